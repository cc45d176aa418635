"""Images are read as a user expects (data/sample.py `load_image`): upright (EXIF orientation), 16-bit and float
pixels scaled rather than clipped, transparency on white, never more pixels than data.max_image_pixels (a
sentence, not PIL's DecompressionBombError), and `python -m phi3v_recipes.data.check` reports duplicate ids and
notes animated images."""

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phi3v_recipes.data.check import main
from phi3v_recipes.data.sample import Sample, Turn, load_image
from phi3v_recipes.errors import SampleError

DEFAULT_MAX_PIXELS = 89478485  # conf/train.yaml data.max_image_pixels
SAMPLE = Sample(id="s1", turns=[Turn("What?", "x")], origin="train.jsonl:3")


def write_huge_png(path: Path, side: int) -> None:
    """A `side` x `side` black 1-bit PNG, written row by row with zlib: a file of ~100 KB whose pixels would take
    `side`² bytes once decoded (what a decompression bomb looks like)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the row's bits
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit per pixel, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit greyscale PNG (a gradient over the whole 0..65535 range) becomes 8-bit RGB with each value scaled
    by 255/65535: dark stays dark and mid-grey stays mid-grey (clipping made everything above 255 white)."""
    values = np.linspace(0, 65535, 256 * 4, dtype=np.uint16).reshape(4, 256)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really 16 bits on disk
    image = load_image(tmp_path / "deep.png", SAMPLE)
    assert image.mode == "RGB" and image.size == (256, 4)
    got = np.asarray(image)[:, :, 0].astype(int)
    assert np.abs(got - np.rint(values / 257.0)).max() <= 1
    assert got.min() == 0 and got.max() == 255 and 120 <= got[2, 0] <= 135  # the middle of the range


@pytest.mark.parametrize("mode,values,expected", [
    ("I", [[0, 1000], [50000, 65535]], [[0, 4], [195, 255]]),            # 16-bit data in a 32-bit image
    ("I", [[-100, 0], [140, 300]], [[0, 64], [153, 255]]),                # other ranges: scaled from min to max
    ("F", [[0.0, 0.25], [0.5, 1.0]], [[0, 64], [128, 255]]),              # floats in [0, 1]
])
def test_other_deep_modes_are_scaled_to_8_bits(mode, values, expected):
    """32-bit integer and float images are scaled into 0..255, never clipped."""
    dtype = np.int32 if mode == "I" else np.float32
    image = load_image(Image.fromarray(np.array(values, dtype=dtype), mode=mode), SAMPLE)
    assert image.mode == "RGB"
    assert np.asarray(image)[:, :, 0].tolist() == expected


def test_exif_rotated_jpeg_is_read_upright(tmp_path):
    """A JPEG stored landscape (red left half, blue right half) with EXIF orientation 6 (rotate 90° clockwise to
    display) is read as the camera's user saw it: portrait, red on top."""
    stored = Image.new("RGB", (80, 40), "blue")
    stored.paste((255, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "photo.jpg", SAMPLE)
    assert image.size == (40, 80)
    top, bottom = image.getpixel((20, 10)), image.getpixel((20, 70))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_transparency_is_composited_onto_white(tmp_path):
    """A palette PNG with a transparent colour and an RGBA PNG read as RGB with their transparent parts white."""
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255])  # 0: red (made transparent), 1: blue
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "palette.png", transparency=0)
    for name in ("rgba.png", "palette.png"):
        image = load_image(tmp_path / name, SAMPLE)
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (0, 0, 255), name
        assert image.getpixel((2, 2)) == (255, 255, 255), name


def test_oversized_image_is_one_sentence_from_its_header(tmp_path):
    """A 20000 x 20000 PNG (400 M pixels, beyond PIL's own decompression-bomb error threshold) is refused from its
    header with a SampleError naming the sample, the image, its size and data.max_image_pixels; PIL raises or
    warns nothing, and afterwards PIL's own limit is as it was."""
    write_huge_png(tmp_path / "huge.png", 20000)
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SampleError) as err:
            load_image(tmp_path / "huge.png", SAMPLE, max_pixels=DEFAULT_MAX_PIXELS)
    assert str(err.value) == (
        f"train.jsonl:3 (id s1): image {tmp_path / 'huge.png'} is 20000x20000 = 400000000 pixels, more than "
        f"data.max_image_pixels={DEFAULT_MAX_PIXELS}; downscale it, raise data.max_image_pixels, or set "
        "data.on_error=skip to drop such samples.")
    assert limit == Image.MAX_IMAGE_PIXELS
    small = Image.new("RGB", (30, 20))
    small.save(tmp_path / "small.png")
    with pytest.raises(SampleError, match="is 30x20 = 600 pixels, more than data.max_image_pixels=599"):
        load_image(tmp_path / "small.png", SAMPLE, max_pixels=599)
    assert load_image(tmp_path / "small.png", SAMPLE, max_pixels=600).size == (30, 20)


def test_check_reports_duplicate_ids_and_notes_animations(tmp_path, capsys):
    """`data.check` lists a repeated id at each repeat (naming where it was first used) as a problem, and notes
    an animated GIF (only its first frame is used) without counting it as a problem."""
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(tmp_path / "still.png")
    rows = [("a", "anim.gif"), ("b", "still.png"), ("a", "still.png"), ("c", "still.png"), ("b", "still.png")]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"id": i, "conversations": [{"images": [img], "user": "Colour?",
                                                                    "assistant": "red"}]}) + "\n"
                            for i, img in rows))
    assert main([str(path), "--num_crops", "1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"{path}:1 (id a): note: image {tmp_path / 'anim.gif'} is animated (3 frames); only its "
                        "first frame is used.")
    assert lines[1].startswith(f"{path}:3 (id a): duplicate id, already used by {path}:1; give every sample")
    assert lines[2].startswith(f"{path}:5 (id b): duplicate id, already used by {path}:2;")
    assert lines[-1] == "5 samples, 2 problems"
    image = load_image(tmp_path / "anim.gif", SAMPLE)
    assert image.mode == "RGB" and image.getpixel((5, 5))[0] > 200  # the first (red) frame


def test_check_reports_an_oversized_image_with_the_training_default(tmp_path, capsys):
    """`data.check` applies conf/train.yaml's data.max_image_pixels unless --max_image_pixels is given."""
    write_huge_png(tmp_path / "huge.png", 20000)
    Image.new("RGB", (30, 20)).save(tmp_path / "small.png")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"id": name, "conversations": [{"images": [f"{name}.png"], "user": "Hi?",
                                                                       "assistant": "yo"}]}) + "\n"
                            for name in ("huge", "small")))
    assert main([str(path), "--num_crops", "1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path}:1 (id huge): image {tmp_path / 'huge.png'} is 20000x20000 = 400000000 "
                               f"pixels, more than data.max_image_pixels={DEFAULT_MAX_PIXELS};")
    assert lines[-1] == "2 samples, 1 problems"
    assert main([str(path), "--num_crops", "1", "--max_image_pixels", "500"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "2 samples, 2 problems"


def test_the_default_limit_is_the_documented_one():
    """The tests' DEFAULT_MAX_PIXELS is conf/train.yaml's value (and what data.check uses by default)."""
    from phi3v_recipes.data.check import _train_default

    assert _train_default("data.max_image_pixels") == DEFAULT_MAX_PIXELS


def test_images_given_as_objects_or_loaders_are_read_the_same_way(tmp_path):
    """A PIL image or a loader returning an opened (not yet decoded) image passes through the same checks."""
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), "red").save(buffer, "PNG")
    loader = lambda: Image.open(io.BytesIO(buffer.getvalue()))  # noqa: E731 - what dataset rows do
    assert load_image(loader, SAMPLE).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(SampleError, match="more than data.max_image_pixels=100"):
        load_image(loader, SAMPLE, max_pixels=100)
