"""Experiment trackers through `python -m phi3v_recipes`: MLflow (a local SQLite store) and wandb (offline) get the
run's configuration and exact per-step numbers, one tracker run per training run across kill -9 and SIGTERM,
sweeps grouped, and a missing package refused at start-up. Read back with MlflowClient and wandb's offline
transaction log."""

import json
import signal
import struct
import sys
from pathlib import Path

import pytest

from phi3v_recipes.config import validate
from phi3v_recipes.errors import ConfigError
from phi3v_recipes.trackers import Trackers
from tests.conftest import compose_config, read_metrics, run_cli, start
from tests.launcher import Launched

mlflow = pytest.importorskip("mlflow")
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

# 48 samples, global batch 16: 3 optimizer steps per epoch, 9 in all; a checkpoint and an evaluation every 3 steps.
RUN = ("task.train_size=48", "task.eval_size=4", "eval.batch_size=4", "train.epochs=3", "train.logging_steps=1",
       "train.save_steps=3", "eval.every_steps=3", "optim.warmup_steps=2", "optim.lr=2e-3", "eval.before=false",
       "report_to=[tensorboard,mlflow,wandb]", "tracker.wandb.mode=offline")


def tracked(root: Path, *extra: str) -> list[str]:
    return [*RUN, f"tracker.mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", *extra]


def wandb_records(path: Path):
    """The records of a wandb transaction log (`run-<id>.wandb`): a 7-byte header, then LevelDB-log framing (32 KiB
    blocks; chunks of [crc32 u32, length u16, type u8] + data; type 1 full, 2 first, 3 middle, 4 last), each
    record a `wandb_internal_pb2.Record`."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a chunk header: the block's tail is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = body if kind in (1, 2) else pending + body
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_launches(run_dir: Path) -> list[tuple[set[str], list[dict], dict]]:
    """(run ids, history rows, config) of each launch's offline wandb file in `run_dir`, in launch order."""
    launches = []
    for log in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):  # offline-run-<date>_<time>-<id>
        ids, rows, config = set(), [], {}
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        launches.append((ids, rows, config))
    return launches


def stop_after(proc: Launched, run_dir: Path, text: str, sig: int) -> None:
    """Send `sig` once train.log shows `text`; wait for the process to end."""
    import time

    deadline = time.monotonic() + 300
    log = run_dir / "train.log"
    while not (log.is_file() and text in log.read_text()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.communicate(timeout=300)


def mlflow_points(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A directory whose mlflow.db is the module's MLflow store (its schema is made once)."""
    return tmp_path_factory.mktemp("tracked")


@pytest.fixture(scope="module")
def interrupted(store) -> dict:
    """One tracked run launched three times with the same command: killed with SIGKILL after step 5 (checkpoint 3
    saved), stopped with SIGTERM after step 7, then run to the end. What MLflow held after each launch is kept."""
    root = store
    run_dir = root / "run"
    args = tracked(root, f"run.output_dir={run_dir}")
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    seen = {}

    proc = start(args, root, threads=1)
    stop_after(proc, run_dir, "step 5/9", signal.SIGKILL)
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    seen["killed"] = (mlflow_points(client, run_id, "train/loss"), client.get_run(run_id).info.status)

    proc = start(args, root, threads=1)
    stop_after(proc, run_dir, "step 7/9", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    seen["stopped"] = (mlflow_points(client, run_id, "train/loss"), client.get_run(run_id).info.status)

    out = run_cli(args, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"root": root, "run_dir": run_dir, "client": client, "run_id": run_id, "seen": seen}


def test_mlflow_holds_one_run_with_each_step_once_and_the_runs_numbers(interrupted):
    """Across kill -9, SIGTERM and a final launch, the run is ONE MLflow run (in the experiment named after the
    task) whose loss, learning-rate and gradient-norm histories have each step 1..9 exactly once, equal to the
    run's own per-step record (metrics.json `steps`), and whose eval/accuracy history is metrics.json `evals`, each
    evaluation once; its params are the flat resolved config (optim.lr as run); final metrics equal metrics.json;
    the run ends FINISHED. Steps past a checkpoint are never sent before it: after kill -9 at step 5 MLflow held
    steps 1-3 only."""
    client, run_id, run_dir = interrupted["client"], interrupted["run_id"], interrupted["run_dir"]
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert float(run.data.params["optim.lr"]) == 2e-3
    assert run.data.params["task.name"] == "demo" and run.data.params["train.save_steps"] == "3"

    metrics = read_metrics(run_dir)
    record = metrics["steps"]
    assert [r["step"] for r in record] == list(range(1, 10))
    for key, field in (("train/loss", "loss"), ("train/learning_rate", "learning_rate"),
                       ("train/grad_norm", "grad_norm")):
        points = mlflow_points(client, run_id, key)
        assert [s for s, _ in points] == list(range(1, 10)), key
        assert [v for _, v in points] == pytest.approx([r[field] for r in record], rel=1e-9, abs=1e-12), key

    assert [e["step"] for e in metrics["evals"]] == [3, 6, 9]
    assert mlflow_points(client, run_id, "eval/accuracy") == [(e["step"], e["score"]) for e in metrics["evals"]]
    assert run.data.metrics["final/train_loss"] == pytest.approx(metrics["train_loss"], rel=1e-9)
    assert run.data.metrics["final/eval_after"] == pytest.approx(metrics["eval_after"])
    assert run.data.metrics["final/global_steps"] == 9

    killed_points, killed_status = interrupted["seen"]["killed"]
    assert [s for s, _ in killed_points] == [1, 2, 3] and killed_status == "RUNNING"
    stopped_points, stopped_status = interrupted["seen"]["stopped"]
    assert [s for s, _ in stopped_points] == list(range(1, len(stopped_points) + 1)) and len(stopped_points) >= 7
    assert stopped_status == "KILLED"


def test_wandb_offline_run_continues_across_launches_with_each_step_once(interrupted):
    """wandb (offline): every launch writes under the run id of trackers.json. wandb writes its run file when the
    run finishes, so the launch killed with SIGKILL kept at most the steps it had sent (never one past its
    checkpoint, step 3), and the next launch sent again what no finished launch holds: the launches that ended
    (SIGTERM, then the end) hold each step 1..9 once (x axis `global_step`), with the run's exact loss, learning
    rate and gradient norm, each evaluation once at its step, and the flat resolved config."""
    run_dir = interrupted["run_dir"]
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["run_id"]
    (killed_ids, killed_rows, _), *ended = wandb_launches(run_dir)
    assert len(ended) == 2 and all(ids == {run_id} for ids, _, _ in ended) and killed_ids <= {run_id}
    assert {row["global_step"] for row in killed_rows} <= {1, 2, 3}
    rows = [row for _, launch_rows, _ in ended for row in launch_rows if "train/loss" in row]
    metrics = read_metrics(run_dir)
    record = metrics["steps"]
    assert [row["global_step"] for row in rows] == list(range(1, 10))
    for key, field in (("train/loss", "loss"), ("train/learning_rate", "learning_rate"),
                       ("train/grad_norm", "grad_norm")):
        assert [row[key] for row in rows] == pytest.approx([r[field] for r in record], rel=1e-9, abs=1e-12), key
    evals = [(row["global_step"], row["eval/accuracy"]) for _, launch_rows, _ in ended for row in launch_rows
             if "eval/accuracy" in row]
    assert evals == [(e["step"], e["score"]) for e in metrics["evals"]]
    config = ended[0][2]
    assert config["optim.lr"] == 2e-3 and config["task.name"] == "demo"


def test_tensorboard_shows_one_curve_with_each_step_once_across_launches(interrupted):
    """TensorBoard: every launch writes into the one log directory `<run dir>/runs` (one event file each), and a
    resumed launch's writer purges the steps after its checkpoint. Read back as TensorBoard reads it
    (EventAccumulator), the run is one curve with steps 1..9 once each and the run's own values, although the
    launch killed at step 5 had logged steps 4 and 5 that the next launch trained again. train.log has each step's
    line with the run's loss, the evaluation steps' too (an evaluation's log no longer cancels its step's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = interrupted["run_dir"] / "runs"
    files = sorted(logs.glob("events.out.tfevents.*"))
    assert len(files) == 3 and not [p for p in logs.iterdir() if p.is_dir()]  # 3 launches, no directory per launch
    raw_steps = []  # what the files hold before TensorBoard's purge: the killed launch's steps 4 and 5 twice
    for file in files:
        single = EventAccumulator(str(file), size_guidance={"scalars": 0}, purge_orphaned_data=False)
        single.Reload()
        raw_steps += [e.step for e in single.Scalars("train/loss")]
    assert sorted(raw_steps) != list(range(1, 10)) and set(raw_steps) == set(range(1, 10))
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    events.Reload()
    record = read_metrics(interrupted["run_dir"])["steps"]
    log = (interrupted["run_dir"] / "train.log").read_text()  # the evaluation steps 3, 6, 9 have their line too
    assert all(f"step {r['step']}/9: loss {r['loss']:.6f}" in log for r in record)
    for key, field in (("train/loss", "loss"), ("train/learning_rate", "learning_rate"),
                       ("train/grad_norm", "grad_norm")):
        points = events.Scalars(key)
        assert [p.step for p in points] == list(range(1, 10)), key
        assert [p.value for p in points] == pytest.approx([r[field] for r in record], rel=1e-6), key  # float32


def test_tensorboard_drops_the_steps_of_a_launch_killed_before_its_first_checkpoint(tmp_path):
    """A launch killed with SIGKILL before any checkpoint leaves steps in `<run dir>/runs`; the relaunch starts the
    run again from step 0 and its writer purges every step after 0, so TensorBoard shows the relaunch's curve
    alone: steps 1..9 once, with the values of metrics.json (not the killed launch's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    args = [*RUN[:4], "train.logging_steps=1", "train.save_steps=100", "optim.warmup_steps=2", "optim.lr=2e-3",
            "eval.before=false", "eval.after=false", "report_to=tensorboard", f"run.output_dir={run_dir}"]
    proc = start(args, tmp_path, threads=1)
    stop_after(proc, run_dir, "step 2/9", signal.SIGKILL)
    assert not list(run_dir.glob("checkpoint-*"))
    out = run_cli(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]

    logs = run_dir / "runs"
    (killed, finished) = sorted(logs.glob("events.out.tfevents.*"))
    first = EventAccumulator(str(killed), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    first.Reload()
    assert [e.step for e in first.Scalars("train/loss")][:2] == [1, 2]  # the killed launch's steps are on disk
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    events.Reload()
    record = read_metrics(run_dir)["steps"]
    points = events.Scalars("train/loss")
    assert [p.step for p in points] == list(range(1, 10))
    assert [p.value for p in points] == pytest.approx([r["loss"] for r in record], rel=1e-6)
    assert [p.wall_time for p in points][0] > max(e.wall_time for e in first.Scalars("train/loss"))


def test_a_sweep_is_one_experiment_and_one_wandb_group(store, tmp_path):
    """`-m optim.lr=1e-3,2e-3`: both jobs go to one MLflow experiment named after the sweep directory (one run
    each, with its own optim.lr) and share a wandb group named after it too."""
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", *tracked(store, "train.epochs=1", "train.max_steps=1", "eval.after=false"),
                   "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(str(sweep.resolve()))
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(float(r.data.params["optim.lr"]) for r in runs) == [1e-3, 3e-3]
    assert {r.info.status for r in runs} == {"FINISHED"}
    groups = set()
    for job in ("0", "1"):
        (log,) = (sweep / job).glob("wandb/offline-run-*/run-*.wandb")
        groups |= {r.run.run_group for r in wandb_records(log) if r.WhichOneof("record_type") == "run"}
    assert groups == {str(sweep.resolve())}


def test_a_missing_tracker_package_is_one_sentence_at_start_up(tmp_path):
    """report_to=wandb without wandb installed (hidden from the import system here): `python -m phi3v_recipes`
    exits 2 with one `error:` line that names the extra to install, before any data, model or tracker file is
    made."""
    (tmp_path / "without_wandb.py").write_text(
        "import runpy, sys\nsys.modules['wandb'] = None\n"
        "runpy.run_module('phi3v_recipes', run_name='__main__', alter_sys=True)\n")
    out = run_cli(["report_to=[tensorboard,wandb]", f"run.output_dir={tmp_path / 'run'}"], cwd=tmp_path,
                  module="without_wandb", fresh=True)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert [x for x in out.stderr.splitlines() if x.startswith("error: ")] == [
        "error: report_to=wandb needs wandb, which is not installed; pip install 'phi3v-recipes[wandb]', or drop "
        "wandb from report_to."]
    assert not (tmp_path / "run" / "tiny_base").exists() and not (tmp_path / "run" / "trackers.json").exists()
    assert not list(tmp_path.rglob("offline-run-*"))


@pytest.mark.parametrize(("override", "hidden", "sentence"), [
    ("report_to=mlflow", "mlflow", "report_to=mlflow needs mlflow, which is not installed; pip install "
                                   "'phi3v-recipes[mlflow]', or drop mlflow from report_to."),
    ("report_to=mlflow", "sqlalchemy", "report_to=mlflow needs sqlalchemy, which is not installed; pip install "
                                       "'phi3v-recipes[mlflow]', or drop mlflow from report_to."),
    ("report_to=[tensorboard,comet]", None, "report_to=comet is not a tracker this recipe supports; choose from "
     "('tensorboard', 'mlflow', 'wandb', 'none'), or a list of them (report_to=[tensorboard,mlflow])."),
    ("tracker.wandb.mode=offlin", None, None),
    ("report_to=wandb tracker.wandb.mode=offlin", None, "tracker.wandb.mode=offlin is not one of ('online', "
     "'offline', 'disabled') (or null for $WANDB_MODE)."),
])
def test_tracker_settings_are_checked_by_validate(override, hidden, sentence, monkeypatch, tmp_path):
    """validate (start-up) refuses an unknown tracker, a missing tracker package (mlflow, or the database driver
    a SQLite store needs) and a bad wandb mode with one sentence; a wandb mode is only checked when wandb is
    used."""
    cfg = compose_config("hardware=cpu", *override.split(), f"run.output_dir={tmp_path / 'run'}")
    if hidden:
        monkeypatch.setitem(sys.modules, hidden, None)
    if sentence is None:
        validate(cfg, world=1)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg, world=1)
    assert str(err.value) == sentence


def test_a_tracker_that_cannot_be_opened_is_one_sentence(tmp_path):
    """An MLflow store that cannot be opened (a SQLite file below a path that is a file) stops the launch with one
    sentence naming the store and the setting to check, not a traceback from inside MLflow."""
    (tmp_path / "a_file").write_text("")
    uri = f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"
    cfg = compose_config("hardware=cpu", "report_to=mlflow", f"tracker.mlflow.tracking_uri={uri}",
                         f"run.output_dir={tmp_path / 'run'}")
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError) as err:
        Trackers.open(cfg, tmp_path / "run", main=True)
    message = str(err.value)
    assert message.startswith(f"report_to=mlflow: could not open the tracker run ({uri}): ")
    assert message.endswith("check the tracker.mlflow settings in conf/train.yaml, or drop mlflow from report_to.")
    assert "\n" not in message and not (tmp_path / "run" / "trackers.json").exists()
