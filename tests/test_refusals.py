"""Inputs that once slipped through, trained on something else than recorded, or changed a user's file: through the
public entrypoints, each is now one `error:` sentence with exit code 2, and nothing of the user's is changed."""

import json
import shutil
from pathlib import Path

from tests.conftest import NINE_STEPS, SMALL_DEMO, run_cli, run_parallel
from tests.test_preemption import FULL_DISK


def error_line(out) -> str:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
    return line


def test_lora_targets_and_adapter_sources_that_would_train_something_else(tmp_path):
    """- A LoRA target that matches no layer of the language model was dropped while the vision targets still
      matched: the run trained CLIP's adapters only. Now every unmatched target is named, with the layer names
      there are.
    - A LoRA run directory as model.name_or_path under strategy=full trained the adapter only and saved an adapter
      while config.yaml said full (under strategy=lora it would train the adapter's rank and targets, not the
      strategy's). Now it is refused, naming the export that merges it.
    - A broken adapter_config.json was a JSONDecodeError traceback; now it is a sentence naming the file."""
    fake = tmp_path / "adapter_run"
    fake.mkdir()
    (fake / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "base")}))
    broken = tmp_path / "broken_adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{broken")
    (tmp_path / "ask.jsonl").write_text(json.dumps({"id": "q", "conversations": [{"user": "Hi"}]}) + "\n")
    demo = ["hardware=cpu", *SMALL_DEMO, "report_to=none"]
    results = run_parallel({
        "targets": ["phi3v_recipes", *demo, "strategy=lora", "strategy.lora.target_modules=[foo,qkv_proj]",
                    f"run.output_dir={tmp_path / 'targets'}"],
        "adapter_full": ["phi3v_recipes", *demo, f"model.name_or_path={fake}", f"run.output_dir={tmp_path / 'full'}"],
        "broken": ["phi3v_recipes.predict", "hardware=cpu", f"model.name_or_path={broken}",
                   f"input={tmp_path / 'ask.jsonl'}", f"output={tmp_path / 'answers.jsonl'}"],
    }, cwd=tmp_path)
    line = error_line(results["targets"])
    assert line.startswith("error: strategy.lora.target_modules: ['foo'] match no linear layer of the language "
                           "model; its linear layers end in "), line
    assert "qkv_proj" in line and "lm_head" in line
    assert not list((tmp_path / "targets").glob("checkpoint-*"))
    assert error_line(results["adapter_full"]) == (
        f"error: model.name_or_path={fake} is a LoRA adapter; train from a merged model instead (python -m "
        f"phi3v_recipes.export model.name_or_path={fake} output=<dir>, then model.name_or_path=<dir> with any "
        "strategy), or continue its own run with train.resume.")
    assert error_line(results["broken"]).startswith(
        f"error: {broken / 'adapter_config.json'} is not a peft adapter config (")


def test_predict_never_changes_a_file_that_is_not_its_answers(tmp_path):
    """predict resumes an answers file of its own, cutting a torn last line. A file that is not one (notes without
    a final newline, the input file itself, a directory) is refused before anything in it changes: it used to cut
    the last line of any such file, then fail with a JSONDecodeError or blame an "older predict"."""
    conversations = "".join(json.dumps({"id": f"q{i}", "conversations": [{"user": "Hi"}]}) + "\n" for i in range(2))
    (tmp_path / "ask.jsonl").write_text(conversations.rstrip("\n"))  # no final newline
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nthe last line, without a newline")
    (tmp_path / "out_dir").mkdir()
    base = ["hardware=cpu", "model.name_or_path=unused", f"input={tmp_path / 'ask.jsonl'}"]
    results = run_parallel({name: ["phi3v_recipes.predict", *base, f"output={tmp_path / output}"]
                            for name, output in (("notes", "notes.txt"), ("input", "ask.jsonl"),
                                                 ("directory", "out_dir"))}, cwd=tmp_path)
    assert error_line(results["notes"]) == (
        f"error: output={notes} is not an answers file of predict (line 1); nothing in it was changed: choose a new "
        "output file, or move this one away to answer from the start.")
    assert error_line(results["input"]) == (
        f"error: output={tmp_path / 'ask.jsonl'} is the input file; give the answers a file of their own.")
    assert error_line(results["directory"]).startswith(f"error: output={tmp_path / 'out_dir'} is a directory;")
    assert notes.read_text() == "my notes\nthe last line, without a newline"
    assert (tmp_path / "ask.jsonl").read_text() == conversations.rstrip("\n")


def test_a_failed_export_leaves_no_output_and_the_retry_succeeds(three_steps, tmp_path):
    """An export whose write fails (files may not grow past 256 KiB, as on a full disk) is one sentence (exit 1), and
    `output` does not exist afterwards (it is written in a staging directory and renamed when complete), so the
    same command then succeeds; an impossible max_shard_size is refused before anything loads. Both used to leave
    a half-written `output` that refused the retry."""
    output = tmp_path / "export"
    args = [f"model.name_or_path={three_steps}", f"output={output}", "device=cpu"]
    full = run_cli(args, cwd=tmp_path, module="phi3v_recipes.export", max_file_size=FULL_DISK)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    (line,) = [x for x in full.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: writing the export to output={output} failed (") and line.endswith(
        "nothing was written there. Free space or fix the cause, then run the same command again."), line
    assert not output.exists() and not [p.name for p in tmp_path.iterdir() if "partial" in p.name]
    shard = run_cli([*args, "max_shard_size=foo"], cwd=tmp_path, module="phi3v_recipes.export")
    assert error_line(shard).startswith("error: max_shard_size=foo is not a size;")
    assert not output.exists()
    done = run_cli(args, cwd=tmp_path, module="phi3v_recipes.export")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    shutil.rmtree(output)
    assert Path(three_steps / "model.safetensors").is_file()  # the run is untouched


def test_a_torn_run_record_an_empty_run_directory_and_a_directory_as_data_file(three_steps, tmp_path):
    """A run whose config.yaml no longer parses (edited by hand, torn) was a yaml traceback at the relaunch; one
    edited to agree with a changed setting resumed on it (exit 0, the record claiming the new value for all steps);
    an
    empty run.output_dir trained into the current directory (a null one printed Hydra's warnings); a directory as task.train_file was reported as not
    existing. Each is now one sentence naming the file or setting."""
    run_dir = tmp_path / "torn"
    shutil.copytree(three_steps, run_dir)
    (run_dir / "config.yaml").write_text("model: [unclosed\n")
    edited = tmp_path / "edited"  # its config.yaml changed by hand to agree with a new optim.lr
    shutil.copytree(three_steps, edited)
    record = edited / "config.yaml"
    record.write_text(record.read_text().replace("lr: 0.003\n", "lr: 0.1\n", 1))
    (tmp_path / "data").mkdir()
    demo = ["hardware=cpu", *SMALL_DEMO, "report_to=none"]
    results = run_parallel({
        "torn": ["phi3v_recipes", "hardware=cpu", "train.max_steps=4", f"run.output_dir={run_dir}"],
        "edited": ["phi3v_recipes", *NINE_STEPS, "hardware=cpu", "train.max_steps=4", "optim.lr=0.1",
                   f"run.output_dir={edited}"],
        "empty": ["phi3v_recipes", *demo, "run.output_dir="],
        "null": ["phi3v_recipes", *demo, "run.output_dir=null"],
        "data_dir": ["phi3v_recipes", "hardware=cpu", "task=jsonl", f"task.train_file={tmp_path / 'data'}",
                     f"run.output_dir={tmp_path / 'jsonl_run'}"],
    }, cwd=tmp_path)
    assert error_line(results["torn"]).startswith(f"error: {run_dir / 'config.yaml'} is not a readable run record (")
    assert error_line(results["edited"]).startswith(  # each checkpoint holds the record of what trained it
        "error: checkpoint-3 (its config.yaml) was trained with other settings; resuming would mix two runs "
        "(optim.lr: 0.003 -> 0.1)")
    assert error_line(results["empty"]) == ("error: run.output_dir is empty; give a directory (a run directory is "
                                            "never the current directory by accident).")
    assert not (tmp_path / "config.yaml").exists() and not list(tmp_path.glob("checkpoint-*"))
    null = results["null"]  # Hydra's own report was a six-line warning block before the sentence
    assert error_line(null) == "error: run.output_dir is null; give a directory." and "Warning" not in null.stderr
    assert error_line(results["data_dir"]).startswith(f"error: {tmp_path / 'data'} is a directory; give the path of")


def test_a_model_path_that_does_not_exist_is_one_sentence_in_every_entrypoint(tmp_path):
    """An absolute (or ./) model.name_or_path that does not exist is no hub id either: train, evaluate and predict
    used to end in a huggingface_hub HFValidationError traceback ("Repo id must be in the form ..."). Each now
    stops with one sentence naming the path and what to give instead (exit 2); only training offers the demo's
    model=tiny (evaluate and predict refuse an untrained model)."""
    missing = tmp_path / "nonexistent" / "model"
    (tmp_path / "ask.jsonl").write_text(json.dumps({"id": "q", "conversations": [{"user": "Hi"}]}) + "\n")
    ask = [f"input={tmp_path / 'ask.jsonl'}", f"output={tmp_path / 'answers.jsonl'}"]
    results = run_parallel({
        "train": ["phi3v_recipes", "hardware=cpu", "task.train_size=16", "task.eval_size=4",
                  f"model.name_or_path={missing}", f"run.output_dir={tmp_path / 'run'}"],
        "evaluate": ["phi3v_recipes.evaluate", "hardware=cpu", f"model.name_or_path={missing}",
                     f"run.output_dir={tmp_path / 'eval'}"],
        "predict": ["phi3v_recipes.predict", "hardware=cpu", f"model.name_or_path={missing}", *ask],
        "relative": ["phi3v_recipes.predict", "hardware=cpu", "model.name_or_path=./nonexistent", *ask],
    }, cwd=tmp_path)
    wanted = ("does not exist; give the path of an existing model directory (a run directory, one of its "
              "checkpoint-* directories, or a model in the official layout), a hub id such as "
              "microsoft/Phi-3.5-vision-instruct")
    assert error_line(results["train"]) == (f"error: model.name_or_path={missing} {wanted}, or model=tiny for the "
                                            "offline demo model.")
    for name in ("evaluate", "predict"):
        assert error_line(results[name]) == f"error: model.name_or_path={missing} {wanted}.", name
    assert error_line(results["relative"]) == f"error: model.name_or_path=./nonexistent {wanted}."
    assert not (tmp_path / "answers.jsonl").exists() and not (tmp_path / "run" / "tiny_base").exists()


def test_a_directory_without_a_model_is_one_sentence_in_export_evaluate_and_predict(tmp_path):
    """A run directory that never produced a final model (stopped, failed or diverged) and any directory without a
    model: export ended in a transformers traceback ("Unrecognized model ... model_type"), evaluate and predict
    said "cannot load the processor ... give a run directory ... or model=tiny" of what is a run directory, where
    model=tiny is refused. Each is now one sentence (exit 2): a run names its newest complete checkpoint to use
    instead, or says it holds none; another directory names what it lacks."""
    stopped, diverged, empty = tmp_path / "stopped", tmp_path / "diverged", tmp_path / "empty"
    for step in (2, 4):
        (stopped / f"checkpoint-{step}").mkdir(parents=True)
        (stopped / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (stopped / "config.yaml").write_text("task: {name: demo}\n")
    diverged.mkdir()
    (diverged / "config.yaml").write_text("task: {name: demo}\n")
    (diverged / "status.json").write_text('{"status": "failed"}\n')
    empty.mkdir()
    (tmp_path / "ask.jsonl").write_text(json.dumps({"id": "q", "conversations": [{"user": "Hi"}]}) + "\n")
    commands = {"export": lambda model, name: ["phi3v_recipes.export", f"model.name_or_path={model}",
                                               f"output={tmp_path / ('x_' + name)}"],
                "evaluate": lambda model, name: ["phi3v_recipes.evaluate", "hardware=cpu",
                                                 f"model.name_or_path={model}", f"run.output_dir={tmp_path / name}"],
                "predict with": lambda model, name: ["phi3v_recipes.predict", "hardware=cpu",
                                                     f"model.name_or_path={model}", f"input={tmp_path / 'ask.jsonl'}",
                                                     f"output={tmp_path / (name + '.jsonl')}"]}
    runs = {f"{use}-{model.name}": command(model, f"{use.split()[0]}_{model.name}")
            for use, command in commands.items() for model in (stopped, diverged, empty)}
    results = run_parallel(runs, cwd=tmp_path)
    unfinished = "is a run that did not finish: it holds no final model (no config.json or adapter_config.json); "
    for use in commands:
        assert error_line(results[f"{use}-stopped"]) == (
            f"error: model.name_or_path={stopped} {unfinished}{use} its newest checkpoint "
            f"(model.name_or_path={stopped / 'checkpoint-4'}), or resume the run to finish it."), use
        assert error_line(results[f"{use}-diverged"]) == (
            f"error: model.name_or_path={diverged} {unfinished}it holds no checkpoint either: resume or retrain the "
            "run to produce a model."), use
        assert error_line(results[f"{use}-empty"]) == (
            f"error: model.name_or_path={empty} holds no model: no config.json (full weights) or adapter_config.json "
            "(a LoRA adapter); give a finished run directory, one of its checkpoint-* directories, or a model "
            "directory in the official layout."), use
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("x_") or p.suffix == ".jsonl" and p.name != "ask.jsonl"]
