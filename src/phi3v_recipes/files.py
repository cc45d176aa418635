"""Writing result files so that a crash never leaves a half-written one under the final name."""

import os
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a hidden temporary file beside `path`, flush it to disk, then rename it onto `path`."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
