"""Tiny, offline fixtures: a small Phi-3-style tokenizer and processor built in code.

The demo and the tests use these instead of the 32k-token Phi-3 tokenizer, which would need the hub. The
tokenizer is a byte-level BPE (any text, newlines included, round-trips) trained in a few milliseconds on a small
built-in English corpus, with the special tokens of Phi-3 laid out like the real ones:

=================  ==========================  ====================
token              tiny id (``vocab_size=V``)  Phi-3 id (V = 32000)
=================  ==========================  ====================
``<unk>``          0                           0
``<s>`` (BOS)      1                           1
``</s>``           2                           2
``<|endoftext|>``  V                           32000 (pad, eos)
``<|assistant|>``  V + 1                       32001
``<|system|>``     V + 6                       32006
``<|end|>``        V + 7                       32007
``<|user|>``       V + 10                      32010
=================  ==========================  ====================

`<|placeholder1|>` … `<|placeholder6|>` fill V + 2 … V + 5, V + 8 and V + 9 as in Phi-3, so `len(tokenizer)` is
`V + 11` (523 by default). Every encoded sequence starts with BOS, like Phi-3's tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from phi3v_recipes.model.configuration_phi3v import Phi3VConfig
from phi3v_recipes.model.image_processing_phi3v import Phi3VImageProcessor
from phi3v_recipes.model.processing_phi3v import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    CHAT_TEMPLATE,
    END_TOKEN,
    ENDOFTEXT_TOKEN,
    EOS_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    Phi3VProcessor,
)

__all__ = [
    "PHI3_ADDED_TOKENS",
    "TINY_BASE_SPECIAL_TOKENS",
    "TINY_NUM_IMG_TOKENS",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "tiny_model_config",
]

UNK_TOKEN = "<unk>"

TINY_BASE_SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
"""The first three ids, 0, 1 and 2, as in Phi-3."""

PHI3_ADDED_TOKENS = (
    ENDOFTEXT_TOKEN,
    ASSISTANT_TOKEN,
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    SYSTEM_TOKEN,
    END_TOKEN,
    "<|placeholder5|>",
    "<|placeholder6|>",
    USER_TOKEN,
)
"""The special tokens Phi-3 adds after its sentencepiece vocabulary, in id order (32000 … 32010)."""

_BUILTIN_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe the image in detail. What is shown in this picture? How many people are in the photo?
The image shows a red car parked next to a white building on a sunny day.
There are two cats sleeping on a blue sofa, and a small dog is sitting on the floor.
The chart compares the sales of three products over four years: 2019, 2020, 2021 and 2022.
Sales grew by 25 percent in the second quarter, while costs stayed almost the same.
Read the text in the document and summarize it in one sentence.
The table has five columns and twelve rows; the last row holds the total.
Answer the question using the information in the image. If you are not sure, say so.
A man is riding a bicycle along the river, and children are playing in the park.
The sky is clear and the mountains in the background are covered with snow.
Please compare the first image with the second image and list the differences.
The receipt shows the date, the name of the store, the items bought and the price of each item.
Question: What color is the bus? Answer: The bus is yellow.
Question: Where is the woman standing? Answer: She is standing near the window.
Question: What does the sign say? Answer: The sign says "No parking from 8 am to 6 pm".
The diagram explains how water moves from the ocean to the clouds and back to the land.
In the kitchen there is a table with fruit: apples, bananas, oranges and a bowl of grapes.
The slide lists three key points about the project, its budget, and its timeline.
Scientists study images from telescopes to learn about stars, planets and distant galaxies.
You are a helpful assistant that answers questions about images accurately and briefly.
The user uploaded a screenshot of an error message; explain what it means and how to fix it.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 336 672 1008 1344.
Punctuation, symbols and code: (a + b) * c = d; x[0] != y[1]; {"key": "value"}; path/to/file.png
"""


def build_tiny_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE tokenizer with Phi-3's special tokens.

    Args:
        corpus (`Iterable[str]`, *optional*):
            Extra training text, appended to the built-in corpus (for instance the prompts of a test data set,
            so that they tokenize into fewer tokens). Any text encodes either way: the tokenizer is byte-level.
        vocab_size (`int`, *optional*, defaults to 512):
            Size of the learned vocabulary, the three base special tokens and the 256 byte symbols included. The
            Phi-3 special tokens come after it (ids `vocab_size` … `vocab_size + 10`).

    Returns:
        A `PreTrainedTokenizerFast` with bos `<s>` (1), unk `<unk>` (0), eos and pad `<|endoftext|>` (as in the
        official Phi-3-vision tokenizer files), right padding, the Phi-3.5-vision chat template, and a BOS added
        to every encoded sequence. The same arguments always give the same tokenizer.

    Raises:
        ValueError: if `vocab_size` leaves no room for merges, or the corpus is too small to learn that many tokens.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(TINY_BASE_SPECIAL_TOKENS) + len(alphabet)
    if vocab_size <= minimum:
        raise ValueError(
            f"vocab_size must exceed {minimum} (3 special tokens + 256 byte symbols), got {vocab_size}."
        )

    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_BASE_SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    texts = _BUILTIN_CORPUS.splitlines(keepends=True)
    if corpus is not None:
        if isinstance(corpus, str):
            raise TypeError(
                "`corpus` must be an iterable of strings, not a single string; wrap it in a list."
            )
        texts += list(corpus)
    backend.train_from_iterator(texts, trainer=trainer)
    learned = backend.get_vocab_size()
    if learned != vocab_size:
        raise ValueError(
            f"The training corpus only yields {learned} tokens, fewer than vocab_size={vocab_size}; pass a larger "
            "`corpus` or a smaller `vocab_size`."
        )

    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in PHI3_ADDED_TOKENS]
    )
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=ENDOFTEXT_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=ENDOFTEXT_TOKEN,
        padding_side="right",
        truncation_side="right",
        model_max_length=131072,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


# The tiny model: a CLIP-shaped tower on 336-px crops with 28-px patches (a 12x12 patch grid, merged 2x2 into
# 6x6 = 36 tokens per crop) feeding a 2-layer Phi-3 decoder. Random weights build in well under a second.
TINY_NUM_IMG_TOKENS = 36


def build_tiny_processor(
    num_crops: int = 4,
    num_img_tokens: int = TINY_NUM_IMG_TOKENS,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
) -> Phi3VProcessor:
    """A [`Phi3VProcessor`] from a [`Phi3VImageProcessor`] and [`build_tiny_tokenizer`].

    Args:
        num_crops (`int`, *optional*, defaults to 4): maximum crops per image.
        num_img_tokens (`int`, *optional*, defaults to `TINY_NUM_IMG_TOKENS`): tokens per crop after the model's
            2×2 merge; must match the vision tower of the model the processor feeds (a perfect square): 36 for
            `tiny_model_config`, 144 for the real Phi-3-V.
        corpus (`Iterable[str]`, *optional*): extra tokenizer training text.
        vocab_size (`int`, *optional*, defaults to 512): learned vocabulary size (see [`build_tiny_tokenizer`]).
    """
    image_processor = Phi3VImageProcessor(num_crops=num_crops, num_img_tokens=num_img_tokens)
    return Phi3VProcessor(image_processor, build_tiny_tokenizer(corpus=corpus, vocab_size=vocab_size))


def tiny_model_config(vocab_size: int = 512 + len(PHI3_ADDED_TOKENS), **overrides: Any) -> Phi3VConfig:
    """A Phi3VConfig small enough to train on a laptop CPU in seconds; `overrides` replace any field.

    `vocab_size` must cover the tokenizer: `len(build_tiny_tokenizer(vocab_size=V))` is `V + 11`.
    """
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=vocab_size - len(PHI3_ADDED_TOKENS),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=336,
            patch_size=28,
        ),
        img_processor=dict(image_dim_out=32, num_img_tokens=TINY_NUM_IMG_TOKENS, layer_idx=-2),
    )
    fields.update(overrides)
    return Phi3VConfig(**fields)
