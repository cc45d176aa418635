"""`python -m phi3v_recipes.verify_checkpoint <dir>`: does a checkpoint directory meet what Microsoft's reference
code and vLLM's Phi-3-V loader require of it? One line per requirement, exit code 1 on any failure.

Only file headers are read (config and processor JSON, safetensors headers), so a real-size checkpoint is checked
in seconds. The requirements (see docs/export.md):

    architectures         `Phi3VForCausalLM`, model_type `phi3_v`
    img_processor         `image_dim_out` 1024 (vLLM asserts it) and `num_img_tokens`
    embd_layer            `use_hd_transform` and `with_learnable_separator` true, `hd_transform_order` `sub_glb`
    rope_scaling          present; a `{type, short_factor, long_factor}` dict (type `su`/`longrope`, head_dim/2
                          factors each) whenever max_position_embeddings exceeds original_max_position_embeddings
    torch_dtype           present (the reference code's `dtype="auto"`)
    tensor names          exactly the official names and shapes for this config: none missing, none extra
    no leftovers          no adapter (`lora_*`, `base_layer`, adapter files) or quantisation (`absmax`, `quant_*`,
                          `quantization_config`) traces
    auto_map              every entry of config.json and preprocessor_config.json resolves: `<module>.py` beside
                          the weights defining the class (and the files it imports relatively), or a
                          `<repo id>--<module>.<Class>` hub reference
    shipped code          our model code beside the weights carries the header naming the phi3v-recipes version
    serving metadata      config.json `use_cache: true` and `eos_token_id` the id of `</s>`; generation_config.json
                          with the stop ids (`<|endoftext|>`, `<|assistant|>`, `<|end|>`); tokenizer_class
                          `LlamaTokenizer` as the official files; no local absolute path in any JSON file
    processor files       preprocessor_config.json with the official fields; tokenizer files with a
                          tokenizer_class transformers 4 knows; a chat template
    image token           with the official vocabulary, the tokenizer maps `<|image|>` to 32044 (vLLM's id)

`--any-size` checks a model of another size (e.g. the tiny test model) against its own `vision_config` instead of
the CLIP ViT-L/14-336 that the reference code and vLLM build; such a model cannot be served by them.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3v_recipes.model.metadata import OFFICIAL_TOKENIZER_CLASS, STOP_TOKENS, absolute_paths, token_ids
from phi3v_recipes.model.processing_phi3v import EOS_TOKEN
from phi3v_recipes.model.remote_code import HEADER_END, REFERENCE_MODULES, SHIPPED_MODULES

__all__ = ["Check", "verify", "main"]

OFFICIAL_IMAGE_TOKEN_ID = 32044  # vLLM hard-codes it
OFFICIAL_ENDOFTEXT_ID = 32000
CLIP_VIT_L_WIDTH = 1024
ROPE_SCALING_KEYS = {"type", "short_factor", "long_factor"}
LEFTOVER = re.compile(r"(lora_[AB]|lora_embedding|lora_magnitude|\.base_layer\.|absmax|quant_map|quant_state|"
                      r"nested_|\.SCB$|weight_format|modules_to_save|original_module)")
PREPROCESSOR_FIELDS = ("processor_class", "image_processor_type", "num_crops", "num_img_tokens", "image_mean",
                       "image_std", "do_convert_rgb", "auto_map")
TRANSFORMERS_5_ONLY_TOKENIZERS = ("TokenizersBackend",)  # unknown to the transformers 4 of the reference code
# The JSON files a loader reads (a run directory's own records, metrics.json and the like, are not among them).
LOADER_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.json")


@dataclass
class Check:
    """One requirement and whether the directory meets it."""

    requirement: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.requirement}: {self.detail}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {dtype, shape, data_offsets}} from a safetensors file's header (the data is not read)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def stored_tensors(directory: Path) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """({name: shape} of every stored tensor, problems with the weight files)."""
    problems: list[str] = []
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = (_read_json(index) or {}).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = {}, [p.name for p in sorted(directory.glob("*.safetensors"))]
    if not files:
        problems.append("no model.safetensors and no model.safetensors.index.json")
    if [p for p in directory.glob("*.bin") if p.name != "training_args.bin"]:  # the Trainer's record, not weights
        problems.append("pytorch *.bin weights beside safetensors")
    tensors: dict[str, tuple[int, ...]] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is named by the index but missing")
            continue
        try:
            header = safetensors_header(path)
        except (OSError, ValueError, struct.error) as err:
            problems.append(f"{name} is not a readable safetensors file ({err})")
            continue
        for tensor, meta in header.items():
            if weight_map and weight_map.get(tensor) != name:
                problems.append(f"{tensor} is in {name} but the index says {weight_map.get(tensor)}")
            tensors[tensor] = tuple(meta["shape"])
    missing_from_files = sorted(set(weight_map) - set(tensors))
    if missing_from_files:
        problems.append(f"the index names {len(missing_from_files)} tensor(s) absent from the files, e.g. "
                        f"{missing_from_files[0]}")
    return tensors, problems


def expected_tensors(config: dict[str, Any], any_size: bool) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the official checkpoint for `config`: our module tree, built on the meta device, whose names
    are the reference's. The vision tower is CLIP ViT-L/14-336, as the reference code and vLLM build it, unless
    `any_size` (then the config's own `vision_config`)."""
    from transformers.utils import logging as hf_logging

    from phi3v_recipes.model import Phi3VConfig
    from phi3v_recipes.model.architecture import meta_model

    fields = {k: v for k, v in config.items() if k not in ("auto_map", "quantization_config")}
    fields["_attn_implementation"] = "eager"
    if not any_size:
        fields.pop("vision_config", None)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = meta_model(Phi3VConfig(**fields))
    finally:
        hf_logging.set_verbosity(verbosity)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_rope(config: dict[str, Any]) -> Check:
    name = "rope_scaling"
    if "rope_scaling" not in config:
        return Check(name, False, "absent from config.json: the reference code and vLLM then use plain RoPE, "
                                  "different logits at every position")
    rope, long_ctx = config["rope_scaling"], config.get("max_position_embeddings", 0)
    original = config.get("original_max_position_embeddings")
    if "rope_theta" not in config:
        return Check(name, False, "rope_theta is absent")
    if original is None:
        return Check(name, False, "original_max_position_embeddings is absent")
    if rope is None:
        if long_ctx > original:
            return Check(name, False, f"null, but max_position_embeddings={long_ctx} exceeds "
                                      f"original_max_position_embeddings={original}")
        return Check(name, True, f"null (plain RoPE up to {long_ctx} positions)")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    problems = []
    if not isinstance(rope, dict) or set(rope) != ROPE_SCALING_KEYS:
        problems.append(f"keys {sorted(rope) if isinstance(rope, dict) else rope} instead of exactly "
                        f"{sorted(ROPE_SCALING_KEYS)} (the reference configuration class rejects others)")
    else:
        if rope["type"] not in ("su", "longrope"):
            problems.append(f"type {rope['type']!r} is not su/longrope")
        for key in ("short_factor", "long_factor"):
            if not isinstance(rope[key], list) or len(rope[key]) != head_dim // 2:
                problems.append(f"{key} must be {head_dim // 2} numbers (head_dim/2)")
    if original > long_ctx:
        problems.append(f"original_max_position_embeddings={original} exceeds max_position_embeddings={long_ctx}")
    if problems:
        return Check(name, False, "; ".join(problems))
    return Check(name, True, f"{rope['type']} with {head_dim // 2} short/long factors, {original} -> {long_ctx}")


def _check_auto_map(directory: Path, config: dict[str, Any], preprocessor: dict[str, Any] | None) -> Check:
    name = "auto_map resolvable"
    wanted = {"config.json": (config, ("AutoConfig", "AutoModelForCausalLM")),
              "preprocessor_config.json": (preprocessor or {}, ("AutoProcessor",))}
    problems, seen = [], []
    for file, (fields, required) in wanted.items():
        auto_map = fields.get("auto_map") or {}
        for key in required:
            if key not in auto_map:
                problems.append(f"{file} has no auto_map.{key}")
        for key, reference in auto_map.items():
            if not isinstance(reference, str):
                continue
            repo, _, local = reference.rpartition("--")
            module, _, cls = local.rpartition(".")
            if repo:
                if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or module not in REFERENCE_MODULES:
                    problems.append(f"{file} auto_map.{key}={reference} is not a hub reference to the reference code")
                else:
                    seen.append(f"{key} -> hub {repo}")
                continue
            code = directory / f"{module}.py"
            if not code.is_file():
                problems.append(f"{file} auto_map.{key}={reference}: {module}.py is not in the directory")
                continue
            text = code.read_text(encoding="utf-8", errors="replace")
            imported = [name for name in re.findall(r"^\s*from \.(\w+) import", text, re.M)
                        if not (directory / f"{name}.py").is_file()]
            if not re.search(rf"^class {re.escape(cls)}\b", text, re.M):
                problems.append(f"{file} auto_map.{key}={reference}: {module}.py defines no class {cls}")
            elif imported:
                problems.append(f"{file} auto_map.{key}={reference}: {module}.py imports {', '.join(imported)}, "
                                "which is not in the directory")
            else:
                seen.append(f"{key} -> {module}.py")
    if problems:
        return Check(name, False, "; ".join(problems))
    return Check(name, True, ", ".join(seen))


def _check_processor(directory: Path, config: dict[str, Any], preprocessor: dict[str, Any] | None) -> Check:
    name = "processor files"
    if preprocessor is None:
        return Check(name, False, "preprocessor_config.json is missing or not JSON")
    problems = [f"preprocessor_config.json has no {field}" for field in PREPROCESSOR_FIELDS if field not in preprocessor]
    if preprocessor.get("processor_class", "Phi3VProcessor") != "Phi3VProcessor":
        problems.append(f"processor_class is {preprocessor['processor_class']!r}, not 'Phi3VProcessor'")
    if preprocessor.get("image_processor_type", "Phi3VImageProcessor") != "Phi3VImageProcessor":
        problems.append(f"image_processor_type is {preprocessor['image_processor_type']!r}")
    tokens = (config.get("img_processor") or {}).get("num_img_tokens")
    if "num_img_tokens" in preprocessor and preprocessor["num_img_tokens"] != tokens:
        problems.append(f"num_img_tokens {preprocessor['num_img_tokens']} != config img_processor {tokens}")
    if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer.model").is_file():
        problems.append("no tokenizer.json / tokenizer.model")
    tokenizer_config = _read_json(directory / "tokenizer_config.json")
    if tokenizer_config is None:
        problems.append("tokenizer_config.json is missing")
    else:
        if not tokenizer_config.get("chat_template") and not (directory / "chat_template.jinja").is_file():
            problems.append("no chat template (tokenizer_config.json chat_template or chat_template.jinja)")
        if tokenizer_config.get("tokenizer_class") in TRANSFORMERS_5_ONLY_TOKENIZERS:
            problems.append(f"tokenizer_class {tokenizer_config['tokenizer_class']!r} exists in transformers 5 only")
    if problems:
        return Check(name, False, "; ".join(problems))
    return Check(name, True, f"Phi3VProcessor, num_crops {preprocessor['num_crops']}, num_img_tokens {tokens}")


def _check_shipped_code(directory: Path) -> Check | None:
    """The header of our model code beside the weights (None when the directory carries none of it)."""
    present = [m for m in SHIPPED_MODULES if (directory / f"{m}.py").is_file()]
    if not present:
        return None
    versions, problems = set(), []
    for module in present:
        text = (directory / f"{module}.py").read_text(encoding="utf-8", errors="replace")
        found = re.match(r"# Written by phi3v-recipes (\S+):", text)
        if not found or HEADER_END.format(name=module) not in text:
            problems.append(f"{module}.py has no phi3v-recipes header")
        else:
            versions.add(found.group(1))
    if problems:
        return Check("shipped code", False, "; ".join(problems))
    return Check("shipped code", True, f"{len(present)} file(s) written by phi3v-recipes {', '.join(sorted(versions))}")


def _check_metadata(directory: Path, config: dict[str, Any]) -> Check:
    name = "serving metadata"
    problems = []
    if config.get("use_cache") is not True:
        problems.append(f"config.json use_cache is {config.get('use_cache')!r}: the reference code then generates "
                        "without a KV cache")
    try:
        ids = token_ids(directory, (EOS_TOKEN, *STOP_TOKENS))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is reported by the image token check
        ids = {}
    if EOS_TOKEN in ids and config.get("eos_token_id") != ids[EOS_TOKEN]:
        problems.append(f"config.json eos_token_id {config.get('eos_token_id')!r} is not the id of {EOS_TOKEN} "
                        f"({ids[EOS_TOKEN]}), as in the official file")
    generation = _read_json(directory / "generation_config.json")
    stops = sorted(ids[t] for t in STOP_TOKENS if t in ids)
    if generation is None:
        problems.append("generation_config.json is missing")
    else:
        eos = generation.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos]
        if not set(stops) <= set(eos):
            problems.append(f"generation_config.json eos_token_id {generation.get('eos_token_id')!r} lacks the stop "
                            f"ids {stops} ({', '.join(STOP_TOKENS)})")
    tokenizer = _read_json(directory / "tokenizer_config.json") or {}
    if tokenizer.get("tokenizer_class") != OFFICIAL_TOKENIZER_CLASS:
        problems.append(f"tokenizer_class {tokenizer.get('tokenizer_class')!r}, not {OFFICIAL_TOKENIZER_CLASS!r} as "
                        "in the official files")
    for file in LOADER_FILES:
        hits = absolute_paths(_read_json(directory / file) or {})
        if hits:
            problems.append(f"{file} records a local absolute path ({hits[0]})")
    if problems:
        return Check(name, False, "; ".join(problems))
    return Check(name, True, f"use_cache true, eos_token_id {config.get('eos_token_id')}, stop ids {stops}, "
                             f"{OFFICIAL_TOKENIZER_CLASS}, no local paths")


def _check_image_token(directory: Path) -> Check:
    name = "image token id"
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as err:  # noqa: BLE001 - any failure to read the tokenizer is the finding
        return Check(name, False, f"tokenizer.json cannot be read ({type(err).__name__})")
    if tokenizer.token_to_id("<|endoftext|>") != OFFICIAL_ENDOFTEXT_ID:
        return Check(name, True, "not the official vocabulary (<|endoftext|> is not 32000): vLLM's id does not apply")
    image_id = tokenizer.token_to_id("<|image|>")
    return Check(name, image_id == OFFICIAL_IMAGE_TOKEN_ID,
                 f"<|image|> -> {image_id} (vLLM hard-codes {OFFICIAL_IMAGE_TOKEN_ID})")


def verify(directory: str | Path, any_size: bool = False) -> list[Check]:
    """Every requirement's check for the checkpoint in `directory`."""
    directory = Path(directory)
    config = _read_json(directory / "config.json")
    if config is None:
        return [Check("config.json", False, "missing or not JSON")]
    checks = []
    arch, model_type = config.get("architectures"), config.get("model_type")
    checks.append(Check("architectures", arch == ["Phi3VForCausalLM"] and model_type == "phi3_v",
                        f"{arch}, model_type {model_type!r} (need ['Phi3VForCausalLM'], 'phi3_v')"))

    img = config.get("img_processor") or {}
    width = (config.get("vision_config") or {}).get("hidden_size", CLIP_VIT_L_WIDTH) if any_size else CLIP_VIT_L_WIDTH
    checks.append(Check("img_processor", img.get("image_dim_out") == width and "num_img_tokens" in img,
                        f"image_dim_out {img.get('image_dim_out')} (need {width}), num_img_tokens "
                        f"{img.get('num_img_tokens', 'absent')}"))
    embd = config.get("embd_layer") or {}
    checks.append(Check("embd_layer", embd.get("use_hd_transform") is True
                        and embd.get("with_learnable_separator") is True and embd.get("hd_transform_order") == "sub_glb",
                        f"use_hd_transform {embd.get('use_hd_transform')}, with_learnable_separator "
                        f"{embd.get('with_learnable_separator')}, hd_transform_order {embd.get('hd_transform_order')!r}"
                        " (need true, true, 'sub_glb')"))
    checks.append(_check_rope(config))
    checks.append(Check("torch_dtype", "torch_dtype" in config, f"{config.get('torch_dtype', 'absent')}"))

    stored, file_problems = stored_tensors(directory)
    try:
        expected = expected_tensors(config, any_size)
    except Exception as err:  # noqa: BLE001 - a config the model cannot be built from is the finding
        expected, file_problems = {}, [*file_problems, f"no model can be built from config.json ({err})"]
    optional = {"model.vision_embed_tokens.wte.weight"}  # the reference's embedding alias, tied when absent
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected) - optional)
    wrong = sorted(n for n in set(stored) & set(expected) if stored[n] != expected[n])
    problems = list(file_problems)
    if missing:
        problems.append(f"{len(missing)} official tensor(s) missing, e.g. {', '.join(missing[:3])}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) not in the official checkpoint, e.g. {', '.join(extra[:3])}")
    if wrong:
        problems.append(f"{len(wrong)} shape(s) differ, e.g. {wrong[0]} {stored[wrong[0]]} != {expected[wrong[0]]}")
    checks.append(Check("tensor names", not problems,
                        "; ".join(problems) or f"{len(stored)} tensors, the official names and shapes"))

    leftovers = sorted(n for n in stored if LEFTOVER.search(n))
    leftovers += [p.name for p in directory.glob("adapter_*")]
    if "quantization_config" in config:
        leftovers.append("config.json quantization_config")
    checks.append(Check("no adapter or quantisation leftovers", not leftovers,
                        f"found {', '.join(leftovers[:3])}" if leftovers else "none"))

    preprocessor = _read_json(directory / "preprocessor_config.json")
    checks.append(_check_auto_map(directory, config, preprocessor))
    shipped = _check_shipped_code(directory)
    if shipped is not None:
        checks.append(shipped)
    checks.append(_check_metadata(directory, config))
    checks.append(_check_processor(directory, config, preprocessor))
    checks.append(_check_image_token(directory))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi3v_recipes.verify_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="the checkpoint directory to check")
    parser.add_argument("--any-size", action="store_true",
                        help="check a model of another size against its own vision_config (not servable by vLLM)")
    args = parser.parse_args(argv)
    if not Path(args.directory).is_dir():
        print(f"error: {args.directory} is not a directory; pass the checkpoint directory to check.", file=sys.stderr)
        return 2
    checks = verify(args.directory, args.any_size)
    for check in checks:
        print(check.line())
    failed = [c.requirement for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} requirements met" + (f"; failed: {', '.join(failed)}" if failed
                                                                           else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
