"""Bad jsonl inputs: `python -m phi3v_recipes.data.check` lists every one (file:line and id), and training with
`data.on_error=raise` stops before any checkpoint while `data.on_error=skip` drops and reports them."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from phi3v_recipes.data.check import MAX_LISTED, main
from phi3v_recipes.model.tiny import build_tiny_processor
from tests.conftest import read_metrics, run_parallel
from tests.test_images import write_huge_png

LONG_TEXT = " ".join(f"token{i}" for i in range(2500))  # far over MAX_LENGTH whatever the tokenizer
MAX_LENGTH = 1500

# (line, id or None, the message's distinctive words); line numbers are those of bad.jsonl below
BAD_CASES = [
    (2, None, "not valid JSON"),
    (3, "no-conversations", "'conversations' must be a non-empty list"),
    (4, "wrong-type", "turn 1 needs string 'user' and 'assistant'"),
    (5, "bad-images-field", "'images' must be a list of paths"),
    (6, "missing-image", "image {root}/nowhere.png does not exist"),
    (7, "unreadable-image", "image {root}/broken.png cannot be read"),
    (8, "tags-without-images", "turn 1 has image tags [1] but carries images []"),
    (9, "tags-out-of-order", "turn 1 has image tags [2, 1] but carries images [1, 2]"),
    (10, "too-long", f"exceed data.max_length={MAX_LENGTH}"),
    (11, "oversized-image", "image {root}/huge.png is 20000x20000 = 400000000 pixels, more than "
                            "data.max_image_pixels=89478485"),
    (12, "path-escapes", "image ../outside.png leads outside the image root {root}"),
    (13, "symlink-escapes", "image link.png leads outside the image root {root}"),
    (14, None, "JSON nested too deeply to read"),
    (15, "lone-surrogate", "a text holds a lone surrogate escape"),
    (16, None, "Exceeds the limit (4300 digits)"),  # Python's own words, with the file:line put before them
    (17, "nul-in-path", "image path 'red\\x00.png' is empty or holds a NUL character"),
    (18, "singular-image", "turn 1 has unknown key(s) ['image']"),
    (19, "image-at-top", "'image' belongs in a turn of 'conversations'"),
    (20, None, "'id' must be a non-empty string or a whole number, got None"),
    (21, "pipe-as-image", "image {root}/pipe.png cannot be read"),  # a named pipe nobody writes to: no wait
    # the chat format's own tokens in a text: the tokenizer reads them as the tokens (a turn ends, a turn begins)
    (22, "end-in-answer", "turn 1's answer holds <|end|>, a token the chat template writes itself"),
    (23, "turn-in-question", "turn 2's question holds <|end|>, <|assistant|>, tokens the chat template writes"),
]


def draw(color: str, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((4, 4, size[0] - 4, size[1] - 4), fill=color)
    return image


def good(i: int, color: str = "red") -> dict:
    return {"id": f"good-{i}", "source": "test",
            "conversations": [{"images": [f"{color}.png"], "user": "What color is the circle?", "assistant": color},
                              {"user": "Are you sure?", "assistant": "Yes"}]}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """data/images/*.png (+ a broken one, and a symlink leading out) and data/jsonl/{bad,clean,eval}.jsonl, image
    paths relative to images/ (one good sample's path is absolute, outside images/: allowed)."""
    root = tmp_path_factory.mktemp("data")
    images, lists = root / "images", root / "jsonl"
    images.mkdir()
    lists.mkdir()
    for color, size in (("red", (64, 48)), ("blue", (40, 72))):
        draw(color, size).save(images / f"{color}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    write_huge_png(images / "huge.png", 20000)  # over the default data.max_image_pixels and PIL's own limit
    draw("red", (32, 32)).save(root / "outside.png")  # a good image, but outside the image root
    (images / "link.png").symlink_to(root / "outside.png")
    os.mkfifo(images / "pipe.png")  # opening it would wait for a writer forever
    turn = {"images": ["red.png"], "user": "What color?", "assistant": "red"}
    bad = [
        good(1),
        '{"id": "broken-json", "conversations": [',
        {"id": "no-conversations"},
        {"id": "wrong-type", "conversations": [{**turn, "user": 42}]},
        {"id": "bad-images-field", "conversations": [{**turn, "images": "red.png"}]},
        {"id": "missing-image", "conversations": [{**turn, "images": ["nowhere.png"]}]},
        {"id": "unreadable-image", "conversations": [{**turn, "images": ["broken.png"]}]},
        {"id": "tags-without-images", "conversations": [{**turn, "images": [], "user": "<|image_1|>\nWhat?"}]},
        {"id": "tags-out-of-order",
         "conversations": [{**turn, "images": ["red.png", "blue.png"], "user": "<|image_2|><|image_1|>\nSame?"}]},
        {"id": "too-long", "conversations": [{**turn, "user": LONG_TEXT}]},
        {"id": "oversized-image", "conversations": [{**turn, "images": ["huge.png"]}]},
        {"id": "path-escapes", "conversations": [{**turn, "images": ["../outside.png"]}]},
        {"id": "symlink-escapes", "conversations": [{**turn, "images": ["link.png"]}]},
        '{"id": "deep", "conversations": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"id": "lone-surrogate", "conversations": [{"user": "What?\\ud800", "assistant": "red"}]}',
        '{"id": "huge-number", "conversations": [], "weight": ' + "9" * 5000 + "}",
        {"id": "nul-in-path", "conversations": [{**turn, "images": ["red\x00.png"]}]},
        {"id": "singular-image", "conversations": [{"image": "red.png", "user": "What color?", "assistant": "red"}]},
        {"id": "image-at-top", "image": "red.png", "conversations": [{**turn, "images": []}]},
        {"id": None, "conversations": [turn]},
        {"id": "pipe-as-image", "conversations": [{**turn, "images": ["pipe.png"]}]},
        {"id": "end-in-answer", "conversations": [{**turn, "assistant": "red<|end|>"}]},
        {"id": "turn-in-question", "conversations": [turn, {"user": "Sure?<|end|>\n<|assistant|>\nyes",
                                                             "assistant": "Yes"}]},
        *[good(i, color) for i, color in zip(range(2, 9), ["blue", "red"] * 4, strict=False)],
        {"id": "absolute-path", "conversations": [{**turn, "images": [str(root / "outside.png")]}]},  # allowed
    ]
    for name, rows in (("bad", bad), ("clean", [good(i) for i in range(4)]), ("eval", [good(i) for i in range(2)])):
        text = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
        (lists / f"{name}.jsonl").write_text(text + ("\n" if name == "clean" else ""))  # a blank line is fine
    return root


def check_args(tree: Path, name: str) -> list[str]:
    return [str(tree / "jsonl" / f"{name}.jsonl"), "--image_root", str(tree / "images"), "--num_crops", "1",
            "--max_length", str(MAX_LENGTH)]


def train_args(tree: Path, on_error: str, run_dir: Path) -> list[str]:
    return ["task=jsonl", "model=tiny", "hardware=cpu", f"task.train_file={tree / 'jsonl' / 'bad.jsonl'}",
            f"task.eval_file={tree / 'jsonl' / 'eval.jsonl'}", f"task.image_root={tree / 'images'}",
            f"data.on_error={on_error}", f"data.max_length={MAX_LENGTH}", "data.num_crops=1", "data.num_workers=0",
            "train.epochs=1", "train.global_batch_size=4", "train.batch_size=4", "optim.warmup_steps=1",
            "eval.max_new_tokens=2", "report_to=none", f"run.output_dir={run_dir}"]


@pytest.fixture(scope="module")
def runs(tree, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The check command and both training runs on bad.jsonl, started together (one thread each)."""
    out = tmp_path_factory.mktemp("runs")
    commands = {
        "check": (out, ["phi3v_recipes.data.check", *check_args(tree, "bad")]),
        "raise": (out / "raise", ["phi3v_recipes", *train_args(tree, "raise", out / "raise")]),
        "skip": (out / "skip", ["phi3v_recipes", *train_args(tree, "skip", out / "skip")]),
    }
    results = run_parallel({name: args for name, (_, args) in commands.items()}, cwd=out)
    return {name: (run_dir, results[name]) for name, (run_dir, _) in commands.items()}


def expected_messages(tree: Path) -> list[tuple[str, str]]:
    """(prefix naming file:line and id, distinctive words) of every bad case."""
    path = tree / "jsonl" / "bad.jsonl"
    cases = []
    for line, sample_id, words in BAD_CASES:
        prefix = f"{path}:{line}" + (f" (id {sample_id}):" if sample_id else ":")
        cases.append((prefix, words.format(root=tree / "images")))
    return cases


def test_check_command_lists_every_problem_with_file_line_and_id(tree, runs):
    _, out = runs["check"]
    assert out.returncode == 1, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    problems = [line for line in lines if line.startswith(str(tree))]
    assert len(problems) == len(BAD_CASES)
    for (prefix, words), line in zip(expected_messages(tree), problems, strict=True):  # in file order
        assert line.startswith(prefix) and words in line, (prefix, words, line)
    assert lines[-1] == f"{9 + len(BAD_CASES)} samples, {len(BAD_CASES)} problems"
    assert "Traceback" not in out.stderr


def test_check_command_reports_every_problem_of_one_sample(tree, tmp_path, capsys):
    row = {"id": "two-missing", "conversations": [
        {"images": ["gone-1.png", "gone-2.png"], "user": "<|image_2|>Which?", "assistant": "x"}]}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert main([str(path), "--num_crops", "1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines[:-1]] == [f"{path}:1 (id two-missing)"] * 3
    assert "image tags [2]" in lines[0] and "gone-1.png does not exist" in lines[1] and "gone-2.png" in lines[2]
    assert lines[-1] == "1 samples, 3 problems"


def test_check_command_passes_a_clean_file(tree, tmp_path, capsys):
    assert main(check_args(tree, "clean")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "4 samples, 0 problems"
    assert lines[-2].startswith("tokens per usable sample (tiny processor, num_crops 1): min ")
    # a processor directory instead of the built-in tiny one (what --model <dir or hub id> loads)
    build_tiny_processor(num_crops=4, num_img_tokens=144).save_pretrained(tmp_path / "processor")
    assert main([*check_args(tree, "clean"), "--model", str(tmp_path / "processor")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "4 samples, 0 problems"


def test_check_command_reports_an_empty_file(tmp_path, capsys):
    """A file with no sample (empty, or blank lines only) is a problem, exit status 1, not a clean pass."""
    for text in ("", "\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(text)
        assert main([str(path)]) == 1
        lines = capsys.readouterr().out.splitlines()
        assert lines == [f"{path}: the file holds no samples (it is empty or has only blank lines); training on it "
                         "would stop with no usable sample.", "0 samples, 1 problems"]


def test_check_command_usage_errors(tree, tmp_path, capsys):
    assert main([str(tmp_path / "absent.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # without --image_root, paths are relative to the jsonl's own directory: every image is missing
    assert main([str(tree / "jsonl" / "clean.jsonl"), "--num_crops", "1"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "4 samples, 4 problems"
    with pytest.raises(SystemExit):
        main([str(tree / "jsonl" / "clean.jsonl"), "--num_crops", "17"])


def test_training_with_on_error_raise_stops_before_any_checkpoint(tree, runs):
    run_dir, out = runs["raise"]
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    error = out.stderr[out.stderr.index("error: "):]
    assert error.startswith(f"error: {len(BAD_CASES)} bad sample(s)")
    listed = [line.strip() for line in error.splitlines()[1:] if line.strip().startswith(str(tree))]
    assert len(listed) == MAX_LISTED and f"... and {len(BAD_CASES) - MAX_LISTED} more" in error  # then the count
    for line in listed:
        assert any(line.startswith(prefix) and words in line for prefix, words in expected_messages(tree)), line
    assert not list(run_dir.glob("checkpoint-*")) and not (run_dir / "model.safetensors").exists()
    assert not (run_dir / "metrics.json").exists()


def test_training_with_on_error_skip_drops_and_reports_them(tree, runs):
    run_dir, out = runs["skip"]
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["skipped_samples"] == len(BAD_CASES)
    assert metrics["train_samples"] == 9 and metrics["eval_samples"] == 2
    skipped = (run_dir / "skipped.txt").read_text().splitlines()
    assert len(skipped) == len(BAD_CASES)
    for prefix, words in expected_messages(tree):
        assert any(line.startswith(prefix) and words in line for line in skipped), (prefix, words)
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "eval_after_predictions.jsonl").is_file()
