"""Generation-based evaluation: greedy answers to each sample's first turn, scored by the task's metric.

Batched (left padding), sharded across ranks (rank r takes samples r, r + world, ...) and gathered on rank 0,
which scores them and writes `<name>_predictions.jsonl` (id, question, prediction, references, score) next to the
metric.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from phi3v_recipes.data.encode import generation_prompt
from phi3v_recipes.data.sample import Sample
from phi3v_recipes.files import atomic_write_text
from phi3v_recipes.metrics import per_sample_scores
from phi3v_recipes.model.processing_phi3v import END_TOKEN, ENDOFTEXT_TOKEN


def stop_token_ids(processor: Any, model: torch.nn.Module) -> list[int]:
    """Generation stops at `<|end|>`, `<|endoftext|>` and the model's own eos."""
    ids = set(processor.tokenizer.convert_tokens_to_ids([END_TOKEN, ENDOFTEXT_TOKEN]))
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


@torch.no_grad()
def answer_batch(
    model: torch.nn.Module, processor: Any, texts: Sequence[str], images: Sequence[list], max_new_tokens: int,
    stops: list[int],
) -> list[str]:
    """Greedy replies to one batch of chat-templated prompts (left-padded), stripped of whitespace."""
    inputs = processor(list(texts), images=list(images), padding_side="left").to(next(model.parameters()).device)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def generate_answers(
    model: torch.nn.Module, processor: Any, samples: Sequence[Sample], batch_size: int, max_new_tokens: int,
    show_progress: bool = True,
) -> list[str]:
    """Greedy answers to the first turn of each sample, in order."""
    was_training = model.training
    model.eval()
    answers: list[str] = []
    stops = stop_token_ids(processor, model)
    batches = range(0, len(samples), batch_size)
    for start in tqdm(batches, desc="generating", disable=not show_progress, leave=False):
        prompts, images = zip(*(generation_prompt(s, processor) for s in samples[start : start + batch_size]),
                              strict=True)
        answers += answer_batch(model, processor, prompts, images, max_new_tokens, stops)
    model.train(was_training)
    return answers


def evaluate(
    model: torch.nn.Module,
    processor: Any,
    samples: Sequence[Sample],
    metric: str,
    batch_size: int,
    max_new_tokens: int,
    predictions_file: Path | None = None,
) -> float | None:
    """The metric over `samples` (every rank calls this; the score is returned on every rank)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = list(samples[rank::world])
    answers = generate_answers(model, processor, mine, batch_size, max_new_tokens, show_progress=rank == 0)
    if distributed:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, answers)
    else:
        gathered = [answers]
    predictions = [None] * len(samples)
    for r, part in enumerate(gathered):
        predictions[r::world] = part
    references = [s.answers for s in samples]
    scores = per_sample_scores(metric, predictions, references)  # the metric is their mean
    if rank == 0 and predictions_file is not None:
        rows = zip(samples, predictions, references, scores, strict=True)
        atomic_write_text(predictions_file, "".join(
            json.dumps({"id": s.id, "question": s.turns[0].user, "prediction": p, "references": refs,
                        "score": score}) + "\n"
            for s, p, refs, score in rows
        ))
    return sum(scores) / len(scores)
