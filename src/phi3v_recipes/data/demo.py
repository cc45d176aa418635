"""The built-in demo task: name the colour or the shape of a figure drawn with Pillow.

Generated locally and deterministically from a seed (no download), so a newcomer can fine-tune on a laptop CPU
and watch accuracy go from chance to near-perfect. Images vary in size and aspect ratio so the HD transform does
real work; train and eval splits come from disjoint seeds.
"""

import random

from PIL import Image, ImageDraw

from phi3v_recipes.data.sample import Sample, Turn
from phi3v_recipes.errors import ConfigError

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {
    "color": "What color is the shape? Answer with one word.",
    "shape": "What shape is it? Answer with one word.",
}


def draw(color: str, shape: str, rng: random.Random) -> Image.Image:
    width, height = rng.randint(160, 480), rng.randint(160, 480)
    image = Image.new("RGB", (width, height), (250, 250, 250))
    size = rng.randint(min(width, height) // 2, min(width, height) - 20)
    left, top = rng.randint(0, width - size), rng.randint(0, height - size)
    box = (left, top, left + size, top + size)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        pen.rectangle(box, fill=COLORS[color])
    else:
        pen.polygon([(left + size // 2, top), (left, top + size), (left + size, top + size)], fill=COLORS[color])
    return image


def make_samples(split: str, size: int, questions: list[str], seed: int) -> list[Sample]:
    """`size` samples of the split; eval samples never share a seed with train samples."""
    unknown = set(questions) - set(QUESTIONS)
    if unknown:
        raise ConfigError(f"task.questions has {sorted(unknown)}; choose from {sorted(QUESTIONS)}.")
    offset = {"train": 0, "eval": 1_000_000}[split]
    samples = []
    for i in range(size):
        rng = random.Random(seed * 10_000_019 + offset + i)
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        question = questions[i % len(questions)]
        answer = color if question == "color" else shape
        turn = Turn(user=QUESTIONS[question], assistant=answer, images=(draw(color, shape, rng),))
        samples.append(Sample(id=f"demo-{split}-{i:05d}", turns=[turn], origin=f"demo {split} #{i}"))
    return samples
