"""Evaluation alone and batch prediction through their entrypoints, on a demo run trained by the test."""

import json
import os
import random
import shutil

import pytest

from phi3v_recipes.data.demo import draw
from tests.conftest import read_metrics, run_cli, run_parallel
from tests.test_jsonl_task import write_tree
from tests.test_refusals import error_line


@pytest.fixture(scope="module")
def trained(default_demo):
    """The default demo run: trained long enough to name colours."""
    return default_demo[1]


def test_evaluate_alone_reproduces_the_runs_score(trained, tmp_path):
    """`python -m phi3v_recipes.evaluate model.name_or_path=<run dir>` scores the held-out split like the run's
    own after-training evaluation, and writes predictions (id, question, prediction, references, score) beside the
    metric."""
    out = run_cli([f"model.name_or_path={trained}", f"run.output_dir={tmp_path / 'eval'}"], cwd=tmp_path,
                  module="phi3v_recipes.evaluate")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert result["score"] == read_metrics(trained)["eval_after"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "eval_predictions.jsonl").open()]
    assert len(rows) == result["samples"] and set(rows[0]) == {"id", "question", "prediction", "references", "score"}


@pytest.mark.slow
def test_evaluate_uses_the_crop_count_saved_with_the_model(tmp_path):
    """A run trained with data.num_crops=1 on a task whose default is 16 crops (jsonl) saves that crop count
    with its processor. `evaluate` without data.num_crops uses 1, so it reproduces the run's own after-training
    predictions; data.num_crops on the command line still overrides the saved value."""
    write_tree(tmp_path, 4, "train")
    write_tree(tmp_path, 3, "val")
    task = ["task=jsonl", "hardware=cpu", f"task.train_file={tmp_path / 'train.jsonl'}",
            f"task.eval_file={tmp_path / 'val.jsonl'}", f"task.image_root={tmp_path / 'images'}",
            "eval.max_new_tokens=3"]
    run_dir = tmp_path / "run"
    trained = run_cli([*task, "model=tiny", "data.num_crops=1", "data.num_workers=0", "train.max_steps=2",
                       "train.global_batch_size=2", "train.batch_size=2", "optim.warmup_steps=0", "eval.before=false",
                       "report_to=none", f"run.output_dir={run_dir}"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluate = ["phi3v_recipes.evaluate", *task, f"model.name_or_path={run_dir}"]
    runs = run_parallel({"saved": [*evaluate, f"run.output_dir={tmp_path / 'saved'}"],
                         "two": [*evaluate, "data.num_crops=2", f"run.output_dir={tmp_path / 'two'}"]}, cwd=tmp_path)
    for name, out in runs.items():
        assert out.returncode == 0, (name, out.stderr[-3000:])
    saved = json.loads((tmp_path / "saved" / "eval_metrics.json").read_text())
    assert saved["num_crops"] == 1 and saved["score"] == read_metrics(run_dir)["eval_after"]
    predictions = [json.loads(line)["prediction"] for line in (tmp_path / "saved" / "eval_predictions.jsonl").open()]
    assert predictions == [json.loads(line)["prediction"] for line in (run_dir / "eval_after_predictions.jsonl").open()]
    assert "processor: num_crops=1 (saved with the model)" in runs["saved"].stdout
    assert json.loads((tmp_path / "two" / "eval_metrics.json").read_text())["num_crops"] == 2
    assert "processor: num_crops=2 (set by data.num_crops)" in runs["two"].stdout


def test_evaluate_refuses_the_untrained_tiny_model(tmp_path):
    out = run_cli(["model.name_or_path=tiny"], cwd=tmp_path, module="phi3v_recipes.evaluate")
    assert out.returncode == 2 and "error: model.name_or_path=tiny" in out.stderr


def write_inputs(root, n: int, repeat_from: int = 10**6):
    """`n` conversations q0, q1, ... into in.jsonl; lines repeat_from + 1 and + 2 share an id."""
    colours = ["red", "blue", "green", "yellow"]
    for c in colours:  # figures like the demo's, drawn from a seed the demo never uses
        draw(c, "square", random.Random(f"predict-{c}")).save(root / f"{c}.png")
    with (root / "in.jsonl").open("w") as f:
        for i in range(n):
            c = colours[i % 4]
            turns = [{"images": [f"{c}.png"], "user": "What color is the shape? Answer with one word."}]
            if i == n - 1:  # a multi-turn conversation: earlier replies given, the last one generated
                turns = [{"images": [f"{c}.png"], "user": "Hi", "assistant": "Hello"}, {"user": "What color?"}]
            sample_id = f"q{repeat_from}" if i == repeat_from + 1 else f"q{i}"
            f.write(json.dumps({"id": sample_id, "conversations": turns}) + "\n")


def test_predict_answers_every_conversation_and_resumes(trained, tmp_path):
    """predict writes one answer per id in batches; after an interruption (simulated by a truncated output with
    a torn last line) the same command answers only what is missing, and the result equals an uninterrupted run."""
    write_inputs(tmp_path, 7)
    args = ["hardware=cpu", f"model.name_or_path={trained}", f"input={tmp_path / 'in.jsonl'}", "eval.batch_size=3"]
    full = run_cli([*args, f"output={tmp_path / 'full.jsonl'}"], cwd=tmp_path, module="phi3v_recipes.predict")
    assert full.returncode == 0, full.stderr[-3000:]
    assert "processor: num_crops=1 (saved with the model)" in full.stdout  # conf/predict.yaml has no task
    answers = [json.loads(line) for line in (tmp_path / "full.jsonl").open()]
    assert [a["id"] for a in answers] == [f"q{i}" for i in range(7)]
    assert [a["answer"] for a in answers[:4]] == ["red", "blue", "green", "yellow"]

    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "partial.jsonl").write_text("".join(lines[:3]) + lines[3][:5])  # 3 done, one torn
    shutil.copy(tmp_path / "full.jsonl.record.json", tmp_path / "partial.jsonl.record.json")  # written before them
    resumed = run_cli([*args, f"output={tmp_path / 'partial.jsonl'}"], cwd=tmp_path, module="phi3v_recipes.predict")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "answered 4 conversations (3 were already done)" in resumed.stdout
    assert (tmp_path / "partial.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()
    again = run_cli([*args, f"output={tmp_path / 'partial.jsonl'}"], cwd=tmp_path, module="phi3v_recipes.predict")
    assert again.returncode == 0 and "already answered" in again.stdout


def test_predict_with_a_repeated_id_never_loses_an_answer(trained, tmp_path):
    """Two conversations with the same id (lines 1 and 2): predict reports the repeat up front and answers both,
    each answer carrying its input line; interrupted after the first batch (the output cut after its first answer,
    as a kill leaves it), the same command answers exactly the missing lines and equals an uninterrupted run."""
    write_inputs(tmp_path, 4, repeat_from=0)
    args = ["hardware=cpu", f"model.name_or_path={trained}", f"input={tmp_path / 'in.jsonl'}", "eval.batch_size=1"]
    full = run_cli([*args, f"output={tmp_path / 'full.jsonl'}"], cwd=tmp_path, module="phi3v_recipes.predict")
    assert full.returncode == 0, full.stderr[-3000:]
    assert "note: 1 id(s) of the input repeat (q0 at lines 1, 2)" in full.stdout
    answers = [json.loads(line) for line in (tmp_path / "full.jsonl").open()]
    assert [(a["id"], a["line"]) for a in answers] == [("q0", 1), ("q0", 2), ("q2", 3), ("q3", 4)]

    first = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)[0]
    (tmp_path / "partial.jsonl").write_text(first)
    shutil.copy(tmp_path / "full.jsonl.record.json", tmp_path / "partial.jsonl.record.json")  # written before it
    resumed = run_cli([*args, f"output={tmp_path / 'partial.jsonl'}"], cwd=tmp_path, module="phi3v_recipes.predict")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "answered 3 conversations (1 were already done)" in resumed.stdout
    assert (tmp_path / "partial.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()


def test_predict_reports_bad_input_lines(trained, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "conversations": [{"user": "x"}]}\n{not json\n')
    out = run_cli(["hardware=cpu", f"model.name_or_path={trained}", f"input={tmp_path / 'bad.jsonl'}",
                   f"output={tmp_path / 'o.jsonl'}"], cwd=tmp_path, module="phi3v_recipes.predict")
    assert out.returncode == 2 and f"{tmp_path / 'bad.jsonl'}:2: not valid JSON" in out.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_predict_continues_an_output_only_from_the_same_input_model_and_settings(trained, tmp_path):
    """An existing output used to be continued by line number alone: another model (a copy of the run elsewhere,
    or the same run retrained in place), another input with other ids, or another max_new_tokens answered "all
    conversations are already answered" (exit 0), passing the first answers off as theirs. Each is now one sentence
    naming what differs (exit 2), with the output and its record unchanged; so is an output whose record is gone
    and one whose answered ids are not the input's at the same lines. The same command still continues it."""
    write_inputs(tmp_path, 3)
    (tmp_path / "in2.jsonl").write_text((tmp_path / "in.jsonl").read_text().replace('"id": "q', '"id": "r'))
    other = tmp_path / "run_b"
    shutil.copytree(trained, other)
    output, record = tmp_path / "out.jsonl", tmp_path / "out.jsonl.record.json"
    args = ["phi3v_recipes.predict", "hardware=cpu", f"output={output}"]
    same = [*args, f"model.name_or_path={trained}", f"input={tmp_path / 'in.jsonl'}"]
    first = run_cli(same[1:], cwd=tmp_path, module="phi3v_recipes.predict")
    assert first.returncode == 0, first.stderr[-3000:]
    answers, saved = output.read_text(), record.read_text()
    assert json.loads(saved)["model.name_or_path"] == str(trained)

    # the ids at the same input lines are the record's: the input edited in place to ask other questions
    (tmp_path / "edited").mkdir()
    shutil.copy(output, tmp_path / "edited" / "out.jsonl")
    edited_record = json.loads(saved) | {"input": str(tmp_path / "edited" / "in.jsonl"),
                                         "image_root": str(tmp_path / "edited")}
    (tmp_path / "edited" / "out.jsonl.record.json").write_text(json.dumps(edited_record))
    (tmp_path / "edited" / "in.jsonl").write_text((tmp_path / "in2.jsonl").read_text())
    for c in ("red", "blue", "green"):
        shutil.copy(tmp_path / f"{c}.png", tmp_path / "edited")
    (tmp_path / "orphan.jsonl").write_text(answers)  # answers without their record
    results = run_parallel({
        "model": [*args, f"model.name_or_path={other}", f"input={tmp_path / 'in.jsonl'}"],
        "input": [*args, f"model.name_or_path={trained}", f"input={tmp_path / 'in2.jsonl'}"],
        "tokens": [*same, "eval.max_new_tokens=8"],
        "edited": ["phi3v_recipes.predict", "hardware=cpu", f"model.name_or_path={trained}",
                   f"input={tmp_path / 'edited' / 'in.jsonl'}", f"output={tmp_path / 'edited' / 'out.jsonl'}"],
        "orphan": ["phi3v_recipes.predict", "hardware=cpu", f"model.name_or_path={trained}",
                   f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'orphan.jsonl'}"],
    }, cwd=tmp_path)
    then = f"; nothing in it was changed: give another output, or remove {output} and {record.name} to answer from the start."
    differs = f"error: output={output} holds answers from another input, model or settings than this command's ("
    assert error_line(results["model"]) == f"{differs}model.name_or_path: {trained} -> {other}){then}"
    assert error_line(results["input"]) == f"{differs}input: {tmp_path / 'in.jsonl'} -> {tmp_path / 'in2.jsonl'}){then}"
    assert error_line(results["tokens"]) == f"{differs}eval.max_new_tokens: 32 -> 8){then}"
    edited = tmp_path / "edited" / "out.jsonl"
    assert error_line(results["edited"]) == (
        f"error: output={edited} answers another input: its answer for line 1 has id q0, but line 1 of "
        f"{tmp_path / 'edited' / 'in.jsonl'} is id r0; nothing in it was changed: give another output, or remove "
        f"{edited} and out.jsonl.record.json to answer from the start.")
    assert error_line(results["orphan"]).startswith(
        f"error: output={tmp_path / 'orphan.jsonl'} holds 3 answers but no record of the model and settings")
    assert output.read_text() == answers and record.read_text() == saved
    assert not (tmp_path / "orphan.jsonl.record.json").exists()

    # the same run retrained in place (its weights written again): another model at the same path
    weights = (other / "model.safetensors").stat()  # copytree kept the mtimes: the record's weights until now
    os.utime(other / "model.safetensors", ns=(weights.st_atime_ns, weights.st_mtime_ns + 10**9))
    shutil.copy(output, tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl.record.json").write_text(json.dumps(json.loads(saved) | {"model.name_or_path": str(other)}))
    again = run_parallel({
        "retrained": [*args[:2], f"output={tmp_path / 'b.jsonl'}", f"model.name_or_path={other}",
                      f"input={tmp_path / 'in.jsonl'}"],
        "same": same,
    }, cwd=tmp_path)
    assert error_line(again["retrained"]).startswith(
        f"error: output={tmp_path / 'b.jsonl'} holds answers from another input, model or settings than this "
        f"command's (the weight files of model.name_or_path={other} changed since (retrained or written again in "
        "place))")
    assert again["same"].returncode == 0 and "already answered" in again["same"].stdout
