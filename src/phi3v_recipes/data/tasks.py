"""Tasks: `task.loader` names a function that returns the train and eval samples of the task.

Each loader returns `(samples, problems)`: `problems` are inputs that could not even be parsed (reported with
`data.on_error` like any other bad sample).
"""

from collections.abc import Callable
from typing import Any

from phi3v_recipes.data import demo
from phi3v_recipes.data.cauldron import load_cauldron, load_docvqa
from phi3v_recipes.data.jsonl import read_jsonl
from phi3v_recipes.data.sample import Sample
from phi3v_recipes.errors import ConfigError

Loaded = tuple[list[Sample], list[str]]


def load_demo(task: Any, split: str) -> Loaded:
    size = task.train_size if split == "train" else task.eval_size
    return demo.make_samples(split, size, list(task.questions), task.seed), []


def load_jsonl(task: Any, split: str) -> Loaded:
    path = task.train_file if split == "train" else task.eval_file
    if path is None:  # task.eval_file is optional: no evaluation
        return [], []
    return read_jsonl(path, task.image_root)


LOADERS: dict[str, Callable[[Any, str], Loaded]] = {
    "demo": load_demo,
    "jsonl": load_jsonl,
    "cauldron": load_cauldron,  # the_cauldron configs with a train/eval holdout: nlvr2, hateful_memes
    "docvqa": load_docvqa,  # DocVQA: the_cauldron docvqa, or the seed's mini split
}


def load_split(task: Any, split: str) -> Loaded:
    """The `split` ("train" or "eval") of the configured task."""
    if task.loader not in LOADERS:
        raise ConfigError(f"task.loader={task.loader} is unknown; choose one of {sorted(LOADERS)}.")
    return LOADERS[task.loader](task, split)
