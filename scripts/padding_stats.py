"""Padding of right-padded batches (random / length-grouped) and fill of packed rows, from header-based lengths,
for the demo task and a synthetic DocVQA-shaped mix (page sizes only, real Phi-3-V image-token counts).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/padding_stats.py      (figures in docs/batching.md)
"""
import numpy as np
from PIL import Image

from phi3v_recipes.data.batching import (
    LengthGroupedBatchSampler,
    PackedBatchSampler,
    padding_fraction,
    row_fill,
)
from phi3v_recipes.data.demo import make_samples
from phi3v_recipes.data.lengths import sample_lengths
from phi3v_recipes.data.sample import Sample, Turn
from phi3v_recipes.model.tiny import build_tiny_processor


def page(w: int, h: int) -> Image.Image:
    """A page-sized image at 1 bit per pixel (only its size matters here)."""
    return Image.new("1", (w, h))


def report(name: str, lengths: list[int], bs: int, budget: int) -> None:
    rng = np.random.default_rng(0)
    order = rng.permutation(len(lengths)).tolist()
    rand = [order[i:i + bs] for i in range(0, len(order), bs)]
    grouped = LengthGroupedBatchSampler(lengths, bs, seed=0).batches(0)
    packed = PackedBatchSampler(lengths, budget, seed=0)
    print(f"{name}: n={len(lengths)} mean {np.mean(lengths):.0f} tokens (min {min(lengths)}, max {max(lengths)}); "
          f"batch {bs} right-padded: random {100*padding_fraction(rand, lengths):.1f}% padding, length-grouped "
          f"{100*padding_fraction(grouped, lengths):.1f}%; packed rows of {budget}: 0.0% padding, "
          f"{len(packed.rows)} rows ({len(lengths)/len(packed.rows):.2f} samples/row), fill "
          f"{100*row_fill(packed.rows, lengths, budget):.1f}%")


demo = make_samples("train", 512, ["color"], 0)
report("demo (num_crops 1, tiny processor)", sample_lengths(demo, build_tiny_processor(num_crops=1)), 8, 840)

rng = np.random.default_rng(1)
proc = build_tiny_processor(num_crops=16, num_img_tokens=144)  # real Phi-3-V image-token counts
words = ["what", "is", "the", "total", "amount", "shown", "on", "invoice", "date", "name", "of", "company", "page"]
docs = []
for i in range(2000):
    w = int(rng.integers(700, 2500))
    h = int(w * rng.uniform(0.75, 1.6))
    q = " ".join(rng.choice(words, int(rng.integers(5, 16))))
    a = " ".join(rng.choice(words, int(rng.integers(1, 6))))
    docs.append(Sample(f"d{i}", [Turn(q + "\nAnswer briefly.", a, (page(w, h),))]))
report("DocVQA-shaped (num_crops 16, 144 tokens/crop)", sample_lengths(docs, proc), 4, 16384)
