"""The training loop: Hugging Face's `Trainer`, with what a long run on shared hardware needs.

`RecipeTrainer` is the one place where the recipe changes how the `Trainer` steps, batches and saves:

- batches: `get_train_dataloader` (padding, length grouping or padding-free packing: `data/batching.py`);
- steps: problem samples reported by the collator (`skipped`, `error` keys of a batch) are consumed before the
  model sees the batch;
- saves: checkpoints (`_save_checkpoint`) and the final model.

Everything else is the stock `Trainer`.
"""

import math
from functools import partial
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import seed_worker


class RecipeTrainer(Trainer):
    """`Trainer` for one recipe run; `recipe` is the composed configuration."""

    def __init__(self, *args: Any, recipe: DictConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recipe = recipe

    # ---- batches (branch `pack`): padding, length grouping or padding-free packing; see data/batching.py ----

    def get_train_dataloader(self) -> DataLoader:
        """The stock loader (random batches of `train.batch_size`) unless `data.packing` (micro-batches of
        `train.batch_size` packed rows of at most `data.max_tokens_per_row` tokens) or `data.group_by_length`
        (batches of similar-length samples) asks for a planned batch sampler. Plans follow `(train.seed, epoch)`;
        accelerate deals the micro-batches to ranks."""
        data = self.recipe.data
        if not (data.get("packing") or data.get("group_by_length")):
            return super().get_train_dataloader()
        from phi3v_recipes.data.batching import LengthGroupedBatchSampler, PackedBatchSampler
        from phi3v_recipes.data.lengths import dataset_lengths

        dataset = self.train_dataset
        lengths = dataset_lengths(dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed

        def epoch() -> int:  # the epoch being started; right after a mid-epoch resume too
            return int(math.floor(self.state.epoch + 1e-9)) if self.state.epoch else 0

        if data.get("packing"):
            samples = getattr(dataset, "samples", None)
            names = [s.where for s in samples] if samples is not None else None
            sampler = PackedBatchSampler(lengths, data.max_tokens_per_row, self.args.per_device_train_batch_size,
                                         seed, epoch_fn=epoch, names=names)
        else:
            sampler = LengthGroupedBatchSampler(lengths, self.args.per_device_train_batch_size, seed,
                                                data.length_group_batches, epoch_fn=epoch)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            worker_init_fn=partial(seed_worker, num_workers=self.args.dataloader_num_workers,
                                   rank=self.args.process_index),
        )
        return self.accelerator.prepare(loader)
