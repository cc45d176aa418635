"""The pre-training screen at scale: its verdicts kept in the run directory, its first pass spread over processes
and ranks.

`check.sample_problems` decodes every image of a sample (tens of milliseconds for a DocVQA page on one core), so
screening a large dataset takes minutes, and every launch of a run (each resume after a preemption) would pay it
again. Here:

- **Kept.** `<run dir>/screen_cache.jsonl` holds, per sample, the verdict (its problem sentences, none when
  usable) and its token count, under a key that hashes everything that decides them:
  - the screen's settings: data.max_length, data.max_image_pixels, the processor's image settings (num_crops,
    num_img_tokens, ...), its tokenizer (vocabulary, special tokens, chat template) and `SCREEN_FORMAT`;
  - the sample: its id, where it came from (file:line) and the texts of its turns, so an edited line of a jsonl
    file is screened again (and only that line);
  - each image's identity: a file's path, size, modification time and inode (a touched or replaced image is
    screened again); an image of a `datasets` row, the dataset's fingerprint and the row.
  A sample whose key is in the cache is not read at all; one with an image held in memory (the demo's) has no key
  and is screened at every launch (nothing is decoded from disk for it). Rank 0 rewrites the file atomically
  after the screen with the verdicts this launch used (after an error, such as bad samples with
  data.on_error=raise, the earlier ones too). An unreadable or foreign cache file is ignored: all is screened.
- **Spread.** Rank r screens the samples r, r + world, ... that the cache does not hold, with
  `data.screen_workers` forked processes (default: the cores this rank may use, shared with the other ranks of
  its node); the verdicts meet in one `all_gather_object`, so every rank keeps the same samples in the same order.
- **Flat memory.** A worker reads one image at a time; what is kept per sample is its key, token count and
  problem sentences, next to the sample list that is in memory anyway.
"""

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from PIL import Image

from phi3v_recipes.data.check import keep_usable, sample_problems
from phi3v_recipes.data.sample import Sample
from phi3v_recipes.files import atomic_write_text

log = logging.getLogger("phi3v_recipes")

CACHE_FILE = "screen_cache.jsonl"
SCREEN_FORMAT = 2  # 2: texts holding the chat format's special tokens are problems
"""Bump when what the screen checks, or how it counts tokens, changes: every cached verdict is then screened again."""

Verdict = tuple[int | None, list[str]]
"""(token count or None, problem sentences): what `check.sample_problems` returns for one sample."""


def screen_workers(setting: int | None) -> int:
    """Processes per rank for the first screen: `setting` (data.screen_workers), or when null the cores this rank
    may use: those it may run on, divided among the ranks of its node (LOCAL_WORLD_SIZE), unless a scheduler
    bound it to cores of its own (affinity narrower than the machine, one rank per task: Slurm's srun). At least 1.
    """
    if setting is not None:
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    bound = cores < (os.cpu_count() or cores) and "TORCHELASTIC_RUN_ID" not in os.environ
    ranks = 1 if bound else max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores // ranks)


def processor_identity(processor: Any) -> dict[str, Any]:
    """What of `processor` decides a sample's token count: the image processor's settings and a digest of the
    tokenizer (its full serialisation when it is a fast one, else its vocabulary) and chat template."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "image_processor": processor.image_processor.to_dict(),
        "tokenizer": type(tokenizer).__name__,
        "tokenizer_digest": hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest(),
        "special_tokens": tokenizer.special_tokens_map,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def image_identity(ref: Any) -> list[Any] | None:
    """What identifies an image reference's content without reading it, or None when nothing does (an image held
    in memory, a loader of unknown kind). A path: itself, its size, modification time and inode (a missing file is
    identified as missing, so that it is screened again once it exists); a dataset row's image: its `identity`."""
    if isinstance(ref, str | Path):
        try:
            stat = os.stat(ref)
        except FileNotFoundError:
            return [str(ref), "missing"]
        except OSError:
            return None
        return [str(ref), stat.st_size, stat.st_mtime_ns, stat.st_ino]
    if isinstance(ref, Image.Image):
        return None
    identity = getattr(ref, "identity", None)
    return identity() if callable(identity) else None


def sample_key(sample: Sample, settings: str) -> str | None:
    """The cache key of `sample` under the screen's `settings` digest, or None when an image has no identity."""
    parts: list[Any] = [settings, sample.id, sample.origin]
    for turn in sample.turns:
        images = [image_identity(ref) for ref in turn.images]
        if any(identity is None for identity in images):
            return None
        parts.append([turn.user, turn.assistant, images])
    text = json.dumps(parts, default=repr, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


# The job of a forked screening process: set before the pool forks, inherited (nothing is pickled but indices).
_JOB: tuple[Sequence[Sample], Any, int | None, int | None] | None = None


def _screen_one(index: int) -> tuple[int, int | None, list[str]]:
    assert _JOB is not None
    samples, processor, max_length, max_pixels = _JOB
    tokens, problems = sample_problems(samples[index], processor, max_length, max_pixels)
    return index, tokens, problems


def _worker_start() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it ends the pool


def screen_indices(samples: Sequence[Sample], indices: Sequence[int], processor: Any, max_length: int | None,
                   max_pixels: int | None, workers: int) -> Iterator[tuple[int, int | None, list[str]]]:
    """(index, token count, problems) of each of `samples[indices]`, screened by `workers` forked processes (in
    this one when 1, or where fork does not exist), in order."""
    global _JOB
    workers = min(workers, len(indices))
    _JOB = (samples, processor, max_length, max_pixels)
    try:
        if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            yield from map(_screen_one, indices)
            return
        with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_start) as pool:
            yield from pool.imap(_screen_one, indices, chunksize=max(1, min(16, len(indices) // (4 * workers))))
    finally:
        _JOB = None


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(local: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        return gathered
    return [local]


def _ids_digest(samples: Sequence[Sample]) -> str:
    return hashlib.blake2b("\n".join(s.id for s in samples).encode("utf-8"), digest_size=4).hexdigest()


def repeated_ids(samples: Sequence[Sample], what: str) -> str | None:
    """One sentence naming the ids that more than one of `samples` carries (how many, the first few with where
    each occurs), or None when every id is distinct."""
    where: dict[str, list[str]] = {}
    for sample in samples:
        where.setdefault(sample.id, []).append(sample.origin or "?")
    repeated = {sample_id: places for sample_id, places in where.items() if len(places) > 1}
    if not repeated:
        return None
    listed = "; ".join(f"{sample_id!r} at {', '.join(places)}" for sample_id, places in list(repeated.items())[:5])
    more = f"; and {len(repeated) - 5} more" if len(repeated) > 5 else ""
    return (f"the {what} data repeats {len(repeated)} sample id(s), {sum(map(len, repeated.values()))} samples in "
            f"all: {listed}{more}. Evaluation, predictions and skipped.txt name samples by id: give each its own.")


class ScreenCache:
    """The pre-training screen of a run, with its verdicts kept in `run_dir` (see the module docstring).

        with ScreenCache(run_dir, processor, max_length, max_pixels, workers, write=rank == 0) as screen:
            train, problems, lengths = screen.screen("training", train, on_error, parse_problems)

    Leaving the block writes the cache (when `write`): the verdicts used by this launch, and after an error (bad
    samples with data.on_error=raise) the earlier ones too, so nothing learned is lost.
    """

    def __init__(self, run_dir: Path, processor: Any, max_length: int | None, max_pixels: int | None,
                 workers: int | None = None, write: bool = True):
        self.path = Path(run_dir) / CACHE_FILE
        self.processor, self.max_length, self.max_pixels = processor, max_length, max_pixels
        self.workers, self.write = screen_workers(workers), write
        settings = {"format": SCREEN_FORMAT, "max_length": max_length, "max_image_pixels": max_pixels,
                    "processor": processor_identity(processor)}
        self.settings = hashlib.blake2b(json.dumps(settings, sort_keys=True, default=repr).encode("utf-8"),
                                        digest_size=16).hexdigest()
        self.earlier = self._read()
        self.used: dict[str, Verdict] = {}

    def _read(self) -> dict[str, Verdict]:
        if not self.path.is_file():
            return {}
        verdicts: dict[str, Verdict] = {}
        try:
            with self.path.open(encoding="utf-8") as lines:
                for line in lines:
                    row = json.loads(line)
                    if "key" in row:
                        verdicts[row["key"]] = (row["tokens"], list(row["problems"]))
                    elif row.get("format") != SCREEN_FORMAT:
                        return {}
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("screen: %s cannot be read (%s); every sample is screened again", self.path, err)
            return {}
        return verdicts

    def __enter__(self) -> "ScreenCache":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if not self.write or not (self.used or self.path.is_file()):
            return
        kept = self.used if exc_type is None else {**self.earlier, **self.used}
        rows = [json.dumps({"format": SCREEN_FORMAT})]
        rows += [json.dumps({"key": key, "tokens": tokens, "problems": problems}, ensure_ascii=False)
                 for key, (tokens, problems) in kept.items()]
        atomic_write_text(self.path, "\n".join(rows) + "\n")

    def verdicts(self, samples: Sequence[Sample]) -> tuple[list[Verdict], str]:
        """(`check.sample_problems` of every sample in order, the same on every rank; how they were found, for the
        log): from the cache where it holds the sample's key, the rest screened, each rank its share (samples rank,
        rank + world, ...) with `workers` processes."""
        start = time.perf_counter()
        rank, world = _rank_and_world()
        mine = range(rank, len(samples), world)
        keys = {i: sample_key(samples[i], self.settings) for i in mine}
        local: dict[int, tuple[str | None, int | None, list[str]]] = {}
        todo = []
        for i in mine:
            key = keys[i]
            if key is not None and key in self.earlier:
                local[i] = (key, *self.earlier[key])
            else:
                todo.append(i)
        from_cache = len(local)
        try:
            for i, tokens, problems in screen_indices(samples, todo, self.processor, self.max_length,
                                                      self.max_pixels, self.workers):
                local[i] = (keys[i], tokens, problems)
            outcome: Any = (local, from_cache, len(todo))
        except Exception as err:  # every rank must reach the gather, or the others wait for it forever
            outcome = err
        shares = _all_gather(outcome)
        for share in shares:
            if isinstance(share, Exception):
                raise share
        verdicts: list[Verdict | None] = [None] * len(samples)
        for share, _, _ in shares:
            for i, (key, tokens, problems) in share.items():
                verdicts[i] = (tokens, problems)
                if key is not None:
                    self.used[key] = (tokens, problems)
        cached, screened = sum(s[1] for s in shares), sum(s[2] for s in shares)
        how = (f"{len(samples)} samples, {cached} from cache, {screened} screened in {time.perf_counter() - start:.1f} s "
               f"({world} rank(s); this one screened {len(todo)} with {min(self.workers, max(1, len(todo)))} "
               "process(es))")
        return verdicts, how  # type: ignore[return-value]

    def screen(self, what: str, samples: Sequence[Sample], on_error: str, errors: Sequence[str] = ()
               ) -> tuple[list[Sample], list[str], list[int]]:
        """(usable samples, problems, token count of each usable sample): `check.screen` with the verdicts of
        `verdicts`, logged with how they were found; `what` names the data ("training", "held-out"). Repeated
        sample ids are logged (rank 0) as a warning."""
        repeated = repeated_ids(samples, what)
        if repeated and _rank_and_world()[0] == 0:
            log.warning("%s", repeated)
        verdicts, how = self.verdicts(samples)
        usable = [not problems for _, problems in verdicts]
        log.info("screen of the %s data: %s; %d usable (ids digest %s)", what, how, sum(usable),
                 _ids_digest([s for s, ok in zip(samples, usable, strict=True) if ok]))
        kept, problems = keep_usable(samples, [problems for _, problems in verdicts], on_error, errors)
        return kept, problems, [tokens for (tokens, _), ok in zip(verdicts, usable, strict=True) if ok]
