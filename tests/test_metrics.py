"""Accuracy and ANLS against hand-computed values (arithmetic in the comments)."""

import pytest

from phi3v_recipes.metrics import (
    METRICS,
    accuracy,
    accuracy_scores,
    anls,
    anls_scores,
    levenshtein,
    normalize_anls,
    normalize_answer,
    per_sample_scores,
)


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("kitten", "sitting", 3),  # k->s, e->i, insert g
        ("flaw", "lawn", 2),  # delete f, insert n
        ("", "abc", 3),
        ("abc", "", 3),
        ("", "", 0),
        ("same", "same", 0),
        ("ab", "ba", 2),  # no transpositions in plain Levenshtein
    ],
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Yes.", "yes"),
        (" Cat ", "cat"),
        ("True..", "true"),  # strip('.') removes every trailing period
        ("..Hi", "hi"),  # ... and every leading one
        ("yes .", "yes "),  # whitespace is stripped before the period, so the inner space stays
        ("U.S.A.", "u.s.a"),  # inner periods stay
    ],
)
def test_normalize_answer_is_the_cookbook_rule(text, normalised):
    assert normalize_answer(text) == normalised


def test_normalize_anls():
    assert normalize_anls("  Dear   DR.\tLobo \n") == "dear dr. lobo"


def test_accuracy_normalisation_and_multiple_references():
    predictions = ["Yes.", " Cat ", "True..", "dog", "yes ."]
    references = ["yes", ["cat"], ["true"], ["cat", "Dog."], ["yes"]]
    # "yes ." -> "yes " != "yes": the cookbook's rule does not remove the space before the period.
    assert accuracy_scores(predictions, references) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert accuracy(predictions, references) == pytest.approx(4 / 5)


def test_accuracy_bounds():
    assert accuracy(["a", "b"], [["a"], ["b"]]) == 1.0
    assert accuracy(["a", "b"], [["x"], ["y"]]) == 0.0


def test_anls_single_reference():
    # "hello" vs "hallo": 1 substitution over max length 5 -> NL 0.2 -> similarity 0.8
    assert anls(["hello"], [["hallo"]]) == pytest.approx(0.8)


def test_anls_threshold_edges():
    # 9 characters, 4 substituted: NL = 4/9 = 0.444 < 0.5 -> similarity 5/9
    assert anls(["abcdefghi"], [["abcdewxyz"]]) == pytest.approx(5 / 9)
    # 9 characters, 5 substituted: NL = 5/9 = 0.556 >= 0.5 -> 0
    assert anls(["abcdefghi"], [["abcdvwxyz"]]) == 0.0
    # exactly at the cut-off: 2 of 4 substituted, NL = 0.5 is not < 0.5 -> 0 (the cookbook's strict rule)
    assert anls(["abcd"], [["abxy"]]) == 0.0
    # a looser threshold keeps it: 1 - 0.5 = 0.5
    assert anls(["abcd"], [["abxy"]], threshold=0.6) == pytest.approx(0.5)


def test_anls_takes_the_best_reference():
    # "denver broncos" (14 chars) vs "denver r. broncos" (17): insert "r. " -> NL 3/17 -> 14/17
    # "denver broncos" vs "broncos" (7): delete "denver " -> NL 7/14 = 0.5 -> 0
    assert anls(["Denver Broncos"], [["Denver R. Broncos", "Broncos"]]) == pytest.approx(14 / 17)
    assert anls(["Denver Broncos"], [["Broncos", "Denver R. Broncos"]]) == pytest.approx(14 / 17)


def test_anls_case_and_whitespace_normalisation():
    # lower-cased, whitespace collapsed: both become "dear dr. lobo" -> 1
    assert anls(["  Dear   DR. Lobo "], [["dear dr. lobo"]]) == 1.0
    # the prediction's trailing period is stripped (cookbook post-processing): "paris" == "paris"
    assert anls(["Paris."], [["PARIS"]]) == 1.0
    # a reference's period is kept: "inc" vs "inc." -> NL 1/4 -> 0.75
    assert anls(["Inc."], [["Inc."]]) == pytest.approx(0.75)


def test_anls_empty_strings():
    # two empty strings are identical -> 1; "." is emptied by the period strip
    assert anls_scores(["", "."], [[""], [""]]) == [1.0, 1.0]
    # empty vs "abc": distance 3 over length 3 -> NL 1 -> 0, either way round
    assert anls_scores(["", "abc"], [["abc"], [""]]) == [0.0, 0.0]


def test_anls_mean_over_samples():
    # 0.8 ("hello"/"hallo") + 0 ("cat"/"dog": NL 1) + 1 (exact) -> 1.8 / 3 = 0.6
    assert anls(["hello", "cat", "x"], [["hallo"], ["dog"], ["X"]]) == pytest.approx(0.6)


def test_registry_and_per_sample_scores():
    assert set(METRICS) == {"accuracy", "anls"}
    predictions, references = ["Yes.", "hello"], [["yes"], ["hallo"]]
    assert METRICS["accuracy"](predictions, references) == 0.5
    assert METRICS["anls"](predictions, references) == pytest.approx((1.0 + 0.8) / 2)
    assert per_sample_scores("accuracy", predictions, references) == [1.0, 0.0]
    assert per_sample_scores("anls", predictions, references) == pytest.approx([1.0, 0.8])
    with pytest.raises(ValueError, match="unknown metric 'bleu'; known metrics: accuracy, anls"):
        per_sample_scores("bleu", predictions, references)


@pytest.mark.parametrize("metric", [accuracy, anls])
def test_bad_inputs(metric):
    with pytest.raises(ValueError, match="empty set of predictions"):
        metric([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        metric(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="sample 1 has no reference answers"):
        metric(["a", "b"], [["a"], []])
    with pytest.raises(TypeError, match="not a single string"):
        metric("ab", [["a"], ["b"]])


def test_anls_rejects_a_threshold_outside_unit_interval():
    with pytest.raises(ValueError, match="threshold"):
        anls(["a"], [["a"]], threshold=1.5)


def test_a_bare_string_of_references_is_refused():
    """A string is not one reference per sample: it would silently be read character by character."""
    with pytest.raises(TypeError, match="one entry"):
        accuracy(["a", "b"], "ab")
