"""A training/evaluation example: a conversation of turns, each with its images, plus the answers accepted at
evaluation. Every task loader produces these; nothing downstream knows where the data came from.

Images are read as a user expects (`load_image`): EXIF orientation applied, 16-bit and float pixels scaled (not
clipped) to 8 bits, transparency composited onto white, the first frame of an animation, and never more pixels
than `data.max_image_pixels` (checked from the file header, before anything is decoded).
"""

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from phi3v_recipes.errors import SampleError

ImageRef = Image.Image | str | Path | Callable[[], Image.Image]
"""An image, a path to one, or a callable that opens one (for dataset rows): it may return the image before its
pixels are decoded (`Image.open`), so that its size is checked from the header first."""


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str
    images: tuple[ImageRef, ...] = ()


@dataclass
class Sample:
    id: str
    turns: list[Turn]
    references: list[str] = field(default_factory=list)
    """Answers accepted for the first turn at evaluation; empty means `[turns[0].assistant]`."""
    origin: str = ""
    """Where the sample came from (`file.jsonl:12`), for error messages."""

    @property
    def where(self) -> str:
        return f"{self.origin} (id {self.id})" if self.origin else f"sample {self.id}"

    @property
    def answers(self) -> list[str]:
        return self.references or [self.turns[0].assistant]

    @property
    def num_images(self) -> int:
        return sum(len(turn.images) for turn in self.turns)


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """PIL's process-wide decompression-bomb limit off while one image is read: `load_image` checks its own limit
    (data.max_image_pixels) from the header instead, with a sentence rather than PIL's exception or warning.
    Images are read by one thread per process (the main process, or each DataLoader worker)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit integer pixels scaled by 255/65535, other integer and float pixels scaled from their
    own range (floats within [0, 1] by 255), transparency composited onto white as the processor does."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
            scale, offset = 255.0 / 65535.0, 0.0
        elif image.mode == "F" and low >= 0 and high <= 1:
            scale, offset = 255.0, 0.0
        else:
            scale, offset = (255.0 / (high - low) if high > low else 0.0), low
        pixels = np.clip(np.rint((values - offset) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB")
    if image.mode == "RGB":
        return image
    # the processor's own conversion; imported here, as the model package loads torch and transformers
    from phi3v_recipes.model.image_processing_phi3v import convert_image_to_rgb

    return convert_image_to_rgb(image)


@contextmanager
def _open_path(path: str | Path) -> Iterator[Image.Image]:
    """`Image.open(path)`; a path that is no regular file (a named pipe, a device) is opened without waiting for a
    writer, so that a pipe nobody writes to is an unreadable image instead of a screen that waits forever."""
    if os.path.isfile(path) or not os.path.exists(path) or os.path.isdir(path):
        with Image.open(path) as image:
            yield image
        return
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as stream, Image.open(stream) as image:
        yield image


@contextmanager
def open_image(ref: Callable[[], Image.Image] | str | Path, sample: Sample) -> Iterator[Image.Image]:
    """`ref` opened (header read, pixels not decoded until `load()`), with PIL's own pixel limit off; a missing or
    unreadable image, found while opening or while using it in the block, raises SampleError naming the sample."""
    try:
        with _own_pixel_limit(), (ref() if callable(ref) else _open_path(ref)) as image:
            yield image
    except FileNotFoundError:
        raise SampleError(f"{sample.where}: image {ref} does not exist; fix the path or the image root.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        if isinstance(err, SampleError):
            raise
        raise SampleError(f"{sample.where}: image {ref} cannot be read ({err}); replace or drop it.") from None


def load_image(
    ref: ImageRef, sample: Sample, max_pixels: int | None = None, notes: list[str] | None = None
) -> Image.Image:
    """`ref` as an 8-bit RGB image, upright (EXIF orientation applied); SampleError naming the sample and image
    when it is missing, unreadable, or has more than `max_pixels` pixels (checked before decoding; None: no
    limit). Facts worth a user's attention (only the first frame of an animation is used) go to `notes`."""
    if isinstance(ref, Image.Image):
        return to_rgb8(ref)
    with open_image(ref, sample) as image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise SampleError(
                f"{sample.where}: image {ref} is {width}x{height} = {width * height} pixels, more than "
                f"data.max_image_pixels={max_pixels}; downscale it, raise data.max_image_pixels, or set "
                "data.on_error=skip to drop such samples."
            )
        frames = getattr(image, "n_frames", 1)
        image.load()
        if frames > 1 and notes is not None:
            notes.append(f"{sample.where}: note: image {ref} is animated ({frames} frames); only its first frame "
                         "is used.")
        ImageOps.exif_transpose(image, in_place=True)  # upright; no copy of the (often large) page when it already is
        return to_rgb8(image)
