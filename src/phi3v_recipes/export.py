"""`python -m phi3v_recipes.export model.name_or_path=<run dir or checkpoint> output=<dir>`: a standalone checkpoint
in the official Phi-3-V layout, for vLLM (which cannot serve Phi-3-V LoRA adapters) and the reference code.

    LoRA run          the adapter merged into its base weights
    QLoRA run         the base loaded as the run trained it (4-bit NF4), de-quantised in the run's compute dtype,
                      the adapter merged into that
    full / frozen     the model as trained
    any model dir     re-written in the official layout

The weights are cast to `dtype` (bf16 by default) and written as safetensors shards of `max_shard_size` with an
index, with `config.json`, `generation_config.json`, the processor files and the chat template (see
`Phi3VForCausalLM.save_pretrained` and `Phi3VProcessor.save_pretrained`); the `auto_map` entries resolve (the base's
reference `*.py` files are copied, or the entries point at the base's hub repository). For an adapter, the export
reports the max |logit| difference between the merged model and the adapter model on one sample of the run's own
data (its `config.yaml` says which task); `python -m phi3v_recipes.verify_checkpoint <dir>` then checks the result.
"""

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from phi3v_recipes.cli import exit_on_user_error, one_sentence_errors, register_resolvers
from phi3v_recipes.config import check_output_dir
from phi3v_recipes.errors import ConfigError
from phi3v_recipes.rundir import run_config

register_resolvers()
log = logging.getLogger("phi3v_recipes.export")

DTYPES = ("bfloat16", "float16", "float32")


def dequantize_4bit(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Replace every bitsandbytes `Linear4bit` of `model` by an `nn.Linear` holding its de-quantised weight in
    `dtype` (exactly the weight the 4-bit layer computes with), and drop the quantization config."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Linear4bit":
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                 device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.config.dtype = dtype
    return model


def load_source(cfg: DictConfig, source: str, base: str | None, run: DictConfig | None) -> tuple[Any, str]:
    """(the model to export, a description): the adapter model (peft) for a LoRA / QLoRA run, else the model."""
    from transformers import AutoModelForCausalLM

    from phi3v_recipes.loading import _loading
    from phi3v_recipes.strategy import quantization_config

    kwargs: dict[str, Any] = {"attn_implementation": cfg.model.attn_implementation, "dtype": getattr(torch,
                                                                                                    cfg.model.dtype)}
    if base is None:
        with _loading("model", source):
            return AutoModelForCausalLM.from_pretrained(source, **kwargs).to(cfg.device), "model as is"
    from peft import PeftModel

    quant = quantization_config(run) if run is not None else None
    with _loading("base model", base):
        if quant is None:
            model = AutoModelForCausalLM.from_pretrained(base, **kwargs).to(cfg.device)
            kind = f"LoRA adapter merged into {base} ({cfg.model.dtype})"
        else:
            try:
                import bitsandbytes  # noqa: F401
            except Exception as err:  # noqa: BLE001 - any failure means 4-bit cannot load here
                raise ConfigError(f"{source} is a QLoRA run: its base loads in 4-bit through bitsandbytes, which "
                                  f"cannot run here ({type(err).__name__}: {err}); pip install "
                                  "'phi3v-recipes[qlora]'.") from None
            compute = quant.bnb_4bit_compute_dtype
            kwargs.update(dtype=compute, quantization_config=quant, device_map={"": torch.device(cfg.device)})
            model = dequantize_4bit(AutoModelForCausalLM.from_pretrained(base, **kwargs), compute)
            kind = f"QLoRA adapter merged into the de-quantised {base} ({str(compute).removeprefix('torch.')})"
    return PeftModel.from_pretrained(model, source), kind


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


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    return model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Write the export `cfg` asks for; return what was written (also printed)."""
    from phi3v_recipes.loading import TINY, adapter_base
    from phi3v_recipes.model import Phi3VProcessor
    from phi3v_recipes.model.remote_code import hub_repo_id

    if OmegaConf.is_missing(cfg, "output") or not cfg.output:
        raise ConfigError("output is required: the directory to write the checkpoint to (output=<dir>).")
    source, output = str(cfg.model.name_or_path), Path(cfg.output)
    if source == TINY:
        raise ConfigError("model.name_or_path=tiny is an untrained random model; point it at a run directory or a "
                          "checkpoint-* directory.")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype}: choose one of {DTYPES}.")
    check_output_dir(output, "output")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"output={output} already exists and is not empty; choose a new directory (nothing is "
                          "overwritten).")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but no CUDA GPU is visible; use device=cpu.")

    run_cfg = run_config(source)
    base = adapter_base(source)
    model, kind = load_source(cfg, source, base, run_cfg)
    model.eval()
    processor_dir = source if (Path(source) / "preprocessor_config.json").is_file() else (base or source)
    processor = Phi3VProcessor.from_pretrained(processor_dir)

    result: dict[str, Any] = {"source": source, "output": str(output), "kind": kind, "dtype": cfg.dtype}
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

    # Where the reference code comes from: the base directory (or the run's), else the base's hub repository.
    code_dir = base or source
    run_base = None if run_cfg is None else str(run_cfg.model.name_or_path)
    repo = cfg.base_repo or hub_repo_id(base) or hub_repo_id(run_base) or hub_repo_id(source)
    # `_name_or_path` as the base's own config.json records it (the official files: the model's name), not the
    # local path it was loaded from.
    recorded = Path(code_dir) / "config.json"
    if recorded.is_file():
        model.config._name_or_path = json.loads(recorded.read_text()).get("_name_or_path", model.config._name_or_path)
    model = model.to(getattr(torch, cfg.dtype))
    model.config.dtype = getattr(torch, cfg.dtype)
    model.save_pretrained(output, max_shard_size=cfg.max_shard_size, reference_code=code_dir, reference_repo=repo)
    processor.save_pretrained(output, reference_code=code_dir, reference_repo=repo)

    result["files"] = sorted(p.name for p in output.iterdir())
    print(summary(result, output), flush=True)
    return result


def summary(result: dict[str, Any], output: Path) -> str:
    shards = sorted(output.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    auto_map = json.loads((output / "config.json").read_text()).get("auto_map")
    if not auto_map:
        code = "auto_map: none (no reference code beside the base and no hub id: set base_repo=<hub repo>)"
    elif any("--" in v for v in auto_map.values()):
        code = f"auto_map: {next(iter(auto_map.values())).split('--')[0]} (hub repository)"
    else:
        code = "auto_map: reference code copied beside the weights"
    lines = [
        f"== phi3v-recipes export: {result['source']} ==",
        f"{result['kind']}",
        f"wrote {output}: {len(shards)} safetensors file(s), {size / 1e6:.1f} MB, {result['dtype']}",
        f"files: {', '.join(result['files'])}",
        code,
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
