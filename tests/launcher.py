"""How tests start the public entrypoints: `python -m <module> <args>` in a process of its own, offline.

Most of a command's cost in this suite is importing: torch, transformers with its Trainer (which imports peft) and
datasets take about 8 s of CPU before the first line of our code runs, and the suite starts over a hundred commands.
So a command runs, by default, in a process forked from a server that has imported those libraries once per pytest
worker (multiprocessing's fork server, with `PRELOAD` preloaded). The child is still a process of its own (its own
pid, working directory, environment, session if asked, signal handlers, standard streams and exit status), it
imports our package itself, runs the module as `python -m` does (runpy, as `__main__`, with `sys.argv` and
`sys.orig_argv` of that command line) and ends as the interpreter ends: non-daemon threads joined, atexit handlers
run, streams flushed, the exit status of `SystemExit`, a traceback and 1 for an uncaught exception, death by
SIGINT for an uncaught KeyboardInterrupt. Only the third-party imports are inherited.

`fresh=True` starts a new interpreter instead (`subprocess.Popen`): for tests about start-up itself (what loads
before a mistake is answered) and for commands the fork server cannot run (torchrun, another interpreter, a module
of the test's own directory). Every command starts fresh where an NVIDIA driver is present (the libraries probe
CUDA while they import, and CUDA does not survive a fork) and when PHI3V_TESTS_FRESH=1 is set, which runs the
whole suite the slow way. This module imports only the standard library: the fork server's children import it to
run `_child`."""

from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

# What every training command imports before our code does any work (measured with `python -X importtime`).
PRELOAD = ["torch", "transformers", "transformers.trainer", "peft", "datasets", "hydra", "omegaconf", "PIL.Image",
           "safetensors.torch", "matplotlib.figure", "torch.utils.tensorboard"]
FORK = not Path("/dev/nvidiactl").exists() and os.environ.get("PHI3V_TESTS_FRESH", "0") != "1"
_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(PRELOAD)


class Launched:
    """A started command: the part of `subprocess.Popen`'s interface the tests use, for a forked or a fresh
    process alike. Its standard output and error go to files and come back as text from `communicate`."""

    def __init__(self, args: list[str], process: multiprocessing.Process | subprocess.Popen, logs: Path,
                 keep_logs: bool) -> None:
        self.args, self._process, self._logs, self._keep_logs = args, process, logs, keep_logs
        self.pid: int = process.pid

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        if isinstance(self._process, subprocess.Popen):
            return self._process.poll()
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        if isinstance(self._process, subprocess.Popen):
            return self._process.wait(timeout)
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the command (killed if `timeout` passes, as `subprocess.run` does); its stdout and stderr."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        out, err = ((self._logs / name).read_text(errors="replace") for name in ("stdout", "stderr"))
        if not self._keep_logs:
            shutil.rmtree(self._logs, ignore_errors=True)
        return out, err

    def completed(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        out, err = self.communicate(timeout)
        return subprocess.CompletedProcess(self.args, self.poll(), out, err)


def start(args: list[str], cwd: Path, env: dict[str, str], module: str = "phi3v_recipes", fresh: bool = False,
          logs: Path | None = None, new_session: bool = False, max_file_size: int | None = None,
          pass_fds: tuple[int, ...] = ()) -> Launched:
    """`python -m <module> <args>` in `cwd` with exactly `env`. Its output goes to `<logs>/stdout` and
    `<logs>/stderr` (kept) or to a temporary directory removed once read. `new_session`: the command leads a new
    session and process group (as `start_new_session`). `max_file_size`: bytes a file may grow to (RLIMIT_FSIZE,
    with SIGXFSZ ignored so that a write past it fails as on a full disk). A command given `pass_fds` (descriptors
    it keeps open) starts as a new interpreter."""
    keep = logs is not None
    logs = Path(logs) if keep else Path(tempfile.mkdtemp(prefix="launch-"))
    logs.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", module, *args]
    if fresh or pass_fds or not FORK:
        with (logs / "stdout").open("w") as out, (logs / "stderr").open("w") as err:
            limit = (lambda: _limit_file_size(max_file_size)) if max_file_size is not None else None
            process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err, pass_fds=pass_fds,
                                       start_new_session=new_session, preexec_fn=limit)
    else:
        process = _FORKSERVER.Process(target=_child, name=module, args=(
            module, list(args), str(cwd), dict(env), str(logs), new_session, max_file_size))
        process.start()
    return Launched(argv, process, logs, keep)


def _limit_file_size(size: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def _child(module: str, args: list[str], cwd: str, env: dict[str, str], logs: str, new_session: bool,
           max_file_size: int | None) -> None:
    """In the forked child: become the process `python -m module args` would be, run it, end as it would."""
    if new_session:
        os.setsid()
    if max_file_size is not None:
        _limit_file_size(max_file_size)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # multiprocessing's bootstrap made this a child process of the fork server's kind; a new interpreter is a main
    # process without a parent, with the default start method. Without this the command's own children (DataLoader
    # workers) would be started through a fork server of their own: outside its process group, without its signal
    # handlers.
    me = multiprocessing.current_process()
    me._name, me._parent_pid, me._parent_name = "MainProcess", None, None
    multiprocessing.process._parent_process = None
    multiprocessing.process.ORIGINAL_DIR = cwd
    multiprocessing.set_start_method(None, force=True)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        file = os.open(os.path.join(logs, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdout = sys.__stdout__ = _text_stream(1, "strict", write_through=unbuffered)
    sys.stderr = sys.__stderr__ = _text_stream(2, "backslashreplace", write_through=True)
    if "torch" in sys.modules and env.get("OMP_NUM_THREADS", "").isdigit():
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))  # the server read its own value at import
    sys.argv = ["-m", *args]  # runpy puts the module's file first, as `python -m` does
    sys.orig_argv = [sys.executable, "-m", module, *args]
    sys.path.insert(0, cwd)
    code = _run(module)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if code == INTERRUPTED:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _text_stream(fd: int, errors: str, write_through: bool) -> io.TextIOWrapper:
    """A standard stream writing to `fd` as the interpreter's does when it is a file (`write_through`: as with
    PYTHONUNBUFFERED)."""
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors=errors,
                            write_through=write_through)


INTERRUPTED = -signal.SIGINT  # an uncaught KeyboardInterrupt: the interpreter ends by SIGINT after its exit


def _run(module: str) -> int:
    """Run `module` as `__main__`; the exit status the interpreter would give (INTERRUPTED: death by SIGINT)."""
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return INTERRUPTED
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1
    return 0
