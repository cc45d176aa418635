"""`python -m phi3v_recipes.evaluate task=... model.name_or_path=<run dir or checkpoint>`: evaluate a trained
model on the task's held-out samples, alone (no training).

Batched, greedy, sharded across ranks under torchrun. Writes `eval_predictions.jsonl` and `eval_metrics.json`
into run.output_dir and prints the score. Configuration: conf/evaluate.yaml; the processor settings saved with the
model (crop count included) are used unless the command line overrides them.
"""

import json

import hydra
from omegaconf import DictConfig

from phi3v_recipes.cli import (
    exit_on_user_error,
    library_logs_to_files,
    one_sentence_errors,
    register_resolvers,
)
from phi3v_recipes.cluster import output_dir, rank
from phi3v_recipes.config import check_hardware, check_model_path, check_settings
from phi3v_recipes.errors import ConfigError, check_on_error
from phi3v_recipes.files import atomic_write_text

register_resolvers()


def run(cfg: DictConfig) -> dict:
    check_settings(cfg, nullable=["data.num_crops"])
    check_model_path(cfg.model.name_or_path, training=False)
    check_hardware(cfg)
    check_on_error(cfg.data.on_error)
    # the data and model code (transformers) load after the checks above, so that a mistake is answered at once
    from phi3v_recipes.data.check import screen
    from phi3v_recipes.data.tasks import load_split
    from phi3v_recipes.evaluation import evaluate
    from phi3v_recipes.loading import load_for_inference

    library_logs_to_files()
    run_dir = output_dir(cfg)
    model, processor = load_for_inference(cfg, "evaluate")
    samples, problems = load_split(cfg.task, "eval")
    samples, skipped = screen(samples, processor, cfg.data.max_length, cfg.data.on_error, problems,
                              cfg.data.max_image_pixels)
    if cfg.eval.max_samples is not None:
        samples = samples[: cfg.eval.max_samples]
    if not samples:
        raise ConfigError(f"task={cfg.task.name} has no evaluation samples.")
    run_dir.mkdir(parents=True, exist_ok=True)
    score = evaluate(model, processor, samples, cfg.task.metric, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                     run_dir / "eval_predictions.jsonl")
    result = {"task": cfg.task.name, "model": cfg.model.name_or_path, "metric": cfg.task.metric, "score": score,
              "samples": len(samples), "skipped_samples": len(skipped),
              "num_crops": processor.image_processor.num_crops}
    if rank() == 0:
        atomic_write_text(run_dir / "eval_metrics.json", json.dumps(result, indent=2) + "\n")
        print(f"{cfg.task.metric} of {cfg.model.name_or_path} on {len(samples)} {cfg.task.name} samples: "
              f"{score:.4f}\npredictions: {run_dir / 'eval_predictions.jsonl'}", flush=True)
    return result


@one_sentence_errors
@hydra.main(version_base="1.3", config_path="pkg://phi3v_recipes.conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    return exit_on_user_error(run, cfg)["score"]


if __name__ == "__main__":
    main()
