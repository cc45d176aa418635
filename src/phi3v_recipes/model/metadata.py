"""Serving metadata of a saved model directory: what a loader on another machine reads besides the weights.

Written into every final model and export (`write_serving_metadata`), checked by `verify_checkpoint`:

- `config.json`: `use_cache: true` (a run that trains with gradient checkpointing turns the cache off in its
  in-memory config; a model that is saved is loaded to generate), `eos_token_id` as the official file has it (the
  id of `</s>`, 2 in Phi-3-V), and no local absolute path in `_name_or_path`;
- `generation_config.json`: `bos_token_id`, `pad_token_id` and the stop ids as `eos_token_id`: `<|endoftext|>`,
  `<|assistant|>` and `<|end|>` (32000, 32001, 32007 in the official files), so that `generate` stops after a reply
  without being told;
- `tokenizer_config.json`: the `tokenizer_class` of the base's own file when it names one transformers 4 and 5
  both know (the official files say `LlamaTokenizer`), and no local absolute path.
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

__all__ = ["STOP_TOKENS", "absolute_paths", "stop_ids", "write_serving_metadata"]

STOP_TOKENS = (ENDOFTEXT_TOKEN, ASSISTANT_TOKEN, END_TOKEN)
"""The tokens `generate` stops on: the official `generation_config.json`'s `eos_token_id` [32000, 32001, 32007]."""

# Tokenizer classes that both transformers 4 (the reference code's, vLLM's) and 5 load from `tokenizer.json`.
PORTABLE_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "PreTrainedTokenizerFast")


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


def write_serving_metadata(directory: str | Path, source_tokenizer: str | Path | None = None) -> None:
    """Rewrite the metadata of the model and processor saved in `directory` (see the module docstring);
    `source_tokenizer` is the directory whose `tokenizer_config.json` names the official tokenizer class. A
    directory without a tokenizer (an adapter saved alone) only gets the `config.json` fixes."""
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
        official = _read(Path(source_tokenizer) / "tokenizer_config.json") if source_tokenizer else None
        official_class = (official or {}).get("tokenizer_class")
        if official_class in PORTABLE_TOKENIZER_CLASSES:
            tokenizer["tokenizer_class"] = official_class
        _write(directory / "tokenizer_config.json", tokenizer)
