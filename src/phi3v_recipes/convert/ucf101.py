"""Convert UCF-101 videos (the cookbook's 10-class subset) into 8-frame jsonl classification samples.

    python -m phi3v_recipes.convert.ucf101 --src <path or repo id> --out_dir <dir> \\
        [--num_frames 8] [--splits train val test] [--tmp_dir <dir>] [--no_progress]

`--src` is one of:

* a folder laid out like `UCF101_subset/`: `train/`, `val/`, `test/`, each holding one folder per class with
  that class's `.avi` videos (a folder holding `UCF101_subset/` is accepted too);
* the archive `UCF101_subset.tar.gz` (any tar file with that layout); it is extracted into a temporary
  folder (under `--tmp_dir` if given) that is removed afterwards. Every member is checked first: absolute
  names, names with `..`, links and special files are refused before anything is written;
* a Hugging Face dataset repo id (`sayakpaul/ucf101-subset` in the cookbook), from which
  `UCF101_subset.tar.gz` is downloaded with `huggingface_hub.hf_hub_download` and then treated as above.
  Offline, or for a repo without that file, this fails with a message naming the repo.

Output, under `--out_dir`:

* `images/<split>/<Class>/<video stem>.<i>.jpg` for i = 0 .. num_frames - 1 (JPEG at Pillow's default
  quality, as the cookbook saves them);
* `ucf101_<split>.jsonl`, one line per video:
  `{"id": "val-0000000300", "source": "ucf101", "conversations": [{"images": ["val/BabyCrawling/
  v_BabyCrawling_g21_c04.0.jpg", ...], "user": "Classify the video into one of the following classes:
  ApplyEyeMakeup, ApplyLipstick, ....", "assistant": "BabyCrawling"}]}`, image paths relative to
  `<out_dir>/images`. Each jsonl is written under a temporary name and renamed when its split is done,
  so an interrupted run never leaves a truncated file under the final name (the images of an interrupted
  split may exist without a jsonl listing them; rerunning overwrites them).

Facts reproduced from the cookbook's `code/04.Finetuning/vision_finetuning/convert_ucf101.py`
(microsoft/Phi-3CookBook):

* frames: `total = container.streams.video[0].frames`, indices
  `np.arange(0, total, total / num_images).astype(int)`, decoded in order with PyAV and converted to RGB.
  `frame_indices` computes `k * total // num_frames` for k = 0 .. num_frames - 1 in integer arithmetic:
  identical for the default 8 frames (checked for every total up to 100 000); for other counts it avoids
  the float rounding that can make the upstream `arange` yield one index too many;
* the prompt lists the sorted set of class names found over all three splits, joined by ", ", in
  "Classify the video into one of the following classes: <classes>." and the answer is the class name;
* ids are `<split>-<index:010d>` where the index runs over the videos of all splits together, train
  first, then val, then test (so with 300 training videos the first val id is `val-0000000300`);
* `json.dumps` with default separators, one object per line.

Choices where the cookbook is silent or fragile:

* order: upstream enumerates with `glob`, whose order depends on the file system; here videos are taken
  in sorted order of class folder, then file name, within each split, so ids are reproducible (the same
  ids as upstream only where its file system happened to list files in sorted order). Ids do not depend
  on `--splits`: the running index counts the videos of every split in the tree, converted or not;
* bad videos: upstream crashes on a video PyAV cannot open or decode, and writes fewer frames (with
  repeated indices) for a video shorter than `num_frames`. Here such a video is skipped with a warning
  naming the file and the reason; it keeps its place in the id sequence, is absent from the jsonl, and
  the final summary counts it. When a container's frame count is missing or wrong, the frames are
  counted by decoding and the indices computed from that count. The command fails (exit status 1) when
  `--src` is unusable, a requested split is missing, or no video at all could be converted.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from phi3v_recipes.files import atomic_write_text

__all__ = [
    "HUB_FILENAME",
    "HUB_REPO_ID",
    "SPLITS",
    "ConversionError",
    "ConversionSummary",
    "Video",
    "VideoDecodeError",
    "build_parser",
    "build_prompt",
    "convert",
    "download_from_hub",
    "find_dataset_root",
    "frame_indices",
    "list_videos",
    "main",
    "make_record",
    "open_source",
    "read_frames",
    "safe_extract",
]

# Named explicitly: under `python -m` this module's __name__ is "__main__".
logger = logging.getLogger("phi3v_recipes.convert.ucf101")
_PACKAGE_LOGGER = logging.getLogger("phi3v_recipes")

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Split folders, in the order their videos are numbered."""
HUB_REPO_ID = "sayakpaul/ucf101-subset"
"""The dataset repo the cookbook downloads."""
HUB_FILENAME = "UCF101_subset.tar.gz"
"""The archive fetched from a hub repo."""
ARCHIVE_ROOT = "UCF101_subset"
"""The top folder inside the archive."""
SOURCE = "ucf101"
VIDEO_SUFFIX = ".avi"
PROMPT_TEMPLATE = "Classify the video into one of the following classes: {classes}."

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConversionError(RuntimeError):
    """Input the converter cannot use; the message names the file or folder at fault."""


class VideoDecodeError(ConversionError):
    """A video that cannot be opened or decoded, or that has fewer frames than requested."""


@dataclass(frozen=True)
class Video:
    """One source video and its place in the output."""

    split: str
    label: str
    path: Path
    index: int
    """Running number over all splits (train, val, test); the number in the sample id."""

    @property
    def sample_id(self) -> str:
        """The jsonl id, e.g. `val-0000000300`."""
        return f"{self.split}-{self.index:010d}"

    @property
    def image_prefix(self) -> str:
        """`<split>/<Class>/<stem>`: frame i is `<image_prefix>.<i>.jpg` under `<out_dir>/images`."""
        return f"{self.split}/{self.label}/{self.path.stem}"


@dataclass
class ConversionSummary:
    """What a conversion produced."""

    videos: dict[str, int] = field(default_factory=dict)
    """Videos converted (lines written) per split."""
    frames_written: int = 0
    skipped: list[Path] = field(default_factory=list)
    """Videos left out because they could not be decoded or were too short."""

    @property
    def total_videos(self) -> int:
        return sum(self.videos.values())

    def line(self) -> str:
        """One human-readable summary line."""
        per_split = ", ".join(f"{split} {count} videos" for split, count in self.videos.items())
        text = f"ucf101: {per_split}; {self.frames_written} frames written"
        if self.skipped:
            text += f"; {len(self.skipped)} videos skipped (see the warnings above)"
        return text


# --------------------------------------------------------------------------------------------- frames


def _import_av() -> ModuleType:
    """PyAV, imported on first use so that the module imports without the `video` extra."""
    try:
        import av
    except ImportError as exc:
        raise ConversionError(
            "decoding videos needs PyAV: install it with `pip install 'phi3v-recipes[video]'` "
            "(or `pip install av`)"
        ) from exc
    return av


def frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """Evenly spaced frame indices: `k * total_frames // num_frames` for k in 0 .. num_frames - 1.

    The cookbook's `np.arange(0, total, total / num).astype(int)` in exact integer arithmetic. Needs
    `total_frames >= num_frames >= 1`, which makes the indices strictly increasing.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if total_frames < num_frames:
        raise ValueError(f"cannot pick {num_frames} distinct frames from {total_frames}")
    return [k * total_frames // num_frames for k in range(num_frames)]


def _decode_at(container: Any, indices: Sequence[int]) -> list[Image.Image]:
    """Decode the first video stream up to the last wanted index and return the wanted frames as RGB."""
    wanted = set(indices)
    last = indices[-1]
    frames: list[Image.Image] = []
    for i, frame in enumerate(container.decode(video=0)):
        if i in wanted:
            frames.append(frame.to_image())
        if i >= last:
            break
    return frames


def _count_frames(container: Any) -> int:
    """Number of frames the first video stream actually decodes to."""
    return sum(1 for _ in container.decode(video=0))


def read_frames(path: Path, num_frames: int = 8) -> list[Image.Image]:
    """Decode `num_frames` evenly spaced frames (see `frame_indices`) of the video at `path` as RGB images.

    The container's frame count is used as the cookbook does; when it is missing or larger than what
    decodes, the frames are counted by decoding. Raises VideoDecodeError, naming the file, when the video
    cannot be opened or decoded or has fewer than `num_frames` frames.
    """
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: the file holds no video stream")
            declared = container.streams.video[0].frames
            if declared >= num_frames:
                frames = _decode_at(container, frame_indices(declared, num_frames))
                if len(frames) == num_frames:
                    return frames
        with av.open(str(path)) as container:
            decoded = _count_frames(container)
        if decoded < num_frames:
            raise VideoDecodeError(f"{path}: only {decoded} decodable frames, {num_frames} needed")
        if declared:
            logger.info("%s: the container declares %d frames but %d decode", path, declared, decoded)
        with av.open(str(path)) as container:
            frames = _decode_at(container, frame_indices(decoded, num_frames))
    except (av.FFmpegError, OSError) as exc:
        raise VideoDecodeError(f"{path}: cannot decode the video ({exc})") from exc
    if len(frames) != num_frames:  # the decoder gave fewer frames on the second pass than on the first
        raise VideoDecodeError(f"{path}: decoding is not reproducible ({len(frames)} of {num_frames} frames)")
    return frames


# --------------------------------------------------------------------------------------------- source


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse a tar member that could write outside the extraction folder or is not a plain file/folder."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member.name):
        raise ConversionError(f"{archive}: refusing the member {member.name!r}, which has an absolute path")
    if ".." in name.parts or ".." in PurePosixPath(member.name.replace("\\", "/")).parts:
        raise ConversionError(f"{archive}: refusing the member {member.name!r}, whose path contains '..'")
    if not (member.isfile() or member.isdir()):
        raise ConversionError(
            f"{archive}: refusing the member {member.name!r}: only regular files and folders are extracted, "
            "not links or special files"
        )


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract the tar archive `archive` (optionally compressed) into `dest` after checking every member."""
    if not tarfile.is_tarfile(archive):
        raise ConversionError(f"{archive} is not a tar archive (expected {HUB_FILENAME} or a dataset folder)")
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12: a second line of defence
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - older Pythons; every member has been checked above
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ConversionError(f"{archive}: cannot extract the archive ({exc})") from exc


def download_from_hub(repo_id: str) -> Path:
    """Download `UCF101_subset.tar.gz` from the dataset repo `repo_id` (cached by huggingface_hub)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise ConversionError(
            f"downloading {repo_id!r} needs huggingface_hub (pip install huggingface_hub)"
        ) from exc
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=HUB_FILENAME, repo_type="dataset"))
    except Exception as exc:  # offline mode, no network, unknown repo or file: all reported alike
        raise ConversionError(
            f"--src {repo_id!r} is not an existing file or folder, and downloading {HUB_FILENAME} from the "
            f"dataset repo {repo_id!r} failed ({type(exc).__name__}: {exc}). Offline, pass the path of a "
            f"local {ARCHIVE_ROOT}/ folder or {HUB_FILENAME} instead."
        ) from exc


def find_dataset_root(path: Path) -> Path:
    """The folder holding the split folders: `path`, `path/UCF101_subset`, or `path`'s only subfolder."""

    def has_splits(folder: Path) -> bool:
        return any((folder / split).is_dir() for split in SPLITS)

    if has_splits(path):
        return path
    if has_splits(path / ARCHIVE_ROOT):
        return path / ARCHIVE_ROOT
    subfolders = [child for child in path.iterdir() if child.is_dir()]
    if len(subfolders) == 1 and has_splits(subfolders[0]):
        return subfolders[0]
    raise ConversionError(
        f"{path} has no split folders: expected {', '.join(s + '/' for s in SPLITS)} (each with one "
        f"folder per class holding {VIDEO_SUFFIX} videos) in it or in {path / ARCHIVE_ROOT}"
    )


@contextmanager
def open_source(src: str, tmp_dir: Path | None = None) -> Iterator[Path]:
    """Resolve `--src` (folder, tar archive or hub repo id) to a dataset root; temporary files go on exit."""
    path = Path(src).expanduser()
    if path.is_dir():
        yield find_dataset_root(path)
        return
    if path.is_file():
        archive = path
    elif path.exists():
        raise ConversionError(f"--src {src!r} is neither a regular file nor a folder")
    elif _REPO_ID.match(src) and not src.endswith((".tar.gz", ".tgz", ".tar")):
        archive = download_from_hub(src)
    else:
        raise ConversionError(f"--src {src!r} does not exist")
    if tmp_dir is not None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ucf101-", dir=tmp_dir) as tmp:
        safe_extract(archive, Path(tmp))
        yield find_dataset_root(Path(tmp))


# --------------------------------------------------------------------------------------------- conversion


def list_videos(root: Path) -> dict[str, list[Video]]:
    """The videos of every split folder present under `root`, numbered across splits in SPLITS order.

    Within a split: class folders in sorted order, then `.avi` files (suffix in any case) in sorted order.
    """
    videos: dict[str, list[Video]] = {}
    index = 0
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        videos[split] = []
        for class_dir in sorted(child for child in split_dir.iterdir() if child.is_dir()):
            for path in sorted(class_dir.iterdir()):
                if path.is_file() and path.suffix.lower() == VIDEO_SUFFIX:
                    videos[split].append(Video(split=split, label=class_dir.name, path=path, index=index))
                    index += 1
    return videos


def build_prompt(class_names: Sequence[str]) -> str:
    """The cookbook's user turn: the sorted class names joined by ', '."""
    return PROMPT_TEMPLATE.format(classes=", ".join(sorted(class_names)))


def make_record(video: Video, num_images: int, prompt: str) -> dict[str, Any]:
    """One jsonl sample, keys in the cookbook's order."""
    return {
        "id": video.sample_id,
        "source": SOURCE,
        "conversations": [
            {
                "images": [f"{video.image_prefix}.{i}.jpg" for i in range(num_images)],
                "user": prompt,
                "assistant": video.label,
            }
        ],
    }


def convert(
    root: Path,
    out_dir: Path,
    num_frames: int = 8,
    splits: Sequence[str] | None = None,
    progress: bool = True,
) -> ConversionSummary:
    """Convert the dataset under `root` (split/Class/video.avi) into `out_dir` (see the module docstring).

    `splits` defaults to every split folder present; asking for one that is absent is an error.
    """
    if num_frames < 1:
        raise ConversionError(f"--num_frames must be at least 1, got {num_frames}")
    videos = list_videos(root)
    if not videos:
        raise ConversionError(f"{root} has no split folders ({', '.join(s + '/' for s in SPLITS)})")
    selected = [split for split in SPLITS if split in set(splits)] if splits else list(videos)
    missing = [split for split in selected if split not in videos]
    if missing:
        raise ConversionError(f"{root} has no {', '.join(s + '/' for s in missing)} folder")
    classes = sorted({video.label for split_videos in videos.values() for video in split_videos})
    if not classes:
        raise ConversionError(f"no {VIDEO_SUFFIX} videos under {root}/<split>/<Class>/")
    prompt = build_prompt(classes)
    image_root = out_dir / "images"
    try:
        image_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError(f"cannot create the output folder {image_root} ({exc})") from exc

    summary = ConversionSummary()
    for split in selected:
        records = []
        bar = tqdm(videos[split], desc=f"ucf101 {split}", unit="video", disable=None if progress else True)
        for video in bar:
            try:
                frames = read_frames(video.path, num_frames)
            except VideoDecodeError as exc:
                logger.warning("skipping a video: %s", exc)
                summary.skipped.append(video.path)
                continue
            try:
                (image_root / video.image_prefix).parent.mkdir(parents=True, exist_ok=True)
                for i, frame in enumerate(frames):
                    frame.save(image_root / f"{video.image_prefix}.{i}.jpg")
            except OSError as exc:  # disk full, permissions: stop, naming the file
                raise ConversionError(f"cannot write the frames of {video.path} under {image_root} ({exc})") from exc
            summary.frames_written += len(frames)
            records.append(make_record(video, len(frames), prompt))
        atomic_write_text(out_dir / f"ucf101_{split}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        summary.videos[split] = len(records)
    return summary


# --------------------------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m phi3v_recipes.convert.ucf101",
        description="Convert UCF-101 videos into jsonl samples of evenly spaced JPEG frames.",
    )
    parser.add_argument(
        "--src",
        required=True,
        help=f"a {ARCHIVE_ROOT}/ folder (train/, val/, test/ of class folders of {VIDEO_SUFFIX} videos), "
        f"the {HUB_FILENAME} archive, or a hub dataset repo id (the cookbook uses {HUB_REPO_ID})",
    )
    parser.add_argument("--out_dir", required=True, type=Path, help="where images/ and the jsonl files go")
    parser.add_argument(
        "--num_frames", type=_positive_int, default=8, help="frames kept per video (default 8)"
    )
    parser.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=None, help="splits to convert (default: all present)"
    )
    parser.add_argument(
        "--tmp_dir", type=Path, default=None, help="where to extract an archive (default: the system's temp)"
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def _configure_logging() -> None:
    """Show this package's warnings on stderr, unless the application has set up logging itself.

    Only the package's logger gets a handler (once), so libraries that print their own warnings
    (huggingface_hub) are not echoed a second time through the root logger.
    """
    if logging.getLogger().handlers or _PACKAGE_LOGGER.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    _PACKAGE_LOGGER.addHandler(handler)
    _PACKAGE_LOGGER.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (0 on success, 1 on unusable input)."""
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        with logging_redirect_tqdm(loggers=[_PACKAGE_LOGGER]), open_source(args.src, args.tmp_dir) as root:
            summary = convert(root, args.out_dir, args.num_frames, args.splits, progress=not args.no_progress)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.line())
    if summary.total_videos == 0:
        print("error: no video could be converted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
