"""The training loop: Hugging Face's `Trainer`, with what a long run on shared hardware needs.

`RecipeTrainer` is the one place where the recipe changes how the `Trainer` steps, batches and saves:

- batches: `get_train_dataloader` (padding, length grouping or padding-free packing: `data/batching.py`);
- problem samples: a batch reports samples that failed while training (`skipped` under data.on_error=skip, listed
  in `skipped.txt`; `error` under raise, which stops the run with its sentence) before the model sees it;
- every optimizer step ends in one check shared by all ranks (`_guard_step`): a non-finite loss or gradient norm
  stops the run before anything is saved; a stop signal (`preemption.py`) makes every rank save a
  checkpoint at that same step and stop; the step's loss, averaged over ranks, is recorded exactly;
- checkpoints are atomic (`_save_checkpoint`): written under `.checkpoint-staging/`, flushed to disk and renamed
  to `checkpoint-N` when complete; older ones are rotated out only after that. A failed write stops the run and
  keeps the previous checkpoint. The final model is written the same way (`save_final_model`), with the serving
  metadata and shipped model code (`model/metadata.py`). A LoRA adapter is saved without the untouched base
  weights (`_save`);
- evaluation during training (`eval.every_steps`, `selection.py`): after the step's check, a due evaluation scores
  the held-out set and writes a checkpoint there; `eval.patience` ends training; rotation keeps the best
  checkpoint (`eval.keep_best`), and `load_best` puts its weights back at the end. An evaluation that a stop
  signal put off runs when the next launch resumes, before it trains;
- the run's record (`recipe_state.json` in every checkpoint): each step's loss, learning rate and gradient norm,
  the evaluations, and each launch's start step and times, so metrics describe the whole run across launches.

Everything else is the stock `Trainer`.
"""

import functools
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import has_length, rotate_checkpoints, seed_worker

from phi3v_recipes.cluster import resume_command
from phi3v_recipes.errors import ConfigError, RunStopped, SampleError, reason
from phi3v_recipes.model.metadata import finish_saved_model
from phi3v_recipes.preemption import StopSignals
from phi3v_recipes.rundir import CHECKPOINT_PREFIX, STAGING, append_skipped, checkpoints, is_complete, record
from phi3v_recipes.selection import Evaluations

log = logging.getLogger("phi3v_recipes")

RECIPE_STATE = "recipe_state.json"
"""Saved in every checkpoint: the exact loss, learning rate and gradient norm of every optimizer step so far, the
evaluations during training, the launches (start step, start time, training and wall seconds), the world size
and the optimizer steps of one epoch (`steps_per_epoch`: how rundir.check_length measures train.epochs)."""

Evaluator = Callable[[torch.nn.Module, int], float]
"""Scores a model on the held-out set at a step (every rank calls it; every rank gets the score)."""


class RecipeTrainer(Trainer):
    """`Trainer` for one recipe run; `recipe` is the composed configuration, `run_dir` the run directory."""

    def __init__(self, *args: Any, recipe: DictConfig, run_dir: Path, stop_signals: StopSignals | None = None,
                 pending_record: DictConfig | None = None, evaluations: Evaluations | None = None,
                 evaluator: Evaluator | None = None, launch_started: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.pending_record = pending_record  # written as config.yaml with the first checkpoint it trained
        self.run_dir = Path(run_dir)
        self.stop_signals = stop_signals
        self.step_losses: list[float] = []
        self.learning_rates: list[float | None] = []
        self.grad_norms: list[float | None] = []
        self.evaluations = evaluations or Evaluations()
        self.evaluator = evaluator
        self.launches: list[dict[str, Any]] = []  # this launch last
        self.stopped_by: str | None = None
        self.early_stop: dict[str, int] | None = None
        self._step_loss = 0.0
        self._guarded_step = -1
        self._launch_started = time.time() if launch_started is None else launch_started
        self._train_started = self._launch_started
        self._eval_seconds = 0.0
        self._finished = False  # resumed from a checkpoint after which nothing is left to train (eval.patience, or
        #                         the checkpoint is at the run's last step)
        self._steps_per_epoch: int | None = None  # optimizer steps in one epoch (recipe_state.json)
        self._resumed_from: Path | None = None  # the checkpoint this launch resumed from
        self.add_callback(_TrainBegin(self))

    # ---- batches: padding, length grouping or padding-free packing (data/batching.py) -----------------------

    def get_train_dataloader(self) -> DataLoader:
        """The stock loader (random batches of `train.batch_size`) unless `data.packing` (micro-batches of
        `train.batch_size` packed rows of at most `data.max_tokens_per_row` tokens) or `data.group_by_length`
        (batches of similar-length samples) asks for a planned batch sampler. Plans follow `(train.seed, epoch)`;
        accelerate deals the micro-batches to ranks."""
        data = self.recipe.data
        if not (data.get("packing") or data.get("group_by_length")):
            return super().get_train_dataloader()
        from phi3v_recipes.data.batching import LengthGroupedBatchSampler, PackedBatchSampler
        from phi3v_recipes.data.lengths import dataset_lengths

        dataset = self.train_dataset
        lengths = dataset_lengths(dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed

        def epoch() -> int:  # the epoch being started; right after a mid-epoch resume too
            return int(math.floor(self.state.epoch + 1e-9)) if self.state.epoch else 0

        if data.get("packing"):
            samples = getattr(dataset, "samples", None)
            names = [s.where for s in samples] if samples is not None else None
            sampler = PackedBatchSampler(lengths, data.max_tokens_per_row, self.args.per_device_train_batch_size,
                                         seed, epoch_fn=epoch, names=names)
        else:
            sampler = LengthGroupedBatchSampler(lengths, self.args.per_device_train_batch_size, seed,
                                                data.length_group_batches, epoch_fn=epoch)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            worker_init_fn=functools.partial(seed_worker, num_workers=self.args.dataloader_num_workers,
                                   rank=self.args.process_index),
        )
        return self.accelerator.prepare(loader)

    # ---- problem samples -------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        if self._finished:  # no batch is drawn: the loop ends without a step (see on_train_begin)
            return [], None
        batches, num_items = [], None
        for _ in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            if "error" in batch:
                raise SampleError(f"{batch['error']} (data.on_error=raise; set data.on_error=skip to drop such "
                                  "samples and go on)")
            self._record_skipped(batch.pop("skipped", None) or [])
            batches.append(batch)
        num_items = self._get_num_items_in_batch(batches, device)
        return batches, num_items

    def _record_skipped(self, problems: list[str]) -> None:
        for problem in problems:
            log.warning("skipped while training: %s", problem)
        append_skipped(self.run_dir, problems)

    # ---- steps -----------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any) -> Any:
        self._resumed_from = Path(resume_from_checkpoint) if resume_from_checkpoint else None
        if resume_from_checkpoint:
            state = json.loads((Path(resume_from_checkpoint) / RECIPE_STATE).read_text())
            if state["world_size"] != self.args.world_size:
                raise ConfigError(
                    f"{resume_from_checkpoint} was trained by {state['world_size']} processes, this launch has "
                    f"{self.args.world_size}; resume with the same number of processes (data order and optimizer "
                    "shards depend on it).")
            self.step_losses = list(state["step_losses"])
            steps = len(self.step_losses)
            self.learning_rates = list(state.get("learning_rates", [None] * steps))
            self.grad_norms = list(state.get("grad_norms", [None] * steps))
            self.evaluations.evals = [dict(e) for e in state.get("evals", [])]
            self.launches = [dict(entry) for entry in state.get("launches", [])]
            log.info("resuming from %s at step %d", resume_from_checkpoint, steps)
        self._guarded_step = len(self.step_losses)
        self.launches.append({"start_step": len(self.step_losses), "started": _iso(self._launch_started)})
        self._train_started = time.time()
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except KeyboardInterrupt:  # a second Ctrl-C (preemption.py): stop at once and say what is kept
            kept = checkpoints(self.run_dir)
            where = (f"{kept[-1]} is the newest checkpoint kept; {resume_command(self.run_dir)} to resume from it"
                     if kept else f"no checkpoint was saved yet; {resume_command(self.run_dir)} to start again")
            raise RunStopped(f"interrupted by a second Ctrl-C at step {self.state.global_step}, before its "
                             f"checkpoint was written: {where}.", exit_code=130) from None

    def on_train_begin(self) -> None:
        """Called once the resumed weights are loaded, before the first step: runs the evaluation that a stop signal
        put off at the checkpoint's step, and ends a run whose patience had already run out."""
        step = self.state.global_step
        if step == 0:
            return
        self._evaluate_if_due()
        self.early_stop = self.evaluations.early_stop(step, self.state.max_steps)
        if self.early_stop is not None:
            self._finished = True
            self.control.should_training_stop = True
            log.info("training stopped early at step %d (eval.patience=%s): nothing more to train", step,
                     self.evaluations.patience)
        elif step >= self.state.max_steps:
            # Hugging Face's loop asks "is max_steps reached?" only after an optimizer step (DefaultFlowCallback's
            # on_step_end), and skips the loop only when the checkpoint ends an epoch: a checkpoint saved at the
            # last step in the middle of an epoch (a stop signal during the last step or the final evaluation)
            # would train one step more. Nothing is left: the run finishes from these weights. (A launch that asks
            # for fewer steps than the checkpoint trained is refused before: rundir.check_length.)
            self._finished = True
            self.control.should_training_stop = True
            log.info("resumed at step %d of %d: nothing more to train", step, self.state.max_steps)

    def set_initial_training_values(self, args: Any, dataloader: DataLoader) -> tuple:
        values = super().set_initial_training_values(args, dataloader)
        if has_length(dataloader):  # what an epoch is, in optimizer steps: rundir.check_length reads it
            self._steps_per_epoch = values[1]
        return values

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The stock restore, then the learning rate of the next step from the schedule of this launch's length.

        The restored optimizer's param groups carry the rate the checkpoint's schedule set for its next step, and
        the scheduler applies its own (rebuilt over `max_steps`, with the restored step count) only at its next
        `step()`, after the optimizer's: a run extended past its end (a linear schedule at 0) would take its first
        new step at the old schedule's rate. A resume of the same length gets the same number as before."""
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = self.lr_scheduler
        if checkpoint is None or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return  # ReduceLROnPlateau and the like have no schedule over the run's length to follow
        rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas,
                                                                            strict=True)]
        for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        scheduler._last_lr = rates  # what get_last_lr() (the logged learning_rate) says for that step

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        # transformers reads the checkpoint's config.json with its base config class, only to compare the version
        # it was saved with; the official layout's `rope_scaling` (what Microsoft's code and vLLM read) makes that
        # class warn that the key is deprecated. No call of ours sets it; this one message is not the user's.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`rope_scaling` is deprecated", category=FutureWarning)
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = self._step_loss + loss.detach()
        return loss

    def _maybe_log_save_evaluate(self, tr_loss: torch.Tensor, grad_norm: Any, *args: Any, **kwargs: Any) -> None:
        if self.state.global_step != self._guarded_step:
            self._guarded_step = self.state.global_step
            learning_rate = kwargs.get("learning_rate")
            self._guard_step(grad_norm, self._get_learning_rate() if learning_rate is None else learning_rate)
            if not self.stopped_by:  # a stop signal saves first; the next launch evaluates this step
                self._evaluate_if_due()
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _evaluate_if_due(self) -> None:
        """Evaluate the model at this step if the schedule asks for it (`selection.Evaluations.due`); the score goes
        to train.log, to the trackers through `log`, and to the checkpoint that this step then writes."""
        step, max_steps = self.state.global_step, self.state.max_steps
        if self.evaluator is None or not self.evaluations.due(step, max_steps):
            return
        started = time.time()
        device = self.args.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            score = self.evaluator(self.model, step)  # generation takes no random number; training's RNG is kept
        self._eval_seconds += time.time() - started
        self.evaluations.add(step, score)
        best = self.evaluations.best
        metric = self.recipe.task.metric
        if self.is_world_process_zero():
            log.info("evaluation at step %d: %s = %.4f (best %.4f at step %d)", step, metric, score, best["score"],
                     best["step"])
        should_log = self.control.should_log
        self.log({f"eval_{metric}": score})
        self.control.should_log = should_log  # Hugging Face's on_log clears it: this step's loss is still to log
        self.control.should_save = True  # the weights that scored are kept
        self.early_stop = self.evaluations.early_stop(step, max_steps)
        if self.early_stop is not None:
            self.control.should_training_stop = True
            if self.is_world_process_zero():
                log.info("early stop at step %d: %d evaluations without improvement on %.4f at step %d "
                         "(eval.patience=%d)", step, self.early_stop["evaluations_without_improvement"],
                         best["score"], best["step"], self.evaluations.patience)

    def _guard_step(self, grad_norm: Any, learning_rate: float | None = None) -> None:
        """One all-reduce per optimizer step: [loss sum, non-finite count, stop signals] over the ranks."""
        loss = torch.as_tensor(self._step_loss, dtype=torch.float64, device=self.args.device).reshape(())
        self._step_loss = 0.0
        norm = float(grad_norm) if grad_norm is not None else 0.0
        # Under fp16 an overflowing gradient is routine: the loss scaler skips that step and lowers the scale.
        bad_norm = not math.isfinite(norm) and self.recipe.hardware.precision != "fp16"
        flags = torch.stack([
            loss,
            torch.tensor(float(not torch.isfinite(loss) or bad_norm), dtype=torch.float64, device=loss.device),
            torch.tensor(float(self.stop_signals is not None and self.stop_signals.received is not None),
                         dtype=torch.float64, device=loss.device),
        ])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags)
        total, nonfinite, stop = flags.tolist()
        step = self.state.global_step
        if nonfinite:
            last = checkpoints(self.run_dir)
            kept = f"the last good checkpoint, {last[-1].name}, is kept" if last else "no checkpoint was written yet"
            raise RunStopped(
                f"training diverged at step {step}: loss {total / self.args.world_size}, gradient norm {norm}; "
                f"nothing from this step was saved and {kept}. Lower optim.lr (now {self.recipe.optim.lr}) or "
                "check the data, then start again.")
        self.step_losses.append(total / self.args.world_size)
        self.learning_rates.append(float(learning_rate) if learning_rate is not None else None)
        self.grad_norms.append(norm if grad_norm is not None and math.isfinite(norm) else None)
        if stop:
            self.stopped_by = (self.stop_signals.name if self.stop_signals and self.stop_signals.received
                               else "a stop signal on another rank")
            self.control.should_save = True
            self.control.should_training_stop = True

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs and self.step_losses:  # the end of train(): the whole run's figures, not this launch's
            self._update_launch()
            logs = {**logs, **self.run_totals()}
        super().log(logs, start_time)
        if self.is_world_process_zero() and "loss" in logs:
            extra = "".join(f" {k} {logs[k]:.6g}" for k in ("grad_norm", "learning_rate") if k in logs)
            log.info("step %d/%d: loss %.6f%s", self.state.global_step, self.state.max_steps, logs["loss"], extra)

    # ---- the run's record across launches ----------------------------------------------------------------------

    def _update_launch(self) -> None:
        """This launch's last trained step and its seconds of training (evaluations during training excluded) and
        of wall time so far; saved with each checkpoint, so an interrupted launch counts up to its last one."""
        now = time.time()
        self.launches[-1].update(end_step=self.state.global_step,
                                 train_runtime_s=round(now - self._train_started - self._eval_seconds, 3),
                                 wall_time_s=round(now - self._launch_started, 3))

    def close_launch(self) -> None:
        """Bring this launch's wall time up to now (the end of the run: the final save and evaluation included)."""
        self.launches[-1]["wall_time_s"] = round(time.time() - self._launch_started, 3)

    def run_totals(self) -> dict[str, float | None]:
        """Loss and speed of the whole run, over every launch: the mean loss of every step, the seconds spent
        training the steps that were kept, and the samples (optimizer steps x global batch) per second."""
        steps = len(self.step_losses)
        runtime = sum(entry.get("train_runtime_s", 0.0) for entry in self.launches)
        samples = steps * self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return {
            "train_loss": sum(self.step_losses) / steps if steps else float("nan"),
            "train_runtime": round(runtime, 3),
            "train_samples_per_second": round(samples / runtime, 3) if runtime > 0 else None,
            "train_steps_per_second": round(steps / runtime, 3) if runtime > 0 else None,
        }

    def step_records(self) -> list[dict[str, Any]]:
        """One row per optimizer step of the whole run: step, loss, learning rate, gradient norm."""
        return [{"step": i + 1, "loss": loss, "learning_rate": lr, "grad_norm": norm} for i, (loss, lr, norm)
                in enumerate(zip(self.step_losses, self.learning_rates, self.grad_norms, strict=True))]

    def load_best(self) -> int:
        """Load the weights of the best evaluation (eval.keep_best) into the model; returns the step whose weights
        the model now holds (the last step when it is the best, or when nothing was evaluated).

        Rotation never removes the best checkpoint under keep_best, but a run can still have lost it: it resumed
        from an older checkpoint (train.resume=<path>) whose history's best was rotated away after a later
        evaluation scored higher, or the checkpoint was deleted by hand. Then the model keeps the last step's
        weights, a warning says so, and the returned step says so too (metrics.json `model_step`), rather than
        claiming weights that were not loaded."""
        best = self.evaluations.best
        step = self.state.global_step
        if best is None or best["step"] == step:
            return step
        checkpoint = self._best_checkpoint(best["step"])
        if checkpoint is None:
            log.warning("eval.keep_best: the best evaluation (%s = %.4f at step %d) has no checkpoint any more "
                        "(%s is gone); the final model is the last step's weights (step %d), and metrics.json "
                        "records that step and its score", self.recipe.task.metric, best["score"], best["step"],
                        self._checkpoint_dir(best["step"]), step)
            return step
        self.state.best_model_checkpoint = str(checkpoint)
        self.state.best_metric = best["score"]
        self._load_best_model()
        log.info("final model: the weights of the best evaluation, %s = %.4f at step %d (%s)",
                 self.recipe.task.metric, best["score"], best["step"], self.state.best_model_checkpoint)
        return best["step"]

    def _checkpoint_dir(self, step: int) -> Path:
        return self.run_dir / f"{CHECKPOINT_PREFIX}{step}"

    def _best_checkpoint(self, step: int) -> Path | None:
        """The complete checkpoint of `step`: in the run directory, or beside the checkpoint this launch resumed
        from (train.resume=<another run's checkpoint> carries that run's evaluations); None when neither has it."""
        places = [self.run_dir] + ([self._resumed_from.parent] if self._resumed_from is not None else [])
        for place in places:
            checkpoint = place / f"{CHECKPOINT_PREFIX}{step}"
            if checkpoint.is_dir() and is_complete(checkpoint):
                return checkpoint
        return None

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        staging_root = self.run_dir / STAGING
        staged, final = staging_root / name, self.run_dir / name
        main = self.is_world_process_zero()
        run_output_dir = self.args.output_dir
        self.args.output_dir = str(staging_root)  # the stock save writes <output_dir>/checkpoint-N
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            self._update_launch()
            if main:
                state = {"step_losses": self.step_losses, "learning_rates": self.learning_rates,
                         "grad_norms": self.grad_norms, "evals": self.evaluations.evals, "launches": self.launches,
                         "world_size": self.args.world_size, "steps_per_epoch": self._steps_per_epoch}
                (staged / RECIPE_STATE).write_text(json.dumps(state) + "\n")
                record(self.recipe, staged)  # what trained these weights, beside them (checked at a resume)
                _fsync_tree(staged)
                if final.exists():  # the same step saved twice (e.g. a resume at the final step): replace it
                    shutil.rmtree(final)
                os.replace(staged, final)
                _fsync_dir(self.run_dir)
                if self.pending_record is not None:
                    record(self.pending_record, self.run_dir)
                    self.pending_record = None
        except Exception as err:  # noqa: BLE001 - disk full, quota, I/O errors raise OSError, SafetensorError, ...
            if main:
                shutil.rmtree(staging_root, ignore_errors=True)
            raise self._write_failed(err, f"checkpoint {final}") from None
        finally:
            self.args.output_dir = run_output_dir
        self.accelerator.wait_for_everyone()  # no rank leaves (e.g. on a stop signal) before the rename is done
        if main:
            shutil.rmtree(staging_root, ignore_errors=True)
            best = self.evaluations.best if self.recipe.eval.get("keep_best", True) else None
            rotate_checkpoints(str(self.run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=str(self._checkpoint_dir(best["step"])) if best else None,
                               use_mtime=False)
            log.info("saved %s", final)


    def save_final_model(self) -> None:
        """The final model (weights or adapter, config, processor files) into the run directory, written like a
        checkpoint: under `.checkpoint-staging/final-model`, flushed, then each file renamed into place with
        `config.json` last, so a run directory never holds a config without its weights. A failed write removes
        the staged files and stops the run naming the last good checkpoint (a relaunch resumes there and saves
        again)."""
        staging_root = self.run_dir / STAGING
        staged = staging_root / "final-model"
        main = self.is_world_process_zero()
        try:
            self.save_model(str(staged))
            self.accelerator.wait_for_everyone()
            if main:
                finish_saved_model(staged)  # serving metadata and the shipped model code, before anything is renamed
                _fsync_tree(staged)
                for path in sorted(staged.iterdir(), key=lambda p: p.name == "config.json"):
                    target = self.run_dir / path.name
                    if path.is_dir() and target.is_dir():
                        shutil.rmtree(target)
                    os.replace(path, target)
                _fsync_dir(self.run_dir)
        except Exception as err:  # noqa: BLE001 - as in _save_checkpoint
            if main:
                shutil.rmtree(staging_root, ignore_errors=True)
            raise self._write_failed(err, f"the final model to {self.run_dir}") from None
        if main:
            shutil.rmtree(staging_root, ignore_errors=True)
            log.info("saved the final model to %s", self.run_dir)

    def _write_failed(self, err: Exception, what: str) -> RunStopped:
        """The one sentence for a write that failed (disk full, quota, I/O error), naming the last good checkpoint."""
        kept = checkpoints(self.run_dir)
        return RunStopped(
            f"writing {what} failed ({reason(err, -1)}); it was removed and "
            f"{kept[-1].name + ' is kept' if kept else 'no earlier checkpoint exists'}. Free space in "
            f"{self.run_dir}, then {resume_command(self.run_dir)} to resume.")

    # ---- adapter saves ----------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints and the final model as the stock `Trainer` writes them, except that a LoRA adapter holds
        the adapter weights only: peft would add the untouched base `lm_head` because `lm_head` is a LoRA target
        (`save_embedding_layers="auto"`), about 200 MB per save at real size in bf16; the base the adapter loads
        onto has it."""
        from peft import PeftModel

        model = self.model
        if not isinstance(model, PeftModel):
            super()._save(output_dir, state_dict)
            return
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
        try:
            super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained


class _TrainBegin(TrainerCallback):
    """Calls `RecipeTrainer.on_train_begin` at HF's `on_train_begin`: resumed weights are loaded, no step taken."""

    def __init__(self, trainer: RecipeTrainer):
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.on_train_begin()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def all_finite(model: torch.nn.Module) -> bool:
    """True when every trainable parameter is finite (checked before the final model is saved)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)
