"""Tests of the Phi-3-V image processor (the HD transform): sizes, token counts and exact pixel values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_transforms import convert_to_rgb

from phi3v_recipes.model.image_processing_phi3v import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    Phi3VImageProcessor,
    convert_image_to_rgb,
    hd_target_size,
    num_image_tokens,
)
from tests.conftest import official_preprocessor_config

GRID_SIDES = (1, 50, 336, 337, 500, 1000, 2000, 4000)


def _reference_tokens(height: int, width: int, side: int = 12) -> int:
    """The reference's token count, written out for g = 12: (h*w + 1) * 144 + 1 + (h + 1) * 12."""
    h, w = height // 336, width // 336
    return (h * w + 1) * side * side + 1 + (h + 1) * side


def _noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1}[mode]
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode)


def _step_by_step(image: Image.Image, num_crops: int) -> tuple[torch.Tensor, list[int]]:
    """An independent, literal re-implementation of the reference pipeline, for exact comparison.

    Uses PIL for transposition and padding (`Image.new` + `paste`), a per-channel normalisation and explicit
    slicing for the crops, where the processor uses NumPy and a reshape.
    """
    image = convert_to_rgb(image, return_numpy=True)  # what the reference calls (transformers' own function)
    image = Image.fromarray(image).convert("RGB")
    width, height = image.size
    transposed = width < height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = int(np.ceil(new_h / 336) * 336)
    canvas = Image.new("RGB", (new_w, target), (255, 255, 255))
    canvas.paste(image, (0, int((target - new_h) / 2)))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)

    x = (
        torch.from_numpy(np.array(canvas, dtype=np.uint8)).permute(2, 0, 1).contiguous().to(torch.float32)
        / 255
    )
    mean = torch.tensor(CLIP_IMAGE_MEAN, dtype=torch.float32)
    std = torch.tensor(CLIP_IMAGE_STD, dtype=torch.float32)
    x = torch.stack([(x[c] - mean[c]) / std[c] for c in range(3)])
    glb = torch.nn.functional.interpolate(
        x.unsqueeze(0), size=(336, 336), mode="bicubic", align_corners=False
    )[0]
    H, W = x.shape[1:]
    crops = [
        x[:, r * 336 : (r + 1) * 336, c * 336 : (c + 1) * 336]
        for r in range(H // 336)
        for c in range(W // 336)
    ]
    entries = [glb, *crops]
    entries += [torch.zeros(3, 336, 336)] * (num_crops + 1 - len(entries))
    return torch.stack(entries), [H, W]


@pytest.fixture(scope="module")
def processor() -> Phi3VImageProcessor:
    return Phi3VImageProcessor()


@pytest.mark.parametrize(
    ("width", "height", "num_crops", "size", "tokens"),
    [(500, 300, 4, [672, 672], 757), (200, 900, 16, [2688, 672], 2557), (1200, 400, 4, [336, 1008], 601)],
)
def test_documented_examples(processor, width, height, num_crops, size, tokens):
    """The three worked examples of the reference notes: padded size and token count, from pixels and from size."""
    out = processor(Image.new("RGB", (width, height), (200, 100, 50)), num_crops=num_crops)
    assert out["image_sizes"].tolist() == [size]
    assert out["image_sizes"].dtype == torch.long
    assert out["num_img_tokens"] == [tokens]
    assert out["pixel_values"].shape == (1, num_crops + 1, 3, 336, 336)
    assert out["pixel_values"].dtype == torch.float32
    assert hd_target_size(width, height, num_crops) == tuple(size)
    assert processor.calc_num_image_tokens_from_image_size(width, height, num_crops) == tokens


def test_size_and_token_formula_over_a_grid():
    """For every valid width x height in the grid and num_crops 1..16: sizes are multiples of 336, the crop count
    never exceeds num_crops, the long side uses the largest allowed scale, the aspect ratio is kept to the pixel,
    and the token count follows the reference formula. Invalid (degenerate) sizes raise ValueError."""
    checked = 0
    for width in GRID_SIDES:
        for height in GRID_SIDES:
            long_side, short_side = max(width, height), min(width, height)
            for num_crops in range(1, 17):
                # The scale from exact integer arithmetic: the largest s with s * ceil(s * short / long) <= n.
                scale = max(
                    s for s in range(1, num_crops + 1) if s * -(-s * short_side // long_side) <= num_crops
                )
                if int(scale * 336 * short_side / long_side) == 0:
                    with pytest.raises(ValueError, match=f"{width}x{height}"):
                        hd_target_size(width, height, num_crops)
                    continue
                padded_h, padded_w = hd_target_size(width, height, num_crops)
                assert padded_h % 336 == 0 and padded_w % 336 == 0 and padded_h > 0 and padded_w > 0
                assert (padded_h // 336) * (padded_w // 336) <= num_crops
                padded_long, padded_short = (padded_w, padded_h) if width >= height else (padded_h, padded_w)
                assert padded_long == 336 * scale
                resized_short = int(336 * scale / (long_side / short_side))
                assert padded_short == math.ceil(resized_short / 336) * 336
                assert abs(resized_short - 336 * scale * short_side / long_side) < 1
                assert num_image_tokens(padded_h, padded_w) == _reference_tokens(padded_h, padded_w)
                checked += 1
    assert checked > 900


@pytest.mark.parametrize(
    ("width", "height"), [(1, 1), (50, 337), (337, 50), (500, 336), (1000, 2000), (2000, 50)]
)
def test_preprocess_agrees_with_hd_target_size(processor, width, height):
    """The full pixel path and the size-only helper agree on `image_sizes` and `num_img_tokens`."""
    image = Image.new("RGB", (width, height), (10, 20, 30))
    for num_crops in (1, 2, 5):
        out = processor(image, num_crops=num_crops)
        size = hd_target_size(width, height, num_crops)
        assert out["image_sizes"].tolist() == [list(size)]
        assert out["num_img_tokens"] == [processor.num_image_tokens(*size)]
        assert processor.calc_num_image_tokens(image, num_crops=num_crops) == out["num_img_tokens"]


@pytest.mark.parametrize(
    ("width", "height", "num_crops", "mode"),
    [
        (500, 300, 4, "RGB"),  # wide
        (130, 420, 4, "RGB"),  # tall: transposed and back
        (400, 400, 4, "RGB"),  # square
        (1, 1, 1, "RGB"),  # tiny, upscaled
        (1, 1, 3, "RGB"),
        (1, 1, 6, "RGB"),
        (97, 61, 2, "RGBA"),  # alpha composited onto white
        (61, 97, 2, "LA"),  # 2 channels
        (80, 50, 2, "L"),  # grey
    ],
)
def test_pixel_values_match_a_step_by_step_implementation(processor, width, height, num_crops, mode):
    """`pixel_values` and `image_sizes` equal, bit for bit, a literal re-implementation of the reference steps
    (PIL bilinear resize, white padding, ToTensor/Normalize in float32, bicubic global view, row-major crops,
    zero padding to num_crops + 1)."""
    image = _noise_image(width, height, seed=width * 7 + height, mode=mode)
    if mode == "RGBA":  # make transparency matter: a fully transparent band and a half-transparent one
        array = np.array(image)
        array[:20, :, 3] = 0
        array[20:40, :, 3] = 128
        image = Image.fromarray(array, mode="RGBA")
    expected, size = _step_by_step(image, num_crops)
    out = processor(image, num_crops=num_crops)
    assert out["image_sizes"].tolist() == [size]
    assert torch.equal(out["pixel_values"][0], expected)


def test_palette_image_with_transparency_is_converted_like_transformers():
    """A 'P' image (with and without a transparency entry) becomes the RGB image transformers' convert_to_rgb gives."""
    base = _noise_image(40, 30, seed=3).convert("P")
    with_transparency = base.copy()
    with_transparency.info["transparency"] = 0
    for image in (base, with_transparency):
        assert np.array_equal(np.array(convert_image_to_rgb(image)), convert_to_rgb(image, return_numpy=True))
        expected, _ = _step_by_step(image, 1)
        assert torch.equal(Phi3VImageProcessor(num_crops=1)(image)["pixel_values"][0], expected)


def test_unused_crops_are_zero(processor):
    """Entries past the global view and the real crops are exactly zero: a 1x2-crop image at num_crops 4 fills
    entries 0..2 and leaves 3..4 zero; a one-crop image at num_crops 1 has just the two entries."""
    out = processor(
        _noise_image(800, 336, seed=1), num_crops=4
    )  # ratio 2.38 at num_crops 4: scale 2 -> 1x2 crops
    image = processor(_noise_image(336, 336, seed=1), num_crops=1)
    assert image["image_sizes"].tolist() == [[336, 336]]
    assert image["pixel_values"].shape[1] == 2
    assert out["image_sizes"].tolist() == [[336, 672]]
    values = out["pixel_values"][0]
    assert values[:3].abs().sum(dim=(1, 2, 3)).gt(0).all()
    assert torch.count_nonzero(values[3:]) == 0


def test_tall_image_transposes_back_into_place(processor):
    """A tall image is padded left/right (not top/bottom) and keeps its orientation: its top band stays at the
    top, its left half on the left, and the crops are the row-major tiles of the padded canvas."""
    width, height = 100, 250  # transposed: 250x100, ratio 2.5 -> scale 2 -> 672x268, padded to 672x336
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = (255, 0, 0)  # left half red
    array[:, width // 2 :] = (0, 0, 255)  # right half blue
    array[:40] = (0, 255, 0)  # top band green
    image = Image.fromarray(array)

    padded = processor.hd_transform(image, 4)
    assert padded.shape == (672, 336, 3)
    top = int((336 - 268) / 2)
    assert (padded[:, :top] == 255).all() and (
        padded[:, top + 268 :] == 255
    ).all()  # white columns at the sides
    assert (padded[200:, top + 5 : top + 120] == (255, 0, 0)).all()  # left half red
    assert (padded[200:, top + 150 : top + 260] == (0, 0, 255)).all()  # right half blue
    assert (
        padded[:90, top + 5 : top + 260] == (0, 255, 0)
    ).all()  # top band green (40/250 of 672 rows ~ 107)

    out = processor(image, num_crops=4)
    assert out["image_sizes"].tolist() == [[672, 336]]
    mean = torch.tensor(CLIP_IMAGE_MEAN)[:, None, None]
    std = torch.tensor(CLIP_IMAGE_STD)[:, None, None]
    expected_first_tile = (torch.from_numpy(padded[:336]).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.equal(out["pixel_values"][0, 1], expected_first_tile)
    assert torch.count_nonzero(out["pixel_values"][0, 3:]) == 0


def test_batch_of_images_and_return_types(processor):
    """A list of images gives one entry per image, in order; 'np' gives arrays and None gives lists of sizes."""
    images = [_noise_image(50, 40, seed=i) for i in range(3)]
    out = processor(images, num_crops=1)
    assert out["pixel_values"].shape == (3, 2, 3, 336, 336)
    for i, image in enumerate(images):
        assert torch.equal(out["pixel_values"][i], processor(image, num_crops=1)["pixel_values"][0])
    as_numpy = processor(images[:1], num_crops=1, return_tensors="np")
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and as_numpy["image_sizes"].dtype == np.int64
    as_lists = processor(images[:1], num_crops=1, return_tensors=None)
    assert as_lists["image_sizes"] == [[336, 336]] and as_lists["num_img_tokens"] == [
        _reference_tokens(336, 336)
    ]
    empty = processor([], num_crops=2)
    assert empty["pixel_values"].shape == (0, 3, 3, 336, 336) and empty["image_sizes"].shape == (0, 2)


def test_num_img_tokens_follows_the_token_grid():
    """With g * g tokens per crop the count is (h*w + 1) * g*g + 1 + (h + 1) * g; non-squares are rejected."""
    tiny = Phi3VImageProcessor(num_img_tokens=4)
    assert tiny.num_image_tokens(672, 1008) == (2 * 3 + 1) * 4 + 1 + 3 * 2
    assert tiny(Image.new("RGB", (500, 300)))["num_img_tokens"] == [(2 * 2 + 1) * 4 + 1 + 3 * 2]
    with pytest.raises(ValueError, match="perfect square"):
        Phi3VImageProcessor(num_img_tokens=150)
    with pytest.raises(ValueError, match="multiple of 336"):
        num_image_tokens(300, 336)


def test_invalid_arguments_and_degenerate_images(processor):
    """num_crops < 1, empty images, over-elongated images and non-PIL inputs fail with clear errors."""
    with pytest.raises(ValueError, match="at least 1"):
        Phi3VImageProcessor(num_crops=0)
    with pytest.raises(ValueError, match="at least 1"):
        processor(Image.new("RGB", (10, 10)), num_crops=0)
    with pytest.raises(ValueError, match=r"empty image of size 0x5"):
        processor(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match=r"4000x1 .*too elongated.*num_crops=1"):
        processor(Image.new("RGB", (4000, 1)), num_crops=1)
    with pytest.raises(ValueError, match=r"1x4000"):
        hd_target_size(1, 4000, 2)
    with pytest.raises(TypeError, match="PIL"):
        processor(np.zeros((10, 10, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="item 1"):
        processor([Image.new("RGB", (10, 10)), "image.png"])


def test_save_and_load_round_trip(tmp_path):
    """save_pretrained / from_pretrained keep every setting; from_pretrained kwargs override saved values."""
    original = Phi3VImageProcessor(
        num_crops=16, num_img_tokens=16, image_mean=[0.5, 0.5, 0.5], do_convert_rgb=False
    )
    original.save_pretrained(tmp_path)
    loaded = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == original.to_dict()
    assert (loaded.num_crops, loaded.num_img_tokens, loaded.image_mean, loaded.do_convert_rgb) == (
        16,
        16,
        (0.5, 0.5, 0.5),
        False,
    )
    assert Phi3VImageProcessor.from_pretrained(tmp_path, num_crops=4).num_crops == 4
    assert loaded.model_input_names == ["pixel_values", "image_sizes"]


def test_loads_the_official_preprocessor_config(tmp_path):
    """The Phi-3.5-vision `preprocessor_config.json` (with `auto_map` and `processor_class`) loads, and its
    remote-code `auto_map` is not written back."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(official_preprocessor_config()))
    loaded = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert (loaded.num_crops, loaded.num_img_tokens) == (4, 144)
    assert loaded.image_mean == CLIP_IMAGE_MEAN and loaded.image_std == CLIP_IMAGE_STD
    saved = loaded.to_dict()
    assert "auto_map" not in saved and "processor_class" not in saved
    assert saved["image_processor_type"] == "Phi3VImageProcessor"
    assert loaded(Image.new("RGB", (500, 300)))["num_img_tokens"] == [757]
