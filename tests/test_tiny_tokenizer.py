"""Tests of the tiny, offline Phi-3-style tokenizer and processor fixtures."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time

import pytest
from transformers import AutoTokenizer

import phi3v_recipes
from phi3v_recipes.model.processing_phi3v import CHAT_TEMPLATE, Phi3VProcessor
from phi3v_recipes.model.tiny import PHI3_ADDED_TOKENS, build_tiny_processor, build_tiny_tokenizer

TEXTS = [
    "<|user|>\n<|image_1|>\nWhat is shown in this picture?<|end|>\n<|assistant|>\nA red car.<|end|>\n<|endoftext|>",
    "Tabs\tand  double  spaces,\n\nblank lines, trailing space \n",
    "Unicode: café, naïve, 日本語, emoji 🙂 — and symbols {}[]<>|\\",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_special_token_ids_mirror_phi3(tokenizer):
    """<unk>/<s>/</s> are 0/1/2; the Phi-3 added tokens follow the learned vocabulary at Phi-3's offsets; pad and
    eos are <|endoftext|> (as in the official files), bos is <s>."""
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    base = 512
    assert [tokenizer.convert_tokens_to_ids(t) for t in PHI3_ADDED_TOKENS] == list(range(base, base + 11))
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
    }
    assert ids == {
        "<|endoftext|>": base,
        "<|assistant|>": base + 1,
        "<|system|>": base + 6,
        "<|end|>": base + 7,
        "<|user|>": base + 10,
    }
    assert len(tokenizer) == base + 11
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 1)
    assert (tokenizer.unk_token_id, tokenizer.pad_token, tokenizer.eos_token) == (
        0,
        "<|endoftext|>",
        "<|endoftext|>",
    )
    assert tokenizer.padding_side == "right"
    assert set(PHI3_ADDED_TOKENS) <= set(tokenizer.all_special_tokens) | set(tokenizer.added_tokens_encoder)


def test_every_encoding_starts_with_bos_and_specials_are_single_ids(tokenizer):
    """Like Phi-3's tokenizer, every encoded text (even the empty one) starts with BOS; special tokens in the
    text are one id each; no EOS is appended."""
    assert tokenizer("").input_ids == [1]
    ids = tokenizer("<|user|>\nhi<|end|>\n").input_ids
    assert ids[:2] == [1, tokenizer.convert_tokens_to_ids("<|user|>")]
    assert tokenizer.convert_tokens_to_ids("<|end|>") in ids
    assert ids[-1] != tokenizer.eos_token_id
    assert tokenizer("hi", add_special_tokens=False).input_ids[0] != 1


@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips(tokenizer, text):
    """Byte-level BPE: decoding the ids gives back the text exactly, newlines, tabs and unicode included."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    without_specials = re.sub(r"<\|(user|end|assistant|endoftext)\|>", "", text)
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == without_specials
    assert tokenizer.unk_token_id not in ids


def test_build_is_deterministic_and_fast():
    """Two builds give the same tokenizer (same serialisation and ids), each in well under a second."""
    start = time.perf_counter()
    first = build_tiny_tokenizer()
    elapsed = time.perf_counter() - start
    second = build_tiny_tokenizer()
    assert elapsed < 1.0
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert [first(t).input_ids for t in TEXTS] == [second(t).input_ids for t in TEXTS]


def test_build_is_identical_in_a_fresh_process():
    """The trained tokenizer does not depend on process state (hash seeds, thread scheduling): a fresh interpreter
    builds the same serialisation."""
    code = (
        "import hashlib; from phi3v_recipes.model.tiny import build_tiny_tokenizer; "
        "print(hashlib.sha256(build_tiny_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())"
    )
    source_root = os.path.dirname(os.path.dirname(phi3v_recipes.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source_root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, env=env
    )
    here = hashlib.sha256(build_tiny_tokenizer().backend_tokenizer.to_str().encode()).hexdigest()
    assert result.stdout.strip().splitlines()[-1] == here


def test_extra_corpus_and_vocab_size():
    """An extra corpus changes the merges (its words get shorter encodings); vocab_size moves the added tokens;
    impossible sizes fail clearly."""
    word = "zyxwvutsrq " * 3
    plain = build_tiny_tokenizer()
    trained = build_tiny_tokenizer(corpus=[word] * 50)
    assert len(trained(word).input_ids) < len(plain(word).input_ids)
    bigger = build_tiny_tokenizer(vocab_size=600)
    assert bigger.convert_tokens_to_ids("<|endoftext|>") == 600 and len(bigger) == 611
    with pytest.raises(ValueError, match="vocab_size must exceed 259"):
        build_tiny_tokenizer(vocab_size=200)
    with pytest.raises(ValueError, match="corpus only yields"):
        build_tiny_tokenizer(vocab_size=100_000)
    with pytest.raises(TypeError, match="iterable of strings"):
        build_tiny_tokenizer(corpus="a single string")


def test_chat_template_and_save_round_trip(tokenizer, tmp_path):
    """The tokenizer carries the Phi-3.5-vision chat template, and reloads through AutoTokenizer with the same
    ids, template and special tokens."""
    assert tokenizer.chat_template == CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert [loaded(t).input_ids for t in TEXTS] == [tokenizer(t).input_ids for t in TEXTS]
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.bos_token_id, loaded.pad_token_id, loaded.padding_side) == (1, 512, "right")


def test_build_tiny_processor():
    """build_tiny_processor combines a Phi3VImageProcessor with the given settings and the tiny tokenizer."""
    processor = build_tiny_processor(num_crops=2, num_img_tokens=16)
    assert isinstance(processor, Phi3VProcessor)
    assert (processor.num_crops, processor.num_img_tokens) == (2, 16)
    assert processor.tokenizer("x").input_ids[0] == 1
