"""Phi-3 / Phi-3.5-vision: transformers' Phi-3 decoder fed by a CLIP vision tower through the HD image embedding.

Module tree and parameter names are those of Microsoft's checkpoints:

    model.embed_tokens, model.layers.*, model.norm            (transformers' Phi3Model)
    model.vision_embed_tokens.img_processor.vision_model.*    (transformers' CLIPVisionModel)
    model.vision_embed_tokens.glb_GN, .sub_GN                 (learnable separators)
    model.vision_embed_tokens.img_projection.{0,2}            (Linear, GELU, Linear)
    lm_head

Image positions in `input_ids` hold negative ids (`-N` for the N-th image of a sample, as the processor writes
them); the model looks the embedding up at `max(id, 0)` on a copy and overwrites those positions with image
features, so the caller's tensor is never modified.

Packed rows (several samples end to end in one row, `position_ids` restarting at 0 for each, no attention mask:
`data/collate.py` `PackingCollator`) are attended block-diagonally by eager/sdpa attention, through the
variable-length path of flash-attention, and by FlexAttention (`attn_implementation="flex_attention"`) through a
block mask of causal AND same-sample, which transformers builds from the `position_ids` restarts and which skips
the blocks between samples; such a forward never creates a cache (with one, transformers would not see the sample
boundaries). FlexAttention serves the language model only: CLIP's crops are a dense batch without a mask, which
sdpa's fused kernels attend without FlexAttention's compilation, so CLIP then runs sdpa (`vision_attention`).

Supervised-only logits (training): `Phi3VForCausalLM.supervised_logits = True`, or the forward argument
`supervised_logits=True`, makes a training forward with `labels` run the LM head only at the positions whose
(shifted) label is supervised: the same loss and gradients, without the full-vocabulary logits of every position
(`logits` is then None). On CUDA, with Liger installed (`pip install 'phi3v-recipes[liger]'`), the head and the
cross-entropy run as Liger's fused linear cross-entropy. The switch is a module attribute, never saved in
`config.json`; generation and evaluation (no labels, or eval mode) are unaffected.

This file imports only torch, transformers and its sibling `configuration_phi3v` (relatively): it is shipped
verbatim beside every export, where transformers loads it with `trust_remote_code=True` (see docs/export.md).
"""

import inspect
import os
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings
from transformers.models.phi3.modeling_phi3 import Phi3Model, Phi3PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, is_liger_kernel_available, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_phi3v import Phi3VConfig

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the key-value cache argument and output field from `past_key_values` to `cache`; the
# GPU image's transformers (5.17) has the old name. Our signatures take `cache` (and `past_key_values` through
# `deprecate_kwarg`); what we hand to or read from transformers uses the installed version's name.
CACHE = "cache" if "cache" in inspect.signature(Phi3Model.forward).parameters else "past_key_values"
# `deprecate_kwarg` warns before this version and renames silently from it: under the old name transformers' own
# generation passes `past_key_values`, which is then no caller's mistake.
CACHE_RENAME_WARNS_UNTIL = "5.40.0" if CACHE == "cache" else "5.0.0"


def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions whose logits are wanted: the last `logits_to_keep` (0: all), or the given positions (what
    transformers >= 5.22 names `slice_logits_to_keep`; the image's 5.17 lacks it)."""
    if isinstance(logits_to_keep, int):
        return hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
    if logits_to_keep.dtype == torch.bool:
        return hidden_states[logits_to_keep]
    return hidden_states[:, logits_to_keep] if logits_to_keep.dim() == 1 else torch.gather(
        hidden_states, 1, logits_to_keep[..., None].expand(-1, -1, hidden_states.shape[-1]))


# The shard size of the official checkpoints (transformers 4's default): two safetensors files and an index for
# the 8.3 GB bf16 Phi-3.5-vision; one file, no index, for anything under 5 GB.
OFFICIAL_MAX_SHARD_SIZE = "5GB"


class Phi3VCLIPTransformer(nn.Module):
    """CLIP's vision transformer with the checkpoints' module names (`embeddings`, `pre_layrnorm`, `encoder`,
    `post_layernorm`), built from transformers' CLIP blocks. It runs only the first `num_layers` encoder layers:
    Phi-3-V reads features from an inner layer, so later layers and `post_layernorm` never run."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Hidden states [N, 1 + patches, width] after `num_layers` encoder layers (0: the embeddings)."""
        hidden = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        hidden = self.pre_layrnorm(hidden)
        for layer in self.encoder.layers[:num_layers]:
            hidden = layer(hidden, None)
        return hidden


class Phi3VCLIPVisionModel(nn.Module):
    """Holds the CLIP transformer as `vision_model`, the layout of `CLIPVisionModel` in the checkpoints."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = Phi3VCLIPTransformer(config)


class Phi3VImageEmbedding(nn.Module):
    """The HD image embedding: CLIP features of every crop, merged 2x2, laid out as the image, projected.

    For an image whose padded size is `h x w` (multiples of the crop size `c`, 336), with `g` merged tokens per
    crop side (12), the output is, in order:

    1. the `(h/c) x (w/c)` grid of sub-crops as one `(h/c * g) x (w/c * g)` token grid, each row followed by
       `sub_GN` (a learnable "newline");
    2. one `glb_GN` (a learnable separator);
    3. the global view (the whole image resized to one crop) as a `g x g` grid, each row followed by `sub_GN`;

    `(h/c * w/c + 1) * g^2 + 1 + (h/c + 1) * g` vectors in all, projected to the LM width by a 2-layer GELU MLP.
    """

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        vision = config.vision_config
        self.img_processor = Phi3VCLIPVisionModel(vision)
        self.num_vision_layers = config.vision_feature_layers
        self.crop_size = vision.image_size
        self.merged_grid = vision.image_size // vision.patch_size // 2
        dim = 4 * config.image_dim_out
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.img_projection = nn.Sequential(
            nn.Linear(dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        self.freeze_unused()

    def freeze_unused(self) -> None:
        """CLIP layers past the feature layer, and CLIP's post-layernorm, are stored in the checkpoints but never
        run: frozen, no optimizer, DDP bucket or LoRA target waits for their gradients."""
        for module in self.unused_vision_modules():
            module.requires_grad_(False)

    def unused_vision_modules(self) -> list[nn.Module]:
        """CLIP modules that exist for checkpoint compatibility only and never take part in a forward pass."""
        vision_model = self.img_processor.vision_model
        return [*vision_model.encoder.layers[self.num_vision_layers :], vision_model.post_layernorm]

    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """CLIP patch features of `crops` [N, 3, c, c]: the hidden state after `num_vision_layers` layers,
        CLS token dropped, [N, patches, image_dim_out]."""
        return self.img_processor.vision_model(crops, self.num_vision_layers)[:, 1:]

    def merge_2x2(self, features: torch.Tensor) -> torch.Tensor:
        """[N, (2g)^2, C] patch features -> [N, g, g, 4C]: each 2x2 block of patches concatenated, row-major."""
        n, _, channels = features.shape
        g = self.merged_grid
        blocks = features.reshape(n, g, 2, g, 2, channels).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(n, g, g, 4 * channels)

    def with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, cols, D] token grid -> [rows * (cols + 1), D] with `sub_GN` closing every row."""
        rows = grid.shape[0]
        newline = self.sub_GN.reshape(1, 1, -1).expand(rows, 1, -1).to(grid.dtype)
        return torch.cat([grid, newline], dim=1).reshape(-1, grid.shape[-1])

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Image features of a batch of images, concatenated in image order.

        Args:
            pixel_values: [n_images, max_crops, 3, c, c]; entry 0 of each image is its global view, entries
                1.. its sub-crops row-major, the rest zero padding (never run through CLIP).
            image_sizes: [n_images, 2], the padded (height, width) of each image, multiples of `c`.

        Returns:
            [total image tokens, hidden_size].
        """
        image_sizes = torch.as_tensor(image_sizes, device=pixel_values.device).reshape(-1, 2).long()
        crops_h, crops_w = (image_sizes // self.crop_size).unbind(-1)
        real_crops = (crops_h * crops_w + 1).tolist()
        n_images, max_crops = pixel_values.shape[:2]
        if len(real_crops) != n_images or max(real_crops) > max_crops:
            raise ValueError(
                f"pixel_values holds {n_images} images of {max_crops} crops but image_sizes "
                f"{image_sizes.tolist()} asks for {real_crops} crops: pass both as the processor returns them."
            )
        # CLIP sees each image's real crops only, never the zero padding.
        keep = torch.arange(max_crops, device=pixel_values.device)[None] < torch.tensor(
            real_crops, device=pixel_values.device
        )[:, None]
        merged = self.merge_2x2(self.crop_features(pixel_values[keep]))
        merged = merged.to(self.img_projection[0].weight.dtype)

        g, pieces = self.merged_grid, []
        for image, h, w in zip(merged.split(real_crops), crops_h.tolist(), crops_w.tolist(), strict=True):
            glb, subs = image[0], image[1:]
            sub_grid = subs.reshape(h, w, g, g, -1).permute(0, 2, 1, 3, 4).reshape(h * g, w * g, -1)
            pieces += [self.with_newlines(sub_grid), self.glb_GN.reshape(1, -1).to(glb.dtype), self.with_newlines(glb)]
        return self.img_projection(torch.cat(pieces))


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    config: Phi3VConfig
    config_class = Phi3VConfig
    input_modalities = ("image", "text")
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    # The reference module tree aliases the token embedding as `vision_embed_tokens.wte`; a checkpoint written
    # from it (e.g. as pytorch_model.bin) may store that alias. We have no alias: the copy is ignored.
    _keys_to_ignore_on_load_unexpected = [r"^model\.vision_embed_tokens\.wte\.weight$"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # Loading creates fresh parameters (requires_grad=True): freeze the never-run CLIP layers again.
        for module in model.modules():
            if isinstance(module, Phi3VImageEmbedding):
                module.freeze_unused()
        unavailable = getattr(model.config, "_unavailable_attn", None)
        if unavailable and kwargs.get("attn_implementation") is None:
            logger.warning_once(
                f"config.json asks for {unavailable}, which is not installed: this model uses "
                f"{model.config._attn_implementation}. Pass attn_implementation= to choose another."
            )
        return loaded

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether activation checkpointing is on, under the name peft (0.21) still reads when it wraps a model:
        transformers 5.2x renamed it `is_activation_checkpointing` and warns on the old one; 5.17 has only this."""
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args: Any,
        max_shard_size: int | str = OFFICIAL_MAX_SHARD_SIZE,
        **kwargs: Any,
    ) -> None:
        """Save in the official layout: `config.json` as the official one (see `Phi3VConfig.to_dict`), the
        official tensor names in safetensors shards of at most `max_shard_size` with an index when there is more
        than one. `auto_map` entries that would not resolve in `save_directory` (a `<module>.py` that is not
        there, e.g. the reference code of the checkpoint this model was loaded from) are left out; hub references
        (`<repo>--<module>.<Class>`) are kept."""
        config = self.config
        had_map, saved_map = hasattr(config, "auto_map"), getattr(config, "auto_map", None)
        if had_map:
            kept = {key: ref for key, ref in (saved_map or {}).items()
                    if not isinstance(ref, str) or "--" in ref
                    or os.path.isfile(os.path.join(save_directory, ref.rsplit(".", 1)[0] + ".py"))}
            if kept:
                config.auto_map = kept
            else:
                del config.auto_map
        try:
            super().save_pretrained(save_directory, *args, max_shard_size=max_shard_size, **kwargs)
        finally:
            if had_map:
                config.auto_map = saved_map
            elif hasattr(config, "auto_map"):
                del config.auto_map

    def set_attn_implementation(self, attn_implementation: str | dict, **kwargs: Any) -> None:
        """transformers' switch of the attention back-end, CLIP's following `vision_attention`."""
        super().set_attn_implementation(attn_implementation, **kwargs)
        if isinstance(attn_implementation, str):
            self.config.vision_config._attn_implementation = vision_attention(self.config._attn_implementation)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Phi3VImageEmbedding):
            init.zeros_(module.glb_GN)
            init.zeros_(module.sub_GN)
        elif isinstance(module, CLIPVisionEmbeddings):
            init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))


def vision_attention(attn_implementation: str | None) -> str | None:
    """CLIP's attention back-end for the language model's: the same, except sdpa under FlexAttention."""
    return "sdpa" if attn_implementation == "flex_attention" else attn_implementation


def is_packed(position_ids: torch.Tensor | None) -> bool:
    """True when `position_ids` restart inside a row: several samples packed end to end."""
    return position_ids is not None and position_ids.shape[-1] > 1 and bool((position_ids[..., 1:] == 0).any())


class Phi3VModel(Phi3VPreTrainedModel, Phi3Model):
    """Phi-3 decoder whose input embeddings carry image features at the image positions."""

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        # transformers resolved the attention back-end on the top config only; the CLIP blocks read theirs from
        # `vision_config`. Re-assigning through the setter hands it down.
        config._attn_implementation = config._attn_implementation
        config.vision_config._attn_implementation = vision_attention(config._attn_implementation)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.post_init()

    def embed(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings of `input_ids`, with image features at the (negative-id) image positions."""
        image_mask = input_ids < 0
        embeds = self.embed_tokens(input_ids.clamp(min=0))
        n_positions = int(image_mask.sum())
        if n_positions == 0:
            return embeds
        if pixel_values is None or image_sizes is None:
            raise ValueError(
                f"input_ids hold {n_positions} image-token positions but no pixel_values/image_sizes were "
                "given: pass the processor's pixel_values and image_sizes with its input_ids."
            )
        features = self.vision_embed_tokens(pixel_values, image_sizes)
        if features.shape[0] != n_positions:
            raise ValueError(
                f"input_ids hold {n_positions} image-token positions but the {len(image_sizes)} images give "
                f"{features.shape[0]} image features: input_ids, pixel_values and image_sizes must come from "
                "one processor call (same images, same num_crops)."
            )
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))
        return nn.functional.dropout(embeds, self.config.embd_pdrop, self.training)

    @deprecate_kwarg("past_key_values", CACHE_RENAME_WARNS_UNTIL, new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes)
        if use_cache is not False and cache is None and attention_mask is None and is_packed(position_ids):
            use_cache = False  # a cache would hide the packed samples' boundaries from the attention mask
        return super().forward(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE: cache},
            **kwargs,
        )


def _liger_fused_linear_cross_entropy():
    """Liger's fused linear cross-entropy function, or None when liger-kernel is not installed."""
    if not is_liger_kernel_available():
        return None
    # In a try block: transformers' check of a remote-code file's imports (4.x and 5.x alike) then does not
    # require liger-kernel.
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


class Phi3VForCausalLM(Phi3VPreTrainedModel, GenerationMixin):
    """Phi-3-V with its language-model head: the class of the released checkpoints."""

    supervised_logits: bool = False
    """Training switch: with labels, in train mode, run the LM head only where the shifted label is supervised
    (see the module docstring). A module attribute, not a config field: never written to `config.json`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def unused_parameter_names(self) -> list[str]:
        """Names of the stored parameters that never take part in a forward pass (see `Phi3VImageEmbedding`)."""
        unused = {id(p) for m in self.model.vision_embed_tokens.unused_vision_modules() for p in m.parameters()}
        return [name for name, p in self.named_parameters() if id(p) in unused]

    @can_return_tuple
    @deprecate_kwarg("past_key_values", CACHE_RENAME_WARNS_UNTIL, new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        supervised_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(n_images, num_crops + 1, 3, 336, 336)`, *optional*):
            All images of the batch in order (sample by sample, image by image), as the processor returns them.
        image_sizes (`torch.LongTensor` of shape `(n_images, 2)`, *optional*):
            Padded (height, width) of each image, as the processor returns them.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Target ids, -100 where no loss is taken; shifted inside the loss.
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            Compute logits for the last `int` positions only, or for the given positions.
        supervised_logits (`bool`, *optional*):
            With `labels`, in train mode: compute the loss from the logits of the supervised positions only and
            return `logits=None`. Defaults to the model's `supervised_logits` attribute.
        """
        if labels is not None and use_cache is None:
            use_cache = False  # a loss pass never needs a cache
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        supervised_only = self.supervised_logits if supervised_logits is None else supervised_logits
        loss = logits = None
        if labels is not None and supervised_only and self.training:
            loss = self.supervised_loss(outputs.last_hidden_state, labels, **kwargs)
        else:
            logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE: getattr(outputs, CACHE)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def supervised_loss(
        self,
        hidden_states: torch.Tensor,
        labels: torch.LongTensor,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """transformers' causal-LM loss (labels shifted left, fp32 cross-entropy, summed over `num_items_in_batch`
        when given, else averaged) from the LM head applied at the supervised positions only."""
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_labels = shift_labels.to(hidden_states.device)
        keep = shift_labels != ignore_index
        hidden, targets = hidden_states[keep], shift_labels[keep]
        reduction = "sum" if num_items_in_batch is not None else "mean"
        fused = _liger_fused_linear_cross_entropy() if hidden.is_cuda and type(self.lm_head) is nn.Linear else None
        if fused is not None:  # the head's matmul and the cross-entropy in chunks, never all logits at once
            weight = self.lm_head.weight.to(hidden.dtype)  # e.g. fp32 master weights under bf16 autocast
            loss = fused(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction)
            loss = loss[0] if isinstance(loss, tuple) else getattr(loss, "loss", loss)
        else:
            logits = self.lm_head(hidden).float()
            loss = nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
        if reduction == "sum":
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    @deprecate_kwarg("past_key_values", CACHE_RENAME_WARNS_UNTIL, new_name="cache")
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        # Phi-3's long-rope factors switch once the sequence passes `original_max_position_embeddings`; the cache
        # built with the short factors is then stale and the whole sequence is run again (as transformers' Phi-3).
        limit = self.config.original_max_position_embeddings
        if cache is not None and input_ids.shape[1] > limit and cache.get_seq_length() <= limit:
            cache = None
            kwargs["next_sequence_length"] = None
        model_inputs = super().prepare_inputs_for_generation(input_ids, **{CACHE: cache}, **kwargs)
        # Images are encoded whenever the step's input holds image positions: at prefill, and again if the
        # cache was dropped above. Decoding steps reuse the cached keys and values.
        step_ids = model_inputs.get("input_ids")
        if step_ids is not None and bool((step_ids < 0).any()):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_sizes"] = image_sizes
        return model_inputs


def set_supervised_logits(model: nn.Module, enabled: bool) -> int:
    """Turn supervised-only logits on or off for every `Phi3VForCausalLM` inside `model` (a peft or DeepSpeed
    wrapper included); returns how many were found."""
    found = [m for m in model.modules() if isinstance(m, Phi3VForCausalLM)]
    for module in found:
        module.supervised_logits = bool(enabled)
    return len(found)


__all__ = ["set_supervised_logits", "Phi3VForCausalLM", "Phi3VModel", "Phi3VPreTrainedModel", "Phi3VImageEmbedding"]
