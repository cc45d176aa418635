"""`python -m phi3v_recipes.export model.name_or_path=<run dir or checkpoint> output=<dir>`: a standalone checkpoint
in the official Phi-3-V layout, for vLLM (which cannot serve Phi-3-V LoRA adapters) and the reference code.

    LoRA run          the adapter merged into its base weights
    QLoRA run         the base loaded as the run trained it (4-bit NF4), de-quantised in the run's compute dtype,
                      the adapter merged into that
    full / frozen     the model as trained
    any model dir     re-written in the official layout

The weights are cast to `dtype` (bf16 by default) and written as safetensors shards of `max_shard_size` with an
index, with `config.json`, `generation_config.json`, the processor files and the chat template (see
`Phi3VForCausalLM.save_pretrained` and `Phi3VProcessor.save_pretrained`), the serving metadata of
`model/metadata.py`, and the code `auto_map` names (`model/remote_code.py`): by default our own model code, so that
the export loads with `trust_remote_code=True` where phi3v-recipes is not installed; with `remote_code=reference`
Microsoft's (the base's reference `*.py` files copied, or the entries pointing at its hub repository). A run
directory without a final model (training stopped, failed or diverged) is refused, naming its newest checkpoint
(`loading.missing_model`, shared with evaluate and predict). For an adapter, the export reports the max |logit|
difference between the merged model and the adapter model on one sample of the run's own data (its `config.yaml` says which task); `python -m phi3v_recipes.verify_checkpoint <dir>` then checks the result.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from phi3v_recipes.cli import exit_on_user_error, one_sentence_errors, register_resolvers, tell_deepspeed_cpu
from phi3v_recipes.config import check_model_path, check_output_dir
from phi3v_recipes.errors import ConfigError, RunStopped, reason
from phi3v_recipes.rundir import run_config

if TYPE_CHECKING:
    import torch

register_resolvers()
log = logging.getLogger("phi3v_recipes.export")

DTYPES = ("bfloat16", "float16", "float32")
def describe_load(source: str, base: str | None, run: DictConfig | None, merge_dtype: str) -> str:
    """What the export loads, in words (the first line of its printout)."""
    from phi3v_recipes.strategy import quantization_config

    if base is None:
        return "model as is"
    quant = quantization_config(run) if run is not None else None
    if quant is None:
        return f"LoRA adapter merged into {base} ({merge_dtype})"
    compute = str(quant.bnb_4bit_compute_dtype).removeprefix("torch.")
    return f"QLoRA adapter merged into the de-quantised {base} ({compute})"


def check_inputs(run: DictConfig, processor: Any, split: str, index: int) -> tuple[str, dict[str, torch.Tensor]]:
    """(sample id, model inputs) of sample `index` of the run's `split`, encoded as the run encodes it."""
    from phi3v_recipes.data.encode import encode_sample
    from phi3v_recipes.data.tasks import load_split

    samples, _ = load_split(run.task, split)
    if not 0 <= index < len(samples):
        raise ConfigError(f"check.index={index} is outside the {len(samples)} {split} samples of task="
                          f"{run.task.name}; choose another check.index or check.split.")
    sample = samples[index]
    encoded = encode_sample(sample, processor, run.data.get("max_length"))
    inputs = {"input_ids": encoded["input_ids"].reshape(1, -1)}
    if "pixel_values" in encoded:
        inputs.update(pixel_values=encoded["pixel_values"], image_sizes=encoded["image_sizes"])
    return sample.id, inputs


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()


def check_settings(cfg: DictConfig) -> Path:
    """The export's output directory, once the settings that need no library are checked (a mistake is answered
    before torch and transformers load)."""
    if OmegaConf.is_missing(cfg, "output") or not cfg.output:
        raise ConfigError("output is required: the directory to write the checkpoint to (output=<dir>).")
    output = Path(cfg.output)
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype}: choose one of {DTYPES}.")
    size = cfg.max_shard_size
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0) and not (
            isinstance(size, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", size, re.IGNORECASE)):
        raise ConfigError(f"max_shard_size={size} is not a size; give a number and a unit (KB, MB, GB, TB), e.g. "
                          "max_shard_size=5GB, or bytes as a whole number.")
    if cfg.check.split not in ("train", "eval"):
        raise ConfigError(f"check.split={cfg.check.split}: choose train or eval.")
    check_model_path(cfg.model.name_or_path, training=False)
    check_output_dir(output, "output")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"output={output} already exists and is not empty; choose a new directory (nothing is "
                          "overwritten).")
    return output


def run(cfg: DictConfig) -> dict[str, Any]:
    """Write the export `cfg` asks for; return what was written (also printed)."""
    output = check_settings(cfg)
    tell_deepspeed_cpu(cfg.device == "cpu")
    import torch

    from phi3v_recipes.loading import adapter_base, check_trained_model, load_model
    from phi3v_recipes.model import Phi3VProcessor
    from phi3v_recipes.model.metadata import write_serving_metadata
    from phi3v_recipes.model.remote_code import REMOTE_CODE_CHOICES, hub_repo_id, write_remote_code

    source = str(cfg.model.name_or_path)
    check_trained_model(source, "export")  # not tiny; a run that did not finish names its newest checkpoint
    if cfg.remote_code not in REMOTE_CODE_CHOICES:
        raise ConfigError(f"remote_code={cfg.remote_code}: choose one of {REMOTE_CODE_CHOICES}.")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but no CUDA GPU is visible; use device=cpu.")

    run_cfg = run_config(source)
    base = adapter_base(source)
    kind = describe_load(source, base, run_cfg, cfg.model.dtype)
    # The run's strategy says whether its base was 4-bit (QLoRA): then it is de-quantised before the merge.
    model = load_model(cfg, source, for_training=False, dequantize=base is not None and run_cfg is not None,
                       run=run_cfg, device=cfg.device)
    model.eval()
    processor_dir = source if (Path(source) / "preprocessor_config.json").is_file() else (base or source)
    processor = Phi3VProcessor.from_pretrained(processor_dir)

    result: dict[str, Any] = {"source": source, "output": str(output), "kind": kind, "dtype": cfg.dtype,
                              "num_crops": processor.image_processor.num_crops}
    if base is not None:
        if run_cfg is None:
            log.warning("%s has no config.yaml of a run: the logit check needs the run's data and is skipped.",
                        source)
            model = model.merge_and_unload()
        else:
            sample_id, inputs = check_inputs(run_cfg, processor, cfg.check.split, cfg.check.index)
            before = logits(model, inputs, cfg.device)
            model = model.merge_and_unload()
            after = logits(model, inputs, cfg.device)
            result.update(check_sample=sample_id, check_positions=before.shape[1],
                          max_abs_logit_diff=float((after - before).abs().max()))

    # `_name_or_path` as the base's own config.json records it (the official files: the model's name); the
    # configuration never writes a local absolute path (see `portable_name`).
    code_dir = base or source
    recorded = Path(code_dir) / "config.json"
    if recorded.is_file():
        model.config._name_or_path = json.loads(recorded.read_text()).get("_name_or_path", model.config._name_or_path)
    model = model.to(getattr(torch, cfg.dtype))
    model.config.dtype = getattr(torch, cfg.dtype)
    # Written into a staging directory beside `output`, renamed into place when complete: a failed export (disk
    # full, a stop) leaves no half-written `output` that would block the retry.
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(staging, max_shard_size=cfg.max_shard_size)
        processor.save_pretrained(staging)
        write_serving_metadata(staging)
        # Where the reference code comes from (remote_code=reference): the base directory, else its hub repository.
        run_base = None if run_cfg is None else str(run_cfg.model.name_or_path)
        repo = cfg.base_repo or hub_repo_id(base) or hub_repo_id(run_base) or hub_repo_id(source)
        result["code"] = write_remote_code(staging, cfg.remote_code, source=code_dir, repo_id=repo)
        if output.is_dir():
            output.rmdir()  # empty (checked at start-up); a file appearing there meanwhile stops the export here
        staging.rename(output)
    except Exception as err:  # noqa: BLE001 - disk full, quota, I/O errors raise OSError, SafetensorError, ...
        shutil.rmtree(staging, ignore_errors=True)
        raise RunStopped(f"writing the export to output={output} failed ({reason(err, -1)}); nothing was written there. "
                         "Free space or fix the cause, then run the same command again.") from None
    except BaseException:  # Ctrl-C: no half-written output either
        shutil.rmtree(staging, ignore_errors=True)
        raise

    result["files"] = sorted(p.name for p in output.iterdir())
    print(summary(result, output), flush=True)
    return result


def summary(result: dict[str, Any], output: Path) -> str:
    shards = sorted(output.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    lines = [
        f"== phi3v-recipes export: {result['source']} ==",
        f"{result['kind']}",
        f"wrote {output}: {len(shards)} safetensors file(s), {size / 1e6:.1f} MB, {result['dtype']}",
        f"files: {', '.join(result['files'])}",
        result["code"],
        f"num_crops: {result['num_crops']} (the processor's default, as the model was trained; a server may pass "
        "another, e.g. vLLM's mm_processor_kwargs)",
    ]
    if "max_abs_logit_diff" in result:
        lines.append(f"max |logit| difference merged vs adapter model on sample {result['check_sample']} "
                     f"({result['check_positions']} positions, before the cast to {result['dtype']}): "
                     f"{result['max_abs_logit_diff']:.3g}")
    lines.append(f"check it: python -m phi3v_recipes.verify_checkpoint {output}")
    return "\n".join(lines)


@one_sentence_errors
@hydra.main(version_base="1.3", config_path="pkg://phi3v_recipes.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(run, cfg)


if __name__ == "__main__":
    main()
