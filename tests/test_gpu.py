"""GPU-only checks (marked `gpu`, skipped without CUDA; scripts/gpu_check.sh runs them on a CUDA machine):
flash-attention 2 against sdpa in bf16, packed rows through flash-attention's variable-length path and through
FlexAttention (backward included: FlexAttention has none on CPU) against unpacked samples, and one bf16 training
run per strategy (QLoRA's 4-bit kernels included) through the recipe with the profile's attention."""

import importlib.util
import math

import pytest
import torch
from omegaconf import OmegaConf

from phi3v_recipes.data.collate import PackingCollator, PaddingCollator
from phi3v_recipes.model.architecture import build_random_model
from phi3v_recipes.workload import draw_workload
from tests.conftest import ROOT, read_metrics, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"),
]
HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
needs_flash = pytest.mark.skipif(not HAS_FLASH, reason="flash-attn is not installed (pip install '.[flash]')")
BF16 = {"rtol": 3e-2, "atol": 3e-2}  # bf16 keeps 8 bits of mantissa; kernels accumulate in different orders


def _model(attn: str) -> torch.nn.Module:
    model = build_random_model(OmegaConf.load(ROOT / "conf/model/tiny.yaml"), attn, seed=0, device="cuda")
    return model.to(torch.bfloat16)


def _samples(n: int) -> list[dict]:
    workload = OmegaConf.create({"images": [0, 2], "turns": [1, 2], "aspect": [0.5, 1.5], "width": [300, 900],
                                 "prompt_tokens": [4, 20], "answer_tokens": [1, 6], "samples": n})
    model_vocab = _model_vocab()
    return [s.tensors(model_vocab) for s in draw_workload(workload, 4, 36, seed=1)]


def _model_vocab() -> int:
    from phi3v_recipes.model.architecture import architecture_config

    return architecture_config(OmegaConf.load(ROOT / "conf/model/tiny.yaml")).vocab_size


def _cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


@needs_flash
def test_flash_attention_2_logits_match_sdpa_in_bf16():
    """The same bf16 weights give the same logits (to bf16 precision) with flash-attention 2 and with sdpa, images
    included."""
    sdpa, flash = _model("sdpa").eval(), _model("flash_attention_2").eval()
    flash.load_state_dict(sdpa.state_dict())
    for feature in _samples(3):
        batch = _cuda(PaddingCollator(0)([feature]))
        with torch.no_grad():
            expected = sdpa(**batch).logits.float()
            got = flash(**batch).logits.float()
        torch.testing.assert_close(got, expected, **BF16)


@pytest.mark.parametrize("attn", [pytest.param("flash_attention_2", marks=needs_flash), "flex_attention"])
def test_packed_row_matches_unpacked_samples_with_gradients(attn):
    """Samples packed into one row (position_ids restarting; cu_seq_lens from PackingCollator for flash-attention)
    give the loss and gradients of the same samples run one by one, in bf16, through flash-attention 2's varlen
    path and through FlexAttention's document block mask (compiled, forward and backward)."""
    model = _model(attn).train()
    if attn == "flex_attention":
        assert model.config.vision_config._attn_implementation == "sdpa"
    features = _samples(4)
    items = sum(int((f["labels"][1:] != -100).sum()) for f in features)
    packed = _cuda(PackingCollator(flash_kwargs=attn == "flash_attention_2")(features))
    assert ("cu_seq_lens_q" in packed) == (attn == "flash_attention_2")
    loss = model(**packed, num_items_in_batch=items).loss
    loss.backward()
    packed_grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    total = 0.0
    for feature in features:
        out = model(**_cuda(PaddingCollator(0)([feature])), num_items_in_batch=items)
        out.loss.backward()
        total += float(out.loss)
    assert math.isclose(float(loss), total, rel_tol=2e-2)
    for name, grad in packed_grads.items():
        ref = dict(model.named_parameters())[name].grad.float()
        assert torch.linalg.vector_norm(grad - ref) <= 5e-2 * torch.linalg.vector_norm(ref) + 1e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["full", "frozen_vision", "lora", "qlora"])
def test_bf16_training_run_per_strategy(strategy, tmp_path):
    """One short bf16 training run per strategy on the GPU through the recipe's entrypoint (DeepSpeed ZeRO-2 for
    full and frozen_vision, 4-bit NF4 kernels for qlora; packed rows, supervised-only logits; the h100 profile's
    attention: flash-attention 2 with flash-attn installed, else FlexAttention): it finishes with a finite loss
    and saves the model, and its recorded config names the attention that ran."""
    run_dir = tmp_path / "run"
    proc = run_cli(["task=demo", f"strategy={strategy}", "hardware=h100", "model=tiny",
                    "task.train_size=64", "train.max_steps=3",
                    "eval.before=false", "eval.after=false", "data.packing=true", "data.max_tokens_per_row=2048",
                    "train.batch_size=1", "train.global_batch_size=4", f"run.output_dir={run_dir}"],
                   cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = read_metrics(run_dir)
    assert math.isfinite(metrics["train_loss"]) and metrics["global_steps"] == 3
    recorded = OmegaConf.load(run_dir / "config.yaml")
    assert recorded.model.attn_implementation == ("flash_attention_2" if HAS_FLASH else "flex_attention")
