"""report.html: written by every run and every sweep through the public entrypoints, self-contained (every
picture embedded), and its numbers are those of metrics.json. Pages are parsed with the standard library's
html.parser (no browser)."""

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from phi3v_recipes.report import write_report
from phi3v_recipes.report.__main__ import main as report_main
from phi3v_recipes.report.page import number
from tests.conftest import read_metrics, run_cli, run_parallel

# A tiny demo: 4-sample batches, 8 held-out samples.
TINY = ("task.train_size=16", "task.eval_size=8", "train.global_batch_size=4", "train.batch_size=4",
        "train.logging_steps=1", "optim.warmup_steps=1", "eval.batch_size=8")
VOID = {"img", "meta", "br", "hr", "input", "link"}


class Page(HTMLParser):
    """Every element of a page as (tag, attributes, text inside it)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None], list[str]]] = []
        self._open: list[int] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), []))
        if tag not in VOID:
            self._open.append(len(self.elements) - 1)

    def handle_endtag(self, tag):
        while self._open:
            index = self._open.pop()
            if self.elements[index][0] == tag:
                break

    def handle_data(self, data):
        for index in self._open:
            self.elements[index][2].append(data)

    def find(self, attribute: str) -> list[tuple[str, dict, str]]:
        return [(tag, attrs, "".join(text).strip()) for tag, attrs, text in self.elements if attribute in attrs]

    def by_id(self, element_id: str) -> str:
        (text,) = [t for _, attrs, t in self.find("id") if attrs["id"] == element_id]
        return text

    def figures(self) -> dict[str, tuple[str | None, str]]:
        """data-key -> (exact value, text shown)."""
        return {attrs["data-key"]: (attrs.get("data-value"), text) for _, attrs, text in self.find("data-key")}


def read_page(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def decode_picture(src: str) -> Image.Image:
    """The picture of a data: URI (asserts that it is one, PNG or JPEG, base64)."""
    head, _, payload = src.partition(",")
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), src[:60]
    picture = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    picture.load()
    assert picture.format == head.split("/")[1].split(";")[0].upper()
    return picture


def assert_self_contained(page: Page) -> int:
    """Every <img> is an embedded, readable PNG or JPEG; nothing is fetched (no src or stylesheet elsewhere)."""
    images = [attrs for tag, attrs, _ in page.elements if tag == "img"]
    for attrs in images:
        decode_picture(attrs["src"])
    assert all(tag == "img" for tag, _, _ in page.find("src"))
    assert not [attrs for tag, attrs, _ in page.elements if tag in ("script", "link", "iframe")]
    return len(images)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A two-job learning-rate sweep (`-m`) of the tiny demo, 2 steps each."""
    root = tmp_path_factory.mktemp("report_sweep")
    sweep = root / "sweep"
    out = run_cli(["-m", *TINY, "train.max_steps=2", "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"], cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep


@pytest.fixture(scope="module")
def resumed_run(sweep_dir) -> Path:
    """Job 1 of the sweep, copied and extended by the same command to 4 steps: a run in two launches, the second
    resumed from its step-2 checkpoint."""
    run_dir = sweep_dir.parent / "run"
    shutil.copytree(sweep_dir / "1", run_dir)
    out = run_cli([*TINY, "optim.lr=3e-3", "train.max_steps=4", f"run.output_dir={run_dir}"], cwd=sweep_dir.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def test_a_run_writes_a_self_contained_report_whose_numbers_are_its_metrics(resumed_run):
    """The run's last launch writes report.html after metrics.json: every picture in it is an embedded PNG/JPEG
    (loss and learning-rate plots, one thumbnail per held-out sample), every figure it shows (exact value and
    the rounded text) is metrics.json's, and the resume after step 2 is marked."""
    page = read_page(resumed_run / "report.html")
    metrics = read_metrics(resumed_run)
    assert metrics["global_steps"] == 4
    pictures = assert_self_contained(page)
    assert pictures >= 2 + metrics["eval_samples"]
    assert page.by_id("plot-loss") == "" and page.by_id("plot-learning-rate") == ""

    figures = page.figures()
    for key in ("eval_before", "eval_after", "train_loss", "global_steps", "eval_samples", "skipped_samples"):
        value, text = figures[key]
        assert float(value) == metrics[key] and text == number(metrics[key]), key
    for key in set(figures) & {"selection_score", "best.score", "best.step"}:  # evaluation during training
        expected = metrics.get(key) if "." not in key else metrics["best"][key.split(".")[1]]
        assert float(figures[key][0]) == expected, key
    assert "Resumed 1 time(s), at step(s) 2" in page.by_id("resumes")
    assert page.by_id("config") == (resumed_run / "config.yaml").read_text().strip()


def test_the_gallery_shows_every_held_out_answer_wrong_ones_first(resumed_run):
    """The gallery has one row per prediction of eval_after_predictions.jsonl, each with the model's answer and
    its reference, ordered by score (wrong answers first)."""
    page = read_page(resumed_run / "report.html")
    rows = [json.loads(line) for line in (resumed_run / "eval_after_predictions.jsonl").read_text().splitlines()]
    shown = [(attrs["data-id"], float(attrs["data-score"]), text) for _, attrs, text in page.find("data-id")]
    assert sorted(i for i, _, _ in shown) == sorted(r["id"] for r in rows)
    assert [s for _, s, _ in shown] == sorted(s for _, s, _ in shown)
    by_id = {r["id"]: r for r in rows}
    for sample_id, score, text in shown:
        assert score == by_id[sample_id]["score"] and by_id[sample_id]["references"][0] in text
        assert by_id[sample_id]["question"] in text


def test_report_command_puts_wrong_answers_first_and_takes_settings(resumed_run, tmp_path, capsys):
    """`python -m phi3v_recipes.report <run dir> gallery.size=5` on a run whose final predictions mix right and
    wrong answers: 5 rows, every wrong answer before any right one, each marked as such."""
    copy = tmp_path / "run"
    shutil.copytree(resumed_run, copy, ignore=shutil.ignore_patterns("checkpoint-*", "runs", "tiny_base"))
    predictions = copy / "eval_after_predictions.jsonl"
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    for i, row in enumerate(rows):  # even samples answered right, odd ones wrong
        row["prediction"], row["score"] = (row["references"][0], 1.0) if i % 2 == 0 else ("no idea", 0.0)
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert report_main([str(copy), "gallery.size=5"]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "report.html")
    page = read_page(copy / "report.html")
    shown = [(attrs["data-id"], text) for _, attrs, text in page.find("data-id")]
    wrong = [r["id"] for r in rows if r["score"] == 0.0]
    assert [i for i, _ in shown] == (wrong + [r["id"] for r in rows if r["score"] == 1.0])[:5]
    assert all(text.endswith("wrong") == (i in wrong) for i, text in shown)
    assert f"{len(wrong)} of {len(rows)} answers after training wrong" in page.by_id("gallery-summary")
    assert_self_contained(page)


def test_a_sweep_writes_a_report_with_a_row_per_job_ranked_by_the_metric(sweep_dir):
    """At the end of a `-m` sweep, <sweep dir>/report.html has one table row per job, ranked by the selection
    score (each equal to that job's metrics.json) with its status and swept lr, plus the metric-against-lr and
    overlaid loss plots, all embedded; each job directory has its own run report."""
    page = read_page(sweep_dir / "report.html")
    assert_self_contained(page)
    rows = [(tag, attrs, text) for tag, attrs, text in page.find("data-job") if tag == "tr"]
    assert sorted(int(attrs["data-job"]) for _, attrs, _ in rows) == [0, 1]
    scores = []
    for _, attrs, text in rows:
        job = sweep_dir / attrs["data-job"]
        metrics = read_metrics(job)
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        lr = next(o.split("=")[1] for o in overrides if o.startswith("optim.lr="))
        assert lr in text and "done" in text and (job / "report.html").is_file()
        scores.append(metrics["eval_after"])
    assert scores == sorted(scores, reverse=True)
    shown = [float(attrs["data-value"]) for _, attrs, _ in page.find("data-key") if attrs["data-key"] == "score"]
    assert shown == scores
    assert page.by_id("plot-losses") == ""
    assert [attrs["alt"] for tag, attrs, _ in page.elements if tag == "img" and "against" in attrs.get("alt", "")] \
        == ["accuracy against optim.lr"]


def test_the_report_shows_evaluation_during_training_from_metrics_json(resumed_run, tmp_path):
    """With the keys evaluation during training adds to metrics.json (steps, launches, evals, best,
    selection_score, early_stop), the report draws the per-step curves from `steps`, marks the resume of
    `launches`, plots `evals` with the best one, and shows best, selection score and early stop exactly."""
    copy = tmp_path / "run"
    shutil.copytree(resumed_run, copy, ignore=shutil.ignore_patterns("checkpoint-*", "runs", "tiny_base"))
    metrics = read_metrics(resumed_run)
    metrics.update(
        steps=[{"step": s, "loss": 6.0 - 0.1 * s, "learning_rate": 1e-3, "grad_norm": 1.5} for s in range(1, 5)],
        launches=[{"start_step": 0, "started": "2026-01-01T00:00:00"}, {"start_step": 3, "started": "2026-01-01T01:00:00"}],
        evals=[{"step": 1, "score": 0.25}, {"step": 2, "score": 0.625}, {"step": 4, "score": 0.5}],
        best={"step": 2, "score": 0.625}, selection_score=0.625,
        early_stop={"step": 4, "evaluations_without_improvement": 1},
    )
    (copy / "metrics.json").write_text(json.dumps(metrics))
    assert write_report(copy) == copy / "report.html"
    page = read_page(copy / "report.html")
    assert_self_contained(page)
    figures = page.figures()
    assert float(figures["best.score"][0]) == 0.625 and figures["best.step"] == ("2", "2")
    assert float(figures["selection_score"][0]) == 0.625 and figures["early_stop.step"][0] == "4"
    assert [float(figures[f"evals.{i}.score"][0]) for i in range(3)] == [0.25, 0.625, 0.5]
    assert page.by_id("plot-evals") == "" and page.by_id("plot-grad-norm") == ""
    assert "at step(s) 3" in page.by_id("resumes") and "metrics.json" in page.by_id("resumes")


def test_report_command_names_a_wrong_directory_or_setting(tmp_path, capsys):
    """A directory that holds no run or sweep, or an unknown setting: exit status 2 and one sentence naming it."""
    assert report_main([str(tmp_path)]) == 2
    assert f"{tmp_path} holds neither a run" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text("{}")
    assert report_main([str(tmp_path), "gallery.sise=3"]) == 2
    assert "gallery.sise=3" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_a_study_report_ranks_failed_trials_last_and_draws_the_trial_history(sweep_dir, tmp_path):
    """A sweep directory holding an Optuna study (optimization_results.yaml) and a failed job (status.json, no
    metrics): the failed job is ranked last with its status and reason, and the page shows the study's best
    value and an embedded trial-history plot."""
    study = tmp_path / "study"
    shutil.copytree(sweep_dir, study, ignore=shutil.ignore_patterns("checkpoint-*", "runs", "tiny_base", "*.safetensors"))
    failed = study / "2"
    shutil.copytree(sweep_dir / "0" / ".hydra", failed / ".hydra")
    overrides = yaml.safe_load((failed / ".hydra" / "overrides.yaml").read_text())
    overrides = [o if not o.startswith("optim.lr=") else "optim.lr=1e+30" for o in overrides]
    (failed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    reason = "training diverged at step 1: loss nan, gradient norm nan."
    (failed / "status.json").write_text(json.dumps({"status": "failed", "reason": reason, "exit_code": 1}))
    best = max(read_metrics(sweep_dir / job)["eval_after"] for job in ("0", "1"))
    (study / "optimization_results.yaml").write_text(yaml.safe_dump(
        {"name": "optuna", "best_params": {"optim.lr": 0.003}, "best_value": best}))
    assert write_report(study) == study / "report.html"
    page = read_page(study / "report.html")
    assert_self_contained(page)
    rows = [(attrs["data-job"], text) for tag, attrs, text in page.find("data-job") if tag == "tr"]
    assert rows[-1][0] == "2" and "failed" in rows[-1][1] and reason in rows[-1][1]
    assert float(page.figures()["best_value"][0]) == best and "optim.lr=0.003" in page.by_id("study-best")
    assert page.by_id("plot-trials") == ""
    assert [attrs["alt"] for tag, attrs, _ in page.elements if tag == "img" and "against" in attrs.get("alt", "")] \
        == ["accuracy against optim.lr"]


def test_the_report_of_a_failed_or_diverged_run_shows_what_is_there(tmp_path):
    """A launch that failed before its run began (a bad setting) leaves status.json, train.log and .hydra/, but no
    config.yaml: `python -m phi3v_recipes.report` on it used to exit 2 ("holds neither a run"), although the report
    is for failed runs too. It now writes the page (exit 0): the status with its reason, the end of train.log and
    the launch's composed configuration. A diverged run (config.yaml, no metrics.json) was titled "run report: ? /
    ?"; both are now titled with their task and strategy."""
    bad, diverged = tmp_path / "bad", tmp_path / "diverged"
    results = run_parallel({
        "bad": ["phi3v_recipes", "optim.lr=abc", f"run.output_dir={bad}"],
        "diverged": ["phi3v_recipes", "task.train_size=16", "task.eval_size=4", "train.global_batch_size=4",
                     "train.batch_size=4", "train.max_steps=2", "optim.lr=1e30", "optim.warmup_steps=0",
                     "eval.before=false", "report_to=none", f"run.output_dir={diverged}"],
    }, cwd=tmp_path)
    assert results["bad"].returncode == 2 and results["diverged"].returncode == 1, results["diverged"].stderr[-3000:]
    assert not (bad / "config.yaml").exists() and (diverged / "config.yaml").is_file()
    assert not (bad / "metrics.json").exists() and not (diverged / "metrics.json").exists()
    for run_dir, reason in ((bad, "optim.lr='abc' is not a number; give a number > 0."),
                            (diverged, "training diverged at step ")):
        assert report_main([str(run_dir)]) == 0
        page = read_page(run_dir / "report.html")
        assert_self_contained(page)
        assert ["".join(text).strip() for tag, _, text in page.elements if tag == "title"] == [
            "run report: demo / full"]
        assert page.by_id("status").startswith(f"status: failed: {reason}")
        assert reason in page.by_id("log").splitlines()[-1]  # the end of train.log: the failure's sentence
    assert "lr: abc" in page_config(bad) and "lr: 1.0e+30" in page_config(diverged)


def page_config(run_dir: Path) -> str:
    return read_page(run_dir / "report.html").by_id("config")
