"""The recipe: one training run of a composed config, from data to a saved, evaluated model.

    validate config -> TrainingArguments (joins the process group) -> task samples -> processor
    -> screen bad samples (data.on_error) -> model + strategy -> eval before -> Trainer.train
    -> save model + processor -> eval after -> metrics.json + summary

The run directory ends with the final model (full weights, or the LoRA adapter) and processor files,
`checkpoint-*` directories, `config.yaml` (the resolved config), `metrics.json`, predictions of each evaluation,
`skipped.txt` when data.on_error=skip dropped samples, and tensorboard logs under `runs/`.
"""

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset
from transformers import TrainingArguments, set_seed

from phi3v_recipes.config import (
    ConfigError,
    gradient_accumulation,
    output_dir,
    uses_deepspeed,
    validate,
    world_size,
)
from phi3v_recipes.data.check import screen
from phi3v_recipes.data.collate import build_collator
from phi3v_recipes.data.encode import encode_sample
from phi3v_recipes.data.sample import Sample, SampleError
from phi3v_recipes.data.tasks import load_split
from phi3v_recipes.evaluation import evaluate
from phi3v_recipes.files import atomic_write_text
from phi3v_recipes.loading import TINY, load_model, load_processor, model_path, write_tiny_base
from phi3v_recipes.model.modeling_phi3v import set_supervised_logits
from phi3v_recipes.strategy import apply_strategy
from phi3v_recipes.trainer import RecipeTrainer

log = logging.getLogger("phi3v_recipes")


class EncodedDataset(Dataset):
    """Samples encoded on access (in DataLoader workers): HD transform, chat template, loss mask."""

    def __init__(self, samples: list[Sample], processor: Any, max_length: int | None):
        self.samples, self.processor, self.max_length = samples, processor, max_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return encode_sample(self.samples[index], self.processor, self.max_length)


def training_arguments(cfg: DictConfig, run_dir: Path) -> TrainingArguments:
    train, optim, hardware = cfg.train, cfg.optim, cfg.hardware
    deepspeed = OmegaConf.to_container(cfg.strategy.deepspeed, resolve=True) if uses_deepspeed(cfg) else None
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
        gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=hardware.precision == "bf16",
        fp16=hardware.precision == "fp16",
        use_cpu=hardware.name == "cpu",
        deepspeed=deepspeed,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        logging_steps=train.logging_steps,
        report_to=[] if cfg.report_to in (None, "none") else cfg.report_to,
        seed=train.seed,
        dataloader_num_workers=cfg.data.num_workers,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint train.resume asks for: None (start fresh, in a directory that holds no earlier run), the
    latest `checkpoint-*` of the run directory (true), or a given checkpoint directory; ConfigError otherwise."""
    resume = cfg.train.resume
    if resume is False or resume is None:
        if any(run_dir.glob("checkpoint-*")) or (run_dir / "metrics.json").exists():
            raise ConfigError(f"{run_dir} already holds a run; continue it with train.resume=true, or choose "
                              "another run.output_dir (nothing there is overwritten).")
        return None
    if resume is True:
        checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        if not checkpoints:
            raise ConfigError(f"train.resume=true but {run_dir} holds no checkpoint-* directory; pass the run to "
                              "continue as run.output_dir=<its directory>, or train.resume=<checkpoint path>.")
        return str(checkpoints[-1])
    if not (Path(resume) / "trainer_state.json").is_file():
        raise ConfigError(f"train.resume={resume} is not a checkpoint directory (no trainer_state.json in it).")
    return str(resume)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate as `cfg` says; return the metrics (also written to <run dir>/metrics.json)."""
    start = time.perf_counter()
    validate(cfg)
    run_dir = output_dir(cfg)
    resume = resume_checkpoint(cfg, run_dir)
    args = training_arguments(cfg, run_dir)
    main = args.process_index == 0
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    set_seed(cfg.train.seed)

    train_samples, train_problems = load_split(cfg.task, "train")
    wants_eval = cfg.eval.before or cfg.eval.after
    eval_samples, eval_problems = load_split(cfg.task, "eval") if wants_eval else ([], [])

    path = model_path(cfg, run_dir)
    if cfg.model.name_or_path == TINY:
        with args.main_process_first(desc="tiny base model"):
            if main and not (run_dir / "tiny_base" / "config.json").is_file():
                texts = [t.user + " " + t.assistant for s in train_samples for t in s.turns]
                write_tiny_base(run_dir / "tiny_base", texts, cfg.train.seed)
    processor = load_processor(path, cfg.data.num_crops)

    train_samples, skipped = screen(train_samples, processor, cfg.data.max_length, cfg.data.on_error, train_problems)
    eval_samples, eval_skipped = screen(eval_samples, processor, cfg.data.max_length, cfg.data.on_error,
                                        eval_problems)
    if cfg.eval.max_samples is not None:
        eval_samples = eval_samples[: cfg.eval.max_samples]
    if main and (skipped or eval_skipped):
        atomic_write_text(run_dir / "skipped.txt", "".join(f"{p}\n" for p in skipped + eval_skipped))
        log.warning("skipped %d bad sample(s); see %s", len(skipped) + len(eval_skipped), run_dir / "skipped.txt")
    if not train_samples:
        raise SampleError(f"task={cfg.task.name} has no usable training samples.")

    model = apply_strategy(load_model(cfg, path), cfg)
    metric = cfg.task.metric
    metrics: dict[str, Any] = {"task": cfg.task.name, "strategy": cfg.strategy.name, "metric": metric}

    def run_eval(name: str, net: torch.nn.Module) -> None:
        if eval_samples:
            metrics[name] = evaluate(net, processor, eval_samples, metric, cfg.eval.batch_size,
                                     cfg.eval.max_new_tokens, run_dir / f"{name}_predictions.jsonl")
            log.info("%s: %s = %.4f on %d samples", name, metric, metrics[name], len(eval_samples))

    if cfg.eval.before:
        run_eval("eval_before", model)

    set_supervised_logits(model, cfg.train.supervised_logits)
    trainer = RecipeTrainer(
        recipe=cfg,
        model=model,
        args=args,
        train_dataset=EncodedDataset(train_samples, processor, cfg.data.max_length),
        data_collator=build_collator(cfg.data, processor.tokenizer.pad_token_id, cfg.model.attn_implementation),
        processing_class=processor,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(run_dir))

    if cfg.eval.after:
        run_eval("eval_after", trainer.model)

    metrics.update(
        train_loss=result.training_loss,
        train_samples=len(train_samples),
        eval_samples=len(eval_samples),
        skipped_samples=len(skipped) + len(eval_skipped),
        train_samples_per_second=result.metrics.get("train_samples_per_second"),
        train_runtime_s=result.metrics.get("train_runtime"),
        global_steps=result.global_step,
        wall_time_s=round(time.perf_counter() - start, 2),
        output_dir=str(run_dir),
    )
    if main:
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        print(summary(metrics), flush=True)
    return metrics


def summary(metrics: dict[str, Any]) -> str:
    before, after = metrics.get("eval_before"), metrics.get("eval_after")
    score = " -> ".join(f"{v:.3f}" for v in (before, after) if v is not None) or "not evaluated"
    speed = metrics.get("train_samples_per_second")
    return "\n".join([
        f"== phi3v-recipes: task={metrics['task']} strategy={metrics['strategy']} ==",
        f"{metrics['metric']} (eval before -> after): {score}",
        f"train loss {metrics['train_loss']:.4f} over {metrics['global_steps']} steps; "
        f"{speed if speed is not None else float('nan'):.2f} samples/s; wall time {metrics['wall_time_s']:.1f} s",
        f"model and processor: {metrics['output_dir']}",
        f"metrics: {Path(metrics['output_dir']) / 'metrics.json'}",
    ])
