"""Batching of encoded samples: right-padded rows (`PaddingCollator`) or one padding-free packed row
(`PackingCollator`); images concatenated in sample order either way.

Both follow the dataset contract: a feature that is exactly `{"error": message}` (a sample that failed under
data.on_error=raise) makes the batch `{"error": message}` and nothing else; features' `skipped` lists (samples
replaced by a substitute under data.on_error=skip) are concatenated into `batch["skipped"]`, a key present only
when non-empty. The recipe's trainer consumes both keys before the model sees the batch.

`PackingCollator` lays the samples of a micro-batch end to end in one row `[1, total tokens]`:

- `position_ids` restart at 0 for each sample, and there is no `attention_mask`: transformers' eager and sdpa
  attention then build the block-diagonal causal mask from the restarts (no cache may be used; the model never
  creates one for a packed row), and flash-attention takes its variable-length path. With `flash_kwargs=True` the
  batch also carries that path's `cu_seq_lens_q/k` and `max_length_q/k`, so it needs no device sync to find them.
- the label of each sample's first token is -100, so no sample's first target is predicted from the previous
  sample's last token;
- `pixel_values` / `image_sizes` are the samples' images in row order: the model fills the image positions
  (negative ids, numbered per sample) in that same order, so each sample's features land at its own positions.

Public API: `PaddingCollator(pad_token_id)`, `PackingCollator(flash_kwargs=False)`, `build_collator(data_cfg,
pad_token_id, attn_implementation)` (the one data.packing chooses).
"""

from dataclasses import dataclass
from typing import Any

import torch

from phi3v_recipes.data.encode import IGNORE_INDEX
from phi3v_recipes.errors import ConfigError

__all__ = ["PackingCollator", "PaddingCollator", "build_collator"]

Feature = dict[str, Any]


def _problems(features: list[Feature]) -> dict[str, Any] | None:
    """`{"error": ...}` when a feature is an error, else None."""
    for feature in features:
        if "error" in feature:
            return {"error": feature["error"]}
    return None


def _skipped(features: list[Feature], batch: dict[str, Any]) -> dict[str, Any]:
    skipped = [message for f in features for message in f.get("skipped", ())]
    if skipped:
        batch["skipped"] = skipped
    return batch


def _images(features: list[Feature], batch: dict[str, Any]) -> None:
    with_images = [f for f in features if "pixel_values" in f]
    if with_images:
        batch["pixel_values"] = torch.cat([f["pixel_values"] for f in with_images])
        batch["image_sizes"] = torch.cat([f["image_sizes"] for f in with_images])


@dataclass
class PaddingCollator:
    """Right-padded `input_ids` (with `pad_token_id`), `labels` (-100) and an `attention_mask`."""

    pad_token_id: int

    def __call__(self, features: list[Feature]) -> dict[str, Any]:
        if error := _problems(features):
            return error
        length = max(f["input_ids"].shape[0] for f in features)
        batch: dict[str, Any] = {
            "input_ids": torch.full((len(features), length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros(len(features), length, dtype=torch.long),
        }
        for row, feature in enumerate(features):
            n = feature["input_ids"].shape[0]
            batch["input_ids"][row, :n] = feature["input_ids"]
            batch["labels"][row, :n] = feature["labels"]
            batch["attention_mask"][row, :n] = 1
        _images(features, batch)
        return _skipped(features, batch)


@dataclass
class PackingCollator:
    """All samples of the micro-batch in one padding-free row (see the module docstring)."""

    flash_kwargs: bool = False

    def __call__(self, features: list[Feature]) -> dict[str, Any]:
        if error := _problems(features):
            return error
        lengths = [f["input_ids"].shape[0] for f in features]
        labels = []
        for feature in features:
            own = feature["labels"].clone()
            own[0] = IGNORE_INDEX  # never a target across the boundary with the previous sample
            labels.append(own)
        batch: dict[str, Any] = {
            "input_ids": torch.cat([f["input_ids"] for f in features])[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        }
        if self.flash_kwargs:
            bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            batch.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=max(lengths),
                         max_length_k=max(lengths))
        _images(features, batch)
        return _skipped(features, batch)


def build_collator(data_cfg: Any, pad_token_id: int, attn_implementation: str) -> PaddingCollator | PackingCollator:
    """The training collator `data.packing` asks for (flash-attention's varlen arguments with flash_attention_2);
    ConfigError for an unusable token budget."""
    if data_cfg.get("packing", False):
        budget = data_cfg.get("max_tokens_per_row")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ConfigError(f"data.max_tokens_per_row={budget}: packing needs a positive whole number of tokens "
                              "per row (e.g. 16384).")
        return PackingCollator(flash_kwargs=attn_implementation.startswith("flash_attention"))
    return PaddingCollator(pad_token_id)
