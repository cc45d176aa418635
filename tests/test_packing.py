"""Padding-free packing, length-grouped batching, header-based lengths and supervised-only logits (issue 9).

Tolerances: fp32 on CPU; packed and unpacked runs sum the same terms in a different order, so losses and
gradients agree to float rounding (measured max |diff| ~1e-7); the tests allow atol 1e-6, rtol 1e-5.
"""

import inspect
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from phi3v_recipes.data.batching import (
    LengthGroupedBatchSampler,
    PackedBatchSampler,
    pack_rows,
    padding_fraction,
    row_fill,
)
from phi3v_recipes.data.collate import PackingCollator, PaddingCollator, build_collator
from phi3v_recipes.data.encode import encode_sample
from phi3v_recipes.data.lengths import sample_length
from phi3v_recipes.data.sample import Sample, Turn
from phi3v_recipes.errors import ConfigError
from phi3v_recipes.model.modeling_phi3v import Phi3VForCausalLM, set_supervised_logits
from phi3v_recipes.model.tiny import build_tiny_processor, tiny_model_config
from tests.conftest import SMALL_DEMO, run_cli

TOL = dict(atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(num_crops=4)


def _image(rng: random.Random) -> Image.Image:
    return Image.new("RGB", (rng.randint(90, 800), rng.randint(90, 800)), tuple(rng.randint(0, 255) for _ in "rgb"))


@pytest.fixture(scope="module")
def samples() -> dict[str, list[Sample]]:
    rng = random.Random(0)
    single = [Sample(f"s{i}", [Turn("What is shown here?", "A shape " * (i + 1), (_image(rng),))]) for i in range(3)]
    multi = [
        Sample("m0", [Turn("Compare the two images.", "The left one is darker.", (_image(rng), _image(rng)))]),
        Sample("m1", [Turn("First?", "Yes.", (_image(rng),)), Turn("And this one?", "No, it is not.", (_image(rng),))]),
    ]
    text = [Sample(f"t{i}", [Turn("Say something.", "Hello there " * (i + 2))]) for i in range(2)]
    return {"single": single, "multi": multi, "text": text}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Phi3VForCausalLM._from_config(tiny_model_config(), attn_implementation="sdpa").train()


def losses_and_grads(model, batches, supervised: bool):
    """Trainer semantics: each micro-batch's loss is normalised by the supervised tokens of all micro-batches."""
    model.zero_grad()
    set_supervised_logits(model, supervised)
    n_items = sum((b["labels"][..., 1:] != -100).sum() for b in batches)
    total = torch.zeros(())
    for batch in batches:
        loss = model(**batch, num_items_in_batch=n_items).loss
        loss.backward()
        total += loss.detach()
    set_supervised_logits(model, False)
    return total, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], **TOL)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **TOL, msg=name)


def test_header_lengths_equal_encoded_lengths_without_decoding_pixels(processor, samples, tmp_path):
    """`sample_length` equals the encoded sample's length for single-image, multi-image, multi-turn and text-only
    samples, and needs only image headers: a PNG whose pixel data is cut off still has its length computed; an
    EXIF-rotated photo counts as upright."""
    for group in samples.values():
        for sample in group:
            assert sample_length(sample, processor) == len(encode_sample(sample, processor)["input_ids"])
    path = tmp_path / "page.png"
    Image.new("RGB", (700, 1000), (10, 20, 30)).save(path)
    full = Sample("p", [Turn("Read it.", "Total: 12.", (str(path),))])
    expected = len(encode_sample(full, processor)["input_ids"])
    path.write_bytes(path.read_bytes()[:64])  # header only: decoding the pixels would fail
    assert sample_length(full, processor) == expected
    # EXIF orientation 6 (turned 90 degrees): counted as the upright image that training reads
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.new("RGB", (900, 300)).save(tmp_path / "turned.jpg", exif=exif)
    Image.new("RGB", (300, 900)).save(tmp_path / "upright.jpg")
    turned, upright = (Sample(n, [Turn("Read it.", "No.", (str(tmp_path / f"{n}.jpg"),))]) for n in ("turned", "upright"))
    assert sample_length(turned, processor) == sample_length(upright, processor) != sample_length(
        Sample("w", [Turn("Read it.", "No.", (Image.new("RGB", (900, 300)),))]), processor)


@pytest.mark.parametrize("mix", ["single", "multi", "text", "all"])
def test_packed_step_equals_unpacked_step(model, processor, samples, mix):
    """A step over packed rows (position ids restarting per sample, no attention mask, images in row order) gives
    the loss and gradients of the same samples in right-padded micro-batches, the loss being the mean over all
    supervised tokens of the step (the Trainer's num_items_in_batch), for each mix of samples."""
    group = [s for g in samples.values() for s in g] if mix == "all" else samples[mix]
    encoded = [encode_sample(s, processor) for s in group]
    pad = PaddingCollator(processor.tokenizer.pad_token_id)
    unpacked = losses_and_grads(model, [pad(encoded[i : i + 2]) for i in range(0, len(encoded), 2)], False)
    packed = losses_and_grads(model, [PackingCollator()(encoded)], False)
    assert_same(packed, unpacked)
    if mix == "all":  # the same samples in two packed rows of another composition
        # flash-attention's varlen arguments ride along harmlessly with sdpa
        rows = [PackingCollator(flash_kwargs=True)(encoded[::2]), PackingCollator()(encoded[1::2])]
        assert_same(losses_and_grads(model, rows, False), unpacked)


def test_supervised_only_logits_give_the_same_loss_and_gradients(model, processor, samples, tmp_path):
    """With supervised-only logits the LM head runs at the supervised positions only: loss and every gradient equal
    the full-logit computation, for padded and packed batches; logits are not materialised; in eval mode (as in
    generation) the switch changes nothing; the switch is never written to config.json."""
    encoded = [encode_sample(s, processor) for g in samples.values() for s in g]
    padded = [PaddingCollator(processor.tokenizer.pad_token_id)(encoded[:4]), PaddingCollator(0)(encoded[4:])]
    packed = [PackingCollator()(encoded)]
    for batches in (padded, packed):
        assert_same(losses_and_grads(model, batches, True), losses_and_grads(model, batches, False))
    out = model(**packed[0], supervised_logits=True)
    assert out.logits is None
    full = model(**packed[0])
    torch.testing.assert_close(out.loss, full.loss, **TOL)  # mean reduction without num_items_in_batch
    model.eval()
    try:
        with torch.no_grad():
            kept = model(**packed[0], supervised_logits=True)
        assert kept.logits is not None and kept.logits.shape[:2] == packed[0]["input_ids"].shape
    finally:
        model.train()
    set_supervised_logits(model, True)
    model.config.save_pretrained(tmp_path)
    set_supervised_logits(model, False)
    assert "supervised" not in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_is_attended_per_sample_even_with_the_default_cache(attn, processor, samples):
    """Each sample of a packed row gets exactly the logits it gets alone, with eager and sdpa attention, also when the
    caller does not disable the cache (transformers would otherwise let samples attend to each other)."""
    encoded = [encode_sample(s, processor) for s in samples["single"][:1] + samples["text"] + samples["multi"][:1]]
    torch.manual_seed(0)
    model = Phi3VForCausalLM._from_config(tiny_model_config(), attn_implementation=attn)
    model.eval()
    try:
        with torch.no_grad():
            row = PackingCollator()(encoded)
            row.pop("labels")
            packed = model(**row).logits[0]
            start = 0
            for feature in encoded:
                alone = {k: v for k, v in feature.items() if k != "labels"}
                alone["input_ids"] = alone["input_ids"][None]
                n = feature["input_ids"].shape[0]
                torch.testing.assert_close(packed[start : start + n], model(**alone).logits[0], atol=1e-5, rtol=1e-5)
                start += n
    finally:
        model.train()


def test_collators_keep_the_batch_contract(processor, samples):
    """Both collators: an error feature makes the batch exactly {"error": ...}; `skipped` lists are concatenated
    (key absent when empty). The packing collator restarts position ids per sample, masks each sample's first
    label, and with flash_kwargs gives the varlen boundaries flash-attention would derive from the position ids;
    `build_collator` picks the collator data.packing
    asks for and rejects a token budget below 1."""
    encoded = [encode_sample(s, processor) for s in samples["single"][:2] + samples["text"][:1]]
    for collate in (PaddingCollator(processor.tokenizer.pad_token_id), PackingCollator(flash_kwargs=True)):
        assert collate([encoded[0], {"error": "a.jsonl:3 (id x): gone"}]) == {"error": "a.jsonl:3 (id x): gone"}
        assert "skipped" not in collate(encoded)
        assert collate([dict(encoded[0], skipped=["a"]), encoded[1], dict(encoded[2], skipped=["b", "c"])])[
            "skipped"] == ["a", "b", "c"]
    batch = PackingCollator(flash_kwargs=True)(encoded)
    lengths = [f["input_ids"].shape[0] for f in encoded]
    starts = np.cumsum([0, *lengths])
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    assert batch["position_ids"][0, starts[:-1]].tolist() == [0, 0, 0]
    assert (batch["labels"][0, starts[:-1]] == -100).all()
    assert batch["cu_seq_lens_q"].tolist() == starts.tolist() and batch["max_length_q"] == max(lengths)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])  # what flash derives
    assert torch.equal(batch["cu_seq_lens_q"], cu_q) and torch.equal(batch["cu_seq_lens_k"], cu_k)
    assert (batch["max_length_q"], batch["max_length_k"]) == (int(max_q), int(max_k))
    assert batch["pixel_values"].shape[0] == 2  # the two single-image samples, in row order
    assert isinstance(build_collator({"packing": True, "max_tokens_per_row": 64}, 0, "sdpa"), PackingCollator)
    assert build_collator({"packing": True, "max_tokens_per_row": 64}, 0, "flash_attention_2").flash_kwargs
    assert isinstance(build_collator({"packing": False}, 0, "sdpa"), PaddingCollator)
    with pytest.raises(ConfigError, match="data.max_tokens_per_row=0"):
        build_collator({"packing": True, "max_tokens_per_row": 0}, 0, "sdpa")


def test_packer_and_samplers_cover_every_sample_once_per_epoch_deterministically():
    """Rows hold whole samples within the budget; the packed and the length-grouped samplers yield every sample
    exactly once per epoch, in an order fixed by (seed, epoch) and different across epochs, with the same number of
    micro-batches every epoch; a sample over the budget is a ConfigError naming it."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 900, size=203).tolist()
    rows = pack_rows(lengths, 1000)
    assert sorted(i for r in rows for i in r) == list(range(203))
    assert all(sum(lengths[i] for i in r) <= 1000 for r in rows)
    assert len(rows) <= 1.06 * np.ceil(sum(lengths) / 1000)  # within 6% of the lower bound on the row count
    assert row_fill(rows, lengths, 1000) == pytest.approx(sum(lengths) / (1000 * len(rows)))
    for make in (lambda: PackedBatchSampler(lengths, 1000, rows_per_batch=2, seed=3),
                 lambda: LengthGroupedBatchSampler(lengths, 4, seed=3, group_batches=5)):
        sampler, again = make(), make()
        epochs = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert sorted(i for b in batches for i in b) == list(range(203)) and len(batches) == len(sampler)
            assert batches == again.batches(epoch)
            epochs.append(batches)
        assert epochs[0] != epochs[1]
    with pytest.raises(ConfigError, match=r"doc.jsonl:7 \(id 7\) has 899 tokens"):
        pack_rows([10, 899], 800, names=["a", "doc.jsonl:7 (id 7)"])


def test_length_grouping_reduces_padding():
    """Length-grouped batches of 4 pad far less than random batches of 4 on a spread of sample lengths."""
    lengths = np.random.default_rng(1).integers(300, 3000, size=400).tolist()
    grouped = LengthGroupedBatchSampler(lengths, 4, seed=0).batches(0)
    order = np.random.default_rng(0).permutation(400).tolist()
    random_batches = [order[i : i + 4] for i in range(0, 400, 4)]
    assert padding_fraction(grouped, lengths) < 0.3 * padding_fraction(random_batches, lengths)


def recipe_trainer(**kwargs):
    """A RecipeTrainer; its run directory (where the constructor asks for one) is the arguments' output_dir."""
    from phi3v_recipes.trainer import RecipeTrainer

    if "run_dir" in inspect.signature(RecipeTrainer.__init__).parameters:
        kwargs.setdefault("run_dir", Path(kwargs["args"].output_dir))
    return RecipeTrainer(**kwargs)


def _losses(run_dir) -> dict[int, float]:
    state = max(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) / "trainer_state.json"
    return {e["step"]: e["loss"] for e in json.loads(state.read_text())["log_history"] if "loss" in e}


@pytest.mark.slow
def test_packed_demo_trains_and_resumes_mid_epoch_at_the_right_sample(tmp_path):
    """`python -m phi3v_recipes data.packing=true` trains the demo on packed rows (with activation checkpointing;
    the loss falls); resuming from a
    checkpoint in the middle of the second epoch replays exactly the losses of the uninterrupted run, so the
    packed sampler resumed at the right rows."""
    common = [*SMALL_DEMO, "data.packing=true", "train.gradient_checkpointing=true", "data.max_tokens_per_row=640", "train.batch_size=1",
              "train.global_batch_size=2", "train.save_steps=3", "train.save_total_limit=10", "eval.before=false",
              "eval.after=false"]
    out = run_cli([*common, f"run.output_dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    full = _losses(tmp_path / "a")
    assert len(full) == 10 and full[10] < full[1]  # 48 samples -> 10 rows of <= 640 tokens -> 5 steps per epoch
    resumed = run_cli([*common, f"run.output_dir={tmp_path / 'b'}", f"train.resume={tmp_path / 'a' / 'checkpoint-6'}"],
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _losses(tmp_path / "b")  # the log history carries steps 1-6 over from the checkpoint
    assert sorted(after) == list(range(1, 11))
    for step in range(7, 11):
        assert after[step] == pytest.approx(full[step], rel=1e-6), step


def test_trainer_builds_length_grouped_and_packed_loaders(processor, samples, model, tmp_path):
    """RecipeTrainer's train loader follows the config: data.group_by_length gives padded batches of the
    length-grouped plan, data.packing one packed row per micro-batch; each covers every sample once per epoch."""
    from omegaconf import OmegaConf
    from transformers import TrainingArguments

    from phi3v_recipes.data.dataset import EncodedDataset

    group = [s for g in samples.values() for s in g] * 2
    dataset = EncodedDataset(group, processor, None)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to=[],
                             seed=5, remove_unused_columns=False)
    lengths = [sample_length(s, processor) for s in group]
    for data, collate in [
        (dict(packing=False, group_by_length=True, length_group_batches=2), PaddingCollator(0)),
        (dict(packing=True, max_tokens_per_row=700, group_by_length=False), PackingCollator()),
    ]:
        trainer = recipe_trainer(recipe=OmegaConf.create({"data": data}), model=model, args=args,
                                 train_dataset=dataset, data_collator=collate)
        batches = list(trainer.get_train_dataloader())
        if data["packing"]:
            plan = PackedBatchSampler(lengths, 700, rows_per_batch=2, seed=5).batches(0)
            assert all(b["input_ids"].shape[0] == 1 and "position_ids" in b for b in batches)
        else:
            plan = LengthGroupedBatchSampler(lengths, 2, seed=5, group_batches=2).batches(0)
        assert sorted(i for b in plan for i in b) == list(range(len(group)))
        assert [b["input_ids"].numel() if data["packing"] else b["attention_mask"].sum() for b in batches] == [
            sum(lengths[i] for i in b) for b in plan]


def test_trainer_loss_of_a_packed_step_is_the_mean_over_its_supervised_tokens(processor, samples, tmp_path):
    """Through RecipeTrainer (packed rows, 2 gradient-accumulation micro-steps): the logged loss of the first
    optimizer step equals the plain padded-batch loss of the same samples, the mean over all their supervised
    tokens (the Trainer's num_items_in_batch reaches the model)."""
    from omegaconf import OmegaConf
    from transformers import TrainingArguments

    from phi3v_recipes.data.dataset import EncodedDataset

    group = [s for g in samples.values() for s in g] * 2
    torch.manual_seed(0)
    net = Phi3VForCausalLM._from_config(tiny_model_config(), attn_implementation="sdpa")
    set_supervised_logits(net, True)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             max_steps=1, logging_steps=1, learning_rate=0.0, save_strategy="no", use_cpu=True,
                             report_to=[], seed=5, remove_unused_columns=False, disable_tqdm=True)
    trainer = recipe_trainer(recipe=OmegaConf.create({"data": {"packing": True, "max_tokens_per_row": 700}}),
                             model=net, args=args, train_dataset=EncodedDataset(group, processor, None),
                             data_collator=PackingCollator())
    trainer.train()
    logged = trainer.state.log_history[0]["loss"]
    lengths = [sample_length(s, processor) for s in group]
    first_step = [i for row in PackedBatchSampler(lengths, 700, seed=5).batches(0)[:2] for i in row]
    batch = PaddingCollator(processor.tokenizer.pad_token_id)([encode_sample(group[i], processor) for i in first_step])
    with torch.no_grad():
        expected = net.eval()(**batch).loss.item()
    assert logged == pytest.approx(expected, rel=1e-5)


def test_packed_row_through_flex_attention_equals_the_samples_alone_forward_only(processor, samples):
    """With FlexAttention (what the GPU profiles use without flash-attn), a packed row gives each sample its
    logits alone and the loss of the samples alone, in fp32: the block mask built from the position_ids restarts
    keeps samples apart. CPU, forward only: FlexAttention has no backward pass on CPU (tests/test_gpu.py checks
    it on CUDA). Run unfused (the reference kernel, compilation off): torch.compile of FlexAttention on CPU costs a
    minute and computes the same values (measured max |diff| 2.7e-7 against the samples alone)."""
    encoded = [encode_sample(s, processor) for s in samples["single"][:1] + samples["text"] + samples["multi"][1:]]
    torch.manual_seed(0)
    model = Phi3VForCausalLM._from_config(tiny_model_config(), attn_implementation="flex_attention").eval()
    assert model.config.vision_config._attn_implementation == "sdpa"  # CLIP's dense crops stay on sdpa
    items = sum(int((f["labels"][1:] != -100).sum()) for f in encoded)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        packed = model(**PackingCollator()(encoded), num_items_in_batch=items)
        start, loss = 0, torch.zeros(())
        for feature in encoded:
            alone = model(**PaddingCollator(0)([feature]), num_items_in_batch=items)
            n = feature["input_ids"].shape[0]
            torch.testing.assert_close(packed.logits[0, start : start + n], alone.logits[0], **TOL)
            start, loss = start + n, loss + alone.loss
    torch.testing.assert_close(packed.loss, loss, **TOL)
