"""A training/evaluation example: a conversation of turns, each with its images, plus the answers accepted at
evaluation. Every task loader produces these; nothing downstream knows where the data came from."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

ImageRef = Image.Image | str | Path | Callable[[], Image.Image]
"""An image, a path to one, or a callable that loads one (for lazily decoded dataset rows)."""


class SampleError(ValueError):
    """A sample that cannot be used; the message names where it came from and what to do."""


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


def load_image(ref: ImageRef, sample: Sample) -> Image.Image:
    """Open `ref` as an RGB-convertible PIL image; a missing or unreadable file raises SampleError naming it."""
    if isinstance(ref, Image.Image):
        return ref
    try:
        if callable(ref):
            return ref()
        with Image.open(ref) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise SampleError(f"{sample.where}: image {ref} does not exist; fix the path or the image root.") from None
    except (UnidentifiedImageError, OSError) as err:
        raise SampleError(f"{sample.where}: image {ref} cannot be read ({err}); replace or drop it.") from None
