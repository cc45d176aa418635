"""Serving metadata of a saved model directory: what a loader on another machine reads besides the weights.

Written into every final model and export (`write_serving_metadata`), checked by `verify_checkpoint`:

- `config.json`: `use_cache: true` (a run that trains with gradient checkpointing turns the cache off in its
  in-memory config; a model that is saved is loaded to generate), `eos_token_id` as the official file has it (the
  id of `</s>`, 2 in Phi-3-V), and no local absolute path in `_name_or_path`;
- `generation_config.json`: `bos_token_id`, `pad_token_id` and the stop ids as `eos_token_id`: `<|endoftext|>`,
  `<|assistant|>` and `<|end|>` (32000, 32001, 32007 in the official files), so that `generate` stops after a reply
  without being told;
- `tokenizer_config.json`: `tokenizer_class: LlamaTokenizer` as the official files name it (transformers 4 then
  builds `LlamaTokenizerFast`, 5 its `LlamaTokenizer`, both from `tokenizer.json`, to the same ids), and no local
  absolute path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from phi3v_recipes.model.configuration_phi3v import portable_name
from phi3v_recipes.model.processing_phi3v import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    END_TOKEN,
    ENDOFTEXT_TOKEN,
    EOS_TOKEN,
)

__all__ = ["OFFICIAL_TOKENIZER_CLASS", "STOP_TOKENS", "absolute_paths", "align_eos_for_training",
           "finish_saved_model", "stop_ids", "write_serving_metadata"]

STOP_TOKENS = (ENDOFTEXT_TOKEN, ASSISTANT_TOKEN, END_TOKEN)
"""The tokens `generate` stops on: the official `generation_config.json`'s `eos_token_id` [32000, 32001, 32007]."""

OFFICIAL_TOKENIZER_CLASS = "LlamaTokenizer"
"""`tokenizer_class` of the official `tokenizer_config.json` (the reference processor expects a Llama tokenizer)."""


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write(path: Path, fields: dict[str, Any]) -> None:
    path.write_text(json.dumps(fields, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def token_ids(directory: Path, tokens: tuple[str, ...]) -> dict[str, int]:
    """{token: id} of those `tokens` that the tokenizer saved in `directory` knows."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    found = {token: tokenizer.token_to_id(token) for token in tokens}
    return {token: index for token, index in found.items() if index is not None}


def stop_ids(directory: str | Path) -> list[int]:
    """The ids `generate` stops on for the tokenizer saved in `directory` (see `STOP_TOKENS`)."""
    return sorted(token_ids(Path(directory), STOP_TOKENS).values())


def absolute_paths(value: Any, where: str = "") -> list[str]:
    """`where.key: value` of every string in a JSON value that is a local absolute path."""
    if isinstance(value, dict):
        return [hit for key, item in value.items() for hit in absolute_paths(item, f"{where}.{key}" if where else key)]
    if isinstance(value, list):
        return [hit for index, item in enumerate(value) for hit in absolute_paths(item, f"{where}[{index}]")]
    if isinstance(value, str) and os.path.isabs(value) and "\n" not in value and len(value) > 1:
        return [f"{where}: {value}"]
    return []


def _portable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_portable(item) for item in value]
    return portable_name(value) if absolute_paths(value) else value


def align_eos_for_training(model: Any, tokenizer: Any) -> bool:
    """Give the in-memory configs of `model` the tokenizer's eos, as Hugging Face's Trainer would, where they differ
    only as the official files do: config.json's eos is `</s>` while the tokenizer's is `<|endoftext|>`.

    The Trainer aligns them at every launch with a warning that would then be about the official checkpoint itself;
    done here it is the expected case and stays quiet. As the Trainer does, the model config's eos becomes the
    tokenizer's and the generation config adds it to its stop ids (no id is removed). A saved model gets the
    official values back from `write_serving_metadata`. Any other difference (a tokenizer with its own eos, pad or
    bos) is left to the Trainer and its warning. True when something changed.
    """
    eos = tokenizer.eos_token_id
    config = model.config.get_text_config()
    if tokenizer.eos_token != ENDOFTEXT_TOKEN or config.eos_token_id != tokenizer.convert_tokens_to_ids(EOS_TOKEN):
        return False
    config.eos_token_id = eos
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
        generation.eos_token_id = [eos, *(stop for stop in stops if stop is not None and stop != eos)]
    return True


def write_serving_metadata(directory: str | Path) -> None:
    """Rewrite the metadata of the model and processor saved in `directory` (see the module docstring). A
    directory without `config.json` (an adapter) gets the tokenizer fixes only."""
    directory = Path(directory)
    ids = token_ids(directory, (BOS_TOKEN, EOS_TOKEN, *STOP_TOKENS)) if (directory / "tokenizer.json").is_file() else {}
    config = _read(directory / "config.json")
    if config is not None:
        config = _portable(config)
        config["use_cache"] = True
        if EOS_TOKEN in ids:
            config["eos_token_id"] = ids[EOS_TOKEN]
        _write(directory / "config.json", config)
        stops = sorted(ids[token] for token in STOP_TOKENS if token in ids)
        generation = _read(directory / "generation_config.json") or {"_from_model_config": True}
        generation.update(bos_token_id=config.get("bos_token_id"), pad_token_id=config.get("pad_token_id"))
        if stops:
            generation["eos_token_id"] = stops
        generation.setdefault("transformers_version", config.get("transformers_version"))
        _write(directory / "generation_config.json", generation)
    tokenizer = _read(directory / "tokenizer_config.json")
    if tokenizer is not None:
        tokenizer = _portable(tokenizer)
        tokenizer["tokenizer_class"] = OFFICIAL_TOKENIZER_CLASS
        _write(directory / "tokenizer_config.json", tokenizer)


def finish_saved_model(directory: str | Path) -> None:
    """What every final model directory of a run gets once its files are written: the serving metadata and, for
    full weights (a `config.json`), the shipped model code its `auto_map` names (see `remote_code`). An adapter
    directory gets the tokenizer metadata only: it is served after `python -m phi3v_recipes.export`."""
    from phi3v_recipes.model.remote_code import write_remote_code

    write_serving_metadata(directory)
    if (Path(directory) / "config.json").is_file():
        write_remote_code(directory)
