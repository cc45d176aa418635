"""Configuration of Phi-3 / Phi-3.5-vision (`model_type: phi3_v`).

The language-model fields are those of transformers' `Phi3Config`. On top of them, the official
`config.json` carries two dicts that describe the vision side:

- `img_processor`: `{name: clip_vision_model, model_name: openai/clip-vit-large-patch14-336,
  image_dim_out: 1024, num_img_tokens: 144, layer_idx: -2, type_feature: patch}`;
- `embd_layer`: `{embedding_cls: image, use_hd_transform: true, with_learnable_separator: true,
  hd_transform_order: sub_glb, projection_cls: mlp}`.

The official file does not spell out the CLIP architecture: `model_name` implies CLIP ViT-L/14-336.
`vision_config` makes it explicit for other towers (we write it when saving a model whose tower is not CLIP
ViT-L/14-336), and lets tests build tiny models.

`config.json` is written in the official layout (`to_dict`), the one Microsoft's reference configuration class
and vLLM read: `rope_scaling: {type, short_factor, long_factor}` and `rope_theta` instead of transformers 5's
`rope_parameters`, `torch_dtype` instead of `dtype`, `_attn_implementation` and `_name_or_path` as the official
files record them. Reading accepts both that layout and transformers 5's.

This file imports only transformers (it is shipped verbatim beside every export, see docs/export.md). Under
transformers 4 (the reference code's era) the class loads as a plain `Phi3Config` with the vision dicts as
attributes, for processors and tools that read the configuration; the model itself needs transformers 5.
"""

import os
from contextvars import ContextVar
from typing import Any

from transformers import CLIPVisionConfig, Phi3Config
from transformers.utils import is_flash_attn_2_available

try:  # transformers >= 5.20 builds declared sub-configs itself
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # older transformers (the GPU image's 5.17, 4.x): `sub_configs` below, built in __post_init__
    SubConfigSpec = None


CLIP_VIT_L_14_336 = "openai/clip-vit-large-patch14-336"

# Set while transformers computes a diff of its own layout (see `Phi3VConfig.to_diff_dict`).
_TRANSFORMERS_LAYOUT: ContextVar[bool] = ContextVar("phi3v_transformers_layout", default=False)

# What the official config.json records as `_attn_implementation`. It is a preference of the machine a model was
# saved on, not a property of the weights: our loader falls back to sdpa without flash-attn (see __post_init__),
# the reference code takes `_attn_implementation="eager"` at load time, vLLM ignores it.
OFFICIAL_ATTN_IMPLEMENTATION = "flash_attention_2"

# The official name of transformers' `longrope` in `rope_scaling.type` (the only type the reference
# configuration class accepts besides `yarn`).
OFFICIAL_LONGROPE_TYPE = "su"

# CLIP ViT-L/14 at 336 px, the vision tower of every released Phi-3-V checkpoint.
CLIP_VIT_L_14_336_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}

DEFAULT_IMG_PROCESSOR: dict[str, Any] = {
    "name": "clip_vision_model",
    "model_name": CLIP_VIT_L_14_336,
    "image_dim_out": 1024,
    "num_img_tokens": 144,
    "layer_idx": -2,
    "type_feature": "patch",
}

# Fields of `img_processor` that the official files leave out, with the value the reference code then uses.
REFERENCE_IMG_PROCESSOR_DEFAULTS: dict[str, Any] = {"layer_idx": -2, "type_feature": "patch"}

DEFAULT_EMBD_LAYER: dict[str, Any] = {
    "embedding_cls": "image",
    "use_hd_transform": True,
    "with_learnable_separator": True,
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
}


class Phi3VConfig(Phi3Config):
    r"""Configuration of [`Phi3VForCausalLM`]: a Phi-3 language model fed by a CLIP vision tower.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP vision tower. Defaults to CLIP ViT-L/14-336, which is what `img_processor.model_name`
            names in the official checkpoints.
        img_processor (`dict`, *optional*):
            Which CLIP features feed the projector: `layer_idx` (hidden-state index, default -2: the output of
            the second-to-last layer), `type_feature` (`patch`: drop the CLS token), `image_dim_out` (CLIP
            width), `num_img_tokens` (tokens per crop after the 2x2 merge).
        embd_layer (`dict`, *optional*):
            The HD image embedding. Only the configuration of the released checkpoints is implemented:
            HD transform, learnable separators, `sub_glb` order, MLP projector.
    """

    model_type = "phi3_v"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_VIT_L_14_336_CONFIG)
        }
    else:
        sub_configs = {"vision_config": CLIPVisionConfig}

    vision_config: dict | CLIPVisionConfig | None = None
    img_processor: dict | None = None
    embd_layer: dict | None = None

    def __post_init__(self, **kwargs):
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        if self.vision_config is None and self.img_processor["model_name"] != CLIP_VIT_L_14_336:
            raise ValueError(
                f"img_processor.model_name is {self.img_processor['model_name']!r}, but only "
                f"{CLIP_VIT_L_14_336!r} is implied without an explicit `vision_config`: pass `vision_config` "
                "(a CLIPVisionConfig or its dict) to use another vision tower."
            )
        # The official config.json records `_attn_implementation: flash_attention_2`: a preference of the machine
        # it was saved on, not a property of the weights. An explicit `attn_implementation=` wins over it, and
        # without flash-attn installed it falls back to the default (sdpa); a model built by `from_pretrained`
        # says so (modeling_phi3v), a config read for its tokenizer alone does not.
        saved_attn = kwargs.pop("_attn_implementation", None)
        self._unavailable_attn = None
        if kwargs.get("attn_implementation") is None and saved_attn is not None:
            if saved_attn == "flash_attention_2" and not is_flash_attn_2_available():
                self._unavailable_attn = saved_attn
            else:
                kwargs["attn_implementation"] = saved_attn
        if SubConfigSpec is None and not isinstance(self.vision_config, CLIPVisionConfig):
            self.vision_config = CLIPVisionConfig(**(self.vision_config or CLIP_VIT_L_14_336_CONFIG))
        super().__post_init__(**kwargs)
        self._check_vision_fields()

    def convert_rope_params_to_dict(self, default_theta: int | float = 10_000.0, ignore_keys=None, **kwargs):
        # The official files say `rope_scaling: {type: su, ...}`. transformers renames `su` to `longrope`
        # only after it has decided which keys `longrope` needs, so it then misses
        # `original_max_position_embeddings`. Rename first.
        rope_scaling = kwargs.get("rope_scaling") or self.rope_parameters
        if isinstance(rope_scaling, dict):
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type in ("su", "yarn"):
                rope_scaling = {k: v for k, v in rope_scaling.items() if k != "type"}
                rope_scaling["rope_type"] = "longrope"
                if "rope_scaling" in kwargs:
                    kwargs["rope_scaling"] = rope_scaling
                else:
                    self.rope_parameters = rope_scaling
        return super().convert_rope_params_to_dict(default_theta=default_theta, ignore_keys=ignore_keys, **kwargs)

    def _check_vision_fields(self) -> None:
        embd, proc, vision = self.embd_layer, self.img_processor, self.vision_config
        expected = {
            "embedding_cls": "image",
            "use_hd_transform": True,
            "with_learnable_separator": True,
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
        }
        for key, value in expected.items():
            if embd.get(key) != value:
                raise ValueError(
                    f"embd_layer.{key}={embd.get(key)!r} is not supported: phi3v-recipes implements the released "
                    f"Phi-3-V image embedding ({key}={value!r})."
                )
        if proc["type_feature"] != "patch":
            raise ValueError(f"img_processor.type_feature={proc['type_feature']!r} is not supported; use 'patch'.")
        if proc["image_dim_out"] != vision.hidden_size:
            raise ValueError(
                f"img_processor.image_dim_out={proc['image_dim_out']} must equal the CLIP width "
                f"vision_config.hidden_size={vision.hidden_size}."
            )
        grid = vision.image_size // vision.patch_size
        if vision.image_size % vision.patch_size or grid % 2:
            raise ValueError(
                f"vision_config image_size={vision.image_size} / patch_size={vision.patch_size} must give an even "
                "patch grid: the image embedding merges 2x2 patches."
            )
        if proc["num_img_tokens"] != (grid // 2) ** 2:
            raise ValueError(
                f"img_processor.num_img_tokens={proc['num_img_tokens']} does not match the CLIP patch grid "
                f"({grid}x{grid} patches merge 2x2 into {(grid // 2) ** 2} tokens per crop)."
            )
        layer_idx = proc["layer_idx"]
        if not -(vision.num_hidden_layers + 1) <= layer_idx <= vision.num_hidden_layers:
            raise ValueError(
                f"img_processor.layer_idx={layer_idx} must index CLIP's hidden states "
                f"(0..{vision.num_hidden_layers} or -1..-{vision.num_hidden_layers + 1})."
            )

    # ------------------------------------------------------------------ config.json in the official layout

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("_unavailable_attn", None)  # what this machine lacks is no property of the model
        return output if _TRANSFORMERS_LAYOUT.get() else self._official_layout(output)

    def to_diff_dict(self) -> dict[str, Any]:
        # The diff drops values equal to transformers' defaults; the official files list every key. transformers
        # computes the diff on its own layout (reading `torch_dtype` back as an attribute would only warn).
        full = self.to_dict()
        token = _TRANSFORMERS_LAYOUT.set(True)
        try:
            diff = self._official_layout(super().to_diff_dict())
        finally:
            _TRANSFORMERS_LAYOUT.reset(token)
        for key in OFFICIAL_KEYS:
            if key in full:
                diff[key] = full[key]
        return dict(sorted(diff.items()))

    def _official_layout(self, output: dict[str, Any]) -> dict[str, Any]:
        """Rewrite transformers 5's serialisation of this config into the keys of the official `config.json`."""
        output = dict(output)
        if "rope_parameters" in output or "rope_scaling" not in output:
            output.pop("rope_parameters", None)
            output.update(self.official_rope_fields())
        dtype = output.pop("dtype", None)
        if dtype is None and getattr(self, "dtype", None) is not None:
            dtype = self.dtype
        if dtype is not None:
            output["torch_dtype"] = str(dtype).removeprefix("torch.")
        output["_attn_implementation"] = OFFICIAL_ATTN_IMPLEMENTATION
        output["_name_or_path"] = portable_name(getattr(self, "_name_or_path", "") or "")
        if output.get("architectures") is None:
            output["architectures"] = ["Phi3VForCausalLM"]
        # The reference code assumes layer_idx -2 and type_feature `patch` when absent, as the official files are.
        output["img_processor"] = {
            key: value for key, value in self.img_processor.items()
            if key not in REFERENCE_IMG_PROCESSOR_DEFAULTS or value != REFERENCE_IMG_PROCESSOR_DEFAULTS[key]
        }
        vision = output.get("vision_config")
        if isinstance(vision, dict) and self.img_processor.get("model_name") == CLIP_VIT_L_14_336 and all(
            vision.get(key) == value for key, value in CLIP_VIT_L_14_336_CONFIG.items()
        ):
            # Implied by `img_processor.model_name`, as in the official files.
            output.pop("vision_config")
        return output

    def official_rope_fields(self) -> dict[str, Any]:
        """`rope_theta`, `rope_scaling` (None for plain RoPE) and, when not 1, `partial_rotary_factor`, as the
        official `config.json` spells them: transformers' `longrope` is written as `su` with its two factor lists
        only (the reference configuration class rejects any other key)."""
        rope = dict(self.rope_parameters or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        fields: dict[str, Any] = {"rope_theta": rope.pop("rope_theta", 10_000.0)}
        partial = rope.pop("partial_rotary_factor", 1.0)
        if partial != 1.0:
            fields["partial_rotary_factor"] = partial
        if rope_type == "default":
            fields["rope_scaling"] = None
        elif rope_type == "longrope":
            fields["rope_scaling"] = {
                "type": OFFICIAL_LONGROPE_TYPE,
                "short_factor": list(rope["short_factor"]),
                "long_factor": list(rope["long_factor"]),
            }
        else:
            rope.pop("original_max_position_embeddings", None)
            fields["rope_scaling"] = {"type": rope_type, **rope}
        return fields

    @property
    def vision_feature_layers(self) -> int:
        """How many CLIP encoder layers run: the features are the output of the last one of them."""
        layer_idx = self.img_processor["layer_idx"]
        n = self.vision_config.num_hidden_layers
        return layer_idx if layer_idx >= 0 else n + 1 + layer_idx

    @property
    def image_dim_out(self) -> int:
        return self.img_processor["image_dim_out"]


def portable_name(name_or_path: str) -> str:
    """`_name_or_path` as a saved file records it: a hub id or a model name as is, a local absolute path reduced to
    its last component (the official files say `Phi-3.5-vision-instruct`), so that no file written on one machine
    names a directory of it."""
    name = str(name_or_path)
    return os.path.basename(os.path.normpath(name)) if os.path.isabs(name) else name


# Every key of the official Phi-3.5-vision-instruct / Phi-3-vision-128k-instruct `config.json`: always written.
OFFICIAL_KEYS = (
    "_attn_implementation", "_name_or_path", "architectures", "attention_dropout", "auto_map", "bos_token_id",
    "embd_layer", "embd_pdrop", "eos_token_id", "hidden_act", "hidden_size", "img_processor", "initializer_range",
    "intermediate_size", "max_position_embeddings", "model_type", "num_attention_heads", "num_hidden_layers",
    "num_key_value_heads", "original_max_position_embeddings", "pad_token_id", "resid_pdrop", "rms_norm_eps",
    "rope_scaling", "rope_theta", "sliding_window", "tie_word_embeddings", "torch_dtype", "transformers_version",
    "use_cache", "vocab_size",
)

__all__ = ["CLIP_VIT_L_14_336_CONFIG", "OFFICIAL_KEYS", "Phi3VConfig", "portable_name"]
