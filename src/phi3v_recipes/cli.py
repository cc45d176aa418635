"""What every entrypoint shares at the command line: the resolvers its yaml uses, the one-sentence exit for a
mistake in the configuration or the data (`exit_on_user_error` around the task function, `one_sentence_errors`
around `@hydra.main` for what Hydra finds while composing), and the Hydra callback that checks a run directory
before Hydra makes it.
"""

import difflib
import functools
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from phi3v_recipes import cluster
from phi3v_recipes.cluster import rank, run_stamp
from phi3v_recipes.config import check_output_dir
from phi3v_recipes.errors import ConfigError, RunStopped, SampleError, closest

T = TypeVar("T")


def exit_on_user_error(run: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """`run(cfg)`, where a mistake in the configuration or the data ends the process with exit code 2 and its one
    `error:` sentence on stderr instead of a traceback (what every entrypoint does); a run that stops on purpose
    (`RunStopped`) prints its sentence and exits with its code. Both sentences also go to the run's log. After a
    successful run under torchrun, the ranks leave together: a rank that exits while another still uses the
    process group can abort in the communication library's teardown."""
    try:
        check_added_keys(cfg)
        result = run(cfg)
    except (ConfigError, SampleError, FileNotFoundError) as err:
        if isinstance(err, FileNotFoundError) and err.errno is not None and err.filename is None:
            raise  # not a file of the user's (e.g. a socket between processes): keep its traceback
        log_to_files(str(err), logging.ERROR)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RunStopped as stop:
        if not stop.logged:
            log_to_files(str(stop), logging.INFO if stop.exit_code == 0 else logging.ERROR)
        if stop.exit_code == 0:
            print(stop, flush=True)
        else:
            print(f"error: {stop}" if stop.exit_code == 1 else f"stopped: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        print("interrupted before training started or after it ended (during training, Ctrl-C saves a checkpoint "
              "first)", file=sys.stderr, flush=True)
        sys.exit(130)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def log_to_files(message: str, level: int = logging.INFO) -> None:
    """`message` into the run's log files only (for what the console already shows once)."""
    record = logging.getLogger("phi3v_recipes").makeRecord("phi3v_recipes", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def library_logs_to_files() -> None:
    """Python warnings and transformers' log records go to the run's log files too, the same on every machine.

    transformers prints through a stderr handler of its own and passes its records on to the root logger (the
    run's handlers) only where the environment variable CI is set, which then also prints them twice. Here it
    never passes them on, and the root logger's file handlers are attached to it directly. Call after Hydra has
    configured logging, where transformers is imported anyway (training, evaluation)."""
    from transformers.utils import logging as hf_logging

    logging.captureWarnings(True)
    library = hf_logging.get_logger()  # the library's root logger, configured by transformers on first use
    library.propagate = False
    for handler in [h for h in library.handlers if isinstance(h, logging.FileHandler)]:
        library.removeHandler(handler)  # an earlier job's (a sweep runs its jobs in one process)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            library.addHandler(handler)


def gpu_attention() -> str:
    """The GPU profiles' attention: flash-attention 2 where flash-attn is installed, else PyTorch's FlexAttention
    (which also attends packed rows per sample, without flash-attn's variable-length kernels)."""
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "flex_attention"


def tell_deepspeed_cpu(on_cpu: bool) -> None:
    """Before the libraries load: when this process runs on the CPU, tell DeepSpeed (which accelerate and peft
    import), so that its accelerator probe does not print that it found no GPU."""
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def register_resolvers() -> None:
    """Resolvers the yaml files use (safe to call more than once)."""
    resolvers = {
        "phi3v_stamp": lambda: run_stamp(),
        "phi3v_rank_zero": lambda value: value if rank() == 0 else None,
        "phi3v_log_file": lambda: "train.log" if rank() == 0 else f"train.rank{rank()}.log",
        "phi3v_console_level": lambda: "INFO" if rank() == 0 else "WARNING",
        "multiply": lambda a, b: a * b,
        "phi3v_gpu_attention": gpu_attention,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            # Cached: every job of a sweep, and every later resolution, sees the same stamp.
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "phi3v_stamp")


class RunDirCheck(Callback):
    """Hydra callback: a run directory (or a sweep's directory) that cannot be one, or cannot be written, stops
    with one sentence (exit 2) before Hydra tries to create it (its own error is a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "run", "run.output_dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "sweep", "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, mode: str, setting: str) -> None:
        try:
            try:
                path = config.hydra[mode].dir
            except OmegaConfBaseException:  # null where Hydra needs a string: its own report is a warning block
                raise ConfigError(f"{setting} is null; give a directory.") from None
            check_output_dir(path, setting)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)


# Sections whose keys are handed to a library as they are: `+key=value` may add to them.
PASS_THROUGH = ("strategy.deepspeed",)


def one_sentence_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entrypoint's `@hydra.main` function: a mistake that Hydra finds while composing the configuration
    (an unknown key or group option, an override it cannot parse, an interpolation that does not resolve) ends
    with one `error:` sentence naming the closest valid keys or options, and exit code 2, instead of Hydra's
    report and exit code 1. HYDRA_FULL_ERROR=1 set by the user keeps Hydra's full report."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        full_report = os.environ.get("HYDRA_FULL_ERROR") == "1"
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises instead of printing and exiting 1
        try:
            return main(*args, **kwargs)
        except (ConfigCompositionException, MissingConfigException, OverrideParseException,
                OmegaConfBaseException) as err:
            if full_report:
                raise
            print(f"error: {composition_sentence(err)}", file=sys.stderr, flush=True)
            sys.exit(2)
        except OSError as err:
            sweep_dir = cluster.sweep_dir
            if full_report or sweep_dir is None:
                raise
            # A job's own errors end in its status.json (status.train_and_record); this one is Hydra's, making a
            # job's directory (a file in its place, no permission, a full disk): the sweep cannot go on.
            print(f"error: the sweep stopped before its next job: {err.strerror or err} ({err.filename}). The jobs "
                  "that ran are kept; make that path usable (a file where a job's directory goes: move it away), "
                  f"then run the same command with hydra.sweep.dir={sweep_dir} to continue.", file=sys.stderr,
                  flush=True)
            sys.exit(1)
        finally:
            if not full_report:
                os.environ.pop("HYDRA_FULL_ERROR", None)

    return wrapper


def composition_sentence(err: Exception) -> str:
    """One sentence for a Hydra composition error, naming the closest valid keys or options."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, option = err.missing_cfg_file.rpartition("/")
        options = sorted(err.options)
        return (f"{group}={option} is not an option of {group}{closest(option, options)}; choose one of "
                f"{', '.join(options)}.")
    if isinstance(err, OverrideParseException):
        return (f"the override {err.override!r} cannot be parsed ({err.message.splitlines()[0]}); see "
                "https://hydra.cc/docs/advanced/override_grammar/basic/.")
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    parent, key = getattr(cause, "parent_node", None), getattr(cause, "full_key", None)
    if isinstance(parent, DictConfig) and key and "not in struct" in str(cause):
        siblings = [k for k in parent if k != "hydra" or key.startswith("hydra")]
        return unknown_key_sentence(key, siblings, parent._get_root())
    first = " ".join(str(err).split("\n")[0].split())
    where = f" ({key})" if key and key not in first else ""
    return f"{first.rstrip('.')}{where}; check the command-line overrides against conf/."


def unknown_key_sentence(key: str, siblings: list[str], root: Any = None) -> str:
    """`key` is not in its section: the closest keys of that section, else the closest full keys elsewhere in
    `root` (`train.lrr` -> optim.lr), and the section's keys."""
    section, _, leaf = key.rpartition(".")
    where = f"{section} has no key {leaf}" if section else f"the configuration has no section or key {leaf}"
    known = sorted(str(k) for k in siblings)
    hint = closest(leaf, known)
    if not hint and isinstance(root, DictConfig):
        leaves = [k for k in _leaf_keys(root) if k != key and not k.startswith("hydra.")]
        by_leaf = [k for k in leaves if k.rpartition(".")[2] in difflib.get_close_matches(leaf, [
            k.rpartition(".")[2] for k in leaves], n=3, cutoff=0.6)]
        hint = f" (did you mean {' or '.join(by_leaf[:3])}?)" if by_leaf else ""
    return f"{key}: {where}{hint}; its keys are {', '.join(known)}."


def _leaf_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for name in node:
        child = node._get_node(name)
        if isinstance(child, DictConfig):
            keys += _leaf_keys(child, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def check_added_keys(cfg: DictConfig) -> None:
    """ConfigError for a command-line `+key=value` that adds a key the configuration does not have (Hydra adds
    it and nothing reads it: a typo would pass silently). Group additions (`+group=option`) and the sections in
    PASS_THROUGH are allowed. A no-op outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    groups = set(hydra_cfg.runtime.choices.keys())
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        key = override.key_or_group
        if not override.is_add() or key in groups or "/" in key:
            continue
        if any(key == p or key.startswith(p + ".") for p in PASS_THROUGH):
            continue
        section, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, section) if section else cfg
        siblings = [k for k in parent if k not in (leaf, "hydra")] if isinstance(parent, DictConfig) else []
        raise ConfigError(f"+{unknown_key_sentence(key, siblings, cfg)[:-1]} (a key added with + is read by nothing).")
