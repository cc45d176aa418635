"""Chat template and loss mask of training samples, and the batching collator."""

import pytest
import torch
from PIL import Image

from phi3v_recipes.data.check import count_tokens
from phi3v_recipes.data.collate import PaddingCollator
from phi3v_recipes.data.encode import IGNORE_INDEX, encode_sample, generation_prompt
from phi3v_recipes.data.sample import Sample, Turn
from phi3v_recipes.errors import SampleError
from phi3v_recipes.model.tiny import build_tiny_processor


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(num_crops=1, num_img_tokens=4)


def img(color, size=(300, 200)):
    return Image.new("RGB", size, color)


@pytest.fixture(scope="module")
def conversation():
    """Three turns: two images, then one image, then none."""
    return Sample(
        id="s1",
        turns=[
            Turn("Compare them.", "Both red.", (img("red"), img("darkred", (200, 500)))),
            Turn("And this?", "Blue.", (img("blue"),)),
            Turn("Thanks!", "You are welcome."),
        ],
    )


def test_loss_mask_counts_exactly_the_assistant_replies(processor, conversation):
    """Only each assistant reply with its `<|end|>\\n`, and the final `<|endoftext|>`, carry labels; every user
    turn, image token, BOS and template token is -100. Images are numbered across the conversation."""
    tok = processor.tokenizer
    chat = tok.apply_chat_template
    ids, labels = [], []

    def prompt(content, images, shift, strip_bos):
        text = chat([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        out = processor(text, images=images or None)["input_ids"][0]
        out = [i - shift if i < 0 else i for i in out.tolist()]
        return out[1:] if strip_bos else out

    def answer(text):
        return tok(text + "<|end|>\n", add_special_tokens=False).input_ids

    t1, t2, t3 = conversation.turns
    for p, a in (
        (prompt("<|image_1|><|image_2|>\nCompare them.", list(t1.images), 0, False), answer("Both red.")),
        (prompt("<|image_1|>\nAnd this?", list(t2.images), 2, True), answer("Blue.")),
        (prompt("Thanks!", [], 0, True), answer("You are welcome.")),
    ):
        ids += p + a
        labels += [IGNORE_INDEX] * len(p) + a
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    ids.append(end)
    labels.append(end)

    encoded = encode_sample(conversation, processor)
    assert encoded["input_ids"].tolist() == ids
    assert encoded["labels"].tolist() == labels
    assert sorted({i for i in ids if i < 0}) == [-3, -2, -1]
    assert ids.count(tok.bos_token_id) == 1 + 2 + 1  # start, after image 1 and 2 (turn 1), after image 3
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "Both red.<|end|>\nBlue.<|end|>\nYou are welcome.<|end|>\n<|endoftext|>"
    images = [*t1.images, *t2.images]
    assert encoded["pixel_values"].shape[0] == 3
    assert encoded["image_sizes"].tolist() == [list(processor.image_processor.hd_target_size(*i.size)) for i in images]


def test_token_count_matches_the_encoding(processor, conversation):
    """The cheap pre-training check measures exactly what encode_sample produces."""
    assert count_tokens(conversation, processor) == len(encode_sample(conversation, processor)["input_ids"])


def test_generation_prompt_is_the_first_training_turn(processor, conversation):
    """Evaluation feeds generate() the same tokens that training puts before the first reply."""
    text, images = generation_prompt(conversation, processor)
    prompt_ids = processor(text, images=images)["input_ids"][0].tolist()
    encoded = encode_sample(conversation, processor)
    first_label = next(i for i, label in enumerate(encoded["labels"].tolist()) if label != IGNORE_INDEX)
    assert encoded["input_ids"][:first_label].tolist() == prompt_ids


def test_explicit_tags_must_match_the_turn_images(processor):
    """Tags written in the text are kept when they name the turn's images in order, and rejected otherwise."""
    ok = Sample(id="ok", turns=[Turn("<|image_1|> left, <|image_2|> right: same?", "Yes", (img("red"), img("red")))])
    assert (encode_sample(ok, processor)["input_ids"] < 0).any()
    bad = Sample(id="bad", origin="data.jsonl:7",
                 turns=[Turn("<|image_2|> then <|image_1|>", "No", (img("red"), img("red")))])
    with pytest.raises(SampleError, match=r"data.jsonl:7 \(id bad\): turn 1 has image tags \[2, 1\]"):
        encode_sample(bad, processor)


def test_too_long_samples_are_refused_never_truncated(processor, conversation):
    n = len(encode_sample(conversation, processor)["input_ids"])
    with pytest.raises(SampleError, match=f"{n} tokens .* exceed data.max_length={n - 1}"):
        encode_sample(conversation, processor, max_length=n - 1)


def test_collator_pads_right_and_concatenates_images(processor, conversation):
    """Right padding with the pad id (labels -100, mask 0); images of all samples in order; a text-only
    sample adds none."""
    with_images = encode_sample(conversation, processor)
    text_only = encode_sample(Sample(id="t", turns=[Turn("Hi", "Hello")]), processor)
    batch = PaddingCollator(processor.tokenizer.pad_token_id)([text_only, with_images])
    n = text_only["input_ids"].shape[0]
    assert batch["input_ids"].shape == (2, with_images["input_ids"].shape[0])
    assert (batch["input_ids"][0, n:] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and batch["attention_mask"][0].sum() == n
    assert torch.equal(batch["pixel_values"], with_images["pixel_values"])


def test_screen_reports_images_the_hd_transform_cannot_take(processor, tmp_path):
    """An image too elongated for the HD transform is a named bad sample (skipped with on_error=skip), not a
    crash; a non-UTF-8 jsonl line is a problem naming file:line."""
    from phi3v_recipes.data.check import screen
    from phi3v_recipes.data.jsonl import read_jsonl

    thin = Sample(id="thin", origin="d.jsonl:3", turns=[Turn("Colour?", "red", (img("red", (1, 2000)),))])
    fine = Sample(id="fine", turns=[Turn("Colour?", "red", (img("red"),))])
    kept, problems = screen([thin, fine], processor, None, "skip")
    assert [s.id for s in kept] == ["fine"] and problems[0].startswith("d.jsonl:3 (id thin): ")
    with pytest.raises(SampleError, match="1 bad sample"):
        screen([thin, fine], processor, None, "raise")
    (tmp_path / "x.jsonl").write_bytes(b'\xff\xfe{"id": 1}\n')
    assert read_jsonl(tmp_path / "x.jsonl")[1] == [f"{tmp_path / 'x.jsonl'}:1: not UTF-8 text (byte 1); save the "
                                                   "file as UTF-8."]
