"""`python -m phi3v_recipes.plan task=... strategy=... hardware=... world_size=N [output=plan.json]`: predict the
per-GPU peak memory of the training run that the same overrides describe, whether it fits the hardware profile's
`memory_gib`, and the largest per-device batch (or packed-row token budget, with `data.packing=true`) that fits.

The memory model (bytes per GPU; `P` parameters stored, `T` trainable, `N` = world_size, `wb` bytes per stored
weight, `ab` bytes per activation: 2 under bf16/fp16, else 4):

- weights: `P * wb`; QLoRA stores its quantized linears at 4.127 bits per weight (NF4 plus double-quantized
  absmax, one per 64 weights) or 4.5 bits (plain fp32 absmax), and its fp32 LoRA adapters at 4 bytes;
- optimizer states (AdamW): fp32 `m` and `v` (8 bytes per trainable parameter) plus an fp32 master copy (4) when
  the trained weights are half precision under DeepSpeed; partitioned over `N` from ZeRO stage 1. Without
  DeepSpeed torch's AdamW keeps its states in the parameter dtype (LoRA adapters: fp32);
- gradients: one per trainable parameter in its dtype, partitioned over `N` from ZeRO stage 2; DDP's bucket copy
  of the gradients when `N > 1`;
- DeepSpeed's communication buffers: `reduce_bucket_size + allgather_bucket_size` elements in the gradient dtype,
  times `plan.overlap_comm_buffers` (4.5, DeepSpeed's own rule for `overlap_comm`: "overlap_comm uses 4.5x the
  allgather_bucket_size and reduce_bucket_size values", i.e. 9 GB at the seed's 5e8 buckets) when it is on;
- optimizer-step temporaries (alive only during the step, when activations are gone): DeepSpeed's fp32 copy of
  the gradient partition and `plan.adam_temporaries` fp32 parameter-sized tensors of the foreach AdamW update;
- activations of one micro-batch (b rows of s tokens; padded to the task's longest sample, or one packed row of
  `data.max_tokens_per_row`): with activation checkpointing each decoder layer keeps its input (`h` per token) and
  one layer at a time is recomputed for its backward: `10h + 4i` saved values per token (norms, q/k/v, rotated q/k,
  attention output, residual, gate/up, activation, product) plus `2h + 2i` gradients; without checkpointing every
  layer keeps its `10h + 4i`. CLIP the same way over its crops (`T` = 577 tokens per crop, width `w`, MLP `i`:
  `10w + 4i`), only when gradients flow through it (full, LoRA on the tower); the projector keeps its input and
  output (`4w + 2h` per image token). Eager attention adds `heads * s^2` fp32 scores and their gradient per layer
  recomputed; flash-attention and sdpa keep none. QLoRA dequantizes one linear weight at a time;
- logits: `positions * V * (2ab + 4 * plan.logits_fp32_copies)`: the head's output and its gradient in the
  activation dtype, and the fp32 upcast, log-softmax and gradient of the cross-entropy. Positions are all tokens,
  or with `train.supervised_logits` only the supervised ones;
- the caching allocator holds more than the live tensors (freed blocks stay cached and split, the more so with
  samples of varying length): the live peak is multiplied by `plan.allocator_reserve`. This is what
  `nvidia-smi`, and the upstream table, report; `torch.cuda.max_memory_allocated` reports the live peak;
- `plan.cuda_context_gib`: the CUDA context, library workspaces and NCCL buffers, outside the allocator.

The peak is the larger of the backward peak (activations + logits) and the optimizer-step peak (temporaries), on
top of weights, states, gradients and buckets.
"""

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from phi3v_recipes.cli import exit_on_user_error, one_sentence_errors, register_resolvers
from phi3v_recipes.config import check_settings, gradient_accumulation, uses_deepspeed
from phi3v_recipes.errors import ConfigError
from phi3v_recipes.files import atomic_write_text

register_resolvers()

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _quantized_linear_params(model: Any, skip: list[str]) -> int:
    import torch

    return sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip)
        and name != "lm_head"
    )


class MemoryModel:
    """The per-GPU memory of one training configuration; `peak(rows, tokens)` for a micro-batch shape."""

    def __init__(self, cfg: DictConfig, world: int):
        from phi3v_recipes.model.architecture import architecture_config, meta_model, parameter_counts
        from phi3v_recipes.strategy import lora_target_modules

        self.cfg, self.world = cfg, world
        self.config = architecture_config(cfg.model)
        model = meta_model(self.config)
        self.counts = parameter_counts(model)
        strategy, constants = cfg.strategy, cfg.plan
        if cfg.model.dtype not in DTYPE_BYTES:
            raise ConfigError(f"model.dtype={cfg.model.dtype}: choose one of {sorted(DTYPE_BYTES)}.")
        self.wb = DTYPE_BYTES[cfg.model.dtype]
        self.ab = 2 if cfg.hardware.precision in ("bf16", "fp16") or self.wb == 2 else 4
        self.zero = int(strategy.deepspeed.zero_optimization.stage) if uses_deepspeed(cfg) else 0
        self.lora = bool(strategy.get("lora"))
        self.vision_grads = not strategy.freeze_vision  # gradients flow through CLIP (trained, or LoRA on it)
        self.attn = cfg.model.attn_implementation
        c = self.counts
        if self.lora:
            shapes = dict(c.linear_shapes)
            targets = lora_target_modules(model, cfg)
            self.trainable = sum(strategy.lora.rank * sum(shapes[name]) for name in targets)
        else:
            self.trainable = c.used - (c.clip if strategy.freeze_vision else 0)
        quant = strategy.get("quantization")
        self.quantized = _quantized_linear_params(model, list(quant.skip_modules)) if quant else 0
        self.quant_bits = (4 + 8 / 64 + 32 / (64 * 256)) if quant and quant.double_quant else 4.5
        self.largest_linear = max(i * o for i, o in c.linear_shapes.values())
        self.constants = constants

    # ---- static parts -------------------------------------------------------------------------------------------

    def static(self) -> dict[str, float]:
        c, n, t = self.counts, self.world, self.trainable
        weights = (c.total - self.quantized) * self.wb + self.quantized * self.quant_bits / 8
        ds = self.cfg.strategy.get("deepspeed") if self.zero else None
        opt_part = n if self.zero >= 1 else 1
        grad_part = n if self.zero >= 2 else 1
        if self.lora:  # fp32 adapters (peft casts adapters of half-precision models to fp32)
            weights += 4 * t
            states, grads, grad_dtype = 8 * t, 4 * t, 4
        elif self.zero:
            master = 4 if self.wb < 4 else 0
            states, grads, grad_dtype = (8 + master) * t / opt_part, self.wb * t / grad_part, self.wb
        else:
            states, grads, grad_dtype = 2 * self.wb * t, self.wb * t, self.wb
        if self.zero:
            zo = ds.zero_optimization
            buckets = (float(zo.reduce_bucket_size) + float(zo.allgather_bucket_size)) * grad_dtype
            if zo.get("overlap_comm"):
                buckets *= self.constants.overlap_comm_buffers
            step = 4 * t / opt_part + self.constants.adam_temporaries * 4 * t / opt_part
        else:
            buckets = grads if n > 1 else 0.0  # DDP's gradient buckets
            step = self.constants.adam_temporaries * grad_dtype * t
        return {"weights": weights, "optimizer_states": states, "gradients": grads, "communication_buckets": buckets,
                "optimizer_step_temporaries": step}

    # ---- per micro-batch ----------------------------------------------------------------------------------------

    def activations(self, rows: int, tokens: int, crops: int, image_tokens: int, supervised: int) -> dict[str, float]:
        """Activation and logits bytes of a micro-batch of `rows` rows of `tokens` tokens holding `crops` real
        crops and `image_tokens` image positions, `supervised` of them supervised."""
        cfg, conf, ab = self.cfg, self.config, self.ab
        h, i, layers = conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers
        d = h // conf.num_attention_heads
        kv = (conf.num_key_value_heads or conf.num_attention_heads) * d
        saved = 6 * h + (h + 2 * kv) + kv + 4 * i
        grads = 2 * h + 2 * i
        checkpointing = bool(cfg.train.gradient_checkpointing)
        per_token = (layers * h + saved if checkpointing else layers * saved) + grads + 2 * h
        n_tok = rows * tokens
        lm = n_tok * per_token * ab
        if self.attn == "eager":
            lm += rows * conf.num_attention_heads * tokens**2 * 4 * 2 * (1 if checkpointing else layers)
        v = conf.vision_config
        clip = 0.0
        if self.vision_grads:
            t = (v.image_size // v.patch_size) ** 2 + 1
            w, vi, run = v.hidden_size, v.intermediate_size, conf.vision_feature_layers
            vsaved = 10 * w + 4 * vi
            clip = crops * t * ((run * w + vsaved) if checkpointing else run * vsaved) * ab
            if self.attn == "eager":
                clip += crops * v.num_attention_heads * t * t * 4 * 2 * (1 if checkpointing else run)
        clip += image_tokens * (4 * conf.image_dim_out + 2 * h) * ab
        positions = supervised if cfg.train.get("supervised_logits") else n_tok
        logits = positions * conf.vocab_size * (2 * ab + 4 * self.constants.logits_fp32_copies)
        dequant = self.largest_linear * DTYPE_BYTES.get(cfg.hardware.qlora_compute_dtype, 2) if self.quantized else 0
        return {"activations_lm": lm, "activations_vision": clip, "logits": logits, "dequantized_weight": dequant}

    def peak(self, parts: dict[str, float]) -> dict[str, Any]:
        """Per-GPU peak (bytes) from static and micro-batch parts: the breakdown, its phase and the total."""
        resident = sum(parts[k] for k in ("weights", "optimizer_states", "gradients", "communication_buckets"))
        backward = sum(parts[k] for k in ("activations_lm", "activations_vision", "logits", "dequantized_weight"))
        step = parts["optimizer_step_temporaries"]
        live = resident + max(backward, step)
        reserve = live * (self.constants.allocator_reserve - 1)
        context = self.constants.cuda_context_gib * GIB
        return {"live": live, "allocator_reserve": reserve, "cuda_context": context,
                "total": live + reserve + context, "phase": "backward" if backward >= step else "optimizer step"}


def _longest(samples: list) -> Any:
    return max(samples, key=lambda s: s.length)


def run(cfg: DictConfig) -> dict[str, Any]:
    world = int(cfg.world_size)
    if world < 1:
        raise ConfigError(f"world_size={world} must be >= 1.")
    check_settings(cfg)  # what training refuses, refused here with the same sentences
    gradient_accumulation(cfg, world)
    memory_gib = cfg.hardware.get("memory_gib")
    if memory_gib is None:
        raise ConfigError(f"hardware={cfg.hardware.name} has no memory_gib; pass the device memory as "
                          "hardware.memory_gib=<GiB>.")
    if cfg.get("workload") is None:
        raise ConfigError(f"task={cfg.task.name} has no workload shape (conf/workload/{cfg.task.name}.yaml); pick "
                          "workload=docvqa, hateful_memes or nlvr2 as the closest shape.")
    # transformers and the model code load only after the checks above, so that a mistake is answered at once
    from phi3v_recipes.workload import draw_workload

    model = MemoryModel(cfg, world)
    num_img_tokens = model.config.img_processor["num_img_tokens"]
    samples = draw_workload(cfg.workload, cfg.data.num_crops, num_img_tokens, cfg.plan.workload_seed,
                            samples=cfg.plan.workload_samples)
    longest = _longest(samples)
    mean_len = sum(s.length for s in samples) / len(samples)
    static = model.static()
    packing = bool(cfg.data.get("packing"))

    def predict(rows: int, tokens: int) -> tuple[dict[str, float], dict[str, Any]]:
        # A packed row holds ~tokens / mean_len samples; a padded row one sample of the longest length.
        per_row = tokens / mean_len if packing else 1.0
        crops = rows * per_row * sum(longest.real_crops)
        image_tokens = rows * per_row * sum(longest.image_tokens)
        supervised = rows * per_row * longest.supervised
        parts = {**static, **model.activations(rows, tokens, crops, image_tokens, supervised)}
        return parts, model.peak(parts)

    rows = int(cfg.train.batch_size)
    tokens = int(cfg.data.max_tokens_per_row) if packing else longest.length
    if packing and tokens < longest.length:
        raise ConfigError(f"data.max_tokens_per_row={tokens} is below the task's longest sample ({longest.length} "
                          "tokens); raise it.")
    parts, peak = predict(rows, tokens)
    budget = memory_gib * GIB

    def fits(r: int, t: int) -> bool:
        return predict(r, t)[1]["total"] <= budget

    lo, hi = 0, int(cfg.plan.max_search)
    low_bound = longest.length if packing else 1
    if fits(rows, low_bound) if packing else fits(1, tokens):
        lo = low_bound
        while lo < hi:  # largest value that fits (binary search)
            mid = (lo + hi + 1) // 2
            if fits(rows, mid) if packing else fits(mid, tokens):
                lo = mid
            else:
                hi = mid - 1
    result: dict[str, Any] = {
        "task": cfg.task.name, "strategy": cfg.strategy.name, "hardware": cfg.hardware.name,
        "model": cfg.model.name, "world_size": world, "zero_stage": model.zero,
        "attn_implementation": model.attn, "gradient_checkpointing": bool(cfg.train.gradient_checkpointing),
        "supervised_logits": bool(cfg.train.get("supervised_logits")), "packing": packing,
        "micro_batch": {"rows": rows, "tokens_per_row": tokens},
        "longest_sample_tokens": longest.length, "mean_sample_tokens": round(mean_len, 1),
        "parameters": model.counts.total, "trainable_parameters": model.trainable,
        "per_gpu_peak_gib": round(peak["total"] / GIB, 2), "hardware_memory_gib": memory_gib,
        "fits": peak["total"] <= budget, "peak_phase": peak["phase"],
        "breakdown_gib": {k: round(v / GIB, 3) for k, v in {**parts, **{k: peak[k] for k in
                          ("allocator_reserve", "cuda_context")}}.items()},
    }
    result["max_tokens_per_row" if packing else "max_batch_size"] = lo if lo else 0
    if cfg.output:
        atomic_write_text(Path(cfg.output), json.dumps(result, indent=2) + "\n")
    print(table(result), flush=True)
    return result


def table(result: dict[str, Any]) -> str:
    lines = [f"== plan: task={result['task']} strategy={result['strategy']} hardware={result['hardware']} "
             f"world_size={result['world_size']} (ZeRO stage {result['zero_stage']}) =="]
    lines += [f"  {k:<28} {v:8.2f} GiB" for k, v in result["breakdown_gib"].items()]
    limit = "max_tokens_per_row" if result["packing"] else "max_batch_size"
    lines.append(f"  {'per-GPU peak':<28} {result['per_gpu_peak_gib']:8.2f} GiB of {result['hardware_memory_gib']} "
                 f"({'fits' if result['fits'] else 'does NOT fit'}; peak in the {result['peak_phase']}); "
                 f"{limit} = {result[limit]}")
    return "\n".join(lines)


@one_sentence_errors
@hydra.main(version_base="1.3", config_path="pkg://phi3v_recipes.conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(run, cfg)


if __name__ == "__main__":
    main()
