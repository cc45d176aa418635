"""Tasks read from Hugging Face datasets: the_cauldron's `nlvr2` and `hateful_memes` (loader `cauldron`) and
DocVQA (loader `docvqa`), as Microsoft's Phi-3CookBook reads them.

Where the data comes from (`task.dataset`, and for DocVQA `task.mini_dataset` / `task.eval_dataset`):

* a hub id: `datasets.load_dataset(id, subset, split=...)`;
* a local copy of the hub repo (a directory `load_dataset(path, subset)` understands, e.g. a clone of
  `HuggingFaceM4/the_cauldron` with its README and parquet files);
* a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (found with
  `datasets.load_from_disk`; `<dir>/<subset>` is tried before `<dir>`, so one folder can hold several cauldron
  configs). A DatasetDict's split is the one the task names (`task.split`, `task.train_split`, ...); a lone
  Dataset is used whatever the split name.

Rows are never decoded up front: the text columns and the image counts are read from Arrow, and each image is
a `DatasetImage`, a zero-argument callable that opens that one image of that row when the sample is encoded
(or checked). A row that cannot become a sample (no image, the wrong number of images, missing or non-string
texts, no reference answers) is a problem naming the dataset, split and row, handled with `data.on_error`
like any other bad sample; an image whose bytes do not decode is caught by the same check before training.

Seed facts (Phi-3CookBook `code/04.Finetuning/vision_finetuning/`):

* `finetune_hf_trainer_nlvr2.py`: `the_cauldron` `nlvr2`, `split=f'train[{eval_size}:]'` for training and
  `train[:{eval_size}]` for evaluation (eval_size 500). Both images go with the first turn as
  `<|image_1|><|image_2|>\\n{user}`; every text of the row is a turn, cauldron's user text kept as is; evaluation
  asks `texts[0]` only and compares `strip().strip('.').lower()`. Rows must have exactly 2 images (asserted).
* `finetune_hf_trainer_hateful_memes.py`: `the_cauldron` `hateful_memes`, the same 500-row holdout of train;
  one image, `texts[0]` only (`<|image_1|>\\n{user}`), for training and evaluation.
* `finetune_hf_trainer_docvqa.py`: evaluation is always on `nielsr/docvqa_1200_examples`, split `test`
  (200 questions): prompt `<|image_1|>\\n{query['en']}\\nAnswer briefly.`, ANLS over the row's `answers`.
  The minimal run trains on the same dataset's `train` split (1000 questions), the answer drawn with
  `random.choice(answers)` each time the row is drawn. `--full_train` trains on `the_cauldron` `docvqa` `train`
  (one row per document, several question/answer texts) with `random.choice(texts)` each time: cauldron's user
  text as is after `<|image_1|>\\n` (no "Answer briefly."), its assistant text as the answer.

The one departure, DocVQA's random choices: the seed draws the answer (mini) or the question/answer pair
(full) anew every time a row is drawn. Here the choice is made once, when the samples are built, with
`random.Random(f"{task.seed}:{row}")`: a fixed function of the seed and the row. Why not a lazily drawn answer:
`Turn` is frozen and its texts are plain strings that three places must agree on: `check` counts the tokens
training will see (the `data.max_length` screen is exact only for a fixed text), `encode` builds the labels,
and the tiny model's tokenizer is trained on the texts. A text drawn at encode time would also depend on
which DataLoader worker, rank and resume point drew it; a fixed choice is the same on every rank, worker and
restart. The cost is small: the mini split's reference answers are mostly spelling variants of one answer,
and a full run sees one question per document per epoch in both cases (the seed a fresh draw each epoch, here
the same one every epoch). `task.per_document: all` trains on every question of every document instead (an
epoch then takes as many steps as the dataset has questions, several per document).
"""

import io
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
from PIL import Image

from phi3v_recipes.data.sample import Sample, Turn
from phi3v_recipes.errors import ConfigError

Loaded = tuple[list[Sample], list[str]]


class DatasetImage:
    """Image `index` of row `row` of a dataset's image column, opened when called (header read, pixels not yet
    decoded: `load_image` checks the size first, then decodes).

    `column` holds a `datasets.Image` (DocVQA's `image`) or a list of them (cauldron's `images`; then `index`
    picks one). Failures raise OSError, which `load_image` reports as an unreadable image.
    """

    __slots__ = ("table", "column", "row", "index", "label")

    def __init__(self, table: datasets.Dataset, column: str, row: int, index: int | None, label: str):
        self.table, self.column, self.row, self.index, self.label = table, column, row, index, label

    def __call__(self) -> Image.Image:
        value = self.table[self.row][self.column][0].as_py()
        if self.index is not None:
            value = value[self.index] if value is not None and self.index < len(value) else None
        if not value or (value.get("bytes") is None and not value.get("path")):
            raise OSError("the row holds no data for this image")
        try:
            return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"])
        except (OSError, ValueError) as err:
            raise OSError(f"{type(err).__name__}: {err}") from None

    def identity(self) -> list:
        """What identifies this image without reading it (the screen cache's key): the dataset's fingerprint
        (which `datasets` derives from its files and the transforms applied), the column, row and index."""
        return [self.table._fingerprint, self.column, self.row, self.index]

    def __repr__(self) -> str:
        return self.label


def _label(source: str, subset: str | None, split: str) -> str:
    return f"{source}:{subset}:{split}" if subset else f"{source}:{split}"


def open_dataset(source: str, subset: str | None, split: str) -> datasets.Dataset:
    """The `split` of `source` (a hub id, a local copy of a hub repo, or a save_to_disk directory)."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        for candidate in ([path / subset] if subset else []) + [path]:
            if not candidate.is_dir():
                continue
            try:
                saved = datasets.load_from_disk(str(candidate))
            except FileNotFoundError:
                continue  # not a save_to_disk directory: try the next, then load_dataset
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    raise ConfigError(
                        f"{candidate} holds the splits {sorted(saved)}, not {split!r}; set the task's split "
                        "setting to one of them."
                    )
                return saved[split]
            return saved
    try:
        return datasets.load_dataset(str(source), subset, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise ConfigError(
            f"cannot load {_label(source, subset, split)} ({type(err).__name__}: {err}); set task.dataset to a hub "
            "id (online, or in the local hub cache), a local copy of the hub repo, or a save_to_disk directory."
        ) from None


def _columns(ds: datasets.Dataset, label: str, needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"{label} has no column(s) {missing} (it has {ds.column_names}); check task.dataset and task.subset."
        )


def _arrow(ds: datasets.Dataset, column: str) -> datasets.Dataset:
    """`ds` reduced to one column, rows returned as Arrow (no image decoding, no copies)."""
    return ds.select_columns([column]).with_format("arrow")


def _image_counts(images: datasets.Dataset, column: str) -> list[int | None]:
    """Images per row of a list-of-images column (None for a null list), read without touching the bytes."""
    return pc.list_value_length(images[:][column]).to_pylist()


def _texts(text_list: Any, first_only: bool) -> tuple[list[tuple[str, str]], str | None]:
    """(user, assistant) pairs of a cauldron `texts` cell, or what is wrong with it."""
    if not isinstance(text_list, list) or not text_list:
        return [], "'texts' is missing or empty (no question to train on)"
    pairs = []
    for k, text in enumerate(text_list[:1] if first_only else text_list, start=1):
        if not isinstance(text, dict) or not isinstance(text.get("user"), str) or not isinstance(
            text.get("assistant"), str
        ):
            return [], f"text {k} needs string 'user' and 'assistant' fields, got {text!r}"
        if not text["assistant"].strip():
            return [], f"text {k} has an empty 'assistant' answer"
        pairs.append((text["user"], text["assistant"]))
    return pairs, None


def _image_problem(count: int | None, expected: int | None) -> str | None:
    if not count:
        return "the row has no image"
    if expected is not None and count != expected:
        return f"the row has {count} images; this task needs exactly {expected}"
    return None


def _problem(where: str, *reasons: str | None) -> str | None:
    """One line naming the row and everything wrong with it, or None for a good row."""
    found = [r for r in reasons if r]
    return f"{where}: {'; '.join(found)}; fix or drop the row." if found else None


def _cauldron_rows(
    ds: datasets.Dataset, label: str, id_prefix: str, rows: range, expected_images: int | None, first_only: bool,
    problems: list[str],
) -> Iterator[tuple[int, str, list[tuple[str, str]], tuple[DatasetImage, ...]]]:
    """(row, sample id, (user, assistant) pairs, lazy images) of each usable the_cauldron row among `rows`; a
    problem line for each unusable one goes to `problems`."""
    _columns(ds, label, ["images", "texts"])
    images = _arrow(ds, "images")
    counts = _image_counts(images, "images")
    texts = _arrow(ds, "texts")[rows.start : rows.stop]["texts"].to_pylist()
    for row, text_list in zip(rows, texts, strict=True):
        sample_id = f"{id_prefix}-{row}"
        pairs, text_problem = _texts(text_list, first_only)
        problem = _problem(f"{label} row {row} (id {sample_id})", _image_problem(counts[row], expected_images),
                           text_problem)
        if problem:
            problems.append(problem)
            continue
        refs = tuple(
            DatasetImage(images, "images", row, k, f"{label} row {row} image {k + 1}") for k in range(counts[row])
        )
        yield row, sample_id, pairs, refs


def load_cauldron(task: Any, split: str) -> Loaded:
    """A the_cauldron config with a train/eval holdout (`nlvr2`, `hateful_memes`, ...).

    The first `task.eval_holdout` rows of `task.split` are the eval samples (first turn only), the rest train
    (every turn, or only the first with `task.turns: first`). All images of a row go with the first turn.
    """
    source, subset, dsplit = task.dataset, task.subset, task.get("split", "train")
    label = _label(source, subset, dsplit)
    ds = open_dataset(source, subset, dsplit)
    holdout = int(task.eval_holdout)
    if holdout < 0 or holdout >= len(ds):
        raise ConfigError(
            f"task.eval_holdout={holdout} must lie in [0, {len(ds)}): {label} has {len(ds)} rows and the rows after "
            "the holdout are the training data."
        )
    rows = range(holdout, len(ds)) if split == "train" else range(holdout)
    turns_mode = task.get("turns", "all")
    if turns_mode not in ("all", "first"):
        raise ConfigError(f"task.turns={turns_mode!r}: choose all or first.")
    first_only = split != "train" or turns_mode == "first"
    expected = task.get("num_images")

    samples: list[Sample] = []
    problems: list[str] = []
    for row, sample_id, pairs, refs in _cauldron_rows(ds, label, f"{subset or 'cauldron'}-{dsplit}", rows, expected,
                                                      first_only, problems):
        turns = [Turn(user=user, assistant=answer, images=refs if k == 0 else ())
                 for k, (user, answer) in enumerate(pairs)]
        samples.append(Sample(id=sample_id, turns=turns, origin=f"{label} row {row}"))
    return samples, problems


def _pick(seed: Any, row: int, options: Sequence[Any]) -> Any:
    """One of `options`, a fixed function of (seed, row) (see the module docstring)."""
    return options[random.Random(f"{seed}:{row}").randrange(len(options))]


def _docvqa_rows(
    task: Any, ds: datasets.Dataset, label: str, name: str, train: bool
) -> Loaded:
    """Samples of a DocVQA dataset in either layout: the_cauldron's (`images`, `texts`: one row per document)
    or `nielsr/docvqa_1200_examples`' (`image`, `query`, `answers`: one row per question)."""
    samples, problems = [], []
    seed, suffix = task.seed, task.prompt_suffix
    if "texts" in ds.column_names:
        per_document = task.get("per_document", "one")
        if per_document not in ("one", "all"):
            raise ConfigError(f"task.per_document={per_document!r}: choose one or all.")
        for row, sample_id, pairs, image in _cauldron_rows(ds, label, name, range(len(ds)), 1, False, problems):
            if train and per_document == "one":
                chosen = [_pick(seed, row, range(len(pairs)))]
            else:
                chosen = range(len(pairs))
            for q in chosen:
                user, answer = pairs[q]
                qid = f"{sample_id}-q{q + 1}"
                # Evaluating on cauldron rows: every question of the document is an eval sample.
                samples.append(Sample(id=qid, turns=[Turn(user=user, assistant=answer, images=image)],
                                      references=[answer], origin=f"{label} row {row} text {q + 1}"))
        return samples, problems

    _columns(ds, label, ["image", "query", "answers"])
    images = _arrow(ds, "image")
    has_image = pc.invert(images[:]["image"].is_null()).to_pylist()
    queries = _arrow(ds, "query")[:]["query"].to_pylist()
    answers = _arrow(ds, "answers")[:]["answers"].to_pylist()
    for row in range(len(ds)):
        sample_id = f"{name}-{row}"
        where = f"{label} row {row} (id {sample_id})"
        query = queries[row].get("en") if isinstance(queries[row], dict) else queries[row]
        refs = answers[row]
        problem = _problem(
            where,
            None if has_image[row] else "the row has no image",
            None if isinstance(query, str) and query.strip()
            else f"'query' needs an English question (query['en'] a string), got {queries[row]!r}",
            None if isinstance(refs, list) and refs and all(isinstance(a, str) and a.strip() for a in refs)
            else f"'answers' must be a non-empty list of non-empty strings, got {refs!r}",
        )
        if problem:
            problems.append(problem)
        else:
            answer = _pick(seed, row, refs) if train else refs[0]
            image = (DatasetImage(images, "image", row, None, f"{label} row {row} image"),)
            turn = Turn(user=f"{query}{suffix}", assistant=answer, images=image)
            samples.append(Sample(id=sample_id, turns=[turn], references=list(refs), origin=f"{label} row {row}"))
    return samples, problems


def load_docvqa(task: Any, split: str) -> Loaded:
    """DocVQA: train on the_cauldron `docvqa` (or, with `task.mini`, the seed's 1000-question mini split);
    evaluate on the seed's 200-question mini test split (`task.eval_dataset`)."""
    if split == "train":
        if task.mini:
            source, subset, dsplit, name = task.mini_dataset, task.mini_subset, task.mini_train_split, "docvqa-mini"
        else:
            source, subset, dsplit, name = task.dataset, task.subset, task.train_split, "docvqa"
    else:
        source, subset, dsplit, name = task.eval_dataset, task.eval_subset, task.eval_split, "docvqa-eval"
    label = _label(source, subset, dsplit)
    ds = open_dataset(source, subset, dsplit)
    return _docvqa_rows(task, ds, label, f"{name}-{dsplit}", train=split == "train")
