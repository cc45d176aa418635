"""The recipe: one training run of a composed config, from data to a saved, evaluated model.

    (config validated by the entrypoint, __main__.checked_run) -> TrainingArguments (joins the process group)
    -> open the run directory (lock, incomplete checkpoints out, resume point, the record: rundir.py)
    -> task samples -> processor -> screen bad samples (data.on_error; kept for relaunches: data/screen_cache.py)
    -> model + strategy -> eval before
    -> RecipeTrainer.train (guarded steps, atomic checkpoints; a stop signal saves and exits: trainer.py;
       evaluations every eval.every_steps with eval.patience: selection.py)
    -> the best evaluation's weights (eval.keep_best) -> save model + processor (finite weights only)
    -> eval after -> metrics.json + summary

The run directory ends with the final model (full weights, or the LoRA adapter) and processor files,
`checkpoint-*` directories, `config.yaml` (the resolved config), `metrics.json`, predictions of each evaluation
(`eval_step-N_predictions.jsonl` for those during training), `skipped.txt` when data.on_error=skip dropped
samples, `screen_cache.jsonl` (the screen's verdicts, which a relaunch reads instead of decoding every image
again), tensorboard logs under `runs/`, `trackers.json` (the MLflow / wandb run ids of report_to: trackers.py),
and `report.html` (report/).
"""

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TrainingArguments, set_seed

from phi3v_recipes.cli import library_logs_to_files, log_to_files
from phi3v_recipes.cluster import output_dir, resume_command, single_process_rendezvous, world_size
from phi3v_recipes.config import gradient_accumulation, uses_deepspeed
from phi3v_recipes.data.collate import build_collator
from phi3v_recipes.data.dataset import EncodedDataset
from phi3v_recipes.data.sample import Sample
from phi3v_recipes.data.screen_cache import ScreenCache
from phi3v_recipes.data.tasks import load_split
from phi3v_recipes.errors import ConfigError, RunStopped, SampleError
from phi3v_recipes.evaluation import evaluate
from phi3v_recipes.files import atomic_write_text
from phi3v_recipes.loading import TINY, adapter_base, load_model, load_processor, model_path, write_tiny_base
from phi3v_recipes.model.metadata import align_eos_for_training
from phi3v_recipes.model.modeling_phi3v import set_supervised_logits
from phi3v_recipes.preemption import StopSignals
from phi3v_recipes.report import write_report
from phi3v_recipes.rundir import METRICS, SKIPPED, open_run_dir, read_skipped, record_skipped
from phi3v_recipes.selection import Evaluations, predictions_name, selection_score
from phi3v_recipes.strategy import apply_strategy
from phi3v_recipes.trackers import Trackers, tensorboard
from phi3v_recipes.trainer import RecipeTrainer, all_finite

log = logging.getLogger("phi3v_recipes")


def checkpointing_arguments(enabled: bool, arguments: type = TrainingArguments) -> dict[str, Any]:
    """TrainingArguments' activation-checkpointing switch under the name this transformers gives it:
    `activation_checkpointing` from 5.2x on (the old name warns there), `gradient_checkpointing` before (the GPU
    image's 5.17 knows no other)."""
    fields = {field.name for field in dataclasses.fields(arguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def training_arguments(cfg: DictConfig, run_dir: Path) -> TrainingArguments:
    train, optim, hardware = cfg.train, cfg.optim, cfg.hardware
    deepspeed = None
    if uses_deepspeed(cfg):
        deepspeed = OmegaConf.to_container(cfg.strategy.deepspeed, resolve=True)
        single_process_rendezvous()  # before these arguments' first device query, where DeepSpeed joins a group
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=gradient_accumulation(cfg, world_size()),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_epsilon=optim.eps,
        lr_scheduler_type=optim.scheduler,
        warmup_steps=optim.warmup_steps,
        max_grad_norm=optim.max_grad_norm,
        **checkpointing_arguments(train.gradient_checkpointing),
        bf16=hardware.precision == "bf16",
        fp16=hardware.precision == "fp16",
        use_cpu=hardware.name == "cpu",
        deepspeed=deepspeed,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        logging_steps=train.logging_steps,
        report_to=[],  # every tracker is trackers.py's, TensorBoard included
        seed=train.seed,
        dataloader_num_workers=cfg.data.num_workers,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
        logging_nan_inf_filter=False,  # log a non-finite loss as it is (the step guard then stops the run)
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate as `cfg` says (validated: config.validate); return the metrics (also written to
    <run dir>/metrics.json)."""
    start, launch_started = time.perf_counter(), time.time()
    library_logs_to_files()  # Python warnings and transformers' messages go to train.log too
    run_dir = output_dir(cfg)
    args = training_arguments(cfg, run_dir)
    main = args.process_index == 0
    _lock, resume = open_run_dir(cfg, run_dir, main)
    trackers = Trackers.open(cfg, run_dir, main)  # report_to: mlflow, wandb (the same tracker run on a resume)
    set_seed(cfg.train.seed)

    train_samples, train_problems = load_split(cfg.task, "train")
    wants_eval = cfg.eval.before or cfg.eval.after or cfg.eval.every_steps is not None
    eval_samples, eval_problems = load_split(cfg.task, "eval") if wants_eval else ([], [])
    check_held_out(cfg, eval_samples)

    path = model_path(cfg, run_dir)
    if adapter_base(path) is not None:  # its rank and targets are the adapter's, not strategy.lora's
        raise ConfigError(f"model.name_or_path={path} is a LoRA adapter; train from a merged model instead (python -m "
                          f"phi3v_recipes.export model.name_or_path={path} output=<dir>, then model.name_or_path=<dir> "
                          f"with any strategy), or continue its own run with train.resume.")
    if cfg.model.name_or_path == TINY:
        with args.main_process_first(desc="tiny base model"):
            if main and not (run_dir / "tiny_base" / "config.json").is_file():
                texts = [t.user + " " + t.assistant for s in train_samples for t in s.turns]
                write_tiny_base(run_dir / "tiny_base", texts, cfg.train.seed)
    processor = load_processor(path, cfg.data.num_crops)

    data = cfg.data
    with ScreenCache(run_dir, processor, data.max_length, data.max_image_pixels, data.screen_workers,
                     write=main) as screened:  # verdicts kept in the run dir; the first screen spread over ranks
        train_samples, skipped, train_lengths = screened.screen("training", train_samples, data.on_error,
                                                                train_problems)
        eval_samples, eval_skipped, _ = screened.screen("held-out", eval_samples, data.on_error, eval_problems)
    if cfg.eval.max_samples is not None:
        eval_samples = eval_samples[: cfg.eval.max_samples]
    if main and (skipped or eval_skipped):
        log.warning("skipped %d bad sample(s); see %s", len(skipped) + len(eval_skipped), run_dir / SKIPPED)
    if main:
        record_skipped(run_dir, skipped + eval_skipped)
    if not train_samples:
        raise SampleError(f"task={cfg.task.name} has no usable training samples.")
    check_held_out(cfg, eval_samples)

    model = load_model(cfg, path)
    align_eos_for_training(model, processor.tokenizer)  # what the Trainer would do, with a warning, at every launch
    model = apply_strategy(model, cfg)
    metric = cfg.task.metric
    metrics: dict[str, Any] = {"task": cfg.task.name, "strategy": cfg.strategy.name, "metric": metric}

    def run_eval(name: str, net: torch.nn.Module) -> None:
        if eval_samples:
            metrics[name] = evaluate(net, processor, eval_samples, metric, cfg.eval.batch_size,
                                     cfg.eval.max_new_tokens, run_dir / f"{name}_predictions.jsonl")
            log.info("%s: %s = %.4f on %d samples", name, metric, metrics[name], len(eval_samples))

    if cfg.eval.before:
        earlier = earlier_score(run_dir / "eval_before_predictions.jsonl", eval_samples) if resume else None
        if earlier is None:
            run_eval("eval_before", model)
        else:  # the untrained model's score does not change when a run resumes: an earlier launch measured it
            metrics["eval_before"] = earlier
            log.info("eval_before: %s = %.4f, as measured by the first launch of this run", metric, earlier)

    def evaluate_at(net: torch.nn.Module, step: int) -> float:  # an evaluation during training
        return evaluate(net, processor, eval_samples, metric, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                        run_dir / predictions_name(step))

    set_supervised_logits(model, cfg.train.supervised_logits)
    stop_signals = StopSignals(cfg.run.stop_signals)  # before the DataLoader forks its workers
    trainer = RecipeTrainer(
        recipe=cfg,
        run_dir=run_dir,
        stop_signals=stop_signals,
        pending_record=cfg if resume else None,
        model=model,
        args=args,
        train_dataset=EncodedDataset(train_samples, processor, data.max_length, data.on_error, data.max_image_pixels,
                                     lengths=train_lengths),
        data_collator=build_collator(cfg.data, processor.tokenizer.pad_token_id, cfg.model.attn_implementation),
        processing_class=processor,
        evaluations=Evaluations(cfg.eval.every_steps, cfg.eval.patience),
        evaluator=evaluate_at,
        launch_started=launch_started,
    )
    for callback in [trackers.callback(trainer), *tensorboard(cfg, run_dir)]:
        trainer.add_callback(callback)
    result = trainer.train(resume_from_checkpoint=resume)
    step = trainer.state.global_step

    def stop(by: str) -> RunStopped:  # the stop sentence: logged here, printed once by cli.exit_on_user_error
        stopped = RunStopped(f"stopped by {by} at step {step}: checkpoint-{step} is saved in {run_dir}; "
                             f"{resume_command(run_dir)} to resume.",
                             exit_code=128 + (stop_signals.received or signal.SIGTERM))
        log_to_files(str(stopped), logging.WARNING)  # before the launcher's handler, which may end the process
        stopped.logged = True
        stop_signals.chain()  # a cluster launcher's handler may requeue the job here
        return stopped

    if trainer.stopped_by:
        raise stop(trainer.stopped_by)
    if not all_finite(trainer.model):
        raise RunStopped(f"the trained weights hold non-finite values after step {step}; the final model was not "
                         "saved. Lower optim.lr or check the data, then start again.")
    if step == 0:
        raise ConfigError(f"task={cfg.task.name} gave no training step ({len(train_samples)} samples, train.epochs="
                          f"{cfg.train.epochs}, train.max_steps={cfg.train.max_steps}); nothing was saved.")
    model_step = trainer.load_best() if cfg.eval.keep_best else step
    trainer.save_final_model()  # a stop signal meanwhile lets the save complete, then stops as during training
    if stop_signals.received:
        raise stop(stop_signals.name)
    stop_signals.restore()

    if cfg.eval.after:
        run_eval("eval_after", trainer.model)

    trainer.close_launch()
    totals = trainer.run_totals()
    metrics.update(
        train_loss=totals["train_loss"],
        train_samples=len(train_samples),
        eval_samples=len(eval_samples),
        skipped_samples=len(read_skipped(run_dir)),
        train_samples_per_second=totals["train_samples_per_second"],
        train_runtime_s=totals["train_runtime"],
        global_steps=result.global_step,
        wall_time_s=round(sum(entry["wall_time_s"] for entry in trainer.launches), 2),
        launch_wall_time_s=round(time.perf_counter() - start, 2),
        output_dir=str(run_dir),
        **selection_record(trainer, metrics.get("eval_after"), model_step),
        steps=trainer.step_records(),
        launches=trainer.launches,
    )
    if main:
        atomic_write_text(run_dir / METRICS, json.dumps(metrics, indent=2) + "\n")
        print(summary(metrics), flush=True)
        log_to_files(summary(metrics))
        write_report(run_dir, on_error="warn")  # report.html: plots, predictions gallery, config
    trackers.finish(metrics, step)  # after metrics.json: a tracker run marked finished is a finished run
    return metrics


def check_held_out(cfg: DictConfig, eval_samples: list[Sample]) -> None:
    """ConfigError when eval.every_steps asks for evaluations during training and there is nothing to evaluate."""
    if cfg.eval.every_steps is not None and not eval_samples:
        raise ConfigError(f"eval.every_steps={cfg.eval.every_steps} evaluates the held-out set, but task="
                          f"{cfg.task.name} has no usable held-out samples; give the task a held-out set or set "
                          "eval.every_steps=null.")


def selection_record(trainer: RecipeTrainer, eval_after: float | None, model_step: int) -> dict[str, Any]:
    """metrics.json's model-selection keys: `evals` ([{step, score}]), `best` ({step, score} or null),
    `selection_score` (the final model's score: selection.selection_score), `early_stop` (null or
    {step, evaluations_without_improvement}) and `model_step` (the step whose weights are the final model)."""
    evaluations = trainer.evaluations
    return {
        "evals": evaluations.evals,
        "best": evaluations.best,
        "selection_score": selection_score(evaluations.evals, model_step, eval_after),
        "early_stop": trainer.early_stop,
        "model_step": model_step,
    }


def earlier_score(predictions: Path, samples: list[Sample]) -> float | None:
    """The score an earlier launch wrote to `predictions` for exactly these samples (same ids, same order), else
    None."""
    if not predictions.is_file() or not samples:
        return None
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines() if line]
    if [row.get("id") for row in rows] != [s.id for s in samples]:
        return None
    return sum(row["score"] for row in rows) / len(rows)


def summary(metrics: dict[str, Any]) -> str:
    before, after = metrics.get("eval_before"), metrics.get("eval_after")
    score = " -> ".join(f"{v:.3f}" for v in (before, after) if v is not None) or "not evaluated"
    speed = metrics.get("train_samples_per_second")
    lines = [
        f"== phi3v-recipes: task={metrics['task']} strategy={metrics['strategy']} ==",
        f"{metrics['metric']} (eval before -> after): {score}",
    ]
    if metrics.get("best") is not None:
        best, stop = metrics["best"], metrics.get("early_stop")
        lines.append(
            f"best {metrics['metric']} {best['score']:.3f} at step {best['step']} of {len(metrics['evals'])} "
            f"evaluations; final model: step {metrics['model_step']}"
            + (f"; stopped early at step {stop['step']} ({stop['evaluations_without_improvement']} evaluations "
               "without improvement)" if stop else ""))
    return "\n".join([
        *lines,
        f"train loss {metrics['train_loss']:.4f} over {metrics['global_steps']} steps; "
        f"{speed if speed is not None else float('nan'):.2f} samples/s; wall time {metrics['wall_time_s']:.1f} s",
        f"model and processor: {metrics['output_dir']}",
        f"metrics: {Path(metrics['output_dir']) / METRICS}",
    ])
