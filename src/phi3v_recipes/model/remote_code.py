"""The code an exported Phi-3-V directory carries, and the `auto_map` entries that point at it.

`remote_code=shipped` (the export's default): this package's own model code, `configuration_phi3v.py`,
`modeling_phi3v.py`, `image_processing_phi3v.py` and `processing_phi3v.py` from `phi3v_recipes/model/`, is copied
beside the weights byte for byte under a header naming the phi3v-recipes version that wrote it. The files import
only torch, transformers, PIL, NumPy and each other (relatively), so that `AutoConfig`, `AutoProcessor` and
`AutoModelForCausalLM` with `trust_remote_code=True` load the directory where phi3v-recipes is not installed.
`auto_map` in `config.json` and `preprocessor_config.json` names these files.

`remote_code=reference`: Microsoft's reference code, as the official checkpoints carry it
(`configuration_phi3_v.Phi3VConfig`, `modeling_phi3_v.Phi3VForCausalLM`, `processing_phi3_v.Phi3VProcessor`,
`image_processing_phi3_v.Phi3VImageProcessor`). transformers resolves an entry either from `<module>.py` in the
same directory or from a repository-qualified reference `<repo id>--<module>.<Class>`; each entry is made to
resolve one of these ways:

1. `<module>.py` is already in the directory: kept;
2. the source directory (the base model, e.g. a download of the official repository) holds it: every reference
   `*.py` file of the source is copied beside the weights;
3. the source is a hub repository id: the entry points at it (`<repo id>--<module>.<Class>`);
4. otherwise the entry cannot resolve and is left out (the verifier then says so).

Our own loaders never use these entries: importing `phi3v_recipes` registers the native classes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

__all__ = [
    "CONFIG_AUTO_MAP",
    "HEADER_END",
    "PROCESSOR_AUTO_MAP",
    "REFERENCE_MODULES",
    "REMOTE_CODE_CHOICES",
    "SHIPPED_CONFIG_AUTO_MAP",
    "SHIPPED_MODULES",
    "SHIPPED_PROCESSOR_AUTO_MAP",
    "hub_repo_id",
    "resolve_auto_map",
    "shipped_source",
    "write_remote_code",
]

REMOTE_CODE_CHOICES = ("shipped", "reference")

SHIPPED_MODULES = ("configuration_phi3v", "modeling_phi3v", "image_processing_phi3v", "processing_phi3v")
"""Our model code, shipped beside every export (see the module docstring)."""

SHIPPED_CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_phi3v.Phi3VConfig",
    "AutoModelForCausalLM": "modeling_phi3v.Phi3VForCausalLM",
}
SHIPPED_PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "image_processing_phi3v.Phi3VImageProcessor",
    "AutoProcessor": "processing_phi3v.Phi3VProcessor",
}

HEADER_END = "# ---- end of the phi3v-recipes header; the code below is phi3v_recipes/model/{name}.py ----\n"
"""The last line of the header of a shipped file: what follows is the package's file, byte for byte."""

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


def shipped_source(module: str) -> str:
    """The text of the shipped `<module>.py`: a header naming the phi3v-recipes version, then the package's file."""
    from phi3v_recipes import __version__

    source = (Path(__file__).parent / f"{module}.py").read_text(encoding="utf-8")
    header = (
        f"# Written by phi3v-recipes {__version__}: its Phi-3-V model code, shipped with this checkpoint so that it\n"
        "# loads where phi3v-recipes is not installed (transformers' trust_remote_code=True). It imports only torch,\n"
        "# transformers, PIL, NumPy and its sibling files. Do not edit: every export writes it again.\n"
        + HEADER_END.format(name=module)
    )
    return header + source


def write_remote_code(
    directory: str | Path, mode: str = "shipped", source: str | Path | None = None, repo_id: str | None = None
) -> str:
    """Give the saved model and processor in `directory` the code their `auto_map` names: our shipped code, or
    (`mode="reference"`) Microsoft's, copied from `source` or pointing at the hub repository `repo_id` (see the
    module docstring). Rewrites `auto_map` in `config.json` and `preprocessor_config.json`; returns one line saying
    where the code comes from."""
    if mode not in REMOTE_CODE_CHOICES:
        raise ValueError(f"remote_code={mode!r}: choose one of {REMOTE_CODE_CHOICES}.")
    directory = Path(directory)
    maps = {"config.json": (SHIPPED_CONFIG_AUTO_MAP, CONFIG_AUTO_MAP),
            "preprocessor_config.json": (SHIPPED_PROCESSOR_AUTO_MAP, PROCESSOR_AUTO_MAP)}
    if mode == "shipped":
        for module in SHIPPED_MODULES:
            (directory / f"{module}.py").write_text(shipped_source(module), encoding="utf-8")
    for file, (shipped, reference) in maps.items():
        path = directory / file
        if not path.is_file():
            continue
        fields = json.loads(path.read_text(encoding="utf-8"))
        fields.pop("auto_map", None)
        auto_map = dict(shipped) if mode == "shipped" else resolve_auto_map(reference, directory, source, repo_id)
        if auto_map:
            fields["auto_map"] = auto_map
        path.write_text(json.dumps(dict(sorted(fields.items())), indent=2) + "\n", encoding="utf-8")
    if mode == "shipped":
        return "auto_map: phi3v-recipes model code shipped beside the weights (" + ", ".join(
            f"{m}.py" for m in SHIPPED_MODULES) + ")"
    auto_map = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("auto_map")
    if not auto_map:
        return "auto_map: none (no reference code beside the base and no hub id: set base_repo=<hub repo>)"
    if any("--" in v for v in auto_map.values()):
        return f"auto_map: Microsoft's reference code on the hub, {next(iter(auto_map.values())).split('--')[0]}"
    return "auto_map: Microsoft's reference code copied beside the weights"


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
