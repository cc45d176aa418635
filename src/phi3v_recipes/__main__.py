"""`python -m phi3v_recipes [overrides]`: compose task x strategy x hardware with Hydra and train.

    python -m phi3v_recipes                                      # the built-in demo, on CPU
    torchrun --nproc_per_node=8 -m phi3v_recipes task=nlvr2 strategy=full hardware=a100 optim.lr=2e-5
    python -m phi3v_recipes -m task=demo optim.lr=1e-4,3e-4      # a sweep (see conf/train.yaml)
    python -m phi3v_recipes -m hydra/sweeper=optuna 'optim.lr=tag(log, interval(1e-4, 1e-2))'   # a study
"""

import logging
import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from phi3v_recipes.cli import one_sentence_errors, register_resolvers, tell_deepspeed_cpu
from phi3v_recipes.cluster import launch_overrides
from phi3v_recipes.config import validate

register_resolvers()
# The tokenizer runs in the main process before the DataLoader forks its workers: keep it single-threaded there.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("phi3v_recipes")


@one_sentence_errors
@hydra.main(version_base="1.3", config_path="pkg://phi3v_recipes.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; record how the launch ended (status.json); return the selection score (what a sweeper optimises)."""
    from phi3v_recipes.status import train_and_record

    return train_and_record(checked_run, cfg)


def checked_run(cfg: DictConfig) -> dict[str, Any]:
    """Log the command, check the settings, then import the recipe and train. The settings are checked before
    torch and transformers load (about 8 s of imports on our CI machines), so that a mistake is one sentence
    within a second or two of start-up."""
    log.info("command: %s", " ".join(sys.orig_argv))
    log.info("overrides: %s", " ".join(launch_overrides()) or "none")
    validate(cfg)
    tell_deepspeed_cpu(cfg.hardware.name == "cpu")
    from phi3v_recipes.train import run

    return run(cfg)


if __name__ == "__main__":
    main()
