"""`python -m phi3v_recipes.predict model.name_or_path=<model> input=<in.jsonl> output=<out.jsonl>`: batch inference.

Answers every conversation of a jsonl file in the seed's format (see data/jsonl.py): the prompt is the whole
conversation, and the model writes the reply to its last user turn (whose "assistant" may be absent). Each answer
goes to the output file as `{"id": ..., "line": <input line>, "answer": ...}` as soon as its batch is done, so an
interrupted run loses at most one batch: run the same command again and it answers the input lines not answered yet
(a torn last line is dropped and redone). Answers are keyed by line, so ids that repeat (reported up front) lose
nothing. Configuration: conf/predict.yaml; the processor settings saved with the model (crop count
included) are used unless the command line overrides them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from phi3v_recipes.cli import exit_on_user_error, one_sentence_errors, register_resolvers
from phi3v_recipes.config import check_hardware, check_model_path, check_output_dir, check_settings
from phi3v_recipes.errors import ConfigError, SampleError

if TYPE_CHECKING:  # the data and model modules load transformers: imported where a command needs them
    from phi3v_recipes.data.sample import Sample

register_resolvers()


def line_of(sample: Sample) -> int:
    """The input line a conversation came from (read_jsonl records `file:line` as its origin)."""
    return int(sample.origin.rpartition(":")[2])


ANSWER_START = b'{"id": '
"""How every answer line of ours begins (json.dumps of {"id": ..., "line": ..., "answer": ...})."""


def answered_lines(output: Path) -> set[int]:
    """Input lines already answered in `output`. A file that is not an answers file of ours is refused before
    anything in it changes; a torn last line of ours (an interrupted write) is cut off."""
    if output.is_dir():
        raise ConfigError(f"output={output} is a directory; give a file path, e.g. output={output / 'answers.jsonl'}.")
    if not output.is_file():
        return set()
    data = output.read_bytes()
    cut = data.rfind(b"\n") + 1
    complete, torn = data[:cut], data[cut:]
    refuse = (f"output={output} is not an answers file of predict (line {{}}); nothing in it was changed: choose a new "
              "output file, or move this one away to answer from the start.")
    lines = []
    try:
        text = complete.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(refuse.format("not UTF-8")) from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("line"), int) or "answer" not in row:
            raise ConfigError(refuse.format(number))
        lines.append(row["line"])
    if torn and not ANSWER_START.startswith(torn[: len(ANSWER_START)]):
        raise ConfigError(refuse.format(text.count("\n") + 1))
    if torn:
        output.write_bytes(complete)
    return set(lines)


def repeated_ids(samples: list[Sample]) -> str | None:
    """A note naming the ids that more than one conversation carries (count and first few), or None."""
    lines: dict[str, list[int]] = {}
    for sample in samples:
        lines.setdefault(sample.id, []).append(line_of(sample))
    repeated = {i: found for i, found in lines.items() if len(found) > 1}
    if not repeated:
        return None
    first = "; ".join(f"{i} at lines {', '.join(map(str, found))}" for i, found in list(repeated.items())[:3])
    return (f"note: {len(repeated)} id(s) of the input repeat ({first}{'; ...' if len(repeated) > 3 else ''}); each "
            "answer carries its input line, so every conversation is answered")


def run(cfg: DictConfig) -> int:
    """Answer every unanswered conversation of cfg.input into cfg.output; return how many were answered now."""
    if not cfg.get("input") or not cfg.get("output"):
        raise ConfigError("predict needs input=<conversations.jsonl> and output=<answers.jsonl>.")
    check_settings(cfg, nullable=["data.num_crops"])
    check_model_path(cfg.model.name_or_path, training=False)
    check_hardware(cfg)
    check_output_dir(cfg.output, "output", file=True)
    # the data and model code (transformers) load after the checks above, so that a mistake is answered at once
    from tqdm.auto import tqdm

    from phi3v_recipes.data.encode import generation_prompt
    from phi3v_recipes.data.jsonl import read_jsonl
    from phi3v_recipes.evaluation import answer_batch, stop_token_ids
    from phi3v_recipes.loading import load_for_inference

    samples, problems = read_jsonl(cfg.input, cfg.image_root, require_answers=False)
    if problems:
        raise SampleError(f"{len(problems)} bad line(s) in {cfg.input}; fix them first:\n  " + "\n  ".join(problems[:10]))
    if (note := repeated_ids(samples)) is not None:
        print(note, flush=True)
    output = Path(cfg.output)
    if output.exists() and output.resolve() == Path(cfg.input).resolve():
        raise ConfigError(f"output={cfg.output} is the input file; give the answers a file of their own.")
    done = answered_lines(output)
    todo = [s for s in samples if line_of(s) not in done]
    if not todo:
        print(f"all {len(samples)} conversations of {cfg.input} are already answered in {output}", flush=True)
        return 0
    model, processor = load_for_inference(cfg)
    stops = stop_token_ids(processor, model)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a", encoding="utf-8") as out:
        for start in tqdm(range(0, len(todo), cfg.eval.batch_size), desc="predicting"):
            batch = todo[start : start + cfg.eval.batch_size]
            texts, images = zip(*(generation_prompt(s, processor, cfg.data.max_image_pixels, whole=True)
                                  for s in batch), strict=True)
            answers = answer_batch(model, processor, texts, images, cfg.eval.max_new_tokens, stops)
            out.write("".join(json.dumps({"id": s.id, "line": line_of(s), "answer": a}) + "\n"
                              for s, a in zip(batch, answers, strict=True)))
            out.flush()
    print(f"answered {len(todo)} conversations ({len(done)} were already done): {output}", flush=True)
    return len(todo)


@one_sentence_errors
@hydra.main(version_base="1.3", config_path="pkg://phi3v_recipes.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(run, cfg)


if __name__ == "__main__":
    main()
