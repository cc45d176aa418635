"""The tests' launcher (tests/launcher.py): a command forked from the fork server is the process a new interpreter
would be, as far as a command can tell: the same arguments, working directory, environment, streams, exit status,
threads joined and atexit handlers run at exit, death by an unhandled signal, and multiprocessing's view (a main
process whose children are forked from it, in its process group, with its signal handlers)."""

import json
import signal
import time

import pytest

from tests import launcher
from tests.conftest import offline_env

# A module that reports what a command sees, then ends as its first argument says.
PROBE = '''import atexit, json, multiprocessing, os, signal, sys, threading, time
atexit.register(lambda: print("atexit ran", flush=True))


def on_sigint(number, frame):
    pass


def report(queue):
    """What a child process of the command (a DataLoader worker) sees."""
    queue.put({"same_group": os.getpgid(0) == os.getpgid(os.getppid()), "ppid_is_command": os.getppid() == main,
               "sigint": signal.getsignal(signal.SIGINT).__name__})


main = os.getpid()
signal.signal(signal.SIGINT, on_sigint)
queue = multiprocessing.Queue()
worker = multiprocessing.Process(target=report, args=(queue,))
worker.start()
seen = {"argv": sys.argv[1:], "orig_argv": sys.orig_argv[1:], "cwd": os.getcwd(), "path0": sys.path[0],
        "name": __name__, "env": os.environ.get("PROBE_VALUE"), "offline": os.environ.get("HF_HUB_OFFLINE"),
        "session_leader": os.getsid(0) == os.getpid(), "process": multiprocessing.current_process().name,
        "parent": multiprocessing.parent_process(), "start_method": multiprocessing.get_start_method(),
        "child": queue.get(timeout=30)}
worker.join()
print(json.dumps(seen), flush=True)
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=True))).start()
elif how == "exit":
    sys.exit(3)
elif how == "raise":
    raise ValueError("boom")
elif how == "interrupt":
    raise KeyboardInterrupt
elif how == "wait":
    open("started", "w").close()
    time.sleep(60)
'''


@pytest.fixture
def probe_dir(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    return tmp_path


@pytest.mark.skipif(not launcher.FORK, reason="commands start fresh here (PHI3V_TESTS_FRESH=1 or an NVIDIA driver)")
@pytest.mark.parametrize("how", ["thread", "exit", "raise", "interrupt"])
def test_a_forked_command_sees_and_ends_as_a_fresh_interpreter_does(probe_dir, how):
    """Forked and fresh, the probe reports the same arguments (`sys.argv`, `sys.orig_argv`), working directory and
    `sys.path[0]`, module name, environment, multiprocessing's process, parent and start method, and a child
    process started the default way (as DataLoader workers are) in the command's group with its SIGINT handler;
    writes the same stdout and stderr; and ends with the same status: a
    non-daemon thread is joined and atexit handlers run at a normal end, `sys.exit(3)` is 3, an uncaught exception
    prints its traceback and is 1, an uncaught KeyboardInterrupt dies by SIGINT."""
    env = offline_env(PROBE_VALUE="42")
    forked, fresh = (launcher.start([how, "x=1"], probe_dir, env, module="probe", fresh=fresh).completed(60)
                     for fresh in (False, True))
    assert forked.returncode == fresh.returncode == {"thread": 0, "exit": 3, "raise": 1, "interrupt": -2}[how]
    assert forked.stdout == fresh.stdout and forked.args == fresh.args
    seen = json.loads(forked.stdout.splitlines()[0])
    assert seen == {"argv": [how, "x=1"], "orig_argv": ["-m", "probe", how, "x=1"], "cwd": str(probe_dir),
                    "path0": str(probe_dir), "name": "__main__", "env": "42", "offline": "1", "session_leader": False,
                    "process": "MainProcess", "parent": None, "start_method": "fork",
                    "child": {"same_group": True, "ppid_is_command": True, "sigint": "on_sigint"}}
    if how in ("thread", "exit"):
        assert forked.stdout.splitlines()[-1] == "atexit ran"
    if how == "thread":
        assert "thread done" in forked.stdout
    assert forked.stderr.splitlines()[0] == fresh.stderr.splitlines()[0] == "to stderr"
    if how in ("raise", "interrupt"):
        assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
        assert "Traceback" in forked.stderr


def test_a_started_command_takes_signals_and_a_new_session(probe_dir):
    """A command started in a new session leads it; SIGTERM ends it like any process (status -15), and the
    handle's output is there once it has ended."""
    command = launcher.start(["wait"], probe_dir, offline_env(), module="probe", new_session=True)
    deadline = time.monotonic() + 60
    while not (probe_dir / "started").exists():
        assert command.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    command.send_signal(signal.SIGTERM)
    out, _ = command.communicate(timeout=60)
    assert command.returncode == -signal.SIGTERM
    assert json.loads(out.splitlines()[0])["session_leader"] is True
