"""Loading the processor and the model a config names.

`model.name_or_path` is a hub id, a directory in the official layout, a run directory of ours (full weights or
a LoRA adapter), or `tiny`: a random tiny Phi-3-V whose tokenizer is trained on the task's own text, written
once to `<run dir>/tiny_base` so that every later load (all ranks, QLoRA's 4-bit load, adapters) goes through
the same `from_pretrained` path as a real checkpoint.
"""

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from phi3v_recipes.errors import ConfigError
from phi3v_recipes.model import Phi3VForCausalLM, Phi3VProcessor
from phi3v_recipes.model.tiny import TINY_NUM_IMG_TOKENS, build_tiny_processor, tiny_model_config
from phi3v_recipes.strategy import quantization_config

TINY = "tiny"


def write_tiny_base(path: Path, corpus: Iterable[str], seed: int) -> None:
    """A random tiny model and its processor, saved at `path` (deterministic for a given corpus and seed)."""
    processor = build_tiny_processor(num_img_tokens=TINY_NUM_IMG_TOKENS, corpus=list(corpus))
    torch.manual_seed(seed)
    config = tiny_model_config(vocab_size=len(processor.tokenizer))
    model = Phi3VForCausalLM._from_config(config)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def model_path(cfg: DictConfig, run_dir: Path) -> str:
    """Where the weights come from: `tiny` resolves to the run's tiny base."""
    return str(run_dir / "tiny_base") if cfg.model.name_or_path == TINY else cfg.model.name_or_path


@contextmanager
def _loading(what: str, path: str) -> Iterator[None]:
    """Turn a failed download or an unreadable directory into one sentence naming the setting to change."""
    try:
        yield
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"cannot load the {what} from model.name_or_path={path} ({reason}); give a local directory in the "
            "official layout or a run directory, a hub id with network access (or in the local hub cache), or "
            "model=tiny for the offline demo model."
        ) from None


def load_processor(path: str, num_crops: int | None) -> Phi3VProcessor:
    """The processor saved at `path` (or with its adapter's base), with `num_crops` HD crops per image; None keeps
    the saved crop count (what evaluation and prediction do unless told otherwise)."""
    source = adapter_base(path) or path
    with _loading("processor", path):
        processor = Phi3VProcessor.from_pretrained(path if _has_processor(path) else source)
    if num_crops is not None:
        processor.image_processor.num_crops = num_crops
    return processor


def load_model(cfg: DictConfig, path: str, for_training: bool = True) -> torch.nn.Module:
    """The model at `path` with the configured dtype, attention and (qlora) quantization; a LoRA run directory
    loads its base and attaches the adapter."""
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, cfg.model.dtype),
        "attn_implementation": cfg.model.attn_implementation,
    }
    quant = quantization_config(cfg) if for_training else None
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": local_device()}
    base = adapter_base(path)
    with _loading("model", path):
        model = AutoModelForCausalLM.from_pretrained(base or path, **kwargs)
        if base:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path, is_trainable=for_training)
    return model


def adapter_base(path: str) -> str | None:
    """The base model of a LoRA adapter directory, None for anything else."""
    adapter = Path(path) / "adapter_config.json"
    if not adapter.is_file():
        return None
    return json.loads(adapter.read_text())["base_model_name_or_path"]


def _has_processor(path: str) -> bool:
    return not Path(path).is_dir() or (Path(path) / "preprocessor_config.json").is_file()


def local_device() -> torch.device:
    """This rank's GPU (torchrun's LOCAL_RANK), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
