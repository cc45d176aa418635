"""Image processor for Phi-3-vision / Phi-3.5-vision (the "HD transform").

Every image is resized so that it tiles into at most `num_crops` crops of 336×336 pixels while keeping its aspect
ratio, padded with white to whole crops, normalised with the CLIP statistics, and returned as a global 336×336 view
followed by the row-major crops, zero-padded to `num_crops + 1` entries:

- `pixel_values`: float32 `[n_images, num_crops + 1, 3, 336, 336]`,
- `image_sizes`: int64 `[n_images, 2]`, the *padded* `[height, width]` of each image (multiples of 336),
- `num_img_tokens`: a list with the number of image tokens the model spends on each image.

The numbers reproduce Microsoft's reference processor (`image_processing_phi3_v.py` as shipped with the hub
checkpoints) exactly: same resize (PIL bilinear), same padding, same float32 normalisation and the same bicubic
global view. The reference needs torchvision; this implementation uses PIL, NumPy and torch only.

This file imports only torch, NumPy, PIL and transformers: it is shipped verbatim beside every export (see
docs/export.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import TensorType

__all__ = [
    "CLIP_IMAGE_MEAN",
    "CLIP_IMAGE_STD",
    "CROP_SIZE",
    "Phi3VImageProcessor",
    "Phi3VImageProcessorKwargs",
    "convert_image_to_rgb",
    "hd_target_size",
    "num_image_tokens",
]

CROP_SIZE = 336
"""Side, in pixels, of one crop (the input size of CLIP ViT-L/14-336)."""

CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# The padding colour of the HD transform (white, before normalisation).
_PAD_VALUE = 255


class Phi3VImageProcessorKwargs(ImagesKwargs, total=False):
    """Keyword arguments of [`Phi3VImageProcessor`] on top of the standard `ImagesKwargs`.

    Declaring them here lets `Phi3VImageProcessor.from_pretrained(path, num_crops=16)` override the saved value
    (`ImageProcessingMixin.from_dict` only applies keyword arguments that `valid_kwargs` declares).

    Attributes:
        num_crops (`int`):
            Maximum number of 336×336 crops per image (the global view comes on top).
        num_img_tokens (`int`):
            Tokens per 336×336 crop after the model's 2×2 merge; a perfect square `g * g`.
    """

    num_crops: int | None
    num_img_tokens: int | None


def _check_num_crops(num_crops: Any) -> int:
    if isinstance(num_crops, bool) or not isinstance(num_crops, (int, np.integer)):
        raise TypeError(f"`num_crops` must be an integer, got {num_crops!r} ({type(num_crops).__name__}).")
    if num_crops < 1:
        raise ValueError(
            f"`num_crops` must be at least 1, got {num_crops}. It is the maximum number of 336x336 crops per "
            "image (Phi-3.5-vision uses 4 for multi-image prompts and 16 for a single image)."
        )
    return int(num_crops)


def _token_grid_side(num_img_tokens: Any) -> int:
    """Side `g` of the token grid of one crop: `num_img_tokens == g * g`."""
    if isinstance(num_img_tokens, bool) or not isinstance(num_img_tokens, (int, np.integer)):
        raise TypeError(f"`num_img_tokens` must be an integer, got {num_img_tokens!r}.")
    side = math.isqrt(num_img_tokens) if num_img_tokens > 0 else 0
    if num_img_tokens < 1 or side * side != num_img_tokens:
        raise ValueError(
            f"`num_img_tokens` must be a positive perfect square (tokens per crop after the 2x2 merge, "
            f"e.g. 144 = 12 * 12 for Phi-3.5-vision), got {num_img_tokens}."
        )
    return side


def _hd_resize_size(width: int, height: int, num_crops: int) -> tuple[int, int, bool]:
    """Size that the HD transform resizes an image to, before padding.

    Works in the landscape frame: a portrait image (`width < height`) is transposed first. Returns
    `(new_width, new_height, transposed)` in that frame, with `new_width` a multiple of 336. The arithmetic
    (float ratio, NumPy ceil, `int` truncation) is the reference's, so that the result agrees to the pixel.
    """
    if width < 1 or height < 1:
        raise ValueError(
            f"Cannot process an empty image of size {width}x{height} (width x height): both sides must be at "
            "least 1 pixel. Drop the image from the sample, or replace it with a real one."
        )
    transposed = width < height
    long_side, short_side = (height, width) if transposed else (width, height)
    ratio = long_side / short_side
    # The largest integer scale s with s * ceil(s / ratio) <= num_crops (s >= 1 since ratio >= 1).
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_width = int(scale * CROP_SIZE)
    new_height = int(new_width / ratio)
    if new_height < 1:
        raise ValueError(
            f"Image of size {width}x{height} (width x height) is too elongated for num_crops={num_crops}: its "
            f"short side ({short_side} px) would be resized to 0 pixels when its long side ({long_side} px) "
            f"becomes {new_width} px. Crop or pad the image to a less extreme aspect ratio, or use a larger "
            "num_crops."
        )
    return new_width, new_height, transposed


def hd_target_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """Padded `(height, width)` that the HD transform gives an image of `width` x `height` pixels.

    This is the `image_sizes` entry of the image, computed without touching pixels (for collators, length
    planners and token budgets). Both sides are multiples of 336, and the number of 336×336 crops,
    `(height // 336) * (width // 336)`, is at most `num_crops`.

    Raises:
        ValueError: for an empty image, or one so elongated that its short side would resize to 0 pixels.
    """
    num_crops = _check_num_crops(num_crops)
    new_width, new_height, transposed = _hd_resize_size(int(width), int(height), num_crops)
    padded_height = int(np.ceil(new_height / CROP_SIZE) * CROP_SIZE)
    if transposed:
        return new_width, padded_height
    return padded_height, new_width


def num_image_tokens(padded_height: int, padded_width: int, num_img_tokens: int = 144) -> int:
    """Number of tokens the model spends on an image whose padded size is `padded_height` x `padded_width`.

    With `g * g == num_img_tokens` tokens per crop and `h, w` crops along each side: the `h*g x w*g` crop grid
    with one newline token after each of its rows, one separator, and the `g x g` global view with one newline
    after each row, i.e. `(h * w + 1) * g * g + 1 + (h + 1) * g`. For Phi-3.5-vision (`g = 12`) that is the
    reference's `(h * w + 1) * 144 + 1 + (h + 1) * 12`.
    """
    side = _token_grid_side(num_img_tokens)
    if (
        padded_height < CROP_SIZE
        or padded_width < CROP_SIZE
        or padded_height % CROP_SIZE
        or padded_width % CROP_SIZE
    ):
        raise ValueError(
            f"A padded image size must be a positive multiple of {CROP_SIZE} on both sides, got "
            f"{padded_height}x{padded_width} (height x width). Use `hd_target_size` to get it from an image size."
        )
    crops_h, crops_w = padded_height // CROP_SIZE, padded_width // CROP_SIZE
    return (crops_h * crops_w + 1) * side * side + 1 + (crops_h + 1) * side


def convert_image_to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image to RGB the way the reference processor does.

    The reference calls `transformers.image_transforms.convert_to_rgb`, which (in transformers 5) composites any
    transparency (an alpha band, or a `transparency` entry of a palette / grey image) onto a white background,
    and otherwise converts with `Image.convert("RGB")`.
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class Phi3VImageProcessor(BaseImageProcessor):
    r"""
    Constructs a Phi-3-V image processor: the HD transform of
    [InternLM-XComposer2-4KHD](https://arxiv.org/abs/2404.06512) as used by Phi-3-vision and Phi-3.5-vision.

    For each image (converted to RGB): a portrait image is transposed; the image is resized (PIL bilinear) to
    `336 * s` pixels wide, `s` the largest integer with `s * ceil(s / ratio) <= num_crops`, keeping its aspect
    ratio; its height is padded with white to a multiple of 336 (centred, extra row at the bottom); it is
    transposed back, scaled to [0, 1] and normalised. The global view is the normalised padded image resized to
    336×336 (bicubic); the crops are its 336×336 tiles in row-major order.

    Args:
        num_crops (`int`, *optional*, defaults to 4):
            Maximum number of 336×336 crops per image. Phi-3.5-vision recommends 16 for single-image prompts and
            4 for multi-image prompts. Can be overridden per call.
        num_img_tokens (`int`, *optional*, defaults to 144):
            Tokens per 336×336 crop after the model's 2×2 merge (`g * g`, `g = 12` for CLIP ViT-L/14-336).
            Only used to count image tokens.
        image_mean (`float` or `list[float]`, *optional*, defaults to the CLIP mean):
            Per-channel mean used for normalisation.
        image_std (`float` or `list[float]`, *optional*, defaults to the CLIP standard deviation):
            Per-channel standard deviation used for normalisation.
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Whether to composite transparency onto white before the (always applied) conversion to RGB.
    """

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = Phi3VImageProcessorKwargs

    def __init__(
        self,
        num_crops: int = 4,
        num_img_tokens: int = 144,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool = True,
        **kwargs: Any,
    ) -> None:
        # `auto_map` points official checkpoints at Microsoft's remote code; the native class replaces it, so it
        # is not kept (nor written back by `save_pretrained`). `image_processor_type` is rewritten by `to_dict`.
        kwargs.pop("auto_map", None)
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.num_crops = _check_num_crops(num_crops)
        _token_grid_side(num_img_tokens)
        self.num_img_tokens = int(num_img_tokens)
        self.image_mean = self._as_channel_tuple(
            CLIP_IMAGE_MEAN if image_mean is None else image_mean, "image_mean"
        )
        self.image_std = self._as_channel_tuple(
            CLIP_IMAGE_STD if image_std is None else image_std, "image_std"
        )
        self.do_convert_rgb = bool(do_convert_rgb)

    @staticmethod
    def _as_channel_tuple(value: float | Sequence[float], name: str) -> tuple[float, ...]:
        values = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
        if len(values) != 3:
            raise ValueError(f"`{name}` must be a float or 3 floats (one per RGB channel), got {value!r}.")
        return values

    # ------------------------------------------------------------------ sizes and token counts

    def hd_target_size(self, width: int, height: int, num_crops: int | None = None) -> tuple[int, int]:
        """Padded `(height, width)` of an image of `width` x `height` pixels; see [`hd_target_size`]."""
        return hd_target_size(width, height, self.num_crops if num_crops is None else num_crops)

    def num_image_tokens(self, padded_height: int, padded_width: int) -> int:
        """Image tokens for an image of padded size `padded_height` x `padded_width` (an `image_sizes` row)."""
        return num_image_tokens(padded_height, padded_width, self.num_img_tokens)

    def calc_num_image_tokens_from_image_size(
        self, width: int, height: int, num_crops: int | None = None
    ) -> int:
        """Image tokens for an (unprocessed) image of `width` x `height` pixels. Same name as the reference."""
        return self.num_image_tokens(*self.hd_target_size(width, height, num_crops))

    def calc_num_image_tokens(
        self, images: Image.Image | Sequence[Image.Image], num_crops: int | None = None
    ) -> list[int]:
        """Image tokens for each image, from its size alone (no pixels are processed). Same name as the reference."""
        return [
            self.calc_num_image_tokens_from_image_size(*image.size, num_crops=num_crops)
            for image in self._as_image_list(images)
        ]

    # ------------------------------------------------------------------ pixels

    @staticmethod
    def _as_image_list(images: Any) -> list[Image.Image]:
        if isinstance(images, Image.Image):
            return [images]
        if isinstance(images, (list, tuple)):
            for index, image in enumerate(images):
                if not isinstance(image, Image.Image):
                    raise TypeError(
                        f"Phi3VImageProcessor takes PIL images; item {index} of the list is a "
                        f"{type(image).__name__}. Convert arrays with `PIL.Image.fromarray` and pass a flat list."
                    )
            return list(images)
        raise TypeError(
            f"Phi3VImageProcessor takes a PIL image or a list of PIL images, got {type(images).__name__}. "
            "Convert arrays with `PIL.Image.fromarray`."
        )

    def hd_transform(self, image: Image.Image, num_crops: int) -> np.ndarray:
        """Resize and pad one RGB PIL image; returns the padded image as a uint8 `[H, W, 3]` array.

        `H` and `W` are multiples of 336 and equal [`hd_target_size`]`(*image.size, num_crops)`.
        """
        width, height = image.size
        new_width, new_height, transposed = _hd_resize_size(width, height, num_crops)
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        resized = np.asarray(image.resize((new_width, new_height), Image.Resampling.BILINEAR), dtype=np.uint8)
        target_height = int(np.ceil(new_height / CROP_SIZE) * CROP_SIZE)
        top = int((target_height - new_height) / 2)
        padded = np.full((target_height, new_width, 3), _PAD_VALUE, dtype=np.uint8)
        padded[top : top + new_height] = resized
        if transposed:
            padded = padded.transpose(1, 0, 2)
        return np.ascontiguousarray(padded)

    def _process_one(
        self, image: Image.Image, num_crops: int, mean: torch.Tensor, std: torch.Tensor, do_convert_rgb: bool
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        if do_convert_rgb:
            image = convert_image_to_rgb(image)
        # The reference converts to RGB a second time, unconditionally (a no-op after the conversion above).
        image = image.convert("RGB")
        padded = self.hd_transform(image, num_crops)
        height, width = padded.shape[:2]
        # ToTensor + Normalize, in float32: x / 255, then (x - mean) / std.
        pixels = torch.from_numpy(padded).permute(2, 0, 1).float().div(255)
        pixels = (pixels - mean[:, None, None]) / std[:, None, None]
        global_view = torch.nn.functional.interpolate(
            pixels[None], size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False
        )
        rows, cols = height // CROP_SIZE, width // CROP_SIZE
        crops = (
            pixels.reshape(3, rows, CROP_SIZE, cols, CROP_SIZE)
            .permute(1, 3, 0, 2, 4)
            .reshape(rows * cols, 3, CROP_SIZE, CROP_SIZE)
        )
        if rows * cols > num_crops:  # cannot happen with the HD transform; guards the zero padding below
            raise AssertionError(f"{rows * cols} crops for num_crops={num_crops} (image size {image.size})")
        out = torch.zeros(num_crops + 1, 3, CROP_SIZE, CROP_SIZE, dtype=torch.float32)
        out[0] = global_view[0]
        out[1 : 1 + rows * cols] = crops
        return out, (height, width)

    def preprocess(
        self,
        images: Image.Image | Sequence[Image.Image],
        num_crops: int | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
        return_tensors: str | TensorType | None = TensorType.PYTORCH,
        **kwargs: Any,
    ) -> BatchFeature:
        """Process one PIL image or a list of them.

        Args:
            images (`PIL.Image.Image` or `list[PIL.Image.Image]`):
                The images, any PIL mode (converted to RGB).
            num_crops (`int`, *optional*, defaults to `self.num_crops`):
                Maximum number of crops per image; `pixel_values` has `num_crops + 1` entries per image.
            image_mean (`float` or `list[float]`, *optional*, defaults to `self.image_mean`):
                Normalisation mean.
            image_std (`float` or `list[float]`, *optional*, defaults to `self.image_std`):
                Normalisation standard deviation.
            do_convert_rgb (`bool`, *optional*, defaults to `self.do_convert_rgb`):
                Whether to composite transparency onto white first.
            return_tensors (`str` or [`~utils.TensorType`], *optional*, defaults to `"pt"`):
                `"pt"`: `pixel_values` and `image_sizes` are torch tensors; `"np"`: NumPy arrays; `None`:
                `pixel_values` is a torch tensor and `image_sizes` a list of `[height, width]` lists (as the
                reference returns them).

        Returns:
            [`BatchFeature`] with `pixel_values` (float32 `[n_images, num_crops + 1, 3, 336, 336]`),
            `image_sizes` (int64 `[n_images, 2]`, padded `[height, width]`) and `num_img_tokens` (a list of int).
        """
        if kwargs:
            raise TypeError(
                f"Phi3VImageProcessor.preprocess got unexpected keyword arguments {sorted(kwargs)}; it accepts "
                "num_crops, image_mean, image_std, do_convert_rgb and return_tensors."
            )
        num_crops = self.num_crops if num_crops is None else _check_num_crops(num_crops)
        mean = torch.tensor(
            self._as_channel_tuple(self.image_mean if image_mean is None else image_mean, "image_mean"),
            dtype=torch.float32,
        )
        std = torch.tensor(
            self._as_channel_tuple(self.image_std if image_std is None else image_std, "image_std"),
            dtype=torch.float32,
        )
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        image_list = self._as_image_list(images)

        pixel_values: list[torch.Tensor] = []
        image_sizes: list[list[int]] = []
        for image in image_list:
            pixels, (height, width) = self._process_one(image, num_crops, mean, std, do_convert_rgb)
            pixel_values.append(pixels)
            image_sizes.append([height, width])
        num_img_tokens = [self.num_image_tokens(height, width) for height, width in image_sizes]

        stacked = (
            torch.stack(pixel_values)
            if pixel_values
            else torch.zeros(0, num_crops + 1, 3, CROP_SIZE, CROP_SIZE, dtype=torch.float32)
        )
        return_tensors = None if return_tensors is None else TensorType(return_tensors)
        sizes: Any
        if return_tensors == TensorType.PYTORCH:
            sizes = torch.tensor(image_sizes, dtype=torch.long).reshape(-1, 2)
        elif return_tensors == TensorType.NUMPY:
            stacked = stacked.numpy()
            sizes = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
        elif return_tensors is None:
            sizes = image_sizes
        else:
            raise ValueError(f"Unsupported return_tensors={return_tensors.value!r}; use 'pt', 'np' or None.")
        return BatchFeature(
            data={"pixel_values": stacked, "image_sizes": sizes, "num_img_tokens": num_img_tokens}
        )

    def __call__(self, images: Image.Image | Sequence[Image.Image], **kwargs: Any) -> BatchFeature:
        """Process images; see [`~Phi3VImageProcessor.preprocess`]."""
        return self.preprocess(images, **kwargs)
