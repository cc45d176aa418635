"""Stop signals become a checkpoint: SIGTERM (what Slurm and Kubernetes send before they kill), SIGINT (Ctrl-C) and
the signals a cluster sends ahead of a time limit (`run.stop_signals`) do not kill the process; they ask the
training loop to finish its optimizer step, save a checkpoint and stop (see `RecipeTrainer`).

The handlers are installed before the DataLoader starts its workers, which inherit them: a worker that gets the
signal too (a Ctrl-C reaches the whole process group) keeps serving batches until the step is done.

After the checkpoint is written, `chain()` hands the signal to whatever handler was installed before ours, e.g.
submitit's, which requeues a Slurm job. A second Ctrl-C while waiting for the step interrupts at once.
"""

import logging
import os
import signal
from collections.abc import Iterable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class StopSignals:
    """Records the first stop signal received; `received` is its number, None until then."""

    def __init__(self, names: Iterable[str]):
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        self.pid = os.getpid()
        for name in names:
            number = signal.Signals[name].value
            self.previous[number] = signal.signal(number, self._handle)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:  # a DataLoader worker: the main process decides
            return
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = number
            _log_from_signal_handler(log, logging.WARNING, "received %s: finishing the current optimizer step, then "
                                     "saving a checkpoint and stopping", signal.Signals(number).name)

    def restore(self) -> None:
        """Put back the handlers that were installed before ours."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def chain(self) -> None:
        """Restore the earlier handlers and call the one of the received signal, if it was a Python function
        (e.g. a cluster launcher's requeue); default and ignored dispositions are left to the caller."""
        self.restore()
        handler = self.previous.get(self.received) if self.received else None
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.received, None)


def _log_from_signal_handler(logger: logging.Logger, level: int, message: str, *args: Any) -> None:
    """Log from a signal handler: the record goes to the root logger's handlers (the run's console and log files),
    formatted as they format it, by one raw `os.write` each (a file handler through a descriptor of its own opened
    for appending), never through the handlers' buffered streams. A Python signal handler runs inside whatever the
    main thread was doing, also inside a write that the signal interrupted (a log line to train.log, a progress
    bar to the console): writing to that same buffered stream again raises "reentrant call", and logging then
    prints its error and loses the line."""
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, __file__, 0, message, args, None)
    for handler in logging.getLogger().handlers:
        if level < handler.level:
            continue
        line = (handler.format(record) + "\n").encode("utf-8", "replace")
        try:
            if isinstance(handler, logging.FileHandler):
                descriptor = os.open(handler.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                try:
                    os.write(descriptor, line)
                finally:
                    os.close(descriptor)
            elif isinstance(handler, logging.StreamHandler):
                os.write(handler.stream.fileno(), line)
        except (OSError, ValueError, AttributeError):  # a stream without a descriptor (captured output): skip it
            continue
