"""Model geometry from the `model` config group, for tools that build a model without loading weights.

`model.architecture` (conf/model/*.yaml) holds `Phi3VConfig` fields: the released checkpoint's for
`phi3_5_vision` / `phi3_vision`, a scaled-down geometry for `small`; null means the tiny test model
(`tiny_model_config`). The benchmark builds random weights from it; the memory planner counts parameters on the
meta device (no memory, no download).

Public API:
    architecture_config(model_cfg) -> Phi3VConfig
    build_random_model(model_cfg, attn_implementation, seed, device) -> Phi3VForCausalLM   (fp32, random)
    meta_model(config) -> Phi3VForCausalLM                                     (meta device: shapes only)
    parameter_counts(model) -> ParameterCounts
"""

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from phi3v_recipes.errors import ConfigError
from phi3v_recipes.model.configuration_phi3v import Phi3VConfig
from phi3v_recipes.model.modeling_phi3v import Phi3VForCausalLM
from phi3v_recipes.model.tiny import tiny_model_config

__all__ = ["ParameterCounts", "architecture_config", "build_random_model", "meta_model", "parameter_counts"]


def architecture_config(model_cfg: DictConfig, attn_implementation: str | None = None) -> Phi3VConfig:
    """The `Phi3VConfig` that `model.architecture` describes (null: the tiny test model)."""
    arch = model_cfg.get("architecture", "missing")
    if isinstance(arch, str):
        raise ConfigError(
            f"model={model_cfg.get('name')} has no `architecture` (the geometry to build without weights); add one "
            "to its conf/model/*.yaml, or pick model=tiny, small or phi3_5_vision."
        )
    fields: dict[str, Any] = {} if arch is None else OmegaConf.to_container(arch, resolve=True)
    try:
        config = tiny_model_config(**fields) if arch is None else Phi3VConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.architecture of model={model_cfg.get('name')} is not a valid Phi3VConfig: {err}") from None
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def build_random_model(model_cfg: DictConfig, attn_implementation: str, seed: int,
                       device: torch.device | str = "cpu") -> Phi3VForCausalLM:
    """A randomly initialised fp32 model of `model.architecture`, built on `device` (the same weights for the same
    seed on the same device)."""
    config = architecture_config(model_cfg)
    torch.manual_seed(seed)
    with torch.device(device):
        return Phi3VForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a `Phi3VForCausalLM`, by part. `unused` are stored CLIP parameters that never run
    (layers after the feature layer, post-layernorm); every other count excludes them."""

    total: int
    unused: int
    clip: int
    projector: int          # glb_GN, sub_GN and the 2-layer MLP projector
    embed_tokens: int
    lm_head: int
    lm_body: int            # decoder layers and the final norm
    linear_shapes: dict[str, tuple[int, int]]  # (in, out) of every nn.Linear that runs, by module name

    @property
    def used(self) -> int:
        return self.total - self.unused


def meta_model(config: Phi3VConfig) -> Phi3VForCausalLM:
    """`Phi3VForCausalLM(config)` on the meta device: every shape, no memory."""
    with torch.device("meta"):
        return Phi3VForCausalLM._from_config(config)


def parameter_counts(model: Phi3VForCausalLM) -> ParameterCounts:
    """Count the parameters of `model` by part (build it with `meta_model` to allocate nothing)."""
    unused_names = set(model.unused_parameter_names())
    parts = dict(clip=0, projector=0, embed_tokens=0, lm_head=0, lm_body=0)
    unused = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name in unused_names:
            unused += n
        elif name.startswith("model.vision_embed_tokens.img_processor."):
            parts["clip"] += n
        elif name.startswith("model.vision_embed_tokens."):
            parts["projector"] += n
        elif name.startswith("model.embed_tokens."):
            parts["embed_tokens"] += n
        elif name.startswith("lm_head."):
            parts["lm_head"] += n
        else:
            parts["lm_body"] += n
    unused_modules = {id(m) for m in model.model.vision_embed_tokens.unused_vision_modules()}
    skip = {id(s) for m in model.modules() if id(m) in unused_modules for s in m.modules()}
    shapes = {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and id(m) not in skip
    }
    total = sum(p.numel() for p in model.parameters())
    return ParameterCounts(total=total, unused=unused, linear_shapes=shapes, **parts)
