"""Evaluation metrics of the recipes: exact-match accuracy and DocVQA's ANLS.

Both metrics take one prediction string per sample and, per sample, a list of reference answers (a bare
string is accepted as a single reference). `METRICS` maps a config name to the aggregate score and
`per_sample_scores` gives each sample's score, so a predictions file can store it beside the text.

Normalisation, and where it comes from (Microsoft's Phi-3CookBook, `code/04.Finetuning/vision_finetuning/`):

* accuracy: `finetune_hf_trainer_{hateful_memes,nlvr2,ucf101}.py` compare
  `text.strip().strip('.').lower()` of the generated text and of the answer; `normalize_answer` is exactly
  that (outer whitespace, then every leading and trailing period, then lower-casing: `"True.."` becomes
  `"true"`, while `"yes ."` keeps its inner space and stays `"yes "`).
* ANLS: `finetune_hf_trainer_docvqa.py` applies `.strip().strip('.')` to the generated text (not to the
  references) and then scores raw, case-sensitive strings with a similarity of `1 - NL` if `NL < 0.5`,
  else 0, best over the references. The official DocVQA evaluation compares lower-cased strings with
  outer whitespace stripped and inner runs of whitespace collapsed. We take the official normalisation
  for both sides (`normalize_anls`) and keep the cookbook's period stripping of the prediction, so that a
  model which ends its answer with a period scores as it did upstream. The cut-off is the cookbook's
  strict `NL < threshold` (a pair at exactly NL = 0.5 scores 0).
* Empty strings: the cookbook scores an empty prediction 0 outright (and would divide by zero for two
  empty strings); here two empty strings are identical (similarity 1) and an empty prediction against a
  non-empty reference has NL = 1, so it scores 0 as upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = [
    "METRICS",
    "PER_SAMPLE_METRICS",
    "accuracy",
    "accuracy_scores",
    "anls",
    "anls_scores",
    "levenshtein",
    "normalize_anls",
    "normalize_answer",
    "per_sample_scores",
]

References = Sequence[str | Sequence[str]]
"""Per sample: one reference string, or a sequence of acceptable reference strings."""


def normalize_answer(text: str) -> str:
    """Normalise an answer for exact-match accuracy, exactly as the cookbook does.

    `text.strip().strip('.').lower()`: strip outer whitespace, then all leading and trailing periods,
    then lower-case. Whitespace exposed by removing periods is kept (`"yes ."` -> `"yes "`).
    """
    return text.strip().strip(".").lower()


def normalize_anls(text: str) -> str:
    """Normalise a string for ANLS as the official DocVQA evaluation does.

    Lower-case, strip outer whitespace and collapse inner runs of whitespace to one space.
    """
    return " ".join(text.lower().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each of cost 1) between `a` and `b`.

    Iterative dynamic programme over two rows: O(len(a) * len(b)) time, O(min(len(a), len(b))) memory.
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete char_a
                    current[j - 1] + 1,  # insert char_b
                    previous[j - 1] + (char_a != char_b),  # substitute (free if equal)
                )
            )
        previous = current
    return previous[-1]


def _as_reference_lists(references: References) -> list[list[str]]:
    """Turn each sample's references into a list of strings (a bare string is one reference)."""
    lists: list[list[str]] = []
    for index, refs in enumerate(references):
        ref_list = [refs] if isinstance(refs, str) else list(refs)
        if not ref_list:
            raise ValueError(f"sample {index} has no reference answers")
        bad = [ref for ref in ref_list if not isinstance(ref, str)]
        if bad:
            raise TypeError(f"sample {index}: reference answers must be strings, got {bad!r}")
        lists.append(ref_list)
    return lists


def _check_inputs(predictions: Sequence[str], references: References) -> list[list[str]]:
    """Validate the inputs shared by every metric and return the references as lists of strings."""
    if isinstance(predictions, str):
        raise TypeError("predictions must be a sequence of strings, one per sample, not a single string")
    if isinstance(references, str):
        raise TypeError("references must hold one entry (a string or a list of strings) per sample, not a string")
    if len(predictions) == 0:
        raise ValueError("cannot score an empty set of predictions: the metric is undefined without samples")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists: "
            "there must be one of each per sample"
        )
    bad = [i for i, prediction in enumerate(predictions) if not isinstance(prediction, str)]
    if bad:
        raise TypeError(f"predictions must be strings; samples {bad[:10]} are not")
    return _as_reference_lists(references)


def accuracy_scores(predictions: Sequence[str], references: References) -> list[float]:
    """Per sample: 1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    ref_lists = _check_inputs(predictions, references)
    scores: list[float] = []
    for prediction, refs in zip(predictions, ref_lists, strict=True):
        target = normalize_answer(prediction)
        scores.append(float(any(normalize_answer(ref) == target for ref in refs)))
    return scores


def accuracy(predictions: Sequence[str], references: References) -> float:
    """Fraction of samples (in [0, 1]) whose prediction matches one of its references after
    `normalize_answer`. Raises ValueError on empty input or mismatched lengths."""
    scores = accuracy_scores(predictions, references)
    return sum(scores) / len(scores)


def _similarity(prediction: str, reference: str, threshold: float) -> float:
    """Thresholded normalised Levenshtein similarity of two already-normalised strings."""
    longest = max(len(prediction), len(reference))
    if longest == 0:
        return 1.0  # two empty strings are identical
    distance = levenshtein(prediction, reference) / longest
    return 1.0 - distance if distance < threshold else 0.0


def anls_scores(predictions: Sequence[str], references: References, threshold: float = 0.5) -> list[float]:
    """Per sample: the best thresholded normalised Levenshtein similarity over the references.

    The prediction is first cleaned like the cookbook's generated text (`.strip().strip('.')`), then
    prediction and references go through `normalize_anls`. For each reference,
    NL = levenshtein(pred, ref) / max(len(pred), len(ref)) and the similarity is 1 - NL if NL < threshold,
    else 0 (1 for two empty strings).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the ANLS threshold must lie in [0, 1], got {threshold}")
    ref_lists = _check_inputs(predictions, references)
    scores: list[float] = []
    for prediction, refs in zip(predictions, ref_lists, strict=True):
        cleaned = normalize_anls(prediction.strip().strip("."))
        scores.append(max(_similarity(cleaned, normalize_anls(ref), threshold) for ref in refs))
    return scores


def anls(predictions: Sequence[str], references: References, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity (DocVQA), in [0, 1]: the mean of `anls_scores`.

    Raises ValueError on empty input or mismatched lengths.
    """
    scores = anls_scores(predictions, references, threshold)
    return sum(scores) / len(scores)


Metric = Callable[[Sequence[str], References], float]
PerSampleMetric = Callable[[Sequence[str], References], list[float]]

METRICS: dict[str, Metric] = {"accuracy": accuracy, "anls": anls}
"""Aggregate metric by config name: `METRICS[name](predictions, references) -> float`."""

PER_SAMPLE_METRICS: dict[str, PerSampleMetric] = {"accuracy": accuracy_scores, "anls": anls_scores}
"""Per-sample metric by config name; the aggregate is the mean of these scores."""


def per_sample_scores(name: str, predictions: Sequence[str], references: References) -> list[float]:
    """Each sample's score under the metric called `name` (a key of `METRICS`)."""
    try:
        metric = PER_SAMPLE_METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}") from None
    return metric(predictions, references)
