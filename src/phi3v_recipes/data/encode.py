"""Chat template and loss mask: one conversation -> `input_ids`, `labels`, `pixel_values`, `image_sizes`.

Layout, for turns k = 1..K (the Phi-3-V chat format, as the processor tokenizes it):

    <|user|>\\n{images of turn k}{user text}<|end|>\\n<|assistant|>\\n   labels -100 (prompt, image tokens, template)
    {assistant text}<|end|>\\n                                          labels = ids (trained)
    ... next turn ...
    <|endoftext|>                                                      labels = id (trained)

The prompt of each turn goes through the processor (BOS before every text chunk, `-N` runs for image N); only
the first turn keeps its leading BOS, so the whole conversation reads as one. Images are numbered across the
conversation: a turn without tags in its text gets `<|image_i|>...<|image_j|>\\n` for its own images in front; a
turn whose text has tags must use exactly its images' numbers, in order. Evaluation prompts are built by the
same function, so training and generation see the same tokens.
"""

import re
from collections.abc import Sequence
from typing import Any

import torch

from phi3v_recipes.data.sample import Sample, load_image
from phi3v_recipes.errors import SampleError
from phi3v_recipes.model.processing_phi3v import END_TOKEN, ENDOFTEXT_TOKEN, IMAGE_TAG_PATTERN, image_tag

IGNORE_INDEX = -100

_TAG_NUMBER = re.compile(r"<\|image_(\d+)\|>")


def user_content(sample: Sample, turn_index: int) -> str:
    """The user message of a turn with its image tags (numbered across the conversation)."""
    first = 1 + sum(len(t.images) for t in sample.turns[:turn_index])
    turn = sample.turns[turn_index]
    numbers = list(range(first, first + len(turn.images)))
    found = [int(n) for n in _TAG_NUMBER.findall(turn.user)]
    if not found:
        return "".join(image_tag(n) for n in numbers) + ("\n" if numbers else "") + turn.user
    if found != numbers:
        raise SampleError(
            f"{sample.where}: turn {turn_index + 1} has image tags {found} but carries images {numbers}; "
            "number the tags 1..n across the conversation, once each, in order (or leave them out)."
        )
    return turn.user


def control_token_problems(sample: Sample, tokenizer: Any) -> list[str]:
    """One problem per turn text that holds one of the tokenizer's special tokens (`<|end|>`, `<|assistant|>`,
    `<s>`, ...). The chat template writes them itself, and the tokenizer reads them in text as the tokens, not as
    characters: an answer with `<|end|>` would teach the model to stop there, a question with
    `<|end|>\n<|assistant|>\n` would turn into a turn of its own, its answer unsupervised. The image tags
    `<|image_N|>` are not among them (the processor's own markers, checked in `user_content`)."""
    texts = [(k, part, text) for k, turn in enumerate(sample.turns)
             for part, text in (("question", turn.user), ("answer", turn.assistant))
             if isinstance(text, str) and "<" in text]
    if not texts:
        return []
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    problems = []
    for k, part, text in texts:
        found = sorted((token for token in specials if token in text), key=text.index)
        if found:
            what = "a token" if len(found) == 1 else "tokens"
            problems.append(f"{sample.where}: turn {k + 1}'s {part} holds {', '.join(found)}, {what} the chat "
                            "template writes itself; in the text the tokenizer reads them as the tokens (the end of "
                            "a turn, another turn), not as characters. Remove them from the data.")
    return problems


def prompt_text(processor: Any, content: str, earlier: Sequence[tuple[str, str]] = ()) -> str:
    """`<|user|>\n{content}<|end|>\n<|assistant|>\n` through the tokenizer's chat template, after the `earlier`
    (user content, assistant reply) turns of the conversation. The one prompt of training, evaluation and
    prediction."""
    messages = []
    for user, reply in earlier:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": content})
    return processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generation_prompt(sample: Sample, processor: Any, max_pixels: int | None = None,
                      whole: bool = False) -> tuple[str, list]:
    """A generation prompt (text, images within `max_pixels` pixels) for `generate`: the first turn (evaluation
    scores the first answer), or with `whole` the whole conversation, the earlier replies given and the last one
    asked for (prediction)."""
    last = len(sample.turns) - 1 if whole else 0
    earlier = [(user_content(sample, k), sample.turns[k].assistant) for k in range(last)]
    images = [load_image(ref, sample, max_pixels) for turn in sample.turns[: last + 1] for ref in turn.images]
    return prompt_text(processor, user_content(sample, last), earlier), images


def too_long(sample: Sample, n_tokens: int, max_length: int) -> str:
    """The problem of a sample longer than data.max_length (never truncated: it would cut image tokens)."""
    return (
        f"{sample.where}: {n_tokens} tokens (image tokens included) exceed data.max_length={max_length}; "
        "raise data.max_length, lower data.num_crops, or set data.on_error=skip to drop such samples."
    )


def encode_sample(
    sample: Sample, processor: Any, max_length: int | None = None, max_pixels: int | None = None
) -> dict[str, torch.Tensor]:
    """Token ids, labels and pixels of a whole conversation (see the module docstring for the layout); images
    over `max_pixels` pixels (data.max_image_pixels) make it a SampleError, like any unreadable image."""
    tokenizer = processor.tokenizer
    problems = control_token_problems(sample, tokenizer)
    if problems:
        raise SampleError(problems[0])
    ids: list[int] = []
    labels: list[int] = []
    pixels, sizes = [], []
    seen_images = 0
    for k, turn in enumerate(sample.turns):
        content = user_content(sample, k)
        # The processor numbers a call's images from 1: renumber this turn's tags locally, shift ids back.
        local = _TAG_NUMBER.sub(lambda m, shift=seen_images: image_tag(int(m.group(1)) - shift), content)
        images = [load_image(ref, sample, max_pixels) for ref in turn.images]
        try:
            out = processor(prompt_text(processor, local), images=images or None, return_tensors="pt")
        except ValueError as err:
            raise SampleError(f"{sample.where}: turn {k + 1}: {err}") from None
        prompt = out["input_ids"][0]
        prompt = torch.where(prompt < 0, prompt - seen_images, prompt).tolist()
        if k > 0 and prompt and prompt[0] == tokenizer.bos_token_id:
            prompt = prompt[1:]
        answer = tokenizer(turn.assistant + END_TOKEN + "\n", add_special_tokens=False).input_ids
        ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
        if images:
            pixels.append(out["pixel_values"])
            sizes.append(out["image_sizes"])
        seen_images += len(images)
    end = tokenizer.convert_tokens_to_ids(ENDOFTEXT_TOKEN)
    ids.append(end)
    labels.append(end)
    if max_length is not None and len(ids) > max_length:
        raise SampleError(too_long(sample, len(ids), max_length))
    encoded = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if pixels:
        encoded["pixel_values"] = torch.cat(pixels)
        encoded["image_sizes"] = torch.cat(sizes)
    return encoded


__all__ = ["IGNORE_INDEX", "IMAGE_TAG_PATTERN", "encode_sample", "generation_prompt", "user_content"]
