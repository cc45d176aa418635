"""Token counts of samples without decoding a pixel: image header sizes, the HD token formula, tokenized text.

Row planning (packing, length-grouped batches) needs the length of every sample before training starts.
`sample_length(sample, processor)` equals `len(encode_sample(sample, processor)["input_ids"])`: each image's size
is read from its file header (`PIL.Image.open` reads the header only; the pixels are never decoded; an EXIF
orientation that turns the image by 90 degrees swaps width and height, as reading it upright will), turned into
its padded HD size and image-token count by the processor's formula, and the text is tokenized as `encode_sample`
lays it out (one BOS at the start of the conversation, answers + `<|end|>\\n`, a closing `<|endoftext|>`).

Public API:
    image_size(ref, sample) -> (width, height)    of an image reference (PIL image, path, or a callable that
                                                  opens one), EXIF orientation applied, from the header
    upright_size(image) -> (width, height)        of an opened PIL image, EXIF orientation applied
    sample_length(sample, processor) -> int       tokens of one encoded sample, image tokens included
    sample_lengths(samples, processor) -> list    the same for a list of samples
    dataset_lengths(dataset) -> list[int]         `dataset.lengths` when it has them, else computed from
                                                  `dataset.samples` and `dataset.processor`
"""

import re
from collections.abc import Sequence
from typing import Any

from PIL import ExifTags, Image

from phi3v_recipes.data.encode import prompt_text, user_content
from phi3v_recipes.data.sample import ImageRef, Sample, open_image
from phi3v_recipes.errors import SampleError
from phi3v_recipes.model.processing_phi3v import END_TOKEN, IMAGE_TAG_PATTERN

__all__ = ["dataset_lengths", "image_size", "sample_length", "sample_lengths", "upright_size"]


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied (as `load_image` applies it),
    read from the header: Pillow's base `getexif` reads the metadata already parsed, never the pixels (PNG's own
    override would decode the image to look for a late eXIf chunk)."""
    width, height = image.size
    orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def image_size(ref: ImageRef, sample: Sample) -> tuple[int, int]:
    """(width, height) of an image reference as training will see it, from the file header only.

    A PIL image gives its size; a path, or a callable (e.g. a dataset row that opens its image), is opened without
    decoding the pixels and measured upright. Missing or unreadable files raise SampleError naming the sample.
    """
    if isinstance(ref, Image.Image):
        return ref.size
    # Reads the header; pixels stay undecoded. data.max_image_pixels is load_image's to enforce, not PIL's.
    with open_image(ref, sample) as image:
        return upright_size(image)


def sample_length(sample: Sample, processor: Any, image_sizes: Sequence[Sequence[tuple[int, int]]] | None = None) -> int:
    """Tokens of `encode_sample(sample, processor)["input_ids"]`, computed from image sizes and text alone: the
    (width, height) of each turn's images from `image_sizes` (one list per turn), or else from the file headers."""
    tokenizer = processor.tokenizer
    total = 1  # the closing <|endoftext|>
    for k, turn in enumerate(sample.turns):
        chunks = tokenizer(re.split(IMAGE_TAG_PATTERN, prompt_text(processor, user_content(sample, k)))).input_ids
        total += sum(len(ids) for ids in chunks)
        if k > 0 and chunks[0][:1] == [tokenizer.bos_token_id]:
            total -= 1  # encode_sample keeps one BOS, at the start of the conversation
        sizes = image_sizes[k] if image_sizes is not None else [image_size(ref, sample) for ref in turn.images]
        for width, height in sizes:
            try:
                total += processor.calc_num_image_tokens_from_image_size(width, height)
            except ValueError as err:  # e.g. an image too elongated for the HD transform
                raise SampleError(f"{sample.where}: {err}") from None
        total += len(tokenizer(turn.assistant + END_TOKEN + "\n", add_special_tokens=False).input_ids)
    return total


def sample_lengths(samples: Sequence[Sample], processor: Any) -> list[int]:
    """`sample_length` of each sample, in order."""
    return [sample_length(sample, processor) for sample in samples]


def dataset_lengths(dataset: Any) -> list[int]:
    """Token count of every item of a training dataset: its `lengths` attribute when it has one, otherwise computed
    from its `samples` and `processor` (the layout of the recipe's encoded dataset)."""
    lengths = getattr(dataset, "lengths", None)
    if lengths is None:
        samples, processor = getattr(dataset, "samples", None), getattr(dataset, "processor", None)
        if samples is None or processor is None:
            raise TypeError(
                f"{type(dataset).__name__} has no `lengths`, nor `samples` and `processor` to compute them from: "
                "length-grouped batching and packing need every item's token count."
            )
        lengths = sample_lengths(samples, processor)
        dataset.lengths = lengths  # computed once per dataset
    lengths = [int(n) for n in lengths]
    if len(lengths) != len(dataset):
        raise ValueError(f"{type(dataset).__name__}.lengths holds {len(lengths)} counts for {len(dataset)} items.")
    return lengths
