"""Tests of the Phi-3-V processor: prompt/image interleaving, batching, validation, saving and loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from phi3v_recipes.model.image_processing_phi3v import Phi3VImageProcessor
from phi3v_recipes.model.processing_phi3v import CHAT_TEMPLATE, IMAGE_TAG_PATTERN, Phi3VProcessor, image_tag
from phi3v_recipes.model.tiny import build_tiny_processor, build_tiny_tokenizer
from tests.conftest import official_preprocessor_config

PROMPT = "<|user|>\n<|image_1|>\nWhat is shown in this picture?<|end|>\n<|assistant|>\n"

# The chat template of the reference notes, with the Jinja string literals' "\n" as real newlines (hub format).
NOTES_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}"
    "{% endif %}"
)


def _image(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


@pytest.fixture(scope="module")
def processor() -> Phi3VProcessor:
    """Real token counts (144 per crop), one crop by default to keep pixel work small."""
    return build_tiny_processor(num_crops=1, num_img_tokens=144)


@pytest.fixture(scope="module")
def small() -> Phi3VProcessor:
    """4 tokens per crop, for short, readable sequences."""
    return build_tiny_processor(num_crops=2, num_img_tokens=4)


def test_single_image_matches_hand_assembled_sequence(processor):
    """One image: BOS + ids of the text before the tag, then -1 x num_img_tokens, then BOS + ids of the rest;
    pixel_values / image_sizes are the image processor's; a batch of one is [1, L] with an all-ones mask."""
    tok = processor.tokenizer
    image = _image(500, 300, (10, 200, 30))
    out = processor(PROMPT, images=image, num_crops=4)

    before, after = PROMPT.split("<|image_1|>")
    expected = tok(before).input_ids + [-1] * 757 + tok(after).input_ids
    assert tok(before).input_ids[0] == tok.bos_token_id == 1
    assert tok(after).input_ids[0] == 1
    assert out["input_ids"].tolist() == [expected]
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape == (1, len(expected))
    assert out["attention_mask"].tolist() == [[1] * len(expected)]

    direct = processor.image_processor(image, num_crops=4)
    assert torch.equal(out["pixel_values"], direct["pixel_values"])
    assert torch.equal(out["image_sizes"], direct["image_sizes"])
    assert out["image_sizes"].tolist() == [[672, 672]]
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    assert processor.num_image_tokens_for(image, num_crops=4) == 757


def test_two_images_and_empty_chunks(small):
    """Two images give -1 and -2 blocks; adjacent tags and a trailing tag leave empty chunks that still add a BOS."""
    tok = small.tokenizer
    first, second = _image(300, 300, (255, 0, 0)), _image(700, 300, (0, 0, 255))
    n1, n2 = small.num_image_tokens_for(first), small.num_image_tokens_for(second)
    out = small("Compare <|image_1|><|image_2|>", images=[first, second])
    expected = tok("Compare ").input_ids + [-1] * n1 + tok("").input_ids + [-2] * n2 + tok("").input_ids
    assert tok("").input_ids == [1]
    assert out["input_ids"].tolist() == [expected]
    assert out["image_sizes"].tolist() == [
        list(small.image_processor.hd_target_size(300, 300)),
        list(small.image_processor.hd_target_size(700, 300)),
    ]
    assert out["pixel_values"].shape == (2, 3, 3, 336, 336)


def test_text_only_is_plain_tokenization(small):
    """Without tags and images the sample is the tokenizer's encoding of the whole text, and no pixels are returned."""
    text = "<|user|>\nTell me a joke.<|end|>\n<|assistant|>\n"
    out = small(text)
    assert out["input_ids"].tolist() == [small.tokenizer(text).input_ids]
    assert "pixel_values" not in out and "image_sizes" not in out


def _batch():
    texts = [
        "<|user|>\nNo image here, just a question?<|end|>\n<|assistant|>\n",
        "<|user|>\n<|image_1|>\nWhat colour?<|end|>\n<|assistant|>\n",
        "<|user|>\n<|image_1|>\n<|image_2|>\nSame?<|end|>\n<|assistant|>\n",
    ]
    images = [_image(100, 100, (255, 0, 0)), _image(400, 150, (0, 255, 0)), _image(120, 400, (0, 0, 255))]
    return texts, images


def test_batch_right_padding_and_image_order(small):
    """A batch with 0, 1 and 2 images: each row equals its single-sample encoding, padded on the right with the
    pad id (mask 0); pixel_values / image_sizes concatenate the images in sample order."""
    texts, images = _batch()
    out = small(texts, images=images)
    singles = [small(texts[0]), small(texts[1], images=images[0]), small(texts[2], images=images[1:])]
    lengths = [s["input_ids"].shape[1] for s in singles]
    width = max(lengths)
    assert out["input_ids"].shape == (3, width)
    pad = small.tokenizer.pad_token_id
    assert pad == small.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for row, single, length in zip(range(3), singles, lengths, strict=True):
        assert out["input_ids"][row].tolist() == single["input_ids"][0].tolist() + [pad] * (width - length)
        assert out["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
    expected_pixels = torch.cat([singles[1]["pixel_values"], singles[2]["pixel_values"]])
    assert torch.equal(out["pixel_values"], expected_pixels)
    assert (
        out["image_sizes"].tolist() == singles[1]["image_sizes"].tolist() + singles[2]["image_sizes"].tolist()
    )
    # the same batch with one list of images per sample
    nested = small(texts, images=[None, [images[0]], images[1:]])
    assert all(torch.equal(nested[key], out[key]) for key in out)


def test_batch_left_padding(small):
    """padding_side='left' puts the pad ids and zero mask before each shorter sample (for generation)."""
    texts, images = _batch()
    right = small(texts, images=images)
    left = small(texts, images=images, padding_side="left")
    pad = small.tokenizer.pad_token_id
    for row in range(3):
        length = int(right["attention_mask"][row].sum())
        ids = right["input_ids"][row, :length].tolist()
        missing = right["input_ids"].shape[1] - length
        assert left["input_ids"][row].tolist() == [pad] * missing + ids
        assert left["attention_mask"][row].tolist() == [0] * missing + [1] * length
    assert torch.equal(left["pixel_values"], right["pixel_values"])


def test_padding_options_and_return_types(small):
    """max_length / pad_to_multiple_of padding, python lists for return_tensors=None, and an error when unequal
    samples cannot be stacked without padding."""
    texts = ["<|user|>\nhi<|end|>\n", "<|user|>\nA longer question about nothing.<|end|>\n"]
    lengths = [len(small.tokenizer(t).input_ids) for t in texts]
    assert small(texts, padding="max_length", max_length=64)["input_ids"].shape == (2, 64)
    assert small(texts, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0
    as_lists = small(texts, return_tensors=None)
    assert [len(ids) for ids in as_lists["input_ids"]] == lengths
    assert as_lists["input_ids"][0] == small.tokenizer(texts[0]).input_ids
    as_numpy = small(texts[1], images=None, return_tensors="np")
    assert as_numpy["input_ids"].shape == (1, lengths[1])
    with pytest.raises(ValueError, match="padding=True"):
        small(texts, padding=False)


def test_truncation_never_cuts_an_image(small):
    """Truncation shortens text after the images, and refuses (ValueError naming the sample) to cut image tokens."""
    image = _image(50, 50, (1, 2, 3))
    out = small("<|image_1|>" + " word" * 40, images=image)
    full = out["input_ids"].shape[1]
    cut = small("<|image_1|>" + " word" * 40, images=image, truncation=True, max_length=full - 10)
    assert cut["input_ids"].tolist() == [out["input_ids"][0, : full - 10].tolist()]
    with pytest.raises(ValueError, match=r"Sample 0: .*would cut image\(s\) \[1\]"):
        small("<|image_1|>" + " word" * 40, images=image, truncation=True, max_length=5)


def test_num_crops_override_per_call(small):
    """num_crops given to __call__ changes the crops and token counts of that call only."""
    image = _image(1000, 500, (9, 9, 9))
    default = small("<|image_1|>", images=image)
    more = small("<|image_1|>", images=image, num_crops=8)
    assert default["pixel_values"].shape[1] == 3 and more["pixel_values"].shape[1] == 9
    assert (more["input_ids"] == -1).sum() == small.num_image_tokens_for(image, num_crops=8)
    assert (default["input_ids"] == -1).sum() == small.num_image_tokens_for(image)


MISMATCHES = [
    ("<|image_1|> and again <|image_1|>", 1, "repeated tag <|image_1|>"),
    ("<|image_2|> then <|image_1|>", 2, "out of order"),
    ("<|image_1|> then <|image_3|>", 3, r"gap.*missing \['<\|image_2\|>'\]"),
    ("<|image_1|> alone", 2, "more images than tags.*image 2 has no tag <|image_2|>"),
    ("no tag at all", 1, "more images than tags"),
    ("<|image_1|> and <|image_2|>", 1, r"fewer images than tags.*<\|image_2\|> has no image"),
    ("<|image_1|> but no image", 0, "fewer images than tags"),
    ("<|image_0|>", 1, "numbered from 1"),
]


@pytest.mark.parametrize(("prompt", "n_images", "message"), MISMATCHES)
def test_tag_image_mismatches_raise_with_sample_index(small, prompt, n_images, message):
    """Every way tags and images can disagree raises ValueError naming the sample, alone and inside a batch
    (where the bad sample is number 1, with per-sample image lists)."""
    images = [_image(40, 40, (i, i, i)) for i in range(n_images)]
    with pytest.raises(ValueError, match=f"Sample 0: .*{message}"):
        small(prompt, images=images or None)
    with pytest.raises(ValueError, match=f"Sample 1: .*{message}"):
        small(["fine text", prompt], images=[[], images])


def test_flat_image_list_over_a_batch_checks_counts(small):
    """With a flat list over a batch, each sample takes its tags' worth of images; shortages and leftovers raise
    ValueError naming a sample."""
    image = _image(40, 40, (0, 0, 0))
    texts = ["<|image_1|>", "text", "<|image_1|><|image_2|>"]
    out = small(texts, images=[image, image, image])
    assert out["pixel_values"].shape[0] == 3
    with pytest.raises(ValueError, match="Sample 2: fewer images than tags"):
        small(texts, images=[image, image])
    with pytest.raises(ValueError, match="Sample 2: more images than tags"):
        small(texts, images=[image] * 4)
    with pytest.raises(ValueError, match="2 per-sample lists but `text` has 3 samples"):
        small(texts, images=[[image], [image, image]])
    with pytest.raises(TypeError, match="mixes PIL images"):
        small(texts, images=[image, [image]])


def test_chat_template(processor):
    """The Phi-3.5-vision template renders <|role|>\\n…<|end|>\\n per message and a trailing <|assistant|>\\n,
    through the tokenizer and through the processor."""
    assert CHAT_TEMPLATE == NOTES_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<|image_1|>\nWhat is this?"},
    ]
    expected = "<|system|>\nBe brief.<|end|>\n<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n"
    assert (
        processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        == expected
    )
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert processor.apply_chat_template(
        messages[:1] + [{"role": "assistant", "content": "Ok"}], tokenize=False, add_generation_prompt=True
    ).endswith("<|assistant|>\nOk<|end|>\n")


def test_tokenizer_without_template_gets_the_phi3v_one():
    """A tokenizer with no chat template receives CHAT_TEMPLATE when wrapped by the processor."""
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    processor = Phi3VProcessor(Phi3VImageProcessor(), tok)
    assert tok.chat_template == CHAT_TEMPLATE and processor.chat_template == CHAT_TEMPLATE


def test_decode_delegates_to_the_tokenizer(small):
    """decode / batch_decode are the tokenizer's (image ids removed by the caller)."""
    ids = small("<|user|>\nHello<|end|>\n")["input_ids"]
    assert small.batch_decode(ids) == small.tokenizer.batch_decode(ids)
    assert small.decode(ids[0], skip_special_tokens=True) == "\nHello\n"


def test_save_and_load_round_trip(tmp_path, small):
    """Phi3VProcessor.save_pretrained / from_pretrained restore the same processor: same settings, template and
    outputs; kwargs such as num_crops reach the image processor only."""
    small.save_pretrained(tmp_path)
    assert {"preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    assert "processor_config.json" not in os.listdir(tmp_path)  # the official layout has none
    loaded = Phi3VProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.to_dict() == small.image_processor.to_dict()
    assert loaded.chat_template == small.chat_template == CHAT_TEMPLATE
    assert loaded.tokenizer.pad_token == "<|endoftext|>" and loaded.tokenizer.padding_side == "right"
    texts, images = _batch()
    before, after = small(texts, images=images), loaded(texts, images=images)
    assert all(torch.equal(before[key], after[key]) for key in before)
    override = Phi3VProcessor.from_pretrained(tmp_path, num_crops=16)
    assert override.num_crops == 16 and "num_crops" not in override.tokenizer.init_kwargs


def test_loads_an_official_style_checkpoint(tmp_path):
    """A directory laid out like the Phi-3.5-vision hub repo (preprocessor_config.json with auto_map, the chat
    template inside tokenizer_config.json, no processor_config.json) loads without remote code."""
    build_tiny_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(
        chat_template=CHAT_TEMPLATE,
        processor_class="Phi3VProcessor",
        auto_map={"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<unk>",
            }
        )
    )
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(official_preprocessor_config()))
    loaded = Phi3VProcessor.from_pretrained(tmp_path)
    assert (loaded.num_crops, loaded.num_img_tokens) == (4, 144)
    assert loaded.chat_template == CHAT_TEMPLATE
    out = loaded(PROMPT, images=_image(500, 300, (0, 0, 0)))
    assert (out["input_ids"] == -1).sum() == 757


def test_helpers_and_constants():
    """image_tag and IMAGE_TAG_PATTERN describe the same tags; model_input_names lists what the model takes."""
    import re

    assert image_tag(3) == "<|image_3|>" and re.fullmatch(IMAGE_TAG_PATTERN, image_tag(12))
    processor = build_tiny_processor()
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values", "image_sizes"]
    with pytest.raises(TypeError):
        processor(123)
