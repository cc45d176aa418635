"""Batching of encoded samples: right padding of ids and labels, images concatenated in sample order.

The seam for padding-free packing: a packing collator returns the same keys plus restarting `position_ids`.
"""

from dataclasses import dataclass

import torch

from phi3v_recipes.data.encode import IGNORE_INDEX


@dataclass
class PaddingCollator:
    pad_token_id: int

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(f["input_ids"].shape[0] for f in features)
        batch = {
            "input_ids": torch.full((len(features), length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros(len(features), length, dtype=torch.long),
        }
        for row, feature in enumerate(features):
            n = feature["input_ids"].shape[0]
            batch["input_ids"][row, :n] = feature["input_ids"]
            batch["labels"][row, :n] = feature["labels"]
            batch["attention_mask"][row, :n] = 1
        with_images = [f for f in features if "pixel_values" in f]
        if with_images:
            batch["pixel_values"] = torch.cat([f["pixel_values"] for f in with_images])
            batch["image_sizes"] = torch.cat([f["image_sizes"] for f in with_images])
        return batch
