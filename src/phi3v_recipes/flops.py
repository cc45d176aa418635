"""Model FLOPs of one training sample, by part (CLIP with the projector, LM body, LM head).

Counted from the geometry, matrix multiplications only (2 FLOPs per multiply-add), as MFU is usually counted:

- CLIP, per crop of `T = (image_size / patch_size)^2 + 1` tokens and width `w`: the patch embedding
  `2 (T - 1) 3 p^2 w`, and per encoder layer that runs `2 T (4 w^2 + 2 w i)` for the projections and the MLP
  plus `4 T^2 w` for the attention scores and their weighted sum. Only the layers up to the feature layer run
  (23 of 24 at real size), on the image's real crops (the global view and its sub-crops).
- projector, per image token: `2 (4 w h + h^2)` (the 2-layer MLP), counted with CLIP (the vision side);
- LM body, per token of a sequence of `s` tokens: `2 (h (q + 2 kv) + h^2 + 3 h i)` for the attention and MLP
  projections of each layer, plus `4 s h` for attention (full, not halved for causality: the common convention);
  a packed row attends within each sample, so `s` is the sample's own length;
- LM head: `2 h V` per position, at every position (the model's FLOPs; supervised-only logits compute fewer).

Training is counted as 3x the forward pass (backward = 2x forward), for every part and every strategy, so that
the count is a property of the model and the sample, not of the strategy or the implementation.
"""

from phi3v_recipes.model.configuration_phi3v import Phi3VConfig
from phi3v_recipes.workload import SyntheticSample

__all__ = ["TRAIN_FACTOR", "sample_flops", "shares"]

TRAIN_FACTOR = 3  # forward + backward (2x forward)


def clip_crop_flops(config: Phi3VConfig) -> float:
    """Forward FLOPs of CLIP on one crop (the layers that run)."""
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    tokens, w, i = patches + 1, v.hidden_size, v.intermediate_size
    embed = 2 * patches * 3 * v.patch_size**2 * w
    layer = 2 * tokens * (4 * w * w + 2 * w * i) + 4 * tokens * tokens * w
    return embed + config.vision_feature_layers * layer


def lm_token_flops(config: Phi3VConfig, seq_len: int) -> float:
    """Forward FLOPs of the decoder layers for one token of a sequence of `seq_len` tokens."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads or config.num_attention_heads
    qkv = h * head_dim * (config.num_attention_heads + 2 * kv)
    return config.num_hidden_layers * (2 * (qkv + h * h + 3 * h * i) + 4 * seq_len * h)


def sample_flops(config: Phi3VConfig, sample: SyntheticSample, crops: str = "real") -> dict[str, float]:
    """Training FLOPs of `sample` by part: `clip` (with the projector), `lm_body`, `lm_head`, and `total`.

    `crops="real"` runs CLIP on the real crops only (our model); `"padded"` on all `num_crops + 1` entries of every
    image (the reference's way): the same model FLOPs are then spent partly on zero padding.
    """
    w, h = config.image_dim_out, config.hidden_size
    n_crops = sum(sample.real_crops) if crops == "real" else len(sample.images) * (sample.num_crops + 1)
    projector = 2 * (4 * w * h + h * h) * sum(sample.image_tokens)
    s = sample.length
    parts = {
        "clip": n_crops * clip_crop_flops(config) + projector,
        "lm_body": s * lm_token_flops(config, s),
        "lm_head": 2 * s * h * config.vocab_size,
    }
    parts = {k: TRAIN_FACTOR * v for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def shares(flops: dict[str, float]) -> dict[str, float]:
    """Each part's share of the total, in percent."""
    return {k: 100 * v / flops["total"] for k, v in flops.items() if k != "total"}
