"""Configuration checks: a composed config is validated before anything heavy happens.

A contradictory or impossible configuration stops with one sentence that says what to change (`ConfigError`),
never a traceback from deep inside a library.
"""

import importlib.util
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from phi3v_recipes.cluster import explicit_output_dir, in_submitit_job, output_dir, world_size
from phi3v_recipes.errors import ConfigError, check_on_error, closest

STRATEGIES = ("full", "frozen_vision", "lora", "qlora")
PRECISIONS = ("bf16", "fp16", "fp32")
# flex_attention: PyTorch's FlexAttention (torch >= 2.5), the GPU profiles' choice without flash-attn; it attends
# packed rows per sample through a document block mask (docs/performance.md). It has no backward pass on CPU.
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flex_attention")
DTYPES = ("float32", "bfloat16", "float16")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class Setting:
    """A setting that must be a number (or true/false) in a range: one row of `SETTINGS`."""

    key: str
    kind: type  # int (whole numbers), float (any number) or bool
    low: float | None = None  # smallest allowed value (inclusive unless low_open)
    high: float | None = None  # largest allowed value (inclusive unless high_open)
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False  # null allowed (it means what the key's comment in conf/ says)

    def problem(self, value: Any) -> str | None:
        """The sentence for a bad `value`, None when it is fine."""
        if value is None:
            return None if self.nullable else f"{self.key} is null; {self._wanted()}."
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            ok = False
        else:
            ok = math.isfinite(value) and (self.kind is float or isinstance(value, int))
        if not ok:
            return f"{self.key}={value!r} is not {self._kind_name()}; {self._wanted()}."
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            return f"{self.key}={value} is out of range; {self._wanted()}."
        return None

    def _kind_name(self) -> str:
        return {bool: "true or false", int: "a whole number", float: "a number"}[self.kind]

    def _wanted(self) -> str:
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        null = " (or null)" if self.nullable else ""
        return f"give {self._kind_name()}{' ' + ' and '.join(bounds) if bounds else ''}{null}"


# Every numeric and true/false knob of the entrypoints' configs; a key that a config does not have is not checked.
SETTINGS = (
    Setting("data.num_crops", int, 1, 16),
    Setting("data.max_length", int, 1, nullable=True),
    Setting("data.num_workers", int, 0),
    Setting("data.max_image_pixels", int, 1, nullable=True),
    Setting("data.screen_workers", int, 1, nullable=True),
    Setting("data.packing", bool),
    Setting("data.max_tokens_per_row", int, 1),
    Setting("data.group_by_length", bool),
    Setting("data.length_group_batches", int, 1),
    Setting("train.global_batch_size", int, 1),
    Setting("train.batch_size", int, 1),
    Setting("train.epochs", float, 0),
    Setting("train.max_steps", int, -1),
    Setting("train.save_steps", int, 1),
    Setting("train.save_total_limit", int, 1, nullable=True),
    Setting("train.seed", int, 0, 2**32 - 1),
    Setting("train.gradient_checkpointing", bool),
    Setting("train.logging_steps", int, 1),
    Setting("train.supervised_logits", bool),
    Setting("optim.lr", float, 0, low_open=True),
    Setting("optim.weight_decay", float, 0),
    Setting("optim.betas.0", float, 0, 1, high_open=True),
    Setting("optim.betas.1", float, 0, 1, high_open=True),
    Setting("optim.eps", float, 0, low_open=True),
    Setting("optim.warmup_steps", int, 0),
    Setting("optim.max_grad_norm", float, 0),
    Setting("eval.before", bool),
    Setting("eval.after", bool),
    Setting("eval.max_new_tokens", int, 1),
    Setting("eval.batch_size", int, 1),
    Setting("eval.max_samples", int, 1, nullable=True),
    Setting("eval.every_steps", int, 1, nullable=True),
    Setting("eval.keep_best", bool),
    Setting("eval.patience", int, 1, nullable=True),
    Setting("task.train_size", int, 1),
    Setting("task.eval_size", int, 0),
    Setting("task.seed", int, 0),
    Setting("task.eval_holdout", int, 0),
    Setting("task.num_images", int, 1, nullable=True),
    Setting("hardware.deepspeed", bool),
    Setting("strategy.freeze_vision", bool),
    Setting("strategy.quantization.double_quant", bool),
    Setting("strategy.lora.rank", int, 1),
    Setting("strategy.lora.alpha", float, 0, low_open=True),
    Setting("strategy.lora.dropout", float, 0, 1, high_open=True),
    # plan (conf/plan.yaml): the memory model's constants are physical quantities
    Setting("hardware.memory_gib", float, 0, low_open=True, nullable=True),
    Setting("plan.workload_samples", int, 1),
    Setting("plan.workload_seed", int, 0),
    Setting("plan.allocator_reserve", float, 1),
    Setting("plan.cuda_context_gib", float, 0),
    Setting("plan.overlap_comm_buffers", float, 0),
    Setting("plan.adam_temporaries", float, 0),
    Setting("plan.logits_fp32_copies", float, 0),
    Setting("plan.max_search", int, 1),
)
_ABSENT = object()


def check_settings(cfg: DictConfig, nullable: Iterable[str] = ()) -> None:
    """ConfigError with one sentence for the first setting of `SETTINGS` (present in `cfg`) that is not a number
    (or true/false) in its range; keys in `nullable` may also be null (e.g. data.num_crops at inference)."""
    nullable = set(nullable)
    for setting in SETTINGS:
        value = OmegaConf.select(cfg, setting.key, default=_ABSENT)
        if value is _ABSENT or (value is None and setting.key in nullable):
            continue
        if (problem := setting.problem(value)) is not None:
            raise ConfigError(problem)


def check_output_dir(path: str | Path, setting: str = "run.output_dir", file: bool = False) -> None:
    """ConfigError when the directory `path` (with `file`: the directory of the file `path`) cannot be created or
    written: it, or a folder above it, exists as something other than a directory, or the nearest existing one is
    not writable (a read-only file system, no permission)."""
    _require(str(path).strip() != "", f"{setting} is empty; give a directory (a run directory is never the "
                                      "current directory by accident).")
    start = Path(path).parent if file else Path(path)
    for place in (start, *start.parents):
        if place.exists() or place.is_symlink():
            _require(place.is_dir(), f"{setting}={path}: {place} is a file, not a directory; choose another "
                                     f"{setting}.")
            _require(os.access(place, os.W_OK | os.X_OK),
                     f"{setting}={path}: {place} is not writable here (a read-only file system or no permission); "
                     f"choose another {setting}.")
            return


def check_scheduler(name: Any) -> None:
    """ConfigError unless `name` is one of transformers' learning-rate schedules (optim.scheduler)."""
    from transformers import SchedulerType

    known = [s.value for s in SchedulerType]
    _require(name in known, f"optim.scheduler={name} is not a transformers learning-rate schedule{closest(name, known)}; "
                            f"choose one of {', '.join(known)}.")


def check_model_path(path: Any, training: bool = True) -> None:
    """ConfigError unless model.name_or_path is a non-empty string (a hub id, a directory, or `tiny` for
    training), and, when it is written as a path (absolute, or starting with `.` or `~`: a hub id never does), an
    existing one: such a path that does not exist is no hub id either, and the hub client would reject it with a
    validation traceback. `training=False` (evaluate, predict, export) does not offer the untrained `tiny`."""
    demo = ", or model=tiny for the offline demo model" if training else ""
    _require(isinstance(path, str) and path.strip() != "",
             f"model.name_or_path={path!r} names no model; give a hub id, a local directory or a run directory"
             f"{demo}.")
    if os.path.isabs(path) or path.startswith((".", "~")):
        _require(Path(path).exists(),
                 f"model.name_or_path={path} does not exist; give the path of an existing model directory (a run "
                 "directory, one of its checkpoint-* directories, or a model in the official layout), a hub id "
                 f"such as microsoft/Phi-3.5-vision-instruct{demo}.")


def check_metric(name: Any) -> None:
    """ConfigError unless task.metric names one of metrics.METRICS (before training, not at its first evaluation)."""
    from phi3v_recipes.metrics import METRICS

    known = sorted(METRICS)
    _require(name in METRICS, f"task.metric={name} is not a metric{closest(str(name), known)}; choose one of "
                              f"{', '.join(known)}.")


def check_stop_signals(names: Any) -> None:
    """ConfigError unless run.stop_signals is a list of signal names that a process can catch."""
    import signal

    _require(OmegaConf.is_list(names) or isinstance(names, list | tuple),
             f"run.stop_signals={names} is not a list; give signal names, e.g. run.stop_signals=[SIGTERM,SIGINT].")
    catchable = sorted(s.name for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP)
                       and s.name.startswith("SIG") and not s.name.startswith("SIG_"))
    for name in names:
        _require(name in catchable, f"run.stop_signals: {name} is not a signal this process can catch"
                                    f"{closest(str(name), catchable)}; choose from {', '.join(catchable)}.")


QUANT_TYPES = ("nf4", "fp4")


def check_strategy_names(strategy: DictConfig) -> None:
    """ConfigError for a LoRA target list that is not a list of names, or a 4-bit setting bitsandbytes lacks."""
    lora = strategy.get("lora")
    if lora:
        for key in ("target_modules", "vision_target_modules"):
            names = lora.get(key)
            _require(OmegaConf.is_list(names) and all(isinstance(n, str) and n for n in names),
                     f"strategy.lora.{key}={names} is not a list of module names; give a list, e.g. "
                     f"strategy.lora.{key}=[qkv_proj,o_proj] ([] for none).")
        check_lora_init(lora.init)
        _require(len(lora.target_modules) > 0, "strategy.lora.target_modules=[] puts no adapter on the language "
                                               "model; name its layers, e.g. [qkv_proj,o_proj,gate_up_proj,down_proj].")
    quant = strategy.get("quantization")
    if quant:
        _require(quant.quant_type in QUANT_TYPES, f"strategy.quantization.quant_type={quant.quant_type}: choose one "
                                                  f"of {', '.join(QUANT_TYPES)}.")
        _require(quant.compute_dtype in DTYPES,
                 f"strategy.quantization.compute_dtype={quant.compute_dtype}: choose one of {', '.join(DTYPES)}"
                 f"{closest(str(quant.compute_dtype), list(DTYPES))} (the hardware profiles set it through "
                 "hardware.qlora_compute_dtype).")


LORA_INITS = ("gaussian", "pissa", "pissa_niter_<N>", "olora", "orthogonal")


def check_lora_init(init: Any) -> None:
    """ConfigError unless strategy.lora.init is an initialisation peft applies from the weights alone: true (peft's
    default), false (B and A random: an adapter that starts non-zero), or one of `LORA_INITS` (those needing data
    or extra configs, such as eva, corda, loftq, are not wired here)."""
    ok = isinstance(init, bool) or (isinstance(init, str) and (
        init in LORA_INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", init) is not None))
    _require(ok, f"strategy.lora.init={init} is not a LoRA initialisation this recipe applies"
                 f"{closest(str(init), list(LORA_INITS))}; choose true, false or one of {', '.join(LORA_INITS)}.")


def uses_deepspeed(cfg: DictConfig) -> bool:
    return bool(cfg.strategy.get("deepspeed")) and bool(cfg.hardware.deepspeed)


def gradient_accumulation(cfg: DictConfig, world: int) -> int:
    per_step = world * cfg.train.batch_size
    _require(
        cfg.train.global_batch_size % per_step == 0,
        f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by world size {world} x "
        f"train.batch_size={cfg.train.batch_size}; pick a global batch that is a multiple of {per_step}.",
    )
    return cfg.train.global_batch_size // per_step


def validate(cfg: DictConfig, world: int | None = None) -> None:
    """Raise ConfigError for any setting that cannot run here; return quietly otherwise."""
    world = world_size() if world is None else world
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} is required for task={cfg.task.name}; set it on the command line "
                          f"({err.full_key}=...).") from None
    model, hardware, strategy = cfg.model, cfg.hardware, cfg.strategy
    _require(strategy.name in STRATEGIES, f"strategy={strategy.name} is unknown; choose one of {STRATEGIES}.")
    _require(hardware.precision in PRECISIONS, f"hardware.precision={hardware.precision}: choose one of {PRECISIONS}.")
    _require(
        model.attn_implementation in ATTENTION,
        f"model.attn_implementation={model.attn_implementation}: choose one of {ATTENTION}.",
    )
    betas = cfg.optim.betas
    _require(OmegaConf.is_list(betas) and len(betas) == 2, f"optim.betas={betas}: give two numbers, [beta1, beta2].")
    check_settings(cfg)
    check_on_error(cfg.data.on_error)
    check_model_path(model.name_or_path)
    check_metric(cfg.task.metric)
    check_stop_signals(cfg.run.stop_signals)
    check_strategy_names(strategy)
    _require(
        cfg.train.epochs > 0 or cfg.train.max_steps > 0,
        f"train.epochs={cfg.train.epochs} with train.max_steps={cfg.train.max_steps} trains nothing; set "
        "train.epochs > 0 or train.max_steps > 0.",
    )
    _require(
        cfg.eval.get("patience") is None or cfg.eval.get("every_steps") is not None,
        f"eval.patience={cfg.eval.get('patience')} counts evaluations during training, but eval.every_steps is "
        "null; set eval.every_steps=N as well, or eval.patience=null.",
    )
    _require(
        not (cfg.data.packing and cfg.data.group_by_length),
        "data.group_by_length=true has no effect with data.packing=true (packed rows are filled from samples in "
        "random order); set one of them to false.",
    )
    check_output_dir(output_dir(cfg))
    gradient_accumulation(cfg, world)
    check_hardware(cfg, training=True)
    # the checks below import transformers or bitsandbytes (seconds): a mistake above is found without them
    check_scheduler(cfg.optim.scheduler)
    if "report_to" in cfg:
        from phi3v_recipes.trackers import check as check_trackers

        check_trackers(cfg)
    if strategy.get("quantization"):
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # noqa: BLE001 - any failure means 4-bit cannot run here
            raise ConfigError(
                f"strategy={strategy.name} needs bitsandbytes, which cannot run here ({type(err).__name__}: {err}); "
                "pip install 'phi3v-recipes[qlora]', or use strategy=lora."
            ) from None
    if uses_deepspeed(cfg):
        _require(
            importlib.util.find_spec("deepspeed") is not None,
            f"strategy={strategy.name} on hardware={hardware.name} uses DeepSpeed ZeRO-2, which is not installed; "
            "pip install 'phi3v-recipes[deepspeed]', or set hardware.deepspeed=false for plain DDP.",
        )
    nodes = world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    _require(
        # a submitit job's directory comes resolved from its submission (cluster.py), the same on every node
        nodes <= 1 or "PHI3V_RUN_STAMP" in os.environ or in_submitit_job() or explicit_output_dir(),
        "a run over several nodes needs one run directory on all of them: set run.output_dir=<shared path>.",
    )


def check_hardware(cfg: DictConfig, training: bool = False) -> None:
    """Attention, precision and device settings that this machine can run (inference; `training=True` also
    checks what a backward pass needs)."""
    model, hardware = cfg.model, cfg.hardware
    _require(model.dtype in DTYPES, f"model.dtype={model.dtype}: choose one of {', '.join(DTYPES)}"
                                    f"{closest(model.dtype, list(DTYPES))}.")
    _require(
        not (hardware.name == "cpu" and hardware.precision == "fp16"),
        "hardware.precision=fp16 has no effect on hardware=cpu (the Trainer would train in fp32 and record fp16); "
        "use hardware.precision=fp32, or bf16 (CPU autocast).",
    )
    if hardware.name != "cpu":
        import torch

        _require(
            torch.cuda.is_available(),
            f"hardware={hardware.name} needs a CUDA GPU and none is visible; use hardware=cpu on this machine.",
        )
    flash = model.attn_implementation == "flash_attention_2"
    _require(
        not (flash and hardware.precision == "fp16"),
        f"flash attention cannot run with fp16 mixed precision (hardware={hardware.name}); set "
        "model.attn_implementation=sdpa, or use bf16 on a GPU that has it (hardware=a100 or h100).",
    )
    _require(
        not flash or model.dtype in ("bfloat16", "float16"),
        f"flash attention needs half-precision weights, but model.dtype={model.dtype}; set model.dtype=bfloat16 "
        "or model.attn_implementation=sdpa.",
    )
    _require(
        not flash or importlib.util.find_spec("flash_attn") is not None,
        "flash attention is requested but flash-attn is not installed; pip install 'phi3v-recipes[flash]' (GPU "
        "only), or set model.attn_implementation=sdpa.",
    )
    if model.attn_implementation == "flex_attention":
        from transformers.utils import is_torch_flex_attn_available

        _require(
            is_torch_flex_attn_available(),
            "model.attn_implementation=flex_attention needs PyTorch's FlexAttention (torch >= 2.5), which this "
            "torch lacks; upgrade torch, or set model.attn_implementation=sdpa.",
        )
        _require(
            not (training and hardware.name == "cpu"),
            "model.attn_implementation=flex_attention cannot train on CPU (PyTorch's FlexAttention has no backward "
            "pass there); set model.attn_implementation=sdpa on hardware=cpu, or train on a CUDA GPU.",
        )
