"""`auto_map` entries of a saved Phi-3-V directory that resolve: Microsoft's reference code, beside or on the hub.

The official checkpoints carry an `auto_map` to their own `*.py` files (`configuration_phi3_v.Phi3VConfig`,
`modeling_phi3_v.Phi3VForCausalLM`, `processing_phi3_v.Phi3VProcessor`, `image_processing_phi3_v.Phi3VImageProcessor`);
the reference code and vLLM (which calls the remote-code processor) load through it. transformers resolves an
entry either from `<module>.py` in the same directory or from a repository-qualified reference
`<repo id>--<module>.<Class>`. When we write a directory, each entry is made to resolve one of these ways:

1. `<module>.py` is already in the directory: kept;
2. the source directory (the base model, e.g. a download of the official repository) holds it: every reference
   `*.py` file of the source is copied beside the weights;
3. the source is a hub repository id: the entry points at it (`<repo id>--<module>.<Class>`);
4. otherwise the entry cannot resolve and is left out (the verifier then says so).

Our own loaders never use these entries: importing `phi3v_recipes` registers the native classes.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

__all__ = [
    "CONFIG_AUTO_MAP",
    "PROCESSOR_AUTO_MAP",
    "REFERENCE_MODULES",
    "hub_repo_id",
    "resolve_auto_map",
]

CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_phi3_v.Phi3VConfig",
    "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
}
"""`auto_map` of the official `config.json`."""

PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
    "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
}
"""`auto_map` of the official `preprocessor_config.json`."""

REFERENCE_MODULES = ("configuration_phi3_v", "modeling_phi3_v", "processing_phi3_v", "image_processing_phi3_v",
                     "image_embedding_phi3_v")
"""The Python modules of the official repositories (the last one is imported by `modeling_phi3_v`)."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hub_repo_id(name_or_path: str | None) -> str | None:
    """`name_or_path` when it names a hub repository (`owner/name`, not an existing local path), else None."""
    if not name_or_path or not _REPO_ID.match(str(name_or_path)) or Path(name_or_path).exists():
        return None
    return str(name_or_path)


def _module(reference: str) -> str:
    return reference.split("--")[-1].rsplit(".", 1)[0]


def resolve_auto_map(
    auto_map: dict[str, str] | None, directory: str | Path, source: str | Path | None, repo_id: str | None = None
) -> dict[str, str]:
    """The entries of `auto_map` that resolve for `directory` (see the module docstring), copying the reference
    `*.py` files of `source` into `directory` when `source` is a directory that holds them. `repo_id` is the hub
    repository to point at; by default `source` itself when it is a repository id."""
    directory = Path(directory)
    repo_id = repo_id or hub_repo_id(str(source) if source is not None else None)
    source_dir = Path(source) if source is not None and Path(source).is_dir() else None
    resolved = {}
    for auto_class, reference in (auto_map or {}).items():
        if not isinstance(reference, str):  # a tokenizer's [slow, fast] pair: not ours to rewrite
            resolved[auto_class] = reference
            continue
        module = _module(reference)
        if "--" in reference or (directory / f"{module}.py").is_file():
            resolved[auto_class] = reference
        elif source_dir is not None and (source_dir / f"{module}.py").is_file():
            directory.mkdir(parents=True, exist_ok=True)
            for name in REFERENCE_MODULES:
                if (source_dir / f"{name}.py").is_file() and source_dir.resolve() != directory.resolve():
                    shutil.copyfile(source_dir / f"{name}.py", directory / f"{name}.py")
            resolved[auto_class] = reference
        elif repo_id is not None:
            resolved[auto_class] = f"{repo_id}--{reference}"
    return resolved
