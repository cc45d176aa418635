"""`python -m phi3v_recipes [overrides]`: compose task x strategy x hardware with Hydra and train.

    python -m phi3v_recipes                                      # the built-in demo, on CPU
    torchrun --nproc_per_node=8 -m phi3v_recipes task=nlvr2 strategy=full hardware=a100 optim.lr=2e-5
    python -m phi3v_recipes -m task=demo optim.lr=1e-4,3e-4      # a sweep (see conf/train.yaml)
    python -m phi3v_recipes -m hydra/sweeper=optuna 'optim.lr=tag(log, interval(1e-4, 1e-2))'   # a study
"""

import os

import hydra
from omegaconf import DictConfig

from phi3v_recipes.cli import one_sentence_errors, register_resolvers

register_resolvers()
# The tokenizer runs in the main process before the DataLoader forks its workers: keep it single-threaded there.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@one_sentence_errors
@hydra.main(version_base="1.3", config_path="pkg://phi3v_recipes.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; record how the launch ended (status.json); return the selection score (what a sweeper optimises)."""
    from phi3v_recipes.status import train_and_record
    from phi3v_recipes.train import run

    return train_and_record(run, cfg)


if __name__ == "__main__":
    main()
