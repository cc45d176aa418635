"""The gallery of held-out predictions: one row per evaluated sample, wrong answers first, with a thumbnail.

Rows come from the final evaluation's `eval_after_predictions.jsonl` (else `eval_before_predictions.jsonl`), with
the untrained model's answer beside it when both exist. Thumbnails are drawn from the task's held-out samples,
re-read by id from the run's `config.yaml` (`data.tasks.load_split`): the demo task draws its images in memory,
files and dataset rows are opened as training opened them. A sample whose image cannot be read here (a path
relative to another machine, a dataset not in this cache) keeps its row without a picture, and the report says
why.
"""

import base64
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger("phi3v_recipes")

PREDICTIONS = ("eval_after_predictions.jsonl", "eval_before_predictions.jsonl")


@dataclass
class Prediction:
    id: str
    question: str
    references: list[str]
    answer: str
    score: float
    before: str | None = None
    """The untrained model's answer (eval_before), when the run evaluated before training."""
    thumbnail: str | None = None
    """A data: URI (JPEG)."""

    @property
    def verdict(self) -> str:
        """right (full score), wrong (zero), or partly right (a partial ANLS)."""
        return "right" if self.score >= 1.0 else "wrong" if self.score <= 0.0 else "partly right"


@dataclass
class Gallery:
    source: str
    """The predictions file shown."""
    stage: str
    """Whose answers: "after training", or "before training" when the run has no final evaluation."""
    total: int
    """Predictions in that file (the gallery shows the first `gallery.size` of them, wrong answers first)."""
    wrong: int
    rows: list[Prediction]
    note: str = ""
    """Why thumbnails are missing, when they are."""


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_gallery(run_dir: Path, config: DictConfig | None, settings: DictConfig) -> Gallery | None:
    """The gallery of the run in `run_dir`, or None when it wrote no predictions."""
    source = next((run_dir / name for name in PREDICTIONS if (run_dir / name).is_file()), None)
    if source is None:
        return None
    rows = _read_rows(source)
    before_file = run_dir / PREDICTIONS[1]
    before = ({r["id"]: r["prediction"] for r in _read_rows(before_file)}
              if source.name != PREDICTIONS[1] and before_file.is_file() else {})
    predictions = [Prediction(id=str(r["id"]), question=r.get("question", ""), references=list(r["references"]),
                              answer=r["prediction"], score=float(r["score"]), before=before.get(r["id"]))
                   for r in rows]
    # Wrong answers first (lowest score first); samples of equal score keep the evaluation's order.
    ordered = sorted(predictions, key=lambda p: p.score)
    shown = ordered if settings.gallery.size is None else ordered[: settings.gallery.size]
    stage = "before training" if source.name == PREDICTIONS[1] else "after training"
    gallery = Gallery(source=source.name, stage=stage, total=len(predictions),
                      wrong=sum(p.verdict == "wrong" for p in ordered), rows=shown)
    if settings.gallery.images and shown:
        gallery.note = _add_thumbnails(shown, config, settings)
    return gallery


def _add_thumbnails(rows: list[Prediction], config: DictConfig | None, settings: DictConfig) -> str:
    """Fill in each row's thumbnail (and its question when the predictions file has none); the sentence to show
    when some are missing."""
    if config is None:
        return "no config.yaml in the run directory, so the held-out images cannot be found."
    from phi3v_recipes.data.sample import load_image
    from phi3v_recipes.data.tasks import load_split

    try:
        samples, _ = load_split(config.task, "eval")
    except Exception as err:  # noqa: BLE001 - any task loader, any reason (missing file, dataset not cached)
        return f"the held-out samples of task={config.task.name} could not be re-read here ({err}); no thumbnails."
    by_id = {sample.id: sample for sample in samples}
    missing = []
    max_pixels = config.get("data", {}).get("max_image_pixels")
    for row in rows:
        sample = by_id.get(row.id)
        if sample is None or not sample.turns[0].images:
            missing.append(row.id)
            continue
        row.question = row.question or sample.turns[0].user
        try:
            image = load_image(sample.turns[0].images[0], sample, max_pixels)
        except Exception:  # noqa: BLE001 - the row stays, without its picture
            missing.append(row.id)
            continue
        row.thumbnail = thumbnail_uri(image, settings.gallery.thumbnail_px, settings.gallery.thumbnail_quality)
    if not missing:
        return ""
    listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return f"no image could be read here for {len(missing)} sample(s): {listed}."


def thumbnail_uri(image: Any, longest_side: int, quality: int) -> str:
    """A JPEG data: URI of `image` (a PIL image) shrunk to at most `longest_side` pixels a side."""
    small = image.convert("RGB")
    small.thumbnail((longest_side, longest_side))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
