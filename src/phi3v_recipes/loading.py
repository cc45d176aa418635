"""Loading the processor and the model a config names: one loader for training, evaluation, prediction and export.

`model.name_or_path` is a hub id, a directory in the official layout, a run directory of ours (full weights or
a LoRA adapter), or `tiny`: a random tiny Phi-3-V whose tokenizer is trained on the task's own text, written
once to `<run dir>/tiny_base` so that every later load (all ranks, QLoRA's 4-bit load, adapters) goes through
the same `from_pretrained` path as a real checkpoint.
"""

import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from huggingface_hub.errors import HFValidationError
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from phi3v_recipes.errors import ConfigError, reason
from phi3v_recipes.model import Phi3VForCausalLM, Phi3VProcessor
from phi3v_recipes.model.tiny import TINY_NUM_IMG_TOKENS, build_tiny_processor, tiny_model_config
from phi3v_recipes.rundir import RECORD, STATUS, checkpoints
from phi3v_recipes.strategy import quantization_config

TINY = "tiny"
# Files that make a directory a model (full weights or a LoRA adapter) rather than a run that has not finished.
MODEL_FILES = ("config.json", "adapter_config.json")


def missing_model(path: str, use: str) -> str | None:
    """The sentence for a local directory that holds no model, for the command `use` (export, evaluate, predict):
    a run directory of ours that never produced a final model (training stopped, failed or diverged) names its
    newest complete checkpoint to `use` instead, or says it holds none; any other directory names what it lacks.
    None for a model directory, a hub id, or anything that is not a directory (checked elsewhere)."""
    directory = Path(path)
    if not directory.is_dir() or any((directory / name).is_file() for name in MODEL_FILES):
        return None
    found = checkpoints(directory)
    if found or (directory / RECORD).is_file() or (directory / STATUS).is_file():
        then = (f"{use} its newest checkpoint (model.name_or_path={found[-1]}), or resume the run to finish it"
                if found else "it holds no checkpoint either: resume or retrain the run to produce a model")
        return (f"model.name_or_path={path} is a run that did not finish: it holds no final model (no config.json "
                f"or adapter_config.json); {then}.")
    return (f"model.name_or_path={path} holds no model: no config.json (full weights) or adapter_config.json (a LoRA "
            "adapter); give a finished run directory, one of its checkpoint-* directories, or a model directory in "
            "the official layout.")




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
def _loading(what: str, path: str, adapter: str | None = None) -> Iterator[None]:
    """Turn a failed download or an unreadable directory into one sentence naming the setting to change (for the
    base model of the LoRA run directory `adapter`: its adapter_config.json)."""
    try:
        yield
    except (OSError, HFValidationError) as err:  # a missing path that is no valid hub id either: the hub client's
        why = reason(err)                        # validation error (config.check_model_path answers most earlier)
        if adapter is not None:
            raise ConfigError(
                f"cannot load the base model {path} that {adapter}/adapter_config.json names ({why}); point its "
                "base_model_name_or_path at the base model's directory, or at a hub id with network access."
            ) from None
        raise ConfigError(
            f"cannot load the {what} from model.name_or_path={path} ({why}); give a local directory in the "
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


def load_model(
    cfg: DictConfig,
    path: str,
    for_training: bool = True,
    dequantize: bool = False,
    run: DictConfig | None = None,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """The model at `path` with the configured dtype and attention; a LoRA run directory loads its base and attaches
    the adapter (trainable when `for_training`).

    The base is loaded in 4-bit when the strategy of `run` (default: `cfg`) is QLoRA and the model is loaded for
    training or with `dequantize`. `dequantize` (the export of a QLoRA run) then replaces every 4-bit layer by a
    plain one holding exactly the weight the 4-bit layer computes with, in the strategy's compute dtype, before
    the adapter is attached. 4-bit layers live on `device` (default: this rank's)."""
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, cfg.model.dtype),
        "attn_implementation": cfg.model.attn_implementation,
    }
    quant = quantization_config(run if run is not None else cfg) if for_training or dequantize else None
    if quant is not None:
        _require_bitsandbytes(path)
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": torch.device(device) if device is not None else local_device()}
        if dequantize:
            kwargs["dtype"] = quant.bnb_4bit_compute_dtype
    base = adapter_base(path)
    with _loading("model", base or path, adapter=path if base else None):
        model = AutoModelForCausalLM.from_pretrained(base or path, **kwargs)
    if quant is not None and dequantize:
        model = dequantize_4bit(model, quant.bnb_4bit_compute_dtype)
    elif device is not None:
        model = model.to(device)
    if base:
        from peft import PeftModel

        with _loading("adapter", path):
            model = PeftModel.from_pretrained(model, path, is_trainable=for_training)
    return model


def _require_bitsandbytes(path: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any failure means 4-bit cannot load here
        raise ConfigError(f"{path} is loaded as a QLoRA run: its base loads in 4-bit through bitsandbytes, which "
                          f"cannot run here ({type(err).__name__}: {err}); pip install 'phi3v-recipes[qlora]'.") from None


def dequantize_4bit(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Replace every bitsandbytes `Linear4bit` of `model` by an `nn.Linear` holding its de-quantised weight in
    `dtype` (exactly the weight the 4-bit layer computes with), and drop the quantization config."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Linear4bit":
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                 device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.config.dtype = dtype
    return model


def adapter_base(path: str) -> str | None:
    """The base model of a LoRA adapter directory, None for anything else."""
    adapter = Path(path) / "adapter_config.json"
    if not adapter.is_file():
        return None
    try:
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError) as err:
        raise ConfigError(f"{adapter} is not a peft adapter config ({err}); restore it from the run's newest "
                          "checkpoint-*/ or re-export the run.") from None
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{adapter} names no base model (base_model_name_or_path); set it to the base model's "
                          "directory or hub id.")
    return base


def _has_processor(path: str) -> bool:
    return not Path(path).is_dir() or (Path(path) / "preprocessor_config.json").is_file()


def local_device() -> torch.device:
    """This rank's GPU (torchrun's LOCAL_RANK), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> torch.device:
    """Join torchrun's process group (if any) and return this rank's device."""
    device = local_device()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def check_trained_model(path: str, use: str) -> None:
    """ConfigError unless `path` can be what `use` (export, evaluate, predict) loads: not the untrained `tiny`, and
    not a directory without a model (`missing_model`)."""
    if path == TINY:
        raise ConfigError("model.name_or_path=tiny is an untrained random model; point it at a run directory, a "
                          "checkpoint-* directory or a hub id.")
    problem = missing_model(path, use)
    if problem:
        raise ConfigError(problem)


def load_for_inference(cfg: DictConfig, use: str) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode on this rank's device, processor) from model.name_or_path, for evaluation and
    prediction (`use`: the command, named in a refusal); the processor keeps the crop count saved with the model
    unless data.num_crops sets one."""
    path = cfg.model.name_or_path
    check_trained_model(path, use)
    device = init_distributed()
    processor = load_processor(path, cfg.data.num_crops)
    model = load_model(cfg, path, for_training=False).to(device).eval()
    saved = "set by data.num_crops" if cfg.data.num_crops is not None else "saved with the model"
    logging.getLogger("phi3v_recipes").info("processor: num_crops=%d (%s)", processor.image_processor.num_crops,
                                            saved)
    return model, processor
