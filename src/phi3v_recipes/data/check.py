"""Validation of samples before training: every problem found up front, named by file:line and id.

`count_tokens` measures a sample exactly as `encode_sample` lays it out, from image sizes alone (no HD transform),
so the whole dataset can be checked in one cheap pass. `screen` applies `data.on_error`: `raise` stops with the
first problems listed; `skip` drops the bad samples, counts them and returns them for the run's skip report.
"""

import re
from collections.abc import Sequence
from typing import Any

from phi3v_recipes.data.encode import prompt_text, user_content
from phi3v_recipes.data.sample import Sample, SampleError, load_image
from phi3v_recipes.model.processing_phi3v import END_TOKEN, IMAGE_TAG_PATTERN

MAX_LISTED = 10


def count_tokens(sample: Sample, processor: Any) -> int:
    """Length of `encode_sample(sample, processor)["input_ids"]`, image tokens included; raises SampleError."""
    tokenizer = processor.tokenizer
    total = 1  # the closing <|endoftext|>
    for k, turn in enumerate(sample.turns):
        chunks = re.split(IMAGE_TAG_PATTERN, prompt_text(processor, user_content(sample, k)))
        total += sum(len(ids) for ids in tokenizer(chunks).input_ids) - (1 if k > 0 else 0)
        for ref in turn.images:
            image = load_image(ref, sample)
            total += processor.num_image_tokens_for(image)
        total += len(tokenizer(turn.assistant + END_TOKEN + "\n", add_special_tokens=False).input_ids)
    return total


def check_sample(sample: Sample, processor: Any, max_length: int | None) -> int:
    """Token count of a usable sample; SampleError naming the sample otherwise."""
    if not sample.turns:
        raise SampleError(f"{sample.where}: the conversation has no turns.")
    for k, turn in enumerate(sample.turns):
        if not isinstance(turn.user, str) or not isinstance(turn.assistant, str):
            raise SampleError(f"{sample.where}: turn {k + 1} needs string 'user' and 'assistant' texts.")
    n_tokens = count_tokens(sample, processor)
    if max_length is not None and n_tokens > max_length:
        raise SampleError(
            f"{sample.where}: {n_tokens} tokens (image tokens included) exceed data.max_length={max_length}; "
            "raise data.max_length, lower data.num_crops, or set data.on_error=skip to drop such samples."
        )
    return n_tokens


def screen(
    samples: Sequence[Sample], processor: Any, max_length: int | None, on_error: str, errors: Sequence[str] = ()
) -> tuple[list[Sample], list[str]]:
    """(usable samples, problems). `errors` are problems found earlier (e.g. unparsable lines)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error={on_error!r}: choose raise or skip.")
    problems = list(errors)
    kept = []
    for sample in samples:
        try:
            check_sample(sample, processor, max_length)
        except SampleError as err:
            problems.append(str(err))
        else:
            kept.append(sample)
    if problems and on_error == "raise":
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise SampleError(
            f"{len(problems)} bad sample(s); fix them, or set data.on_error=skip to drop them:\n  {listed}{more}"
        )
    return kept, problems
