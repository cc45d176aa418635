"""`python -m phi3v_recipes.predict model.name_or_path=<model> input=<in.jsonl> output=<out.jsonl>`: batch inference.

Answers every conversation of a jsonl file in the seed's format (see data/jsonl.py): the prompt is the whole
conversation, and the model writes the reply to its last user turn (whose "assistant" may be absent). Each answer
goes to the output file as `{"id": ..., "answer": ...}` as soon as its batch is done, so an interrupted run loses
at most one batch: run the same command again and it resumes after the ids already answered (a torn last line is
dropped and redone). Configuration: conf/predict.yaml; the processor settings saved with the model (crop count
included) are used unless the command line overrides them.
"""

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from phi3v_recipes.cli import exit_on_user_error, one_sentence_errors, register_resolvers
from phi3v_recipes.config import check_hardware, check_settings
from phi3v_recipes.data.sample import Sample
from phi3v_recipes.errors import ConfigError, SampleError

register_resolvers()


def conversation_prompt(sample: Sample, processor: Any, max_pixels: int | None = None) -> tuple[str, list]:
    """(chat-templated text of the whole conversation ending with the generation prompt, its images, each within
    `max_pixels` pixels)."""
    from phi3v_recipes.data.encode import user_content
    from phi3v_recipes.data.sample import load_image

    messages = []
    for k, turn in enumerate(sample.turns):
        messages.append({"role": "user", "content": user_content(sample, k)})
        if k < len(sample.turns) - 1:
            messages.append({"role": "assistant", "content": turn.assistant})
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, [load_image(ref, sample, max_pixels) for turn in sample.turns for ref in turn.images]


def answered_ids(output: Path) -> set[str]:
    """Ids already in `output`; a torn last line (an interrupted write) is cut off."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        output.write_bytes(complete)
    return {json.loads(line)["id"] for line in complete.decode("utf-8").splitlines() if line.strip()}


def run(cfg: DictConfig) -> int:
    """Answer every unanswered conversation of cfg.input into cfg.output; return how many were answered now."""
    from tqdm.auto import tqdm

    from phi3v_recipes.data.jsonl import read_jsonl
    from phi3v_recipes.evaluation import answer_batch, stop_token_ids
    from phi3v_recipes.loading import load_for_inference

    if not cfg.get("input") or not cfg.get("output"):
        raise ConfigError("predict needs input=<conversations.jsonl> and output=<answers.jsonl>.")
    check_settings(cfg, nullable=["data.num_crops"])
    check_hardware(cfg)
    samples, problems = read_jsonl(cfg.input, cfg.image_root, require_answers=False)
    if problems:
        raise SampleError(f"{len(problems)} bad line(s) in {cfg.input}; fix them first:\n  " + "\n  ".join(problems[:10]))
    output = Path(cfg.output)
    done = answered_ids(output)
    todo = [s for s in samples if s.id not in done]
    if not todo:
        print(f"all {len(samples)} conversations of {cfg.input} are already answered in {output}", flush=True)
        return 0
    model, processor = load_for_inference(cfg)
    stops = stop_token_ids(processor, model)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a", encoding="utf-8") as out:
        for start in tqdm(range(0, len(todo), cfg.eval.batch_size), desc="predicting"):
            batch = todo[start : start + cfg.eval.batch_size]
            texts, images = zip(*(conversation_prompt(s, processor, cfg.data.max_image_pixels) for s in batch),
                                strict=True)
            answers = answer_batch(model, processor, texts, images, cfg.eval.max_new_tokens, stops)
            out.write("".join(json.dumps({"id": s.id, "answer": a}) + "\n" for s, a in zip(batch, answers,
                                                                                          strict=True)))
            out.flush()
    print(f"answered {len(todo)} conversations ({len(done)} were already done): {output}", flush=True)
    return len(todo)


@one_sentence_errors
@hydra.main(version_base="1.3", config_path="pkg://phi3v_recipes.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(run, cfg)


if __name__ == "__main__":
    main()
