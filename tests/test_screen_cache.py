"""The pre-training screen at scale (data/screen_cache.py): a relaunch reads the verdicts kept in the run
directory instead of decoding again, a touched image or a changed setting is screened again, and the first screen
is shared across ranks and processes with every rank keeping the same samples."""

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from phi3v_recipes.data.check import screen
from phi3v_recipes.data.jsonl import read_jsonl
from phi3v_recipes.data.screen_cache import CACHE_FILE, SCREEN_FORMAT, ScreenCache, screen_workers
from phi3v_recipes.model.tiny import build_tiny_processor
from tests.conftest import read_metrics, run_cli

COLORS = ("red", "green", "blue", "yellow", "purple", "black")


def write_data(root: Path) -> Path:
    """root/images/<color>.png and root/train.jsonl: 6 samples, one per image, the 6th reusing the 1st's id, plus
    one whose image (absent.png) does not exist; root/eval.jsonl: 2 samples sharing one id."""
    (root / "images").mkdir(parents=True)
    for k, color in enumerate(COLORS):
        Image.new("RGB", (40 + 8 * k, 64 - 4 * k), color).save(root / "images" / f"{color}.png")
    rows = [{"id": f"s-{k % 5}", "conversations": [{"images": [f"{color}.png"], "user": "What color is it?",
                                                     "assistant": color}]} for k, color in enumerate(COLORS)]
    rows.append({"id": "absent", "conversations": [{"images": ["absent.png"], "user": "What color is it?",
                                                    "assistant": "white"}]})
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps({**row, "id": "e"}) + "\n" for row in rows[:2]))
    return root


def train_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["task=jsonl", "model=tiny", "hardware=cpu", f"task.train_file={root / 'train.jsonl'}",
            f"task.eval_file={root / 'eval.jsonl'}", f"task.image_root={root / 'images'}", "data.num_crops=1",
            "data.num_workers=0", "train.global_batch_size=2", "train.batch_size=1", "train.save_steps=1",
            "optim.warmup_steps=0", "eval.before=false", "eval.after=false", "report_to=none",
            f"run.output_dir={run_dir}", *extra]


def screen_lines(log: Path, what: str = "training") -> list[str]:
    """The screen's log lines about the `what` data, oldest first (train.log keeps every launch's)."""
    return [line.split(" - ", 1)[1] for line in log.read_text().splitlines()
            if f"screen of the {what} data:" in line]


def test_first_screen_is_shared_across_two_ranks(tmp_path):
    """Under torchrun with 2 ranks each rank screens its half of the samples (with its own processes), the
    verdicts are shared, and both ranks keep the same samples in the same order (same count and ids digest),
    dropping the same bad one; rank 0 alone writes the cache and warns about repeated ids (count and first few)."""
    root = write_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    out = run_cli(train_args(root, run_dir, "data.on_error=skip", "data.screen_workers=2", "train.max_steps=1",
                             "eval.after=true", "eval.max_new_tokens=2"), cwd=tmp_path, torchrun_procs=2)
    assert out.returncode == 0, out.stderr[-3000:]
    (rank0,), (rank1,) = screen_lines(run_dir / "train.log"), screen_lines(run_dir / "train.rank1.log")
    assert rank0.startswith("screen of the training data: 7 samples, 0 from cache, 7 screened in ")
    assert "(2 rank(s); this one screened 4 with 2 process(es)); 6 usable" in rank0
    assert "(2 rank(s); this one screened 3 with 2 process(es)); 6 usable" in rank1
    assert rank0.split("; ")[-1] == rank1.split("; ")[-1]  # "6 usable (ids digest ...)": the same samples
    assert screen_lines(run_dir / "train.log", "held-out")[0].split("; ")[-1].startswith("2 usable")
    skipped = (run_dir / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and "(id absent): image" in skipped[0] and "does not exist" in skipped[0]
    assert read_metrics(run_dir)["train_samples"] == 6
    log = (run_dir / "train.log").read_text()
    assert ("the training data repeats 1 sample id(s), 2 samples in all: 's-0' at "
            f"{root / 'train.jsonl'}:1, {root / 'train.jsonl'}:6.") in log
    assert "the held-out data repeats 1 sample id(s), 2 samples in all: 'e' at " in log
    assert "repeats" not in (run_dir / "train.rank1.log").read_text()
    cached = (run_dir / CACHE_FILE).read_text().splitlines()
    assert json.loads(cached[0]) == {"format": SCREEN_FORMAT} and len(cached) == 1 + 7 + 2


def test_relaunch_reads_the_cache_and_screens_again_what_changed(tmp_path):
    """Launches into one run directory: the first screens everything and stops on the missing image
    (data.on_error=raise); touching one image screens only that one again (the missing image's problem, from the
    cache, stops the run with the same sentence); with the image written and data.num_crops=2 everything is screened
    again and the run trains; a relaunch that resumes it reads every verdict from the cache."""
    root = write_data(tmp_path / "data")
    run_dir = tmp_path / "run"

    def launch(*extra: str):
        return run_cli(train_args(root, run_dir, *extra), cwd=tmp_path)

    first = launch("train.max_steps=1")
    error = first.stderr[first.stderr.index("error: "):]
    assert first.returncode == 2 and error.startswith("error: 1 bad sample(s)") and "absent.png does not" in error
    touched = root / "images" / "red.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    second = launch("train.max_steps=1")
    assert second.returncode == 2 and second.stderr.endswith(error)
    Image.new("RGB", (30, 30), "white").save(root / "images" / "absent.png")
    trained = launch("train.max_steps=1", "data.num_crops=2")
    assert trained.returncode == 0, trained.stderr[-3000:]
    resumed = launch("train.max_steps=2", "data.num_crops=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    counts = [re.match(r"screen of the training data: 7 samples, (\d+) from cache, (\d+) screened", line).groups()
              for line in screen_lines(run_dir / "train.log")]
    assert counts == [("0", "7"), ("6", "1"), ("0", "7"), ("7", "0")]
    assert "resuming from" in (run_dir / "train.log").read_text()
    assert read_metrics(run_dir)["train_samples"] == 7


def test_cache_and_workers_give_the_plain_screens_verdicts(tmp_path):
    """In-process: two screening processes give `check.screen`'s samples and problems in order, the token
    counts match the header-based `sample_length`, a second ScreenCache on the same directory reads them all, and
    a changed processor setting (num_crops) or an edited image misses the cache."""
    from phi3v_recipes.data.lengths import sample_lengths

    root = write_data(tmp_path / "data")
    samples, _ = read_jsonl(root / "train.jsonl", root / "images")
    processor = build_tiny_processor(num_crops=1)
    plain = screen(samples, processor, None, "skip")
    with ScreenCache(tmp_path, processor, None, None, workers=2) as cache:
        kept, problems, lengths = cache.screen("training", samples, "skip")
    assert (kept, problems) == plain and lengths == sample_lengths(kept, processor)
    with ScreenCache(tmp_path, processor, None, None, workers=1) as cache:
        verdicts, how = cache.verdicts(samples)
    assert how.startswith("7 samples, 7 from cache, 0 screened") and [p for _, p in verdicts] == [
        [] if s in kept else [problems[0]] for s in samples]
    Image.new("RGB", (50, 10), "red").save(root / "images" / "red.png")  # same name, other size
    with ScreenCache(tmp_path, build_tiny_processor(num_crops=4), None, None) as cache:
        assert cache.verdicts(samples)[1].startswith("7 samples, 0 from cache, 7 screened")
    with ScreenCache(tmp_path, processor, None, None) as cache:  # the num_crops=4 launch rewrote the cache
        assert cache.verdicts(samples)[1].startswith("7 samples, 0 from cache, 7 screened")
    with ScreenCache(tmp_path, processor, None, None) as cache:
        verdicts, how = cache.verdicts(samples)
    assert how.startswith("7 samples, 7 from cache") and verdicts[0][0] == sample_lengths(samples[:1], processor)[0]


@pytest.mark.parametrize(("env", "expected"), [({}, 8), ({"LOCAL_WORLD_SIZE": "2"}, 4),
                                               ({"LOCAL_WORLD_SIZE": "16"}, 1)])
def test_screen_workers_default_to_this_ranks_share_of_the_cores(monkeypatch, env, expected):
    """data.screen_workers=null: the cores this process may run on, divided among the ranks of its node."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert screen_workers(None) == expected and screen_workers(3) == 3


def test_an_unreadable_or_older_cache_is_ignored(tmp_path, caplog):
    """A damaged cache file (or one of another SCREEN_FORMAT) costs a new screen, never a wrong verdict or a
    crash; the damaged one is named in the log."""
    root = write_data(tmp_path / "data")
    samples, _ = read_jsonl(root / "train.jsonl", root / "images")
    processor = build_tiny_processor(num_crops=1)
    with ScreenCache(tmp_path, processor, None, None, workers=1) as cache:
        cache.verdicts(samples)
    text = (tmp_path / CACHE_FILE).read_text()
    torn = text[: text.index("\n", len(text) // 2) + 10]  # a line cut in its middle
    for damaged in (torn, text.replace(f'{{"format": {SCREEN_FORMAT}}}', f'{{"format": {SCREEN_FORMAT - 1}}}')):
        (tmp_path / CACHE_FILE).write_text(damaged)
        with ScreenCache(tmp_path, processor, None, None, workers=1) as cache:
            assert cache.verdicts(samples)[1].startswith("7 samples, 0 from cache, 7 screened")
    assert f"screen: {tmp_path / CACHE_FILE} cannot be read" in caplog.text
    assert (tmp_path / CACHE_FILE).read_text() == text  # rewritten whole
