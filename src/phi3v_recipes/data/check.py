"""Validation of samples before training: every problem found up front, named by file:line and id.

`count_tokens` measures a sample exactly as `encode_sample` lays it out, from image sizes (no HD transform; each
image is read once as training reads it, decoded and within data.max_image_pixels, which proves it usable), so
the whole dataset is checked in one pass. `screen` applies `data.on_error`: `raise` stops with the first problems
listed; `skip` drops the bad samples, counts them and returns them for the run's skip report.

As a command, it checks a jsonl file before any training and lists every problem, one per line:

    python -m phi3v_recipes.data.check train.jsonl [--image_root DIR] [--num_crops 16] [--max_length 4096]
                                                   [--max_image_pixels N] [--model tiny|<processor dir or hub id>]

Problems: a file without any sample, lines that are not JSON, missing or mistyped fields, duplicate ids, missing
or unreadable images, images over --max_image_pixels pixels (default: data.max_image_pixels of conf/train.yaml),
image tags in a turn's text that do not match its images, and samples longer than --max_length. Notes (`note:`,
not problems): animated images, of which only the first frame is used. The exit status is 1 when anything is
wrong, 0 otherwise (2 when the file or the processor cannot be opened). Token counts need a processor: the
default `tiny` one counts image tokens exactly as Phi-3-V does (144 per crop, the HD layout of --num_crops), but
its small tokenizer only approximates the text tokens; `--model` with a real processor (a model directory, or a
hub id in the local cache) gives the exact counts that `data.max_length` compares.
"""

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from phi3v_recipes.data.jsonl import read_jsonl
from phi3v_recipes.data.sample import Sample, load_image
from phi3v_recipes.errors import SampleError, check_on_error

MAX_LISTED = 10


def count_tokens(sample: Sample, processor: Any, images: Sequence[Sequence[Any]] | None = None,
                 max_pixels: int | None = None) -> int:
    """Length of `encode_sample(sample, processor)["input_ids"]`, image tokens included; raises SampleError.

    `images`, when given, are the turns' images already loaded (one list per turn), so they are not read twice;
    otherwise they are read with the `max_pixels` limit (data.max_image_pixels), as training reads them.
    """
    from phi3v_recipes.data.lengths import sample_length  # here, not at the top: see sample_problems

    loaded = images if images is not None else [[load_image(ref, sample, max_pixels) for ref in turn.images]
                                                for turn in sample.turns]
    return sample_length(sample, processor, [[image.size for image in turn] for turn in loaded])


def check_sample(sample: Sample, processor: Any, max_length: int | None, max_pixels: int | None = None) -> int:
    """Token count of a usable sample; SampleError naming its first problem otherwise."""
    n_tokens, problems = sample_problems(sample, processor, max_length, max_pixels)
    if problems:
        raise SampleError(problems[0])
    return n_tokens


def sample_problems(
    sample: Sample, processor: Any, max_length: int | None, max_pixels: int | None = None,
    notes: list[str] | None = None,
) -> tuple[int | None, list[str]]:
    """(token count or None, every problem of the sample): unlike `check_sample`, it does not stop at the
    first one: each turn's texts and image tags and each image (read as training reads it: decoded, at most
    `max_pixels` pixels) are checked, then the length of a sound sample. Remarks that are not problems (an
    animation's first frame is used) go to `notes`."""
    # here, not at the top: with the processor code they load torch and transformers, which the command's
    # answer to a missing file does not need
    from phi3v_recipes.data.encode import control_token_problems, too_long, user_content

    if not sample.turns:
        return None, [f"{sample.where}: the conversation has no turns."]
    problems: list[str] = control_token_problems(sample, processor.tokenizer)
    images: list[list[Any]] = []
    for k, turn in enumerate(sample.turns):
        images.append([])
        if not isinstance(turn.user, str) or not isinstance(turn.assistant, str):
            problems.append(f"{sample.where}: turn {k + 1} needs string 'user' and 'assistant' texts.")
            continue
        try:
            user_content(sample, k)
        except SampleError as err:
            problems.append(str(err))
        for ref in turn.images:
            try:
                images[k].append(load_image(ref, sample, max_pixels, notes))
            except SampleError as err:
                problems.append(str(err))
    if problems:
        return None, problems
    try:
        n_tokens = count_tokens(sample, processor, images)
    except SampleError as err:
        return None, [str(err)]
    if max_length is not None and n_tokens > max_length:
        return n_tokens, [too_long(sample, n_tokens, max_length)]
    return n_tokens, []


def screen(
    samples: Sequence[Sample], processor: Any, max_length: int | None, on_error: str, errors: Sequence[str] = (),
    max_pixels: int | None = None,
) -> tuple[list[Sample], list[str]]:
    """(usable samples, problems). `errors` are problems found earlier (e.g. unparsable lines); images are read
    as training reads them (`max_pixels`: data.max_image_pixels). Training screens through
    `screen_cache.ScreenCache`, which keeps the verdicts in the run directory and spreads the work."""
    check_on_error(on_error)
    found = [sample_problems(sample, processor, max_length, max_pixels)[1] for sample in samples]
    return keep_usable(samples, found, on_error, errors)


def keep_usable(
    samples: Sequence[Sample], found: Sequence[Sequence[str]], on_error: str, errors: Sequence[str] = ()
) -> tuple[list[Sample], list[str]]:
    """(usable samples, problems) given the problems `found` for each sample: `data.on_error` applied (`raise`:
    SampleError listing the first problems; `skip`: the samples without problems)."""
    check_on_error(on_error)
    problems = list(errors)
    kept = []
    for sample, sample_found in zip(samples, found, strict=True):
        problems += sample_found
        if not sample_found:
            kept.append(sample)
    if problems and on_error == "raise":
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise SampleError(
            f"{len(problems)} bad sample(s); fix them, or set data.on_error=skip to drop them:\n  {listed}{more}"
        )
    return kept, problems


def _line_of(message: str, path: Path) -> int:
    """The line number a problem message about `path` starts with (0 when it names none)."""
    match = re.match(re.escape(str(path)) + r":(\d+)", message)
    return int(match.group(1)) if match else 0


def _train_default(key: str) -> Any:
    """`key`'s default in the packaged conf/train.yaml, so that the command checks what training would."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    return OmegaConf.select(OmegaConf.create((files("phi3v_recipes.conf") / "train.yaml").read_text()), key)


def _processor(model: str, num_crops: int) -> Any:
    if model == "tiny":
        from phi3v_recipes.model.tiny import build_tiny_processor

        # Real Phi-3-V image token counts (144 per crop) with the tiny tokenizer's approximate text counts.
        return build_tiny_processor(num_crops=num_crops, num_img_tokens=144)
    from phi3v_recipes.loading import load_processor

    return load_processor(model, num_crops)


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    """Check a jsonl file; print every problem (file:line, id, what is wrong) and a summary. Exit status:
    0 when every sample is usable, 1 when any problem was found, 2 when the file or processor cannot be opened."""
    parser = argparse.ArgumentParser(
        prog="python -m phi3v_recipes.data.check",
        description="Check a jsonl dataset in the seed's format before training; list every problem.",
    )
    parser.add_argument("jsonl", type=Path, help="the jsonl file to check")
    parser.add_argument("--image_root", type=Path, default=None,
                        help="image paths are relative to this (default: the directory of the jsonl file)")
    parser.add_argument("--num_crops", type=int, default=16, help="HD crops per image, as data.num_crops (1-16)")
    parser.add_argument("--max_length", type=int, default=None,
                        help="report samples longer than this many tokens, as data.max_length")
    parser.add_argument("--max_image_pixels", type=int, default=_train_default("data.max_image_pixels"),
                        help="report images with more pixels than this, as data.max_image_pixels (default: "
                             "conf/train.yaml's)")
    parser.add_argument("--model", default="tiny",
                        help="processor counting the tokens: tiny (exact image tokens, approximate text tokens), "
                             "or a model directory / hub id for exact counts")
    args = parser.parse_args(argv)
    if not 1 <= args.num_crops <= 16:
        parser.error(f"--num_crops={args.num_crops}: choose 1 to 16")
    if args.max_image_pixels is not None and args.max_image_pixels < 1:
        parser.error(f"--max_image_pixels={args.max_image_pixels}: choose a positive number")
    try:
        samples, parse_problems = read_jsonl(args.jsonl, args.image_root)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        processor = _processor(args.model, args.num_crops)
    except (OSError, ValueError) as err:
        print(f"error: cannot load a processor from --model {args.model} ({err}); use --model tiny or a local "
              "model directory.", file=sys.stderr)
        return 2

    problems = [(_line_of(p, args.jsonl), p) for p in parse_problems]
    if not samples and not parse_problems:
        problems.append((0, f"{args.jsonl}: the file holds no samples (it is empty or has only blank lines); "
                            "training on it would stop with no usable sample."))
    notes: list[tuple[int, str]] = []
    lengths: list[tuple[int, str]] = []
    first_use: dict[str, Sample] = {}
    for sample in samples:
        line = _line_of(sample.origin, args.jsonl)
        sample_notes: list[str] = []
        n_tokens, found = sample_problems(sample, processor, args.max_length, args.max_image_pixels, sample_notes)
        if sample.id in first_use:
            found.append(f"{sample.where}: duplicate id, already used by {first_use[sample.id].origin}; give "
                         "every sample its own id (evaluation and predict tell answers apart by id).")
        first_use.setdefault(sample.id, sample)
        problems += [(line, p) for p in found]
        notes += [(line, n) for n in sample_notes]
        if n_tokens is not None and not found:
            lengths.append((n_tokens, sample.id))
    for _, message in sorted(problems + notes, key=lambda item: item[0]):
        out(message)
    if lengths:
        longest = max(lengths)
        mean = sum(n for n, _ in lengths) / len(lengths)
        out(f"tokens per usable sample ({args.model} processor, num_crops {args.num_crops}): min {min(lengths)[0]}, "
            f"mean {mean:.0f}, max {longest[0]} (id {longest[1]})")
    total = len(samples) + len(parse_problems)
    out(f"{total} samples, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
