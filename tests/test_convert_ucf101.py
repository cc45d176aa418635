"""The UCF-101 converter on small videos encoded here with PyAV.

Frame k of every test video shows k in binary as five vertical bars (bar b white when bit b of k is set),
which survives mpeg4 and JPEG compression, so the test can read back which frames were kept.
"""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")

from phi3v_recipes.convert import ucf101  # noqa: E402  (after the PyAV check)

WIDTH, HEIGHT, BAR = 64, 48, 12
PROMPT = "Classify the video into one of the following classes: ApplyLipstick, Basketball, Biking."
# split -> class -> [(video stem, frame count)]; class names deliberately not in sorted order
TREE = {
    "train": {
        "Biking": [("v_Biking_g01_c01", 16)],
        "ApplyLipstick": [("v_ApplyLipstick_g01_c02", 13), ("v_ApplyLipstick_g01_c01", 20)],
        "Basketball": [("v_Basketball_g02_c01", 8)],
    },
    "val": {
        "Basketball": [("v_Basketball_g09_c01", 12)],
        "Biking": [("v_Biking_g09_c03", 17)],
    },
}
# numbering: train in (class, file) order, then val
EXPECTED_ORDER = [
    ("train", "ApplyLipstick", "v_ApplyLipstick_g01_c01", 20),
    ("train", "ApplyLipstick", "v_ApplyLipstick_g01_c02", 13),
    ("train", "Basketball", "v_Basketball_g02_c01", 8),
    ("train", "Biking", "v_Biking_g01_c01", 16),
    ("val", "Basketball", "v_Basketball_g09_c01", 12),
    ("val", "Biking", "v_Biking_g09_c03", 17),
]


def encode_video(path: Path, num_frames: int) -> None:
    """An mpeg4 .avi whose frame k shows k in binary (see the module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for k in range(num_frames):
            pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            for bit in range(5):
                if k >> bit & 1:
                    pixels[:, bit * BAR + 2 : (bit + 1) * BAR] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_number(jpeg: Path) -> int:
    """Read back the frame index a JPEG written by the converter shows."""
    grey = np.asarray(Image.open(jpeg).convert("L"), dtype=float)
    return sum(1 << bit for bit in range(5) if grey[:, bit * BAR + 5 : bit * BAR + 9].mean() > 128)


def make_tree(root: Path) -> Path:
    for split, classes in TREE.items():
        for label, videos in classes.items():
            for stem, frames in videos:
                encode_video(root / split / label / f"{stem}.avi", frames)
    (root / "train" / "README.txt").write_text("stray files beside class folders are ignored")
    return root


def make_tar(tree: Path, archive: Path, arcname: str = "UCF101_subset") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=arcname)
    return archive


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("src") / "UCF101_subset")


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory) -> tuple[Path, str]:
    """The tree converted once through main(); returns the output folder and what main printed."""
    out_dir = tmp_path_factory.mktemp("out")
    capture = io.StringIO()
    stdout, sys.stdout = sys.stdout, capture
    try:
        assert ucf101.main(["--src", str(tree), "--out_dir", str(out_dir), "--no_progress"]) == 0
    finally:
        sys.stdout = stdout
    return out_dir, capture.getvalue()


def test_frame_indices_reproduce_the_cookbook_rule():
    # 13 frames: 13 * k / 8 = 0, 1.625, 3.25, 4.875, 6.5, 8.125, 9.75, 11.375 -> floor
    assert ucf101.frame_indices(13, 8) == [0, 1, 3, 4, 6, 8, 9, 11]
    assert ucf101.frame_indices(8, 8) == list(range(8))
    for total in range(8, 3000):  # the cookbook: np.arange(0, total, total / 8).astype(int)
        assert ucf101.frame_indices(total, 8) == np.arange(0, total, total / 8).astype(int).tolist()
    with pytest.raises(ValueError, match="cannot pick 8 distinct frames from 5"):
        ucf101.frame_indices(5, 8)


def test_layout_and_kept_frames(converted):
    out_dir, printed = converted
    images = out_dir / "images"
    expected = {
        f"{split}/{label}/{stem}.{i}.jpg" for split, label, stem, _ in EXPECTED_ORDER for i in range(8)
    }
    written = {str(p.relative_to(images)) for p in images.rglob("*") if p.is_file()}
    assert written == expected
    assert sorted(p.name for p in out_dir.iterdir()) == ["images", "ucf101_train.jsonl", "ucf101_val.jsonl"]
    for split, label, stem, total in EXPECTED_ORDER:
        kept = [frame_number(images / split / label / f"{stem}.{i}.jpg") for i in range(8)]
        assert kept == [k * total // 8 for k in range(8)], (stem, kept)
    with Image.open(images / "val/Biking/v_Biking_g09_c03.0.jpg") as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (WIDTH, HEIGHT))
    assert printed.strip().splitlines()[-1] == "ucf101: train 4 videos, val 2 videos; 48 frames written"


def test_jsonl_contents(converted):
    out_dir, _ = converted
    records = read_jsonl(out_dir / "ucf101_train.jsonl") + read_jsonl(out_dir / "ucf101_val.jsonl")
    assert len(records) == len(EXPECTED_ORDER)
    for index, (record, (split, label, stem, _)) in enumerate(zip(records, EXPECTED_ORDER, strict=True)):
        assert record == {
            "id": f"{split}-{index:010d}",  # the running index continues from train into val
            "source": "ucf101",
            "conversations": [
                {
                    "images": [f"{split}/{label}/{stem}.{i}.jpg" for i in range(8)],
                    "user": PROMPT,
                    "assistant": label,
                }
            ],
        }
        for image in record["conversations"][0]["images"]:
            assert (out_dir / "images" / image).is_file()
    # the cookbook's serialisation: json.dumps defaults, key order id, source, conversations
    first_line = (out_dir / "ucf101_val.jsonl").read_text().splitlines()[0]
    assert first_line.startswith('{"id": "val-0000000004", "source": "ucf101", "conversations": [{"images": [')
    assert first_line.endswith(f'"user": "{PROMPT}", "assistant": "Basketball"}}]}}')


def test_tar_gz_source_through_python_m(tree, converted, tmp_path):
    """`python -m phi3v_recipes.convert.ucf101` on the archive gives the same output as the folder."""
    archive = make_tar(tree, tmp_path / "UCF101_subset.tar.gz")
    out_dir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "phi3v_recipes.convert.ucf101", "--src", str(archive), "--out_dir", str(out_dir),
         "--tmp_dir", str(tmp_path / "tmp")],
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ucf101: train 4 videos, val 2 videos; 48 frames written"
    folder_out, _ = converted
    for name in ("ucf101_train.jsonl", "ucf101_val.jsonl"):
        assert (out_dir / name).read_text() == (folder_out / name).read_text()
    assert len(list((out_dir / "images").rglob("*.jpg"))) == 48
    assert list((tmp_path / "tmp").iterdir()) == []  # the extraction folder is removed


def test_hub_repo_id_downloads_the_archive(tree, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    archive = make_tar(tree, tmp_path / "UCF101_subset.tar.gz")
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(archive)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert ucf101.main(["--src", ucf101.HUB_REPO_ID, "--out_dir", str(tmp_path / "out"), "--splits", "val"]) == 0
    assert calls == [{"repo_id": "sayakpaul/ucf101-subset", "filename": "UCF101_subset.tar.gz",
                      "repo_type": "dataset"}]
    # only val is written, and its ids still count the train videos before it
    assert [p.name for p in (tmp_path / "out").glob("*.jsonl")] == ["ucf101_val.jsonl"]
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "ucf101_val.jsonl")] == [
        "val-0000000004", "val-0000000005"
    ]


def test_hub_download_failure_is_reported(tmp_path, monkeypatch, capsys):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert ucf101.main(["--src", "someone/ucf101-copy", "--out_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "downloading UCF101_subset.tar.gz from the dataset repo 'someone/ucf101-copy' failed" in err
    assert "offline mode is enabled" in err


def run_failing(argv: list[str], capsys) -> str:
    """Run main(), expect exit status 1, return stderr."""
    assert ucf101.main([*argv, "--no_progress"]) == 1
    return capsys.readouterr().err


def test_missing_source_and_tree_without_splits(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "--src '/no/such/UCF101_subset.tar.gz' does not exist" in run_failing(
        ["--src", "/no/such/UCF101_subset.tar.gz", "--out_dir", out], capsys
    )
    (tmp_path / "flat" / "Biking").mkdir(parents=True)
    (tmp_path / "flat" / "Basketball").mkdir()
    err = run_failing(["--src", str(tmp_path / "flat"), "--out_dir", out], capsys)
    assert f"{tmp_path / 'flat'} has no split folders: expected train/, val/, test/" in err
    not_tar = tmp_path / "videos.tar.gz"
    not_tar.write_bytes(b"not an archive")
    assert f"{not_tar} is not a tar archive" in run_failing(["--src", str(not_tar), "--out_dir", out], capsys)
    with pytest.raises(SystemExit):  # argparse: --src is required
        ucf101.main(["--out_dir", out])


def test_requested_split_must_exist(tree, tmp_path, capsys):
    err = run_failing(["--src", str(tree), "--out_dir", str(tmp_path / "out"), "--splits", "test"], capsys)
    assert f"{tree} has no test/ folder" in err


def test_a_split_without_videos_is_an_error(tmp_path, capsys):
    """Converting nothing is not a success: an empty split folder exits 1 with a message."""
    root = tmp_path / "UCF101_subset"
    (root / "val" / "Empty").mkdir(parents=True)
    err = run_failing(["--src", str(root), "--out_dir", str(tmp_path / "out"), "--splits", "val"], capsys)
    assert "error: no .avi videos under" in err


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("../evil.avi", tarfile.REGTYPE, "whose path contains '..'"),
        ("UCF101_subset/train/../../evil.avi", tarfile.REGTYPE, "whose path contains '..'"),
        ("/tmp/evil.avi", tarfile.REGTYPE, "which has an absolute path"),
        ("UCF101_subset/train/link", tarfile.SYMTYPE, "only regular files and folders are extracted"),
    ],
)
def test_unsafe_archive_members_are_refused(tmp_path, capsys, name, kind, message):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo(name)
        member.type = kind
        if kind == tarfile.SYMTYPE:
            member.linkname = "/etc/passwd"
            tar.addfile(member)
        else:
            member.size = 4
            tar.addfile(member, io.BytesIO(b"evil"))
    err = run_failing(["--src", str(archive), "--out_dir", str(tmp_path / "out"), "--tmp_dir", str(tmp_path / "t")],
                      capsys)
    assert f"{archive}: refusing the member {name!r}" in err and message in err
    assert list((tmp_path / "t").iterdir()) == []
    assert not (tmp_path / "evil.avi").exists()


def test_bad_videos_are_skipped_with_a_warning(tmp_path, caplog, capsys):
    root = tmp_path / "UCF101_subset"
    encode_video(root / "train" / "Biking" / "v_Biking_g01_c01.avi", 9)
    encode_video(root / "train" / "Biking" / "v_Biking_g01_c02.avi", 5)  # too short for 8 frames
    broken = root / "train" / "Diving" / "v_Diving_g01_c01.avi"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"RIFF" + bytes(range(256)) * 4)  # not a decodable video
    out_dir = tmp_path / "out"
    assert ucf101.main(["--src", str(root), "--out_dir", str(out_dir), "--no_progress"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert f"{root}/train/Biking/v_Biking_g01_c02.avi: only 5 decodable frames, 8 needed" in warnings[0]
    assert f"{broken}: cannot decode the video" in warnings[1]
    records = read_jsonl(out_dir / "ucf101_train.jsonl")
    assert [r["id"] for r in records] == ["train-0000000000"]  # the skipped ones keep their numbers (1, 2)
    # the class list comes from the folders' videos, including the undecodable one
    assert records[0]["conversations"][0]["user"].endswith("classes: Biking, Diving.")
    assert capsys.readouterr().out.strip() == (
        "ucf101: train 1 videos; 8 frames written; 2 videos skipped (see the warnings above)"
    )
    assert not list(out_dir.glob(".*.partial"))

    # when nothing at all converts, the command fails
    assert ucf101.main(["--src", str(root), "--out_dir", str(out_dir), "--num_frames", "10"]) == 1
    assert "no video could be converted" in capsys.readouterr().err


def test_num_frames_option(tree, tmp_path):
    out_dir = tmp_path / "out"
    assert ucf101.main(["--src", str(tree), "--out_dir", str(out_dir), "--num_frames", "4", "--splits", "val",
                        "--no_progress"]) == 0
    images = out_dir / "images" / "val" / "Biking"
    # 17 frames, 4 kept: 17 * k / 4 = 0, 4.25, 8.5, 12.75 -> 0, 4, 8, 12
    assert [frame_number(images / f"v_Biking_g09_c03.{i}.jpg") for i in range(4)] == [0, 4, 8, 12]
    with pytest.raises(SystemExit):
        ucf101.main(["--src", str(tree), "--out_dir", str(out_dir), "--num_frames", "0"])


def test_converted_videos_train_and_evaluate_as_the_ucf101_task(converted, tmp_path):
    """The converter's output is the ucf101 task: 8 frames per video as 8 images, trained and evaluated through
    `python -m phi3v_recipes task=ucf101 model=tiny hardware=cpu task.data_dir=<out_dir>`."""
    from tests.conftest import read_metrics, run_cli

    out_dir, _ = converted
    run_dir = tmp_path / "run"
    out = run_cli(["task=ucf101", "model=tiny", "hardware=cpu", "strategy=full", f"task.data_dir={out_dir}",
                   "data.num_crops=1", "data.num_workers=0", "train.epochs=1", "train.global_batch_size=2",
                   "train.batch_size=2", "eval.max_new_tokens=4", f"run.output_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["metric"] == "accuracy" and metrics["eval_samples"] == len(read_jsonl(out_dir / "ucf101_val.jsonl"))
    assert {"eval_before", "eval_after", "train_loss"} <= metrics.keys()
    first = json.loads((run_dir / "eval_after_predictions.jsonl").read_text().splitlines()[0])
    assert first["references"] == [read_jsonl(out_dir / "ucf101_val.jsonl")[0]["conversations"][0]["assistant"]]
