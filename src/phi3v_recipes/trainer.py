"""The training loop: Hugging Face's `Trainer`, with what a long run on shared hardware needs.

`RecipeTrainer` is the one place where the recipe changes how the `Trainer` steps, batches and saves:

- batches: `get_train_dataloader` (padding, length grouping or padding-free packing: `data/batching.py`);
- steps: problem samples reported by the collator (`skipped`, `error` keys of a batch) are consumed before the
  model sees the batch;
- saves: checkpoints (`_save_checkpoint`) and the final model.

Everything else is the stock `Trainer`.
"""

import functools
from typing import Any

from omegaconf import DictConfig
from transformers import Trainer


class RecipeTrainer(Trainer):
    """`Trainer` for one recipe run; `recipe` is the composed configuration."""

    def __init__(self, *args: Any, recipe: DictConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recipe = recipe

    # ------------------------------------------------------------------ adapter saves (branch `export`)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints and the final model as the stock `Trainer` writes them, except that a LoRA adapter holds
        the adapter weights only: peft would add the untouched base `lm_head` because `lm_head` is a LoRA target
        (`save_embedding_layers="auto"`), about 200 MB per save at real size in bf16; the base the adapter loads
        onto has it."""
        from peft import PeftModel

        model = self.model
        if not isinstance(model, PeftModel):
            super()._save(output_dir, state_dict)
            return
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
        try:
            super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained
