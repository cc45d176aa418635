"""The strategy switch: what trains, applied in one place after the model loads.

    full           every weight (DeepSpeed ZeRO-2 where the hardware has it)
    frozen_vision  everything but the CLIP tower (the projector and separators still train)
    lora           peft LoRA adapters; base weights frozen
    qlora          LoRA over a 4-bit NF4 language model (`quantization_config` is used at load time)

CLIP layers after the feature layer never run (see `Phi3VImageEmbedding`): they stay frozen and get no adapter.
"""

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from phi3v_recipes.errors import ConfigError

log = logging.getLogger(__name__)

VISION_PREFIX = "model.vision_embed_tokens."
CLIP_PREFIX = VISION_PREFIX + "img_processor."


def quantization_config(cfg: DictConfig) -> Any | None:
    """The bitsandbytes config a qlora strategy loads the model with; None for the others."""
    quant = cfg.strategy.get("quantization")
    if not quant:
        return None
    from transformers import BitsAndBytesConfig

    if quant.bits != 4:
        raise ConfigError(f"strategy.quantization.bits={quant.bits}: only 4-bit QLoRA is supported.")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
        llm_int8_skip_modules=list(quant.skip_modules),
    )


def lora_target_modules(model: torch.nn.Module, cfg: DictConfig) -> list[str]:
    """Full names of the modules that get adapters: the language-model targets, plus CLIP's and the projector's
    unless the vision tower is frozen; never a CLIP layer that does not run."""
    lora = cfg.strategy.lora
    unused = {name for name, _ in _unused_modules(model)}
    lm = tuple(lora.target_modules)
    vision = () if cfg.strategy.freeze_vision else tuple(lora.vision_target_modules)
    names, matched, leaves = [], set(), {False: set(), True: set()}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) and not _is_quantized_linear(module):
            continue
        if any(name.startswith(u + ".") or name == u for u in unused):
            continue
        in_vision = name.startswith(VISION_PREFIX)
        parts = name.split(".")
        leaves[in_vision].add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])  # img_projection.0
        hits = [t for t in (vision if in_vision else lm) if name == t or name.endswith("." + t)]
        if hits:
            names.append(name)
            matched.update((in_vision, t) for t in hits)
    for key, in_vision, targets in (("target_modules", False, lm), ("vision_target_modules", True, vision)):
        missing = [t for t in targets if (in_vision, t) not in matched]
        if missing:
            part = "the vision tower and projector" if in_vision else "the language model"
            raise ConfigError(f"strategy.lora.{key}: {missing} match no linear layer of {part}; its linear "
                              f"layers end in {', '.join(sorted(leaves[in_vision]))}.")
    return names


def apply_strategy(model: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    """Freeze, quantize-prepare and wrap `model` as the strategy says; log trainable / total parameters."""
    strategy = cfg.strategy
    if strategy.freeze_vision:
        model.model.vision_embed_tokens.img_processor.requires_grad_(False)
    if strategy.get("lora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if strategy.get("quantization"):
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        lora = strategy.lora
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            init_lora_weights=lora.init,
            target_modules=lora_target_modules(model, cfg),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "strategy %s: %s trainable of %s parameters (%.2f%%)", strategy.name, f"{trainable:,}", f"{total:,}",
        100 * trainable / total,
    )
    return model


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The `Phi3VForCausalLM` inside a peft wrapper, or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _unused_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    base = base_model(model)
    unused = {id(m) for m in base.model.vision_embed_tokens.unused_vision_modules()}
    return [(name, m) for name, m in base.named_modules() if id(m) in unused]


def _is_quantized_linear(module: torch.nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")

