"""Time to first step of a training run on N DocVQA-sized pages, first launch against relaunch (figures in
docs/performance.md):

    .venv/bin/python scripts/startup_bench.py --pages 1000 [--repeats 2] [--screen_workers 1] [--data DIR]
                                              [--output startup.json] [--keep_data] [-- <more overrides>]
    .venv/bin/python scripts/startup_bench.py --pages 600 --screen_only 1,2 --repeats 3    (the screen alone)

Writes N pages (1700x2200 RGB JPEG, ~0.4 MB each, lines of dark "words" on light grey with a little noise:
decoding one takes about as long as a scanned DocVQA page; 64 drawn pages, each file made distinct by a JPEG
comment) and a jsonl with one question per page, into --data (reused when the files are there). Then, per repeat,
in a fresh run directory, two launches of the same command (`task=jsonl model=tiny hardware=cpu data.num_crops=16`,
batch 1, no evaluation): the first launch gets SIGTERM once its first step is logged (it finishes the step under
way, saves a checkpoint and exits 143, like a preempted job), then the same command relaunched resumes from that
checkpoint and is stopped the same way. For each launch: the seconds from starting the process to its first step's log line, the screen's own log
line, and the exit code. With --screen_only, the first screen alone is timed in this process, with each process
count in turn. The data is removed at the end unless --keep_data.
"""

import argparse
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PAGE_SIZE = (1700, 2200)
STAMP = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[phi3v_recipes\]\[INFO\] - "
STAMP_FORMAT = "%Y-%m-%d %H:%M:%S,%f"
DISTINCT_PAGES = 64


def draw_page(seed: int) -> bytes:
    """A DocVQA-sized page as JPEG bytes: lines of dark word boxes on light grey with a little scan noise."""
    rng = random.Random(seed)
    width, height = PAGE_SIZE
    image = Image.new("L", PAGE_SIZE, 250)
    pen = ImageDraw.Draw(image)
    y = 150
    while y < height - 150:
        x, line_height = 120, rng.randint(14, 22)
        while x < width - 120:
            word = rng.randint(20, 120)
            pen.rectangle((x, y, min(x + word, width - 120), y + line_height), fill=rng.randint(10, 60))
            x += word + rng.randint(10, 20)
        y += line_height + rng.randint(14, 40)
    noise = np.random.default_rng(seed).integers(0, 4, (height, width), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image) - noise).convert("RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def with_comment(jpeg: bytes, text: str) -> bytes:
    """`jpeg` with a COM segment holding `text` right after its start marker (the pixels are unchanged)."""
    payload = text.encode("ascii")
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def write_data(root: Path, pages: int) -> Path:
    """`root/pages/page-*.jpg` and `root/train-<pages>.jsonl` (one question per page); returns the jsonl."""
    (root / "pages").mkdir(parents=True, exist_ok=True)
    bases = [draw_page(seed) for seed in range(min(pages, DISTINCT_PAGES))]
    rows = []
    for i in range(pages):
        path = root / "pages" / f"page-{i:05d}.jpg"
        if not path.is_file():
            path.write_bytes(with_comment(bases[i % len(bases)], f"page {i}"))
        rows.append({"id": f"page-{i:05d}", "conversations": [
            {"images": [path.name], "user": "<|image_1|>\nWhat is the date on this page? Answer briefly.",
             "assistant": f"March {1 + i % 28}, 19{50 + i % 50}"}]})
    jsonl = root / f"train-{pages}.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return jsonl


def launch(args: list[str], log: Path) -> dict:
    """Run `python -m phi3v_recipes args` until its first step's log line, then SIGTERM it (it checkpoints and
    exits): seconds from the start of the process to that line, and from the run's first log line ("command:",
    once Python, torch and transformers are imported) to it; the screen's log line; the exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "phi3v_recipes", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    first_step, screen, stamps = None, None, {}
    with log.open("w") as out:
        for line in proc.stdout:
            out.write(line)
            if "screen of the training data" in line:
                screen = line.split(" - ", 1)[-1].strip()
            if command := re.search(STAMP + "command: ", line):
                stamps["command"] = command.group(1)
            if first_step is None and (step := re.search(STAMP + r"step \d+/\d+: loss", line)):
                first_step, stamps["step"] = time.perf_counter() - start, step.group(1)
                proc.send_signal(signal.SIGTERM)  # the line may follow a progress bar on the same line
    code = proc.wait()
    logged = None
    if len(stamps) == 2:
        logged = (datetime.strptime(stamps["step"], STAMP_FORMAT)
                  - datetime.strptime(stamps["command"], STAMP_FORMAT)).total_seconds()
    return {"to_first_step_s": None if first_step is None else round(first_step, 2),
            "log_to_first_step_s": None if logged is None else round(logged, 2), "screen": screen,
            "exit_code": code, "log": str(log)}


def screen_only(jsonl: Path, pages: Path, workers: list[int], repeats: int) -> list[dict]:
    """The first screen alone, in this process: `ScreenCache.verdicts` of every page with each worker count in
    turn (A B A B ..., so that a drift in the machine's load touches both alike), each time without a cache."""
    from phi3v_recipes.data.jsonl import read_jsonl
    from phi3v_recipes.data.screen_cache import ScreenCache
    from phi3v_recipes.model.tiny import build_tiny_processor

    samples, _ = read_jsonl(jsonl, pages)
    processor = build_tiny_processor(num_crops=16, num_img_tokens=144)
    rounds = []
    for _ in range(repeats):
        seconds = {}
        for count in workers:
            with tempfile.TemporaryDirectory() as empty:
                cache = ScreenCache(Path(empty), processor, None, 89478485, workers=count, write=False)
                start = time.perf_counter()
                cache.verdicts(samples)
                seconds[count] = round(time.perf_counter() - start, 2)
        rounds.append({"seconds": seconds, "load_average": os.getloadavg()})
        print(json.dumps(rounds[-1]), flush=True)
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=1, help="first launch + relaunch pairs, each in a new run")
    parser.add_argument("--screen_workers", default="null", help="data.screen_workers of both launches")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "phi3v-startup-bench")
    parser.add_argument("--output", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--keep_data", action="store_true", help="keep the pages and runs for another measure")
    parser.add_argument("--screen_only", default=None, metavar="N,M",
                        help="instead of launches: time the first screen alone with N, then M processes, --repeats "
                             "times (e.g. 1,2)")
    parser.add_argument("overrides", nargs="*", help="more overrides for both launches (after --)")
    opts = parser.parse_args()
    started = time.perf_counter()
    jsonl = write_data(opts.data, opts.pages)
    print(f"{opts.pages} pages in {opts.data} ({time.perf_counter() - started:.0f} s to write)", flush=True)
    if opts.screen_only:
        rounds = screen_only(jsonl, opts.data / "pages", [int(n) for n in opts.screen_only.split(",")], opts.repeats)
        if opts.output:
            opts.output.write_text(json.dumps({"pages": opts.pages, "cores": os.cpu_count(), "rounds": rounds},
                                              indent=2) + "\n")
        if not opts.keep_data:
            shutil.rmtree(opts.data, ignore_errors=True)
        return 0
    results = []
    for repeat in range(opts.repeats):
        run_dir = opts.data / f"run-{opts.pages}-{repeat}"
        shutil.rmtree(run_dir, ignore_errors=True)
        args = ["task=jsonl", "model=tiny", "hardware=cpu", f"task.train_file={jsonl}",
                f"task.image_root={opts.data / 'pages'}", "data.num_crops=16", f"data.screen_workers={opts.screen_workers}", "train.batch_size=1",
                "train.global_batch_size=1", "train.max_steps=4", "train.save_steps=100", "train.logging_steps=1",
                "optim.warmup_steps=0", "eval.before=false", "eval.after=false", "report_to=none",
                f"run.output_dir={run_dir}", *opts.overrides]
        first = launch(args, opts.data / f"first-{opts.pages}-{repeat}.log")
        again = launch(args, opts.data / f"relaunch-{opts.pages}-{repeat}.log")
        ratios = {key: round(again[key] / first[key], 3) if first[key] and again[key] else None
                  for key in ("to_first_step_s", "log_to_first_step_s")}
        results.append({"first_launch": first, "relaunch": again, "ratio": ratios["to_first_step_s"],
                        "log_ratio": ratios["log_to_first_step_s"]})
        print(json.dumps(results[-1], indent=2), flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    summary = {"pages": opts.pages, "page_size": PAGE_SIZE, "screen_workers": opts.screen_workers,
               "cores": os.cpu_count(), "load_average_at_end": load, "results": results}
    if opts.output:
        opts.output.write_text(json.dumps(summary, indent=2) + "\n")
    for pair in results:
        first, again = pair["first_launch"], pair["relaunch"]
        print(f"{opts.pages} pages, to the first step: first launch {first['to_first_step_s']} s, relaunch "
              f"{again['to_first_step_s']} s (ratio {pair['ratio']}); from the first log line "
              f"{first['log_to_first_step_s']} s and {again['log_to_first_step_s']} s (ratio {pair['log_ratio']})")
    if not opts.keep_data:
        shutil.rmtree(opts.data, ignore_errors=True)
    return 0 if all(p["ratio"] is not None for p in results) else 1


if __name__ == "__main__":
    sys.exit(main())
