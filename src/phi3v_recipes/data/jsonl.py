"""The seed's jsonl format, how users bring their own data.

One JSON object per line:

    {"id": "val-0000000300", "source": "ucf101",
     "conversations": [{"images": ["val/BabyCrawling/v_BabyCrawling_g21_c04.0.jpg", ...],
                        "user": "Classify the video ...", "assistant": "BabyCrawling"},
                       {"user": "Are you sure?", "assistant": "Yes"}]}

Image paths are relative to an image root and must stay inside it (a `..` or a symlink that leads out makes the line
a bad sample); absolute paths are taken as they are. Any number of images and turns; later turns may carry no
images.
An optional "references" list gives every answer accepted for the first turn at evaluation.

A line is a bad sample (reported with its file:line and id) when its "id" is not a non-empty string or whole number,
a turn holds a key other than "user", "assistant" and "images" (a misspelt "image" would otherwise train text
only), "image" or "images" stands at the top of the line, or a text holds a lone surrogate escape such as "\\ud800". Other
top-level keys ("source", your own metadata) are kept out of training and allowed.
"""

import json
import os
from pathlib import Path

from phi3v_recipes.data.sample import Sample, Turn

TURN_KEYS = {"user", "assistant", "images"}


def _parse_row(row: object, where: str, image_root: Path, require_answers: bool = True,
               escaped: bool = True) -> Sample:
    """The sample of one parsed line (`escaped`: the line holds a `\\u` escape, the only way to a lone surrogate)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a line must hold a JSON object, got {type(row).__name__}.")
    if "id" not in row:
        raise ValueError(f"{where}: missing 'id'.")
    if isinstance(row["id"], bool) or not isinstance(row["id"], str | int) or str(row["id"]) == "":
        raise ValueError(f"{where}: 'id' must be a non-empty string or a whole number, got {row['id']!r}.")
    try:
        if escaped:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where} (id {row['id']}): a text holds a lone surrogate escape (e.g. \\ud800), which is "
                         "no character; write the character itself or a valid surrogate pair.") from None
    for key in ("image", "images"):
        if key in row:
            raise ValueError(f"{where} (id {row['id']}): '{key}' belongs in a turn of 'conversations' (as "
                             "\"images\": [paths]), not at the top of the line.")
    conversations = row.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where} (id {row['id']}): 'conversations' must be a non-empty list of turns.")
    turns = []
    for k, turn in enumerate(conversations, start=1):
        # Without required answers (prediction), the last turn's reply is what the model writes.
        needs_answer = require_answers or k < len(conversations)
        answer = turn.get("assistant", None if needs_answer else "") if isinstance(turn, dict) else None
        if not isinstance(turn, dict) or not isinstance(turn.get("user"), str) or not isinstance(answer, str):
            raise ValueError(f"{where} (id {row['id']}): turn {k} needs string 'user' and 'assistant' fields.")
        unknown = sorted(set(turn) - TURN_KEYS)
        if unknown:
            raise ValueError(f"{where} (id {row['id']}): turn {k} has unknown key(s) {unknown}; a turn holds "
                             "'user', 'assistant' and 'images' (a list of paths).")
        images = turn.get("images", [])
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise ValueError(f"{where} (id {row['id']}): turn {k}: 'images' must be a list of paths.")
        for p in images:
            if "\x00" in p or not p:
                raise ValueError(f"{where} (id {row['id']}): turn {k}: image path {p!r} is empty or holds a NUL "
                                 "character.")
            if not Path(p).is_absolute() and not _inside(image_root / p, image_root):
                raise ValueError(f"{where} (id {row['id']}): turn {k}: image {p} leads outside the image root "
                                 f"{image_root}; keep relative paths inside it, or give an absolute path.")
        turns.append(Turn(user=turn["user"], assistant=answer, images=tuple(image_root / p for p in images)))
    references = row.get("references", [])
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise ValueError(f"{where} (id {row['id']}): 'references' must be a list of strings.")
    return Sample(id=str(row["id"]), turns=turns, references=references, origin=where)


def _inside(path: Path, root: Path) -> bool:
    """True when `path`, with `..` and symlinks resolved, lies under `root` (resolved the same way)."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def read_jsonl(
    path: str | Path, image_root: str | Path | None = None, require_answers: bool = True
) -> tuple[list[Sample], list[str]]:
    """(samples, problems): every line that parses into a sample, and a message per line that does not.

    `image_root` defaults to the directory of the file. `require_answers=False` lets the last turn of each
    conversation leave out "assistant" (inputs to prediction).
    """
    if not str(path).strip() or Path(path).is_dir():
        what = f"{path} is a directory" if str(path).strip() else "the data file path is empty"
        raise FileNotFoundError(f"{what}; give the path of a jsonl file (the task's train_file / eval_file setting).")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: check the task's data file setting.")
    root = Path(image_root) if image_root is not None else path.parent
    samples, problems = [], []
    with path.open("rb") as lines:
        for lineno, raw in enumerate(lines, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.strip():
                    samples.append(_parse_row(json.loads(line), where, root, require_answers, "\\u" in line))
            except UnicodeDecodeError as err:
                problems.append(f"{where}: not UTF-8 text (byte {err.start + 1}); save the file as UTF-8.")
            except json.JSONDecodeError as err:
                problems.append(f"{where}: not valid JSON ({err.msg} at column {err.colno}).")
            except RecursionError:
                problems.append(f"{where}: JSON nested too deeply to read; a line holds one sample object.")
            except ValueError as err:  # ours name the line; Python's (e.g. a number of > 4300 digits) do not
                message = str(err)
                problems.append(message if message.startswith(where) else f"{where}: {message}")
    return samples, problems
