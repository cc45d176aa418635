"""End-to-end runs of the recipe through the public entrypoint, on the tiny model and the demo task, on CPU."""

import json
import shutil

import pytest
import torch

from phi3v_recipes.data.tasks import load_split
from phi3v_recipes.evaluation import generate_answers
from phi3v_recipes.loading import load_model, load_processor
from tests.conftest import NINE_STEPS, SMALL_DEMO, compose_config, read_metrics, run_cli, run_parallel


def logged_losses(run_dir) -> list[float]:
    (checkpoint,) = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1:]
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def check_trained_run(out, run_dir, strategy: str, overrides: list[str]) -> None:
    """The loss fell, the run directory holds the model (or adapter), processor, checkpoints, resolved config and
    metrics, train.log holds no warning (no deprecated API called by us or, through us, by peft; no attention
    fallback), and the saved output reloads and answers the eval samples exactly as the run's own after-training
    evaluation did."""
    assert out.returncode == 0, out.stderr[-3000:]
    losses = logged_losses(run_dir)
    assert len(losses) >= 4 and losses[-1] < losses[0]
    metrics = read_metrics(run_dir)
    assert {"train_loss", "eval_before", "eval_after"} <= metrics.keys()
    weights = "adapter_model.safetensors" if strategy in ("lora", "qlora") else "model.safetensors"
    for name in (weights, "preprocessor_config.json", "tokenizer.json", "config.yaml", "train.log"):
        assert (run_dir / name).is_file(), name
    assert any(run_dir.glob("checkpoint-*")) and (run_dir / ".hydra").is_dir()
    assert any(run_dir.glob("runs/**/events.out.tfevents.*"))  # report_to=tensorboard, logs in the run dir
    assert "accuracy (eval before -> after)" in out.stdout
    log = (run_dir / "train.log").read_text()  # the libraries' warnings land there: none is ours to fix
    assert "FutureWarning" not in log and "deprecated" not in log.lower() and "WARNING" not in log, log[-3000:]

    cfg = compose_config(*overrides)
    processor = load_processor(str(run_dir), cfg.data.num_crops)
    model = load_model(cfg, str(run_dir), for_training=strategy == "qlora")
    samples, _ = load_split(cfg.task, "eval")
    answers = generate_answers(model, processor, samples, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                               show_progress=False)
    saved = [json.loads(line)["prediction"] for line in (run_dir / "eval_after_predictions.jsonl").open()]
    assert answers == saved


@pytest.mark.parametrize("strategy", ["frozen_vision", "lora", "qlora"])
def test_demo_trains_saves_and_reloads(strategy, tmp_path):
    """Each strategy trains the demo through `python -m phi3v_recipes` (see check_trained_run; strategy=full is the
    default demo's, below)."""
    run_dir = tmp_path / "run"
    overrides = [f"strategy={strategy}", *SMALL_DEMO, f"run.output_dir={run_dir}"]
    check_trained_run(run_cli(overrides, cwd=tmp_path), run_dir, strategy, overrides)


def test_default_demo_trains_saves_and_reloads(default_demo):
    """strategy=full, the default, as check_trained_run says: the README's main job."""
    out, run_dir = default_demo
    check_trained_run(out, run_dir, "full", [f"run.output_dir={run_dir}"])


def test_default_demo_goes_from_chance_to_at_least_90_percent(default_demo):
    """README's main job: `python -m phi3v_recipes` with no arguments trains the demo on CPU and the held-out
    accuracy rises from chance (or below) to >= 90%, shown in the closing summary and in metrics.json."""
    out, run_dir = default_demo
    metrics = read_metrics(run_dir)
    assert metrics["eval_before"] <= 1 / 6 and metrics["eval_after"] >= 0.9, metrics
    assert f"accuracy (eval before -> after): {metrics['eval_before']:.3f} -> {metrics['eval_after']:.3f}" in out.stdout


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """The small demo under `torchrun --nproc_per_node=2` (DDP over gloo on CPU), in Hydra's default run directory:
    (output, run directory)."""
    root = tmp_path_factory.mktemp("ddp")
    out = run_cli(list(SMALL_DEMO), cwd=root, torchrun_procs=2)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = list((root / "outputs" / "demo" / "full").iterdir())
    return out, run_dir


def test_torchrun_two_processes_share_one_run_directory(ddp):
    """`torchrun --nproc_per_node=2`: both ranks use one run directory; only rank 0 writes the shared files
    (.hydra, metrics, model); rank 1 logs to its own file; evaluation is sharded and gathered."""
    out, run_dir = ddp
    assert (run_dir / "train.log").is_file() and (run_dir / "train.rank1.log").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    metrics = read_metrics(run_dir)
    assert metrics["eval_samples"] == 8
    predictions = (run_dir / "eval_after_predictions.jsonl").read_text().splitlines()
    assert [json.loads(p)["id"] for p in predictions] == [f"demo-eval-{i:05d}" for i in range(8)]
    assert out.stdout.count("== phi3v-recipes:") == 1


def test_zero2_with_two_processes_matches_ddp(ddp, tmp_path):
    """strategy=full with DeepSpeed ZeRO-2 through the Trainer on 2 CPU processes, otherwise the DDP run's
    settings: the optimizer state is sharded in the checkpoint (one file per rank), the losses equal plain DDP's,
    and the trained model is saved and evaluated."""
    zero = run_cli([*SMALL_DEMO, "hardware.deepspeed=true", f"run.output_dir={tmp_path / 'zero2'}"], cwd=tmp_path,
                   torchrun_procs=2)
    assert zero.returncode == 0, zero.stderr[-3000:]
    (step_dir,) = (tmp_path / "zero2").glob("checkpoint-6/global_step6")
    assert sorted(p.name for p in step_dir.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not list(ddp[1].glob("checkpoint-6/global_step*"))
    assert (tmp_path / "zero2" / "model.safetensors").is_file()
    assert read_metrics(tmp_path / "zero2")["eval_after"] is not None
    torch.testing.assert_close(torch.tensor(logged_losses(tmp_path / "zero2")),
                               torch.tensor(logged_losses(ddp[1])), rtol=0, atol=1e-4)


def test_two_single_process_deepspeed_runs_side_by_side(tmp_path):
    """DeepSpeed started without a launcher (`python -m phi3v_recipes strategy=full`, one GPU) joins a process
    group of one: each run gets its own on a free local port, so two such runs on one machine both finish. Before,
    DeepSpeed looked for an MPI launcher: an ImportError without mpi4py, and with it port 29500 for both runs, the
    second failing with EADDRINUSE (seen on the lent H200, whose image has mpi4py)."""
    command = ["phi3v_recipes", "strategy=full", "hardware.deepspeed=true", "task.train_size=8", "train.max_steps=2",
               "train.batch_size=2", "train.global_batch_size=2", "eval.before=false", "eval.after=false"]
    done = run_parallel({name: [*command, f"run.output_dir={tmp_path / name}"] for name in ("a", "b")}, tmp_path)
    for name, proc in done.items():
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / name / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own checkpoint
        assert read_metrics(tmp_path / name)["global_steps"] == 2


def test_multirun_sweep_writes_one_directory_per_job_and_a_summary(tmp_path):
    """`-m` with two learning rates runs two jobs, each in its own directory with its metrics, and leaves
    summary.json / summary.txt (job overrides -> final metrics, best selection score first) in the sweep directory."""
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", *SMALL_DEMO, "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").is_file() and (sweep / job / "model.safetensors").is_file()
    rows = json.loads((sweep / "summary.json").read_text())
    assert [r["selection_score"] for r in rows] == sorted((r["eval_after"] for r in rows), reverse=True)
    rows.sort(key=lambda r: r["job"])
    assert [r["job"] for r in rows] == [0, 1]
    assert [o for r in rows for o in r["overrides"] if o.startswith("optim.lr")] == ["optim.lr=0.001",
                                                                                       "optim.lr=0.003"]
    assert all(r["status"] == "done" and r["eval_after"] is not None for r in rows)
    text = (sweep / "summary.txt").read_text()
    assert "optim.lr=0.001" in text and "eval_after" in text


def test_resume_continues_from_the_latest_checkpoint(three_steps, tmp_path):
    """train.resume=true in an existing run directory (a copy of a finished 3-step run) continues from its latest
    checkpoint instead of starting over."""
    run_dir = tmp_path / "run"
    shutil.copytree(three_steps, run_dir)
    out = run_cli([*NINE_STEPS, "train.max_steps=6", "train.save_steps=3", "train.resume=true",
                   f"run.output_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert read_metrics(run_dir)["global_steps"] == 6


def test_a_fresh_run_never_overwrites_an_earlier_one(default_demo, tmp_path):
    """Training into a run directory that already holds a run stops before touching its model, checkpoints, config
    or metrics (Hydra's own launch record, .hydra/, the log and the lock are rewritten): with train.resume=false as
    an error, and with the default (auto) by saying the run is finished."""
    _, run_dir = default_demo

    def results():
        return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")
                if p.is_file() and ".hydra" not in p.parts and p.name not in ("train.log", ".lock")}

    before = results()
    out = run_cli([f"run.output_dir={run_dir}", "train.resume=false"], cwd=tmp_path)
    assert out.returncode == 2 and "already holds a run; continue it with train.resume=auto" in out.stderr
    assert results() == before
    out = run_cli([f"run.output_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 0 and "holds a finished run (metrics.json): nothing to train" in out.stdout
    assert results() == before


def test_resume_without_a_checkpoint_fails_early(tmp_path):
    """train.resume=true in a directory with no checkpoint stops with one sentence that says what to pass."""
    out = run_cli([*SMALL_DEMO, "train.resume=true", f"run.output_dir={tmp_path / 'empty'}"], cwd=tmp_path)
    assert out.returncode == 2 and "holds no complete checkpoint-* directory" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("ci", [False, True])
def test_transformers_messages_reach_the_run_log_once_whether_or_not_ci_is_set(ci, tmp_path):
    """train.log holds transformers' log records, once each, on every machine: so check_trained_run's "no WARNING"
    covers the library's warnings on a laptop as in CI. transformers passes its records on to the root logger only
    where the environment variable CI is set (its own choice, made when it first logs); a sweep sets up the run's
    logging again for each job in one process."""
    import logging

    from transformers.utils import logging as hf_logging

    from phi3v_recipes.cli import library_logs_to_files

    library = hf_logging.get_logger()
    root = logging.getLogger()
    before = (library.propagate, list(library.handlers), list(root.handlers))
    library.propagate = ci  # what transformers sets from CI
    logs = [tmp_path / "job0.log", tmp_path / "job1.log"]
    try:
        for log in logs:  # two jobs of a sweep: each gets its own file handler on the root logger
            for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
                root.removeHandler(handler)
            root.addHandler(logging.FileHandler(log))
            library_logs_to_files()
            hf_logging.get_logger("transformers.trainer_utils").warning("message for %s", log.name)
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in [h for h in root.handlers if h not in before[2]]:
            root.removeHandler(handler)
            handler.close()
        library.propagate = before[0]
        library.handlers[:] = before[1]
    assert logs[0].read_text() == "message for job0.log\n"
    assert logs[1].read_text() == "message for job1.log\n"


def test_only_the_official_eos_pairing_is_aligned_before_training():
    """Phi-3-V's config names `</s>` as eos while its tokenizer's eos is `<|endoftext|>`: training gives the
    in-memory config the tokenizer's eos and adds it to the stop ids, as the Trainer would (with a warning at every
    launch; check_trained_run holds train.log free of it). A tokenizer whose eos is some other token is not
    touched, so the Trainer still warns about that one."""
    from phi3v_recipes.model import Phi3VForCausalLM
    from phi3v_recipes.model.metadata import align_eos_for_training
    from phi3v_recipes.model.tiny import build_tiny_processor, tiny_model_config

    tokenizer = build_tiny_processor().tokenizer
    model = Phi3VForCausalLM(tiny_model_config(vocab_size=len(tokenizer)))
    eos, endoftext = tokenizer.convert_tokens_to_ids(["</s>", "<|endoftext|>"])
    assert model.config.eos_token_id == eos and model.generation_config.eos_token_id == eos
    assert align_eos_for_training(model, tokenizer)
    assert model.config.eos_token_id == endoftext and model.generation_config.eos_token_id == [endoftext, eos]

    other = Phi3VForCausalLM(tiny_model_config(vocab_size=len(tokenizer)))
    tokenizer.eos_token = "<|end|>"
    assert not align_eos_for_training(other, tokenizer)
    assert other.config.eos_token_id == eos and other.generation_config.eos_token_id == eos
