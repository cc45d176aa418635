"""The training loop: Hugging Face's `Trainer`, with what a long run on shared hardware needs.

`RecipeTrainer` is the one place where the recipe changes how the `Trainer` steps, batches and saves:

- batches: `get_train_dataloader` (padding, length grouping or padding-free packing: `data/batching.py`);
- steps: problem samples reported by the collator (`skipped`, `error` keys of a batch) are consumed before the
  model sees the batch;
- saves: checkpoints (`_save_checkpoint`) and the final model.

Everything else is the stock `Trainer`.
"""

from typing import Any

from omegaconf import DictConfig
from transformers import Trainer


class RecipeTrainer(Trainer):
    """`Trainer` for one recipe run; `recipe` is the composed configuration."""

    def __init__(self, *args: Any, recipe: DictConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
