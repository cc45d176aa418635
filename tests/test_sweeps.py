"""Sweeps and Optuna studies survive failed jobs: each job records how it ended (status.json), the summary ranks
every job with its status and reason, the command says how to re-run, and re-running keeps what finished. All
through `python -m phi3v_recipes -m ...` on the tiny demo, on CPU."""

import fcntl
import json
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
from urllib.parse import unquote

import yaml

from tests.conftest import offline_env, read_metrics, run_cli, start

# Two optimizer steps of 4 samples and a 4-sample held-out set: seconds per job.
TINY = ("task.train_size=16", "task.eval_size=4", "train.global_batch_size=4", "train.batch_size=4",
        "train.max_steps=2", "train.logging_steps=1", "eval.before=false", "optim.warmup_steps=0")


def status(job_dir) -> dict:
    return json.loads((job_dir / "status.json").read_text())


def test_a_sweep_goes_on_after_a_diverging_and_a_bad_value_job_and_its_rerun_keeps_the_finished_job(tmp_path):
    """optim.lr=1e-3,1e30,abc: job 1 diverges and job 2 has a bad value, yet every job runs; each records its
    status and one-sentence reason; summary.json/txt list all three with status and reason, best score first; the
    command exits 1 naming the summary and the re-run command. That command (hydra.sweep.dir pinned) leaves the
    finished job untouched and runs the failed ones again."""
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", *TINY, "optim.lr=1e-3,1e30,abc", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert status(sweep / "0") == {"status": "done", "reason": "trained 2 steps; selection score "
                                   f"{read_metrics(sweep / '0')['eval_after']:.4f}", "exit_code": 0}
    diverged, bad = status(sweep / "1"), status(sweep / "2")
    assert diverged["status"] == "failed" and diverged["exit_code"] == 1
    assert diverged["reason"].startswith("training diverged at step")
    assert bad == {"status": "failed", "reason": "optim.lr='abc' is not a number; give a number > 0.", "exit_code": 2}

    rows = json.loads((sweep / "summary.json").read_text())
    assert [(r["job"], r["status"]) for r in rows] == [(0, "done"), (1, "failed"), (2, "failed")]
    assert rows[0]["selection_score"] == read_metrics(sweep / "0")["eval_after"] is not None
    assert [r["reason"] for r in rows[1:]] == [diverged["reason"], bad["reason"]]
    text = (sweep / "summary.txt").read_text()
    assert "status" in text and "reason" in text and "optim.lr=abc" in text and diverged["reason"] in text
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error: 2 of 3 jobs did not finish")]
    assert str(sweep / "summary.txt") in line
    rerun = shlex.split(out.stderr.split(line, 1)[1].strip().splitlines()[0])
    assert rerun[:4] == ["python", "-m", "phi3v_recipes", "-m"] and rerun[-1] == f"hydra.sweep.dir={sweep}"

    finished = {p: p.stat().st_mtime_ns for p in (sweep / "0").iterdir() if p.suffix in (".json", ".safetensors")}
    done = status(sweep / "0")
    again = run_cli(rerun[3:], cwd=tmp_path)
    assert again.returncode == 1, again.stderr[-3000:]
    # the finished job is untouched, its status.json included: it still says how the run that trained it ended
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert status(sweep / "0") == done
    assert status(sweep / "1")["reason"].startswith("training diverged at step")  # tried again, failed again
    assert "training diverged" in (sweep / "1" / "train.log").read_text().split("command: ")[-1]
    assert status(sweep / "2") == bad


def test_a_single_run_records_its_status(tmp_path):
    """A plain run writes status.json too: a bad value is a failed run with its sentence and exit code 2."""
    run_dir = tmp_path / "run"
    out = run_cli([*TINY, "optim.lr=abc", f"run.output_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert status(run_dir) == {"status": "failed", "reason": "optim.lr='abc' is not a number; give a number > 0.",
                               "exit_code": 2}


def trials(sweep) -> dict[int, tuple[str, str]]:
    """{trial number: (state, optim.lr)} read from the study's SQLite file."""
    with sqlite3.connect(sweep / "optuna_study.db") as db:
        rows = db.execute("SELECT t.number, t.state, p.param_value, p.distribution_json FROM trials t "
                          "JOIN trial_params p ON p.trial_id = t.trial_id WHERE p.param_name = 'optim.lr'").fetchall()
    return {n: (state, json.loads(dist)["attributes"]["choices"][int(value)]) for n, state, value, dist in rows}


def test_an_optuna_study_records_a_failing_trial_goes_on_and_continues_in_its_sweep_dir(tmp_path):
    """hydra/sweeper=optuna, 3 trials over choice(1e-3, 1e30) (seeded): the 1e30 trial diverges and is recorded as
    FAIL in the study, the others complete; optimization_results.yaml's best_value is the best job's selection
    score and best_params its lr. The same command with n_trials=4 and the same hydra.sweep.dir continues the
    stored study: it runs exactly one more trial, in job directory 3."""
    sweep = tmp_path / "study"
    study = ["-m", "hydra/sweeper=optuna", *TINY, "optim.lr=choice(1e-3,1e30)", f"hydra.sweep.dir={sweep}"]
    out = run_cli([*study, "hydra.sweeper.n_trials=3"], cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]  # a failed trial: the study goes on, the exit code says so
    first = trials(sweep)
    assert sorted(first) == [0, 1, 2]
    assert all(state == ("FAIL" if lr == 1e30 else "COMPLETE") for state, lr in first.values())
    assert {state for state, _ in first.values()} == {"FAIL", "COMPLETE"}
    for n, (state, _) in first.items():
        assert status(sweep / str(n))["status"] == ("failed" if state == "FAIL" else "done")
    assert "error: 1 of 3 trials failed" in out.stderr or "error: 2 of 3 trials failed" in out.stderr

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    scores = {n: read_metrics(sweep / str(n))["eval_after"] for n, (state, _) in first.items() if state == "COMPLETE"}
    assert results["best_value"] == max(scores.values())
    assert results["best_value"] == read_metrics(sweep / str(results["best_trial"]))["eval_after"]
    assert results["best_params"] == {"optim.lr": first[results["best_trial"]][1]} == {"optim.lr": 1e-3}
    rows = json.loads((sweep / "summary.json").read_text())
    assert sorted(r["job"] for r in rows) == [0, 1, 2] and rows[0]["selection_score"] == results["best_value"]

    again = run_cli([*study, "hydra.sweeper.n_trials=4"], cwd=tmp_path)
    assert again.returncode == 1, again.stderr[-3000:]  # the recorded failed trials are still part of the study
    second = trials(sweep)
    assert sorted(second) == [0, 1, 2, 3] and {n: second[n] for n in first} == first
    assert (sweep / "3" / "status.json").is_file() and not (sweep / "4").exists()

    # another search space in the same directory would mix two searches in one study: refused before it opens
    other = [a.replace("choice(1e-3,1e30)", "choice(1e-3,2e-3)") for a in study]
    changed = run_cli([*other, "hydra.sweeper.n_trials=5"], cwd=tmp_path)
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert ("it swept optim.lr=choice(1e-3,1e30); this one sweeps optim.lr=choice(1e-3,2e-3)); its study would mix "
            "two searches") in changed.stderr
    assert trials(sweep) == second and not (sweep / "4").exists()


def test_the_optuna_sweeper_without_optuna_is_one_sentence(tmp_path):
    """hydra/sweeper=optuna where Optuna is not installed stops at start-up with one sentence naming the extra."""
    code = ("import runpy, sys; sys.modules['optuna'] = None; "
            "sys.argv = ['phi3v_recipes', '-m', 'hydra/sweeper=optuna', 'optim.lr=interval(1e-4, 1e-2)', "
            f"'hydra.sweep.dir={tmp_path / 'study'}']; runpy.run_module('phi3v_recipes', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=offline_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == ("error: hydra/sweeper=optuna needs Optuna, which is not installed "
                                                   "here: pip install 'phi3v-recipes[optuna]'.")


def test_the_optuna_search_space_keeps_the_hydra_optuna_sweeper_syntax():
    """interval -> float, tag(log, ...) -> log scale, tag(int, ...) -> integers, range -> Hydra's values (end
    excluded), choice and a,b -> categorical; plain overrides stay fixed; the command line wins over params."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.phi3v_optuna_sweeper.optuna_sweeper import encode, search_space

    space, fixed = search_space(
        {"optim.lr": "interval(0.1, 0.2)", "train.seed": "3"},
        ["optim.lr=tag(log, interval(1e-4, 1e-2))", "train.epochs=range(1, 4)", "strategy.lora.rank=choice(8, 16)",
         "strategy=lora,full", "+extra=tag(log, int, interval(1, 64))", "task=demo"])
    assert space == {"optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
                     "train.epochs": IntDistribution(1, 3),
                     "strategy.lora.rank": CategoricalDistribution([8, 16]),
                     "strategy": CategoricalDistribution(["lora", "full"]),
                     "+extra": IntDistribution(1, 64, log=True)}
    assert fixed == ["train.seed=3", "task=demo"]
    assert [encode(v) for v in (1e-05, 3, True, None, "lora", "a b")] == ["1e-05", "3", "true", "null", "lora",
                                                                           "'a b'"]


def summary_rows(sweep) -> dict[int, tuple[str, float | None]]:
    return {r["job"]: (r["status"], r["selection_score"]) for r in json.loads((sweep / "summary.json").read_text())}


def test_a_sweep_directory_holds_one_sweep_and_each_launch_of_it_reports_its_own_jobs(tmp_path):
    """A sweep directory holds one sweep, as a run directory holds one run. Another sweep there (other values,
    fewer jobs, the same values in another order, or a setting a resume must keep) is refused at once with one
    sentence naming the difference and the command that continues the first sweep, and nothing in the directory
    changes. A second launch while the first holds the directory is refused alike. A job of a later launch that
    is refused at its own door (here its run directory is busy) is failed in the summary, with no score, and the
    command exits 1 (it used to stay "done" with its old metrics, exit 0); once the same command finds it
    finished again, it is done with its original record."""
    sweep = tmp_path / "sweep"
    first = ["-m", *TINY, "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"]
    out = run_cli(first, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    done = {n: status(sweep / str(n)) for n in (0, 1)}
    kept = {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file() and p.name != ".lock"}

    others = {
        "optim.lr=1e-3,3e-3": "it swept optim.lr=1e-3,2e-3; this one sweeps optim.lr=1e-3,3e-3",
        "optim.lr=1e-3": "it swept optim.lr=1e-3,2e-3; this one sweeps nothing",
        "optim.lr=2e-3,1e-3": "it swept optim.lr=1e-3,2e-3; this one sweeps optim.lr=2e-3,1e-3",
        "optim.lr=1e-3,2e-3 optim.weight_decay=0.3": "a sweep trained with other settings; re-running it there "
                                                     "would mix two sweeps (optim.weight_decay: 0.01 -> 0.3)",
    }
    for overrides, difference in others.items():
        refused = run_cli(["-m", *TINY, *overrides.split(), f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
        assert refused.returncode == 2, (overrides, refused.stderr[-3000:])
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith(f"error: hydra.sweep.dir={sweep} holds ") and difference in line, line
        assert line.endswith(f"{shlex.join(['python', '-m', 'phi3v_recipes', *first])}"), line
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing written, not even the summary

    with (sweep / ".lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = run_cli(first, cwd=tmp_path)
    assert busy.returncode == 2 and busy.stderr.strip().splitlines()[-1].startswith(
        f"error: {sweep} is in use by another sweep"), busy.stderr[-3000:]

    with (sweep / "1" / ".lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused_job = run_cli(first, cwd=tmp_path)
    assert refused_job.returncode == 1, refused_job.stderr[-3000:]
    assert "error: 1 of 2 jobs did not finish (job 1 failed)" in refused_job.stderr
    assert status(sweep / "1")["reason"].startswith(f"{sweep / '1'} is in use by another run")
    assert summary_rows(sweep) == {0: ("done", read_metrics(sweep / "0")["selection_score"]), 1: ("failed", None)}

    again = run_cli(first, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {n: status(sweep / str(n)) for n in (0, 1)} == done
    assert summary_rows(sweep) == {n: ("done", read_metrics(sweep / str(n))["selection_score"]) for n in (0, 1)}


def test_jobs_under_a_custom_subdir_are_summarised_and_a_file_in_a_jobs_place_is_one_sentence(tmp_path):
    """hydra.sweep.subdir=${hydra.job.override_dirname}: the summary and report.html still list every job (the
    summary used to read only numbered directories: empty, exit 0 although a job diverged), each with its
    directory, and the report links each finished job's report where it is. A file where Hydra makes a job's
    directory stops the sweep with one sentence (exit 1) saying how to continue, not a FileExistsError
    traceback."""
    sweep = tmp_path / "named"
    out = run_cli(["-m", *TINY, "optim.lr=1e-3,1e30", "hydra.sweep.subdir=${hydra.job.override_dirname}",
                   f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "error: 1 of 2 jobs did not finish (job 1 failed)" in out.stderr
    rows = {r["job"]: r for r in json.loads((sweep / "summary.json").read_text())}
    assert sorted(rows) == [0, 1] and rows[0]["status"] == "done" and rows[1]["status"] == "failed"
    assert all("optim.lr=" in r["dir"] and (sweep / r["dir"] / "status.json").is_file() for r in rows.values())
    assert f"0 ({rows[0]['dir']})" in (sweep / "summary.txt").read_text()
    links = re.findall(r'href="([^"]+)"', (sweep / "report.html").read_text())
    assert [unquote(link) for link in links] == [f"{rows[0]['dir']}/report.html"]
    assert (sweep / unquote(links[0])).is_file()

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "0").write_text("not a directory")
    stopped = run_cli(["-m", *TINY, "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={blocked}"], cwd=tmp_path)
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"error: the sweep stopped before its next job: File exists ({blocked / '0'}). The jobs that ran are kept; "
        "make that path usable (a file where a job's directory goes: move it away), then run the same command "
        f"with hydra.sweep.dir={blocked} to continue.")


def test_sweep_directories_and_subdirs_that_cannot_hold_one_sweep_are_refused_before_any_job(tmp_path):
    """One sentence (exit 2) before any job: a constant hydra.sweep.subdir (every job in one directory); and in a
    directory holding a sweep, a subdir with the launch time (it could never continue there) or, with jobs named by
    their overrides, an added override (every job would start again elsewhere). A sweep refused at composition (a
    typo in a group option) leaves nothing that blocks the corrected command in the same directory; and the same
    values written another way (`choice(1e-3, 2e-3)` for `1e-3,2e-3`) are the same sweep."""
    def refused(args: list[str], sweep) -> str:
        out = run_cli(["-m", *TINY, *args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        return out.stderr.strip().splitlines()[-1]

    assert refused(["optim.lr=1e-3,2e-3", "hydra.sweep.subdir=same"], tmp_path / "one").startswith(
        "error: hydra.sweep.subdir=same puts every job of this sweep in one directory")
    assert not (tmp_path / "one").exists()

    sweep = tmp_path / "named"
    named = ["optim.lr=1e-3", "hydra.sweep.subdir=${hydra.job.override_dirname}"]
    assert "error: model=nosuch is not an option of model" in refused(["model=tiny,nosuch", *named], sweep)
    out = run_cli(["-m", *TINY, *named, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]  # the typo's launch made no job: the directory was free
    assert "adds train.max_steps=3, so every job would start again in a new directory" in refused(
        [*named, "train.max_steps=3"], sweep)
    assert "holds the launch time" in refused(["optim.lr=1e-3", "hydra.sweep.subdir=${now:%H%M%S}"], sweep)
    assert len(json.loads((sweep / "summary.json").read_text())) == 1

    again = run_cli(["-m", *TINY, "optim.lr=choice(1e-3)", named[1], f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert again.returncode == 2  # a one-value choice is a sweep of one job, 1e-3 alone is no sweep
    grid = tmp_path / "grid"
    assert run_cli(["-m", *TINY, "train.max_steps=1", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={grid}"],
                   cwd=tmp_path).returncode == 0
    same = run_cli(["-m", *TINY, "train.max_steps=1", "optim.lr=choice(1e-3, 2e-3)", f"hydra.sweep.dir={grid}"],
                   cwd=tmp_path)
    assert same.returncode == 0, same.stderr[-3000:]
    assert {r["status"] for r in json.loads((grid / "summary.json").read_text())} == {"done"}


def test_optuna_refuses_a_study_without_objective_and_counts_trials_that_could_not_be_composed(tmp_path):
    """A study whose trials would not evaluate (eval.after=false, no eval.every_steps) has no objective: one
    sentence, exit 2, before any trial. A trial whose configuration cannot be composed (an unknown group option)
    is a failed trial in the study, in the summary (its own job directory and reason) and in the exit code (it
    used to vanish, exit 0). A study refused for its direction leaves the directory's multirun.yaml as it was."""
    study = ["-m", "hydra/sweeper=optuna", *TINY, "optim.lr=choice(1e-3,2e-3)"]
    out = run_cli([*study, "eval.after=false", f"hydra.sweep.dir={tmp_path / 'none'}"], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "error: hydra/sweeper=optuna optimizes each trial's selection score, which needs an evaluation: "
        "eval.after=true or eval.every_steps=N.")

    sweep = tmp_path / "broken"
    out = run_cli([*study, "hydra.sweeper.n_trials=2", "model=choice(nosuch)", f"hydra.sweep.dir={sweep}"],
                  cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    rows = json.loads((sweep / "summary.json").read_text())
    assert [(r["job"], r["status"]) for r in rows] == [(0, "failed"), (1, "failed")]
    assert all(r["reason"] == "its configuration could not be composed: In 'train': Could not find 'model/nosuch'"
               for r in rows)
    assert "error: 2 of 2 trials failed" in out.stderr and "optimization_results.yaml" not in out.stderr

    typo = tmp_path / "typo"  # refused by the job itself, before it runs: its reason is the sentence, not a code
    out = run_cli([*study, "hydra.sweeper.n_trials=1", "+train.lrr=1", f"hydra.sweep.dir={typo}"], cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    (row,) = json.loads((typo / "summary.json").read_text())
    assert row["reason"].startswith("+train.lrr: train has no key lrr"), row

    record = (sweep / "multirun.yaml").read_bytes()
    flipped = run_cli([*study, "hydra.sweeper.n_trials=2", "model=choice(nosuch)", "hydra.sweeper.direction=minimize",
                       f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert flipped.returncode == 2 and "hydra.sweeper.direction=maximize" in flipped.stderr, flipped.stderr[-3000:]
    assert (sweep / "multirun.yaml").read_bytes() == record

    named = tmp_path / "named"  # optimization_results.yaml names the best trial's directory where it is
    out = run_cli([*study, "hydra.sweeper.n_trials=1", "hydra.sweep.subdir=trial_${hydra.job.num}",
                   f"hydra.sweep.dir={named}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert yaml.safe_load((named / "optimization_results.yaml").read_text())["best_job_dir"] == str(named / "trial_0")


def test_sigterm_stops_the_sweep_with_its_summary_and_report_and_the_command_continues_it(tmp_path):
    """SIGTERM to a sweep run in one process: the running job saves a checkpoint and is stopped, the jobs after it
    do not start, summary.json and report.html say so (the page used to keep the sweep as it was before), the
    command exits 143 naming the command that continues, and that command finishes both jobs."""
    from tests.test_preemption import logged, wait_for

    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "train.max_steps=8", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"]
    proc = start(args, tmp_path, threads=1)
    wait_for(lambda: logged(sweep / "0", "step 2/8"), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    assert "stopped: the sweep stopped with this job; the jobs after it did not start." in stderr
    assert [(r["job"], r["status"]) for r in json.loads((sweep / "summary.json").read_text())] == [(0, "stopped")]
    page = (sweep / "report.html").read_text()
    assert re.search(r'<tr data-job="0">.*?status-stopped', page, re.S), page[-2000:]
    assert not (sweep / "1").exists()

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [status(sweep / str(n))["reason"].startswith("trained 8 steps") for n in (0, 1)] == [True, True]
