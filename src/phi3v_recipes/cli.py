"""What every entrypoint shares at the command line: the resolvers its yaml uses, the one-sentence exit for a
mistake in the configuration or the data, and the Hydra callback that checks a run directory before Hydra makes it.
"""

import importlib.util
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from phi3v_recipes.cluster import rank, run_stamp
from phi3v_recipes.config import check_output_dir
from phi3v_recipes.errors import ConfigError, RunStopped, SampleError

T = TypeVar("T")


def exit_on_user_error(run: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """`run(cfg)`, where a mistake in the configuration or the data ends the process with exit code 2 and its one
    `error:` sentence on stderr instead of a traceback (what every entrypoint does); a run that stops on purpose
    (`RunStopped`) prints its sentence and exits with its code. Both sentences also go to the run's log. After a
    successful run under torchrun, the ranks leave together: a rank that exits while another still uses the
    process group can abort in the communication library's teardown."""
    try:
        result = run(cfg)
    except (ConfigError, SampleError, FileNotFoundError) as err:
        log_to_files(str(err), logging.ERROR)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RunStopped as stop:
        log_to_files(str(stop), logging.INFO if stop.exit_code == 0 else logging.ERROR)
        if stop.exit_code == 0:
            print(stop, flush=True)
        else:
            print(f"error: {stop}" if stop.exit_code == 1 else f"stopped: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        print("interrupted (nothing is saved outside training: a run saves a checkpoint on Ctrl-C once training "
              "has started)", file=sys.stderr, flush=True)
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


def gpu_attention() -> str:
    """The GPU profiles' attention: flash-attention 2 where flash-attn is installed, else PyTorch's FlexAttention
    (which also attends packed rows per sample, without flash-attn's variable-length kernels)."""
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "flex_attention"


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
    """Hydra callback: a run directory that cannot be one stops with one sentence (exit 2) before Hydra tries to
    create it (its own error is a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_output_dir(config.hydra.run.dir)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
