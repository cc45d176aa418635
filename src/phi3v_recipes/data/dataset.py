"""The training dataset: samples encoded on access, in the DataLoader's workers, with `data.on_error` applied to
a sample that fails only now (an image deleted, rewritten or unreadable since the pre-training screen).

An item is what `encode_sample` returns (input_ids, labels, and pixel_values / image_sizes with images), or:

- with on_error=skip, the encoding of the next sample (cyclically) that encodes, carrying `skipped`: the
  message of each sample passed over (file:line and id, what is wrong), so that batch shapes stay intact and the
  trainer can count and list them (skipped.txt);
- with on_error=raise, exactly `{"error": <that message>}`, for the trainer to stop with one sentence.

No exception about a sample leaves `__getitem__`, so a bad sample never becomes a DataLoader worker traceback.
"""

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from phi3v_recipes.data.encode import encode_sample
from phi3v_recipes.data.sample import Sample
from phi3v_recipes.errors import SampleError, check_on_error


class EncodedDataset(Dataset):
    """`samples` encoded on access: HD transform, chat template, loss mask (see the module docstring)."""

    def __init__(self, samples: Sequence[Sample], processor: Any, max_length: int | None = None,
                 on_error: str = "raise", max_pixels: int | None = None, lengths: Sequence[int] | None = None):
        """`lengths`: each sample's token count when already known (the screen's), for length-grouped batches
        and packing; None: `data.lengths.dataset_lengths` reads them from the image headers when needed."""
        check_on_error(on_error)
        if lengths is not None and len(lengths) != len(samples):
            raise ValueError(f"{len(lengths)} lengths for {len(samples)} samples.")
        self.samples, self.processor = samples, processor
        self.max_length, self.on_error, self.max_pixels = max_length, on_error, max_pixels
        self.lengths = list(lengths) if lengths is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[str] = []
        for offset in range(len(self.samples)):
            sample = self.samples[(index + offset) % len(self.samples)]
            try:
                item: dict[str, Any] = encode_sample(sample, self.processor, self.max_length, self.max_pixels)
            except SampleError as err:
                if self.on_error == "raise":
                    return {"error": str(err)}
                skipped.append(str(err))
                continue
            if skipped:
                item["skipped"] = skipped
            return item
        return {"error": f"no training sample can be read any more ({len(skipped)} failed, the first: "
                         f"{skipped[0] if skipped else 'none'})."}
