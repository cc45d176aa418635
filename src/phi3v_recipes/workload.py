"""Synthetic training workloads with a task's shape (conf/workload/*.yaml), for the benchmark and the memory planner.

A workload draws samples (seeded): image sizes (width and height/width proportion, uniform in the configured
ranges), a number of turns, question and answer lengths in tokens. Token counts follow the real layout of
`data/encode.py` and the real HD token formula of the image processor (`hd_target_size`, `num_image_tokens`):

    BOS <|user|> \\n {image tokens, BOS after each image} \\n {question} <|end|> \\n <|assistant|> \\n   (labels -100)
    {answer} <|end|> \\n                                                                      (supervised)
    ... further turns (without the leading BOS) ...
    <|endoftext|>                                                                             (supervised)

`SyntheticSample.tensors(...)` builds what the recipe's dataset yields (`input_ids` with `-N` image positions,
`labels`, `pixel_values` [images, num_crops + 1, 3, 336, 336] with zeroed padding crops, `image_sizes`), with random
token ids and pixels drawn from the sample's own seed, so every path of a benchmark sees identical samples.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig

from phi3v_recipes.data.encode import IGNORE_INDEX
from phi3v_recipes.errors import ConfigError
from phi3v_recipes.model.image_processing_phi3v import CROP_SIZE, hd_target_size, num_image_tokens

__all__ = ["SyntheticSample", "draw_workload"]

# Template tokens of the chat format around the texts (see the module docstring).
USER_OPEN = 2        # <|user|> \n
AFTER_IMAGES = 1     # \n between the images and the question
ASSISTANT_OPEN = 4   # <|end|> \n <|assistant|> \n
ANSWER_CLOSE = 2     # <|end|> \n


@dataclass
class SyntheticSample:
    seed: int
    images: list[tuple[int, int]]          # (width, height) in pixels, in the first turn
    turns: list[tuple[int, int]]           # (question tokens, answer tokens)
    num_crops: int
    num_img_tokens: int                    # tokens per crop after the 2x2 merge (144 at real size)
    padded: list[tuple[int, int]] = field(init=False)   # image_sizes: padded (height, width)

    def __post_init__(self) -> None:
        self.padded = [hd_target_size(w, h, self.num_crops) for w, h in self.images]

    @property
    def image_tokens(self) -> list[int]:
        return [num_image_tokens(h, w, self.num_img_tokens) for h, w in self.padded]

    @property
    def real_crops(self) -> list[int]:
        """Crops per image that hold pixels: the global view and the sub-crops."""
        return [(h // CROP_SIZE) * (w // CROP_SIZE) + 1 for h, w in self.padded]

    @property
    def supervised(self) -> int:
        """Positions whose (shifted) label is supervised: every answer, its closing tokens, <|endoftext|>."""
        return sum(a + ANSWER_CLOSE for _, a in self.turns) + 1

    @property
    def length(self) -> int:
        total = 1 + 1  # BOS, <|endoftext|>
        for k, (question, answer) in enumerate(self.turns):
            images = self.image_tokens if k == 0 else []
            total += USER_OPEN + sum(n + 1 for n in images) + AFTER_IMAGES + question + ASSISTANT_OPEN
            total += answer + ANSWER_CLOSE
        return total

    def tensors(self, vocab_size: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """`input_ids`, `labels` (and `pixel_values`, `image_sizes`) of this sample, from its own seed."""
        gen = torch.Generator().manual_seed(self.seed)

        def text(n: int) -> list[int]:
            return torch.randint(3, vocab_size, (n,), generator=gen).tolist()

        ids, labels = [1], [IGNORE_INDEX]  # BOS
        for k, (question, answer) in enumerate(self.turns):
            prompt = text(USER_OPEN)
            for i, n in enumerate(self.image_tokens if k == 0 else []):
                prompt += [-(i + 1)] * n + [1]
            prompt += text(AFTER_IMAGES + question + ASSISTANT_OPEN)
            target = text(answer + ANSWER_CLOSE)
            ids += prompt + target
            labels += [IGNORE_INDEX] * len(prompt) + target
        end = text(1)
        ids += end
        labels += end
        out = {"input_ids": torch.tensor(ids, device=device), "labels": torch.tensor(labels, device=device)}
        if self.images:
            pixels = torch.zeros(len(self.images), self.num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
            for i, crops in enumerate(self.real_crops):
                pixels[i, :crops] = torch.randn(crops, 3, CROP_SIZE, CROP_SIZE, generator=gen)
            out["pixel_values"] = pixels.to(device)
            out["image_sizes"] = torch.tensor(self.padded, device=device)
        return out


def _range(workload: DictConfig, key: str) -> tuple[float, float]:
    lo, hi = workload[key]
    if lo > hi or lo < 0:
        raise ConfigError(f"workload.{key}={[lo, hi]} must be [min, max] with 0 <= min <= max.")
    return lo, hi


def draw_workload(workload: DictConfig, num_crops: int, num_img_tokens: int, seed: int,
                  samples: int | None = None) -> list[SyntheticSample]:
    """`workload.samples` (or `samples`) synthetic samples with the workload's shape (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    count = workload.samples if samples is None else samples
    if count < 1:
        raise ConfigError(f"workload.samples={count} must be >= 1.")
    drawn = []
    for i in range(count):
        n_images = int(rng.integers(*map(int, _range(workload, "images")), endpoint=True))
        n_turns = int(rng.integers(*map(int, _range(workload, "turns")), endpoint=True))
        if n_turns < 1:
            raise ConfigError("workload.turns must allow at least one turn.")
        images = []
        for _ in range(n_images):
            width = int(rng.uniform(*_range(workload, "width")))
            images.append((width, max(1, int(width * rng.uniform(*_range(workload, "aspect"))))))
        turns = [
            (int(rng.integers(*map(int, _range(workload, "prompt_tokens")), endpoint=True)),
             int(rng.integers(*map(int, _range(workload, "answer_tokens")), endpoint=True)))
            for _ in range(n_turns)
        ]
        drawn.append(SyntheticSample(seed=seed * 100_003 + i, images=images, turns=turns, num_crops=num_crops,
                                     num_img_tokens=num_img_tokens))
    return drawn
