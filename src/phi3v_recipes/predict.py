"""`python -m phi3v_recipes.predict model.name_or_path=<model> input=<in.jsonl> output=<out.jsonl>`: batch inference.

Answers every conversation of a jsonl file in the seed's format (see data/jsonl.py): the prompt is the whole
conversation, and the model writes the reply to its last user turn (whose "assistant" may be absent). Each answer
goes to the output file as `{"id": ..., "line": <input line>, "answer": ...}` as soon as its batch is done, so an
interrupted run loses at most one batch: run the same command again and it answers the input lines not answered yet
(a torn last line is dropped and redone). Answers are keyed by line, so ids that repeat (reported up front) lose
nothing. Before its first answer, `<output>.record.json` is written beside it: the input, the model (path and weight
files) and the generation settings (`answers_record`). The answer lines stay plain `{"id", "line", "answer"}` rows
for whoever reads them; an existing output is continued only when this command's record equals the saved one and
every answered line's id is the id of that input line, and is otherwise refused with nothing changed (answers of
one model are never passed off as another's). Configuration: conf/predict.yaml; the processor settings saved with the model (crop count
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
from phi3v_recipes.files import atomic_write_text

if TYPE_CHECKING:  # the data and model modules load transformers: imported where a command needs them
    from phi3v_recipes.data.sample import Sample

register_resolvers()


def line_of(sample: Sample) -> int:
    """The input line a conversation came from (read_jsonl records `file:line` as its origin)."""
    return int(sample.origin.rpartition(":")[2])


ANSWER_START = b'{"id": '
"""How every answer line of ours begins (json.dumps of {"id": ..., "line": ..., "answer": ...})."""
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def record_path(output: Path) -> Path:
    """The record beside `output` of what its answers come from (see `answers_record`)."""
    return output.with_name(f"{output.name}.record.json")


def answers_record(cfg: DictConfig) -> dict[str, object]:
    """What decides the answers of `cfg`, by setting: the input file, where its images are read, the model (a local
    directory by its absolute path and the name, size and modification time of each weight file in it, so that a
    model retrained or re-exported in place is another model), and the generation settings. Written beside the
    output before its first answer; an existing output is continued only under the same record."""
    model = str(cfg.model.name_or_path)
    weights = []
    if Path(model).is_dir():
        model = str(Path(model).resolve())
        weights = [f"{f.name} ({f.stat().st_size} bytes, mtime_ns {f.stat().st_mtime_ns})"
                   for f in sorted(Path(model).iterdir())
                   if f.is_file() and f.suffix in WEIGHT_SUFFIXES and f.name != "training_args.bin"]
    return {
        "input": str(Path(cfg.input).resolve()),
        "image_root": str(Path(cfg.image_root or Path(cfg.input).parent).resolve()),
        "model.name_or_path": model,
        "model weights": weights,
        "model.dtype": cfg.model.dtype,
        "data.num_crops": cfg.data.num_crops,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
    }


def read_answers(output: Path) -> tuple[dict[int, str], bytes | None]:
    """(id answered per input line, the file without its torn last line, or None when it has none) of `output`,
    changing nothing. A file that is not an answers file of ours is refused."""
    if output.is_dir():
        raise ConfigError(f"output={output} is a directory; give a file path, e.g. output={output / 'answers.jsonl'}.")
    if not output.is_file():
        return {}, None
    data = output.read_bytes()
    cut = data.rfind(b"\n") + 1
    complete, torn = data[:cut], data[cut:]
    refuse = (f"output={output} is not an answers file of predict (line {{}}); nothing in it was changed: choose a new "
              "output file, or move this one away to answer from the start.")
    answered: dict[int, str] = {}
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
        answered[row["line"]] = row.get("id")
    if torn and not ANSWER_START.startswith(torn[: len(ANSWER_START)]):
        raise ConfigError(refuse.format(text.count("\n") + 1))
    return answered, complete if torn else None


def check_continues(output: Path, answered: dict[int, str], record: dict[str, object], ids: dict[int, str],
                    source: str) -> None:
    """ConfigError unless the answers of `output` were written under `record` (its record file beside it) and each
    answered line's id is the id of that line of the input `source` (`ids`)."""
    if not answered:
        return
    saved_at = record_path(output)
    then = (f"nothing in it was changed: give another output, or remove {output} and {saved_at.name} to answer from "
            "the start.")
    try:
        saved = json.loads(saved_at.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"output={output} holds {len(answered)} answers but no record of the model and settings that "
                          f"wrote them ({saved_at.name} beside it), so they cannot be continued safely; {then}") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"output={output}: its record {saved_at} is not readable ({err}); {then}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"output={output}: its record {saved_at} is not a predict record; {then}")
    changed = [f"{key}: {saved.get(key)} -> {value}" for key, value in record.items()
               if saved.get(key) != value and key != "model weights"]
    if not changed and saved.get("model weights") != record["model weights"]:
        changed = [f"the weight files of model.name_or_path={record['model.name_or_path']} changed since (retrained or "
                   "written again in place)"]
    if changed:
        raise ConfigError(f"output={output} holds answers from another input, model or settings than this command's "
                          f"({'; '.join(changed)}); {then}")
    for line, answer_id in sorted(answered.items()):
        if ids.get(line) != answer_id:
            now = f"is id {ids[line]}" if line in ids else "holds no conversation"
            raise ConfigError(f"output={output} answers another input: its answer for line {line} has id {answer_id}, "
                              f"but line {line} of {source} {now}; {then}")


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
    from phi3v_recipes.loading import check_trained_model, load_for_inference

    samples, problems = read_jsonl(cfg.input, cfg.image_root, require_answers=False)
    if problems:
        raise SampleError(f"{len(problems)} bad line(s) in {cfg.input}; fix them first:\n  " + "\n  ".join(problems[:10]))
    if (note := repeated_ids(samples)) is not None:
        print(note, flush=True)
    output = Path(cfg.output)
    if output.exists() and output.resolve() == Path(cfg.input).resolve():
        raise ConfigError(f"output={cfg.output} is the input file; give the answers a file of their own.")
    check_trained_model(cfg.model.name_or_path, "predict with")  # before the output is read
    record = answers_record(cfg)
    answered, complete = read_answers(output)
    check_continues(output, answered, record, {line_of(s): s.id for s in samples}, cfg.input)
    if complete is not None:  # a torn last line of ours (an interrupted write): cut off, and answered again
        output.write_bytes(complete)
    done = set(answered)
    todo = [s for s in samples if line_of(s) not in done]
    if not todo:
        print(f"all {len(samples)} conversations of {cfg.input} are already answered in {output}", flush=True)
        return 0
    model, processor = load_for_inference(cfg, "predict with")
    stops = stop_token_ids(processor, model)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not answered:  # before the first answer, so that no answer is ever without its record (else: checked equal)
        atomic_write_text(record_path(output), json.dumps(record, indent=2) + "\n")
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
