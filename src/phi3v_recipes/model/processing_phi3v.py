"""Processor for Phi-3-vision / Phi-3.5-vision: the image processor and the tokenizer behind one call.

Prompts are chat-templated strings that reference images with the tags `<|image_1|>`, `<|image_2|>`, … . The
processor splits each prompt on the tags, tokenizes every text chunk separately (each one gets the tokenizer's
BOS, as in Microsoft's reference processor), and puts image `N` of the sample in place of its tag as the id `-N`
repeated once per image token. The model finds the image positions as `input_ids < 0`.

Unlike the reference, which takes one string, the processor batches: a list of prompts is padded (right for
training, left for generation) and the images of all samples are concatenated, in sample order, into
`pixel_values` / `image_sizes`. A batch of one is identical to the reference's output.

This file imports only torch, NumPy, PIL, transformers and its sibling `image_processing_phi3v` (relatively): it is
shipped verbatim beside every export and loads through `AutoProcessor` with `trust_remote_code=True` under
transformers 5 and 4.46+ (see docs/export.md). It offers what vLLM's Phi-3-V loader calls on the reference
processor: `processor(text, images, num_crops=...)`, `calc_num_image_tokens_from_image_size(width, height)`,
`img_tokens` and `num_img_tokens`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import PaddingStrategy, TensorType

from .image_processing_phi3v import Phi3VImageProcessor, Phi3VImageProcessorKwargs

__all__ = [
    "ASSISTANT_TOKEN",
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "END_TOKEN",
    "ENDOFTEXT_TOKEN",
    "EOS_TOKEN",
    "IMAGE_TAG_PATTERN",
    "PAD_TOKEN",
    "SYSTEM_TOKEN",
    "USER_TOKEN",
    "ImageTags",
    "Phi3VProcessor",
    "image_tag",
]

IMAGE_TAG_PATTERN = r"<\|image_\d+\|>"
"""Regular expression of an image tag, `<|image_N|>` (the reference's split pattern)."""

_IMAGE_TAG_RE = re.compile(IMAGE_TAG_PATTERN)
_IMAGE_TAG_NUMBER_RE = re.compile(r"<\|image_(\d+)\|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{- '<|assistant|>\n' -}}"
    "{% endif %}"
)
"""The chat template of Phi-3-vision / Phi-3.5-vision, character for character (as stored in the hub's
`tokenizer_config.json`: the `\\n` inside the Jinja string literals are real newlines)."""

BOS_TOKEN = "<s>"  # id 1 in Phi-3
EOS_TOKEN = "</s>"  # id 2 in Phi-3 (`eos_token_id` of the model config)
# 32000: the pad token, and also the `eos_token` of the official tokenizer files.
ENDOFTEXT_TOKEN = "<|endoftext|>"
PAD_TOKEN = ENDOFTEXT_TOKEN
ASSISTANT_TOKEN = "<|assistant|>"  # 32001
SYSTEM_TOKEN = "<|system|>"  # 32006
END_TOKEN = "<|end|>"  # 32007: ends every message; generation stops on it
USER_TOKEN = "<|user|>"  # 32010


def image_tag(number: int) -> str:
    """The tag that places image `number` (1-based) of a sample in its prompt: `<|image_{number}|>`."""
    return f"<|image_{number}|>"


class ImageTags(Sequence):
    """`<|image_1|>`, `<|image_2|>`, … as a sequence computed on demand: the reference processor's `img_tokens`
    list (vLLM slices it to the number of images of a prompt) without a million strings in memory."""

    def __init__(self, length: int = 1_000_000) -> None:
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [image_tag(i + 1) for i in range(*index.indices(self._length))]
        if not -self._length <= index < self._length:
            raise IndexError(f"image tag index {index} out of range")
        return image_tag(index % self._length + 1)


_TRUNCATE = {True, "longest_first", "only_first"}
_NO_TRUNCATE = {None, False, "do_not_truncate"}


class Phi3VProcessor(ProcessorMixin):
    r"""
    Constructs a Phi-3-V processor from a [`Phi3VImageProcessor`] and a tokenizer (the official checkpoints ship a
    Llama fast tokenizer; any [`PreTrainedTokenizerBase`] works).

    [`~Phi3VProcessor.__call__`] turns chat-templated prompts with `<|image_N|>` tags, and their images, into
    `input_ids` (images as negative ids), `attention_mask`, `pixel_values` and `image_sizes`.

    Args:
        image_processor ([`Phi3VImageProcessor`]):
            The image processor.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The tokenizer. If it has no chat template, it gets [`CHAT_TEMPLATE`].
        chat_template (`str`, *optional*):
            The processor's chat template; defaults to the tokenizer's (hence to [`CHAT_TEMPLATE`]).
    """

    attributes = ["image_processor", "tokenizer"]
    # transformers 4 checks each attribute against these (base classes of any image processor / tokenizer);
    # transformers 5 reads the attributes from `__init__` and loads them in `_get_arguments_from_pretrained`.
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"
    img_tokens = ImageTags()
    """The image tags, `img_tokens[i] == "<|image_{i+1}|>"` (the reference processor's attribute)."""

    def __init__(
        self,
        image_processor: Phi3VImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
    ) -> None:
        if not isinstance(image_processor, Phi3VImageProcessor):
            raise TypeError(
                f"Phi3VProcessor needs a Phi3VImageProcessor, got {type(image_processor).__name__}."
            )
        if isinstance(tokenizer, PreTrainedTokenizerBase) and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHAT_TEMPLATE
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def _get_arguments_from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        processor_dict: dict | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Load the image processor and the tokenizer of a checkpoint directory or hub id.

        The image processor is loaded as [`Phi3VImageProcessor`] directly (not through `AutoImageProcessor`), so
        that official checkpoints, whose `preprocessor_config.json` carries an `auto_map` to Microsoft's remote
        code, load without `trust_remote_code` and whether or not the Auto classes are registered. Keyword
        arguments that the image processor declares (`num_crops`, `num_img_tokens`, …) go to it only; the
        others (hub arguments such as `revision`, `local_files_only`) go to both.
        """
        image_keys = set(Phi3VImageProcessorKwargs.__annotations__)
        shared = {key: value for key, value in kwargs.items() if key not in image_keys}
        image_overrides = {key: value for key, value in kwargs.items() if key in image_keys}
        image_processor = Phi3VImageProcessor.from_pretrained(
            pretrained_model_name_or_path, **shared, **image_overrides
        )
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **shared)
        return [image_processor, tokenizer]

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> list[str]:
        """Save the processor in the official layout: `preprocessor_config.json` with the official fields
        (`processor_class`, `image_processor_type`, `num_crops`, `num_img_tokens`, `image_mean`, `image_std`,
        `do_convert_rgb`), the tokenizer files with the chat template inside `tokenizer_config.json` (and as
        `chat_template.jinja`), under a `tokenizer_class` that transformers 4 knows. No `processor_config.json`:
        the official repositories have none, and the reference processor of transformers 4 cannot take
        transformers 5's nested one. The `auto_map` of `preprocessor_config.json` is written by whoever ships
        code beside the files (phi3v-recipes' export)."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        (save_directory / "processor_config.json").unlink(missing_ok=True)
        preprocessor = {
            **self.image_processor.to_dict(),
            "processor_class": type(self).__name__,
            "image_processor_type": type(self.image_processor).__name__,
        }
        (save_directory / "preprocessor_config.json").write_text(
            json.dumps(dict(sorted(preprocessor.items())), indent=2) + "\n", encoding="utf-8"
        )
        tokenizer_config = save_directory / "tokenizer_config.json"
        if tokenizer_config.is_file():
            fields = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            if self.chat_template:
                fields.setdefault("chat_template", self.chat_template)
            if fields.get("tokenizer_class") == "TokenizersBackend":
                # transformers 5's name of a plain fast tokenizer; transformers 4 (the reference code's, and many
                # vLLM installs') knows the same class as PreTrainedTokenizerFast, and 5 reads that name too.
                fields["tokenizer_class"] = "PreTrainedTokenizerFast"
            tokenizer_config.write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [str(f) for f in files if Path(f).name != "processor_config.json"] + [
            str(save_directory / "preprocessor_config.json")
        ]

    # ------------------------------------------------------------------ properties and helpers

    @property
    def num_img_tokens(self) -> int:
        """Tokens per 336×336 crop after the model's 2×2 merge (144 for Phi-3.5-vision)."""
        return self.image_processor.num_img_tokens

    @property
    def num_crops(self) -> int:
        """Default maximum number of crops per image (the image processor's; setting it sets the image
        processor's, as transformers 4's `from_pretrained(..., num_crops=N)` does)."""
        return self.image_processor.num_crops

    @num_crops.setter
    def num_crops(self, value: int) -> None:
        self.image_processor.num_crops = value

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]

    def num_image_tokens_for(self, image: Image.Image, num_crops: int | None = None) -> int:
        """Number of positions (negative ids) that `image` takes in `input_ids`, from its size alone."""
        width, height = image.size
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height, num_crops=num_crops)

    def calc_num_image_tokens(
        self, images: Image.Image | Sequence[Image.Image], num_crops: int | None = None
    ) -> list[int]:
        """Image tokens of each image (the reference's method name)."""
        return self.image_processor.calc_num_image_tokens(images, num_crops=num_crops)

    def calc_num_image_tokens_from_image_size(
        self, width: int, height: int, num_crops: int | None = None
    ) -> int:
        """Image tokens of an image of `width` x `height` pixels (the reference's method name)."""
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height, num_crops=num_crops)

    # ------------------------------------------------------------------ __call__

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Image.Image | Sequence[Image.Image] | Sequence[Sequence[Image.Image] | None] | None = None,
        padding: bool | str | PaddingStrategy | None = None,
        padding_side: str = "right",
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | TensorType | None = TensorType.PYTORCH,
        num_crops: int | None = None,
        add_special_tokens: bool = True,
        videos: None = None,
        audio: None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize prompts and process their images.

        Args:
            text (`str` or `list[str]`):
                One prompt or a batch of prompts, already chat-templated, with the tags `<|image_1|>` …
                `<|image_n|>` where the sample's images go: each tag exactly once, in increasing order.
            images (`PIL.Image.Image`, `list[PIL.Image.Image]` or `list[list[PIL.Image.Image]]`, *optional*):
                The images: one image; a flat list consumed in order (sample 0 takes as many images as it has
                tags, then sample 1, …); or one list per sample (`None` or `[]` for a sample without images).
            padding (`bool`, `str` or [`~utils.PaddingStrategy`], *optional*):
                `True`/`"longest"`: pad to the longest sample; `"max_length"`: pad to `max_length`;
                `False`/`"do_not_pad"`: no padding (then tensors need samples of equal length). Defaults to
                `"longest"` when `return_tensors` is set, and to no padding otherwise.
            padding_side (`str`, *optional*, defaults to `"right"`):
                `"right"` (training) or `"left"` (generation).
            truncation (`bool` or `str`, *optional*):
                `True`/`"longest_first"`/`"only_first"`: cut samples longer than `max_length` (default: the
                tokenizer's `model_max_length`) on the tokenizer's `truncation_side`. Cutting into an image's
                tokens raises a `ValueError`, since the model needs all of them.
            max_length (`int`, *optional*):
                Length for `truncation` and `padding="max_length"`.
            pad_to_multiple_of (`int`, *optional*):
                Round the padded length up to a multiple of this.
            return_tensors (`str` or [`~utils.TensorType`], *optional*, defaults to `"pt"`):
                `"pt"` (torch), `"np"` (NumPy) or `None` (python lists; `pixel_values` stays a torch tensor).
            num_crops (`int`, *optional*):
                Override of the image processor's `num_crops` for this call.
            add_special_tokens (`bool`, *optional*, defaults to `True`):
                Whether every text chunk gets the tokenizer's special tokens (BOS), as in the reference.

        Returns:
            [`BatchFeature`] with `input_ids` (image `N` of a sample as `-N`), `attention_mask` (1 for text and
            image tokens, 0 for padding) and, when the batch has images, `pixel_values`
            (`[total_images, num_crops + 1, 3, 336, 336]`) and `image_sizes` (`[total_images, 2]`).

        Raises:
            ValueError: when a sample's tags and images do not match (the message names the sample).
        """
        if kwargs:
            raise TypeError(f"Phi3VProcessor.__call__ got unexpected keyword arguments {sorted(kwargs)}.")
        if videos is not None or audio is not None:
            raise ValueError("Phi3VProcessor handles text and images only; got videos or audio.")
        if text is None:
            raise ValueError(
                "Phi3VProcessor needs `text`: the prompt(s), with an `<|image_N|>` tag per image."
            )
        if padding_side not in ("right", "left"):
            raise ValueError(f"`padding_side` must be 'right' or 'left', got {padding_side!r}.")
        return_tensors = None if return_tensors is None else TensorType(return_tensors)
        if return_tensors not in (None, TensorType.PYTORCH, TensorType.NUMPY):
            raise ValueError(f"Unsupported return_tensors={return_tensors.value!r}; use 'pt', 'np' or None.")

        texts = self._as_text_list(text)
        tags = [[int(number) for number in _IMAGE_TAG_NUMBER_RE.findall(prompt)] for prompt in texts]
        per_sample_images = self._split_images(images, tags)
        for index, (sample_tags, sample_images) in enumerate(zip(tags, per_sample_images, strict=True)):
            self._check_tags(index, sample_tags, len(sample_images))

        all_images = [image for sample_images in per_sample_images for image in sample_images]
        image_inputs: BatchFeature | None = None
        if all_images:
            image_inputs = self.image_processor(
                all_images, num_crops=num_crops, return_tensors=TensorType.PYTORCH
            )

        input_ids = self._tokenize(texts, per_sample_images, image_inputs, add_special_tokens)
        if truncation not in _NO_TRUNCATE:
            input_ids = self._truncate(input_ids, truncation, max_length)
        input_ids, attention_mask = self._pad(
            input_ids, padding, padding_side, max_length, pad_to_multiple_of, return_tensors
        )

        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if image_inputs is not None:
            data["pixel_values"] = image_inputs["pixel_values"]
            data["image_sizes"] = image_inputs["image_sizes"]
        if return_tensors == TensorType.PYTORCH:
            data["input_ids"] = torch.tensor(input_ids, dtype=torch.long)
            data["attention_mask"] = torch.tensor(attention_mask, dtype=torch.long)
        elif return_tensors == TensorType.NUMPY:
            data["input_ids"] = np.asarray(input_ids, dtype=np.int64)
            data["attention_mask"] = np.asarray(attention_mask, dtype=np.int64)
            if image_inputs is not None:
                data["pixel_values"] = data["pixel_values"].numpy()
                data["image_sizes"] = data["image_sizes"].numpy()
        elif image_inputs is not None:
            data["image_sizes"] = data["image_sizes"].tolist()
        return BatchFeature(data=data)

    # ------------------------------------------------------------------ steps of __call__

    @staticmethod
    def _as_text_list(text: Any) -> list[str]:
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)) and text and all(isinstance(prompt, str) for prompt in text):
            return list(text)
        raise TypeError(
            "`text` must be a string or a non-empty list of strings (chat-templated prompts with <|image_N|> "
            f"tags), got {type(text).__name__}."
        )

    @staticmethod
    def _split_images(images: Any, tags: list[list[int]]) -> list[list[Image.Image]]:
        """Per-sample lists of images from the accepted `images` layouts."""
        batch_size = len(tags)
        if images is None:
            return [[] for _ in range(batch_size)]
        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise TypeError(
                f"`images` must be a PIL image, a list of PIL images or a list of per-sample lists, got "
                f"{type(images).__name__}."
            )
        is_image = [isinstance(item, Image.Image) for item in images]
        is_list = [item is None or isinstance(item, (list, tuple)) for item in images]
        if images and all(is_list):  # one list per sample
            if len(images) != batch_size:
                raise ValueError(
                    f"`images` has {len(images)} per-sample lists but `text` has {batch_size} samples; pass one "
                    "list per sample (None or [] for a sample without images), or a flat list of images."
                )
            per_sample = [list(item) if item is not None else [] for item in images]
            for index, sample_images in enumerate(per_sample):
                for image in sample_images:
                    if not isinstance(image, Image.Image):
                        raise TypeError(
                            f"Sample {index}: images must be PIL images, got {type(image).__name__}."
                        )
            return per_sample
        if not all(is_image):
            bad = next(index for index, ok in enumerate(is_image) if not ok)
            raise TypeError(
                f"`images` mixes PIL images with other items (item {bad} is a {type(images[bad]).__name__}); pass "
                "a flat list of PIL images or one list of PIL images per sample."
            )
        images = list(images)
        if batch_size == 1:
            return [images]
        # A flat list over a batch: each sample takes as many images as it has tags, in order.
        per_sample, start = [], 0
        for index, sample_tags in enumerate(tags):
            wanted = len(sample_tags)
            if start + wanted > len(images):
                raise ValueError(
                    f"Sample {index}: fewer images than tags. Its prompt has {wanted} image tag(s), but only "
                    f"{len(images) - start} of the {len(images)} images in the flat `images` list are left for it "
                    f"(tags per sample: {[len(t) for t in tags]}). Pass one image per tag, or one list of images "
                    "per sample."
                )
            per_sample.append(images[start : start + wanted])
            start += wanted
        if start < len(images):
            raise ValueError(
                f"Sample {batch_size - 1}: more images than tags. The prompts have {start} image tag(s) in all "
                f"(tags per sample: {[len(t) for t in tags]}) but {len(images)} images were given, so "
                f"{len(images) - start} are left over after the last sample. Add an <|image_N|> tag per image, "
                "or pass one list of images per sample."
            )
        return per_sample

    @staticmethod
    def _check_tags(index: int, tags: list[int], num_images: int) -> None:
        """Check that a sample's tags are `<|image_1|>` … `<|image_n|>`, once each, in order, n == num_images."""
        seen: set[int] = set()
        for number in tags:
            if number in seen:
                raise ValueError(
                    f"Sample {index}: repeated tag {image_tag(number)} (it appears {tags.count(number)} times). "
                    "Each image is referenced exactly once; to show the same image twice, pass it twice with "
                    "distinct tags."
                )
            seen.add(number)
        if tags != sorted(tags):
            raise ValueError(
                f"Sample {index}: image tags out of order: {[image_tag(n) for n in tags]}. Number the tags in order "
                "of appearance (<|image_1|> first, then <|image_2|>, …) and order the images the same way."
            )
        if tags and tags[0] < 1:
            raise ValueError(
                f"Sample {index}: tag {image_tag(tags[0])} is not a valid image number. Tags are numbered from 1: "
                "<|image_1|> … <|image_n|>."
            )
        expected = list(range(1, len(tags) + 1))
        if tags != expected:
            missing = [number for number in range(1, max(tags) + 1) if number not in seen]
            raise ValueError(
                f"Sample {index}: tag numbering has a gap: found {[image_tag(n) for n in tags]}, missing "
                f"{[image_tag(n) for n in missing]}. Tags must be <|image_1|> … <|image_n|> without gaps."
            )
        if num_images > len(tags):
            raise ValueError(
                f"Sample {index}: more images than tags: {num_images} image(s) but {len(tags)} tag(s), so "
                f"image {len(tags) + 1} has no tag {image_tag(len(tags) + 1)}. Add one tag per image to the prompt, "
                "or drop the extra images."
            )
        if num_images < len(tags):
            raise ValueError(
                f"Sample {index}: fewer images than tags: the prompt has {len(tags)} tag(s) but {num_images} "
                f"image(s) were given, so {image_tag(num_images + 1)} has no image. Pass one image per tag, or "
                "remove the extra tags."
            )

    def _tokenize(
        self,
        texts: list[str],
        per_sample_images: list[list[Image.Image]],
        image_inputs: BatchFeature | None,
        add_special_tokens: bool,
    ) -> list[list[int]]:
        """Token ids of each sample: text chunks (each with BOS) interleaved with image placeholders."""
        chunks_per_sample = [
            _IMAGE_TAG_RE.split(prompt) if sample_images else [prompt]
            for prompt, sample_images in zip(texts, per_sample_images, strict=True)
        ]
        flat_chunks = [chunk for chunks in chunks_per_sample for chunk in chunks]
        flat_ids = self.tokenizer(flat_chunks, add_special_tokens=add_special_tokens)["input_ids"]
        tokens_per_image = list(image_inputs["num_img_tokens"]) if image_inputs is not None else []

        input_ids: list[list[int]] = []
        chunk_index = image_index = 0
        for chunks in chunks_per_sample:
            ids: list[int] = []
            for position in range(len(chunks)):
                if position > 0:  # the image of tag <|image_position|> sits before this chunk
                    ids.extend([-position] * int(tokens_per_image[image_index]))
                    image_index += 1
                ids.extend(flat_ids[chunk_index])
                chunk_index += 1
            input_ids.append(ids)
        return input_ids

    def _truncate(
        self, input_ids: list[list[int]], truncation: Any, max_length: int | None
    ) -> list[list[int]]:
        if truncation not in _TRUNCATE:
            raise ValueError(
                f"Unsupported truncation={truncation!r}; use True, 'longest_first' or 'only_first' (one sequence "
                "per sample), or False."
            )
        limit = max_length if max_length is not None else self.tokenizer.model_max_length
        if limit < 1:
            raise ValueError(f"max_length={limit}: truncation needs a length of at least 1.")
        side = getattr(self.tokenizer, "truncation_side", "right")
        truncated = []
        for index, ids in enumerate(input_ids):
            if len(ids) > limit:
                kept, cut = (ids[:limit], ids[limit:]) if side == "right" else (ids[-limit:], ids[:-limit])
                cut_images = sorted({-token for token in cut if token < 0})
                if cut_images:
                    raise ValueError(
                        f"Sample {index}: truncating {len(ids)} tokens to max_length={limit} ({side} side) would cut "
                        f"image(s) {cut_images}, whose tokens the model needs in full. Raise max_length, use fewer "
                        "or smaller images (a lower num_crops), or shorten the text."
                    )
                ids = kept
            truncated.append(ids)
        return truncated

    def _pad(
        self,
        input_ids: list[list[int]],
        padding: Any,
        padding_side: str,
        max_length: int | None,
        pad_to_multiple_of: int | None,
        return_tensors: TensorType | None,
    ) -> tuple[list[list[int]], list[list[int]]]:
        if padding is None:
            strategy = PaddingStrategy.LONGEST if return_tensors is not None else PaddingStrategy.DO_NOT_PAD
        elif padding is True:
            strategy = PaddingStrategy.LONGEST
        elif padding is False:
            strategy = PaddingStrategy.DO_NOT_PAD
        else:
            strategy = PaddingStrategy(padding)
        lengths = [len(ids) for ids in input_ids]
        if strategy == PaddingStrategy.LONGEST:
            target = max(lengths)
        elif strategy == PaddingStrategy.MAX_LENGTH:
            if max_length is None:
                raise ValueError("padding='max_length' needs `max_length`.")
            target = max(max_length, max(lengths))
        else:
            target = None
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of

        attention_mask = [[1] * length for length in lengths]
        if target is None:
            if return_tensors is not None and len(set(lengths)) > 1:
                raise ValueError(
                    f"Samples have different lengths {lengths} and padding is off, so they cannot be stacked into "
                    "tensors. Pass padding=True (or 'longest'), or return_tensors=None."
                )
            return input_ids, attention_mask

        pad_id = self.tokenizer.pad_token_id
        if pad_id is None and any(length < target for length in lengths):
            raise ValueError(
                "The tokenizer has no pad token, so the batch cannot be padded. Set `tokenizer.pad_token` (Phi-3 "
                f"uses {PAD_TOKEN!r})."
            )
        padded_ids, padded_mask = [], []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            missing = target - len(ids)
            if padding_side == "right":
                padded_ids.append(ids + [pad_id] * missing)
                padded_mask.append(mask + [0] * missing)
            else:
                padded_ids.append([pad_id] * missing + ids)
                padded_mask.append([0] * missing + mask)
        return padded_ids, padded_mask
