"""Which samples share a training step: padding-free packed rows, or length-grouped padded batches.

Both work on token counts known before training (`data/lengths.py`: image headers + the HD token formula +
tokenized text; no pixel is decoded) and are batch samplers: each item they yield is the list of dataset indices of
one per-device micro-batch. Their order is a pure function of `(seed, epoch)`, so the `Trainer`'s mid-epoch resume
(which skips the first batches of the epoch) lands on the right samples, and every rank computes the same plan;
`accelerate` deals micro-batches to ranks (rank r takes micro-batches r, r + world, ...).

- `pack_rows(lengths, max_tokens)`: whole samples (never split) placed into rows of at most `max_tokens` tokens,
  best-fit decreasing (fills rows to ~99%; `row_fill` measures it). A sample longer than the budget is a
  ConfigError naming it.
- `PackedBatchSampler(lengths, max_tokens_per_row, rows_per_batch=1, seed=0)`: the rows of `pack_rows` (planned
  once, so every epoch has the same number of micro-batches), in an order shuffled per `(seed, epoch)`; one
  micro-batch is `rows_per_batch` consecutive rows. `PackingCollator` (`data/collate.py`) turns it into one
  padding-free sequence.
- `LengthGroupedBatchSampler(lengths, batch_size, seed=0, group_batches=50)`: per epoch a shuffled order, cut into
  groups of `group_batches * batch_size` samples; each group sorted by length and cut into batches; the batches
  shuffled (a smaller last batch stays last). Padded batches then hold samples of similar length (`PaddingCollator`).
- `padding_fraction(batches, lengths)`: share of the tokens of right-padded batches that is padding.
- `row_fill(rows, lengths, max_tokens)`: share of the packed rows' token budget that holds sample tokens.

Under DDP, when the micro-batches of an epoch do not divide evenly among the ranks, accelerate gives the last ranks
the epoch's first micro-batches again (every rank takes the same number of steps). A packed row can exceed its
budget only when data.on_error=skip replaced a sample that failed while training by a longer one.

Both samplers take `epoch_fn`, a callable returning the current epoch, read when an epoch's iteration starts
(the recipe's trainer passes its state's epoch, which is right after a resume as well); without it, `set_epoch`
sets the epoch.
"""

import bisect
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from phi3v_recipes.errors import ConfigError

__all__ = [
    "LengthGroupedBatchSampler",
    "PackedBatchSampler",
    "pack_rows",
    "padding_fraction",
    "row_fill",
]


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch)])


def pack_rows(lengths: Sequence[int], max_tokens: int, names: Sequence[str] | None = None) -> list[list[int]]:
    """Indices of `lengths` grouped into rows whose lengths sum to at most `max_tokens` (best-fit decreasing).

    Deterministic: ties are broken by index. Each index appears in exactly one row; within a row, indices are in
    increasing order. `names[i]` (e.g. a sample's file:line and id) names an item that cannot fit.
    """
    if max_tokens < 1:
        raise ConfigError(f"data.max_tokens_per_row={max_tokens}: choose a positive token budget per packed row.")
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i = too_long[0]
        who = names[i] if names is not None else f"training item {i}"
        raise ConfigError(
            f"{who} has {lengths[i]} tokens, more than data.max_tokens_per_row={max_tokens} "
            f"({len(too_long)} such sample(s)); raise data.max_tokens_per_row, or set data.max_length={max_tokens} "
            "with data.on_error=skip to drop longer samples."
        )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row number), sorted: best fit = first with enough room
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            room, row = max_tokens - n, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= n
        bisect.insort(free, (room, row))
    return [sorted(row) for row in rows]


class PackedBatchSampler(Sampler[list[int]]):
    """Micro-batches of packed rows (see the module docstring); `len()` is the same for every epoch."""

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens_per_row: int,
        rows_per_batch: int = 1,
        seed: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        names: Sequence[str] | None = None,
    ):
        if rows_per_batch < 1:
            raise ConfigError(f"rows per micro-batch (train.batch_size={rows_per_batch}) must be >= 1.")
        self.lengths = [int(n) for n in lengths]
        self.max_tokens_per_row, self.rows_per_batch, self.seed = max_tokens_per_row, rows_per_batch, seed
        self.rows = pack_rows(self.lengths, max_tokens_per_row, names)
        self.epoch, self.epoch_fn = 0, epoch_fn
        self.batch_size = None  # micro-batches hold varying sample counts (what accelerate's sharding reads)
        self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of `epoch`, in order."""
        order = _rng(self.seed, epoch).permutation(len(self.rows))
        k = self.rows_per_batch
        return [[i for r in order[s : s + k] for i in self.rows[r]] for s in range(0, len(order), k)]

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        yield from self.batches(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.rows_per_batch)


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` samples of similar length (see the module docstring); the last may be smaller."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        group_batches: int = 50,
        epoch_fn: Callable[[], int] | None = None,
    ):
        if batch_size < 1 or group_batches < 1:
            raise ConfigError(
                f"length grouping needs train.batch_size >= 1 and data.length_group_batches >= 1, got {batch_size} "
                f"and {group_batches}."
            )
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.group_batches = batch_size, seed, group_batches
        self.epoch, self.epoch_fn = 0, epoch_fn
        self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of `epoch`, in order."""
        rng = _rng(self.seed, epoch)
        order = rng.permutation(len(self.lengths))
        group = self.group_batches * self.batch_size
        batches = []
        for s in range(0, len(order), group):
            chunk = order[s : s + group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[b : b + self.batch_size].tolist() for b in range(0, len(chunk), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        # Full batches in random order; the one smaller batch (if any) last, where DDP sharding expects it.
        return [full[i] for i in rng.permutation(len(full))] + [b for b in batches if len(b) < self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        yield from self.batches(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Padding tokens / all tokens when each batch is right-padded to its longest sample."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return 1.0 - real / padded if padded else 0.0


def row_fill(rows: Sequence[Sequence[int]], lengths: Sequence[int], max_tokens: int) -> float:
    """Sample tokens / (rows x max_tokens): how full the packed rows are."""
    return sum(lengths[i] for r in rows for i in r) / (len(rows) * max_tokens) if rows else 0.0
