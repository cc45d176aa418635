"""Auto classes resolve our native classes for official-layout and saved directories, without remote code; the
processor's output feeds the model directly."""

import json
import logging

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor
from transformers.utils import is_flash_attn_2_available
from transformers.utils import logging as hf_logging

from phi3v_recipes.model import Phi3VConfig, Phi3VForCausalLM, Phi3VProcessor
from phi3v_recipes.model.tiny import TINY_NUM_IMG_TOKENS, build_tiny_processor, tiny_model_config
from tests.conftest import official_preprocessor_config


def official_layout_checkpoint(path) -> Phi3VForCausalLM:
    """A tiny checkpoint laid out like the hub's: remote-code auto_map, rope `su`, flash attention recorded,
    bf16 dtype, an official-style preprocessor_config.json and a tokenizer without processor files."""
    torch.manual_seed(0)
    model = Phi3VForCausalLM._from_config(tiny_model_config())
    model.save_pretrained(path)
    build_tiny_processor().tokenizer.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(
        auto_map={
            "AutoConfig": "configuration_phi3_v.Phi3VConfig",
            "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        },
        _attn_implementation="flash_attention_2",
        rope_theta=10000.0,
        rope_scaling={"type": "su", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8},
        torch_dtype="float32",
    )
    config.pop("dtype", None)
    (path / "config.json").write_text(json.dumps(config))
    (path / "preprocessor_config.json").write_text(json.dumps(official_preprocessor_config(TINY_NUM_IMG_TOKENS)))
    return model


def test_auto_classes_load_an_official_layout_directory_without_remote_code(tmp_path):
    """AutoConfig, AutoModelForCausalLM and AutoProcessor return our classes for a directory whose files point
    at remote code, with every tensor loaded and no trust_remote_code."""
    original = official_layout_checkpoint(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Phi3VConfig)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model) is Phi3VForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.rope_parameters["rope_type"] == "longrope"
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor) is Phi3VProcessor
    assert processor.image_processor.num_crops == 4


@pytest.mark.skipif(is_flash_attn_2_available(), reason="the fallback happens only without flash-attn")
def test_a_saved_flash_preference_without_flash_attn_is_told_when_a_model_loads_only(tmp_path, caplog):
    """config.json's `_attn_implementation: flash_attention_2` (the official files'), without flash-attn here:
    loading the processor (whose tokenizer reads the config) says nothing, loading the model without
    `attn_implementation=` says once which attention it uses instead, loading it with one says nothing, and a
    saved copy's config.json records the official preference, not what this machine lacks."""
    official_layout_checkpoint(tmp_path / "official")
    told = "config.json asks for flash_attention_2, which is not installed: this model uses sdpa."

    def warnings_while(load) -> list[str]:
        hf_logging.get_logger("phi3v_recipes").warning_once.cache_clear()  # warned once per process otherwise
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loaded = load()
        return loaded, [r.getMessage() for r in caplog.records if "flash_attention_2" in r.getMessage()]

    assert warnings_while(lambda: AutoProcessor.from_pretrained(tmp_path / "official"))[1] == []
    model, told_now = warnings_while(lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "official"))
    assert [m.startswith(told) for m in told_now] == [True] and model.config._attn_implementation == "sdpa"
    explicit = warnings_while(lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "official",
                                                                           attn_implementation="eager"))
    assert explicit[1] == []
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["_attn_implementation"] == "flash_attention_2" and "_unavailable_attn" not in saved


def test_the_reference_embedding_alias_in_a_checkpoint_is_ignored(tmp_path):
    """A checkpoint written from the reference module tree may also store `model.vision_embed_tokens.wte.weight`
    (an alias of the token embedding): it loads with no unexpected key and the embedding is the stored one."""
    from safetensors.torch import load_file, save_file

    original = official_layout_checkpoint(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.vision_embed_tokens.wte.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)


def test_processor_output_feeds_the_model_and_batches_match_single_samples():
    """A right-padded processor batch (2 images, 1 image, text only) through the model gives each sample the
    logits it gets alone (fp32, tolerance 1e-5), and generation decodes."""
    processor = build_tiny_processor(num_crops=2, num_img_tokens=TINY_NUM_IMG_TOKENS)
    torch.manual_seed(0)
    model = Phi3VForCausalLM._from_config(tiny_model_config(), attn_implementation="sdpa").eval()
    red, blue = Image.new("RGB", (500, 300), (220, 20, 20)), Image.new("RGB", (200, 600), (20, 20, 220))
    chat = processor.tokenizer.apply_chat_template
    prompts = [
        chat([{"role": "user", "content": "<|image_1|><|image_2|>\nSame colour?"}], tokenize=False,
             add_generation_prompt=True),
        chat([{"role": "user", "content": "<|image_1|>\nWhat colour?"}], tokenize=False, add_generation_prompt=True),
        chat([{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True),
    ]
    images = [[red, blue], [blue], []]
    batch = processor(prompts, images=images)
    with torch.no_grad():
        logits = model(**batch).logits
        for row, (prompt, imgs) in enumerate(zip(prompts, images, strict=True)):
            alone = processor(prompt, images=imgs or None)
            n = alone["input_ids"].shape[1]
            assert torch.equal(batch["input_ids"][row, :n], alone["input_ids"][0])
            torch.testing.assert_close(logits[row, :n], model(**alone).logits[0], rtol=0, atol=1e-5)
        left = processor(prompts, images=images, padding_side="left")
        out = model.generate(**left, max_new_tokens=3, do_sample=False)
    assert len(processor.batch_decode(out[:, left["input_ids"].shape[1]:])) == 3
