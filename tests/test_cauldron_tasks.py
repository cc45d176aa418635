"""The hub-backed tasks (nlvr2, hateful_memes, docvqa full and mini) on tiny local stand-ins of their datasets.

Each stand-in has the on-disk shape of the real one: the_cauldron rows `{"images": [Image], "texts": [{"user",
"assistant", "source"}]}`, and `nielsr/docvqa_1200_examples` rows `{"id", "image", "query": {de, en, es, fr, it},
"answers", "words", "bounding_boxes", "answer"}`, images drawn with Pillow and stored through `datasets.Image()`,
written with `save_to_disk` (or as a parquet copy of a hub repo). The loaders' samples are checked directly,
then each task trains and evaluates end to end through `python -m phi3v_recipes` on the tiny model.
"""

import io
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from phi3v_recipes.data.cauldron import DatasetImage, load_cauldron, load_docvqa
from phi3v_recipes.data.check import check_sample
from phi3v_recipes.data.encode import encode_sample, user_content
from phi3v_recipes.data.screen_cache import ScreenCache, sample_key
from phi3v_recipes.data.tasks import LOADERS
from phi3v_recipes.errors import ConfigError, SampleError
from phi3v_recipes.model.tiny import build_tiny_processor
from tests.conftest import compose_config, read_metrics, run_parallel

TEXT = {"user": Value("string"), "assistant": Value("string"), "source": Value("string")}
CAULDRON = Features({"images": List(ImageFeature()), "texts": List(TEXT)})
DOCVQA_MINI = Features({
    "id": Value("string"),
    "image": ImageFeature(),
    "query": {lang: Value("string") for lang in ("de", "en", "es", "fr", "it")},
    "answers": List(Value("string")),
    "words": List(Value("string")),
    "bounding_boxes": List(List(Value("float32"), length=4)),
    "answer": {"match_score": Value("float64"), "matched_text": Value("string"), "start": Value("int64"),
               "text": Value("string")},
})


def picture(seed: int) -> Image.Image:
    """A small picture: noise behind a coloured rectangle, its size varying with the seed."""
    rng = np.random.default_rng(seed)
    width, height = 40 + 8 * (seed % 5), 32 + 6 * (seed % 3)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    ImageDraw.Draw(image).rectangle((4, 4, width // 2, height // 2), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image


def cauldron_rows(n: int, n_images: int, n_texts: int, source: str) -> dict:
    rows = {"images": [], "texts": []}
    for i in range(n):
        rows["images"].append([picture(100 * i + k) for k in range(n_images)])
        rows["texts"].append([
            {"user": f"Question {k + 1} about picture {i}: is it red?", "assistant": "True" if (i + k) % 2 else "False",
             "source": source}
            for k in range(n_texts)
        ])
    return rows


def mini_rows(n: int, start: int) -> dict:
    rows = {key: [] for key in DOCVQA_MINI}
    for i in range(n):
        answers = [f"{start + i} Main St", f"{start + i} main st.", f"{start + i} Main Street"]
        rows["id"].append(f"doc-{start + i}")
        rows["image"].append(picture(7 * (start + i)))
        rows["query"].append({lang: f"[{lang}] What is the address on page {start + i}?"
                              for lang in ("de", "en", "es", "fr", "it")})
        rows["answers"].append(answers)
        rows["words"].append(["Main", "St"])
        rows["bounding_boxes"].append([[0.0, 0.0, 10.0, 10.0], [12.0, 0.0, 20.0, 10.0]])
        rows["answer"].append({"match_score": 1.0, "matched_text": answers[0], "start": 0, "text": answers[0]})
    return rows


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """root/cauldron/{nlvr2,docvqa} (DatasetDicts, one folder per config), root/hateful_memes (a lone Dataset),
    root/docvqa_mini (a DatasetDict with train and test)."""
    root = tmp_path_factory.mktemp("hub")
    DatasetDict({"train": Dataset.from_dict(cauldron_rows(12, 2, 3, "nlvr2"), features=CAULDRON)}).save_to_disk(
        root / "cauldron" / "nlvr2")
    Dataset.from_dict(cauldron_rows(12, 1, 1, "hateful_memes"), features=CAULDRON).save_to_disk(root / "hateful_memes")
    DatasetDict({"train": Dataset.from_dict(cauldron_rows(8, 1, 3, "docvqa"), features=CAULDRON)}).save_to_disk(
        root / "cauldron" / "docvqa")
    DatasetDict({
        "train": Dataset.from_dict(mini_rows(8, 0), features=DOCVQA_MINI),
        "test": Dataset.from_dict(mini_rows(4, 100), features=DOCVQA_MINI),
    }).save_to_disk(root / "docvqa_mini")
    return root


def task_cfg(name: str, **overrides):
    cfg = compose_config(f"task={name}", "model=tiny", "hardware=cpu")
    task = cfg.task
    for key, value in overrides.items():
        OmegaConf.update(task, key, value)
    return task


# ------------------------------------------------------------------ loaders


def test_loaders_are_registered():
    assert LOADERS["cauldron"] is load_cauldron and LOADERS["docvqa"] is load_docvqa
    for name, loader in (("nlvr2", "cauldron"), ("hateful_memes", "cauldron"), ("docvqa", "docvqa")):
        task = compose_config(f"task={name}").task
        assert task.loader == loader and task.dataset == "HuggingFaceM4/the_cauldron"
    docvqa = compose_config("task=docvqa").task
    assert (docvqa.subset, docvqa.mini_dataset, docvqa.eval_dataset, docvqa.eval_split) == (
        "docvqa", "nielsr/docvqa_1200_examples", "nielsr/docvqa_1200_examples", "test")
    assert compose_config("task=nlvr2").task.eval_holdout == 500


def test_nlvr2_holds_out_the_first_rows_and_keeps_every_turn(data_root):
    task = task_cfg("nlvr2", dataset=str(data_root / "cauldron"), eval_holdout=4)
    train, train_problems = load_cauldron(task, "train")
    evals, eval_problems = load_cauldron(task, "eval")
    assert train_problems == eval_problems == []
    assert [s.id for s in evals] == [f"nlvr2-train-{i}" for i in range(4)]
    assert [s.id for s in train] == [f"nlvr2-train-{i}" for i in range(4, 12)]
    sample = train[0]
    assert [len(t.images) for t in sample.turns] == [2, 0, 0] and sample.num_images == 2
    assert sample.turns[1].user == "Question 2 about picture 4: is it red?" and sample.turns[1].assistant == "True"
    # the seed's prompt: both image tags, a newline, cauldron's user text as is; later turns bare
    assert user_content(sample, 0) == "<|image_1|><|image_2|>\nQuestion 1 about picture 4: is it red?"
    assert user_content(sample, 1) == sample.turns[1].user
    # images are decoded lazily, each one on its own
    first, second = sample.turns[0].images
    assert isinstance(first, DatasetImage) and not isinstance(first, Image.Image)
    assert np.array_equal(np.asarray(first()), np.asarray(picture(400)))
    assert second().size == picture(401).size
    assert "row 4 image 2" in repr(second)
    # evaluation asks the first question only; the reference is its answer
    assert [len(s.turns) for s in evals] == [1] * 4 and evals[1].answers == ["True"]
    assert len(evals[0].turns[0].images) == 2
    processor = build_tiny_processor(num_crops=1, num_img_tokens=36)
    encoded = encode_sample(sample, processor)
    assert encoded["pixel_values"].shape[0] == 2 and (encoded["input_ids"] < 0).any()


def test_hateful_memes_one_image_first_text(data_root):
    task = task_cfg("hateful_memes", dataset=str(data_root / "hateful_memes"), eval_holdout=4)
    train, _ = load_cauldron(task, "train")
    evals, _ = load_cauldron(task, "eval")
    assert (len(train), len(evals)) == (8, 4)
    assert all(len(s.turns) == 1 and s.num_images == 1 for s in train + evals)
    assert user_content(evals[0], 0).startswith("<|image_1|>\nQuestion 1 about picture 0")


def test_bad_cauldron_rows_become_problems(tmp_path):
    good = cauldron_rows(6, 2, 2, "nlvr2")
    rows = {"images": list(good["images"]), "texts": list(good["texts"])}
    rows["images"][1] = []                                                    # no image
    rows["images"][2] = [picture(1)]                                          # one image, nlvr2 needs two
    rows["texts"][3] = None                                                   # no texts
    rows["texts"][4] = [{"user": None, "assistant": "True", "source": "x"}]  # user missing
    rows["images"][5] = [{"bytes": b"not an image", "path": None}, picture(2)]  # undecodable bytes
    rows["texts"][0] = [{"user": "Q?", "assistant": "  ", "source": "x"}]      # empty answer
    Dataset.from_dict(rows, features=CAULDRON).save_to_disk(tmp_path / "bad")
    task = task_cfg("nlvr2", dataset=str(tmp_path / "bad"), eval_holdout=0)
    samples, problems = load_cauldron(task, "train")
    label = f"{tmp_path / 'bad'}:nlvr2:train"
    assert len(problems) == 5
    for row, what in [(0, "empty 'assistant'"), (1, "no image"), (2, "has 1 images; this task needs exactly 2"),
                      (3, "'texts' is missing"), (4, "text 1 needs string 'user' and 'assistant'")]:
        (message,) = [p for p in problems if f"row {row} " in p]
        assert message.startswith(f"{label} row {row} (id nlvr2-train-{row}): ") and what in message
    (sample,) = samples
    with pytest.raises(SampleError, match=r"row 5 \(id nlvr2-train-5\).*row 5 image 1 cannot be read"):
        check_sample(sample, build_tiny_processor(num_crops=1), None)


def test_docvqa_full_picks_one_question_per_document_deterministically(data_root):
    task = task_cfg("docvqa", dataset=str(data_root / "cauldron"), mini_dataset=str(data_root / "docvqa_mini"))
    train, problems = load_docvqa(task, "train")
    assert problems == [] and len(train) == 8
    assert all(len(s.turns) == 1 and s.num_images == 1 for s in train)
    again, _ = load_docvqa(task, "train")
    assert [(s.id, s.turns[0].user) for s in train] == [(s.id, s.turns[0].user) for s in again]
    picked = [int(s.id.rsplit("-q", 1)[1]) for s in train]
    assert len(set(picked)) > 1  # not always the first question
    # cauldron's user text as is (the seed adds no "Answer briefly." to it), its own answer trained
    q = picked[0]
    assert train[0].turns[0].user == f"Question {q} about picture 0: is it red?"
    assert train[0].turns[0].assistant == ("True" if (q - 1) % 2 else "False")
    assert user_content(train[0], 0).startswith("<|image_1|>\nQuestion")
    other_seed, _ = load_docvqa(task_cfg("docvqa", dataset=str(data_root / "cauldron"), seed=7), "train")
    assert [s.id for s in other_seed] != [s.id for s in train]
    every, _ = load_docvqa(task_cfg("docvqa", dataset=str(data_root / "cauldron"), per_document="all"), "train")
    assert len(every) == 24


def test_docvqa_evaluates_on_the_mini_test_split_with_every_reference(data_root):
    task = task_cfg("docvqa", mini_dataset=str(data_root / "docvqa_mini"))  # eval_dataset follows mini_dataset
    evals, problems = load_docvqa(task, "eval")
    assert problems == [] and [s.id for s in evals] == [f"docvqa-eval-test-{i}" for i in range(4)]
    sample = evals[2]
    assert sample.turns[0].user == "[en] What is the address on page 102?\nAnswer briefly."
    assert user_content(sample, 0) == "<|image_1|>\n[en] What is the address on page 102?\nAnswer briefly."
    assert sample.answers == ["102 Main St", "102 main st.", "102 Main Street"]
    assert sample.turns[0].images[0]().size == picture(7 * 102).size


def test_docvqa_mini_trains_on_one_sampled_reference(data_root):
    task = task_cfg("docvqa", mini=True, mini_dataset=str(data_root / "docvqa_mini"))
    train, problems = load_docvqa(task, "train")
    assert problems == [] and len(train) == 8
    chosen = [s.turns[0].assistant for s in train]
    assert all(answer in s.references and len(s.references) == 3 for answer, s in zip(chosen, train, strict=True))
    assert len({s.references.index(a) for a, s in zip(chosen, train, strict=True)}) > 1
    assert chosen == [s.turns[0].assistant for s in load_docvqa(task, "train")[0]]


def test_bad_docvqa_mini_rows_become_problems(tmp_path):
    rows = mini_rows(3, 0)
    rows["image"][0] = None
    rows["answers"][1] = []
    rows["query"][2] = {lang: None for lang in ("de", "en", "es", "fr", "it")}
    DatasetDict({"test": Dataset.from_dict(rows, features=DOCVQA_MINI)}).save_to_disk(tmp_path / "mini")
    samples, problems = load_docvqa(task_cfg("docvqa", mini_dataset=str(tmp_path / "mini")), "eval")
    assert samples == [] and len(problems) == 3
    for row, what in enumerate(["no image", "'answers' must be a non-empty list", "'query' needs an English"]):
        assert problems[row].startswith(f"{tmp_path / 'mini'}:test row {row} (id docvqa-eval-test-{row}): ")
        assert what in problems[row]


def test_a_local_copy_of_the_hub_repo_loads_by_config_name(tmp_path, monkeypatch):
    """A clone of the_cauldron: README front matter naming the configs, parquet shards per config."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    repo = tmp_path / "the_cauldron"
    (repo / "hateful_memes").mkdir(parents=True)
    Dataset.from_dict(cauldron_rows(5, 1, 1, "hateful_memes"), features=CAULDRON).to_parquet(
        repo / "hateful_memes" / "train-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: hateful_memes\n  data_files:\n  - split: train\n"
        "    path: hateful_memes/train-*\n---\n# the_cauldron (local copy)\n")
    task = task_cfg("hateful_memes", dataset=str(repo), eval_holdout=2)
    train, problems = load_cauldron(task, "train")
    assert problems == [] and [s.id for s in train] == ["hateful_memes-train-2", "hateful_memes-train-3",
                                                      "hateful_memes-train-4"]
    assert np.array_equal(np.asarray(train[0].turns[0].images[0]()), np.asarray(picture(200)))


def test_unusable_settings_stop_with_a_config_error(data_root):
    with pytest.raises(ConfigError, match="eval_holdout=12 must lie in"):
        load_cauldron(task_cfg("nlvr2", dataset=str(data_root / "cauldron"), eval_holdout=12), "train")
    with pytest.raises(ConfigError, match=r"holds the splits \['test', 'train'\], not 'validation'"):
        load_docvqa(task_cfg("docvqa", mini_dataset=str(data_root / "docvqa_mini"), eval_split="validation"), "eval")
    with pytest.raises(ConfigError, match=r"cannot load /nonexistent/cauldron:nlvr2:train .*set task.dataset"):
        load_cauldron(task_cfg("nlvr2", dataset="/nonexistent/cauldron"), "train")
    with pytest.raises(ConfigError, match="no column"):
        load_cauldron(task_cfg("nlvr2", dataset=str(data_root / "docvqa_mini"), split="train", eval_holdout=1),
                      "train")


def test_dataset_image_reports_undecodable_bytes():
    buffer = io.BytesIO()
    picture(3).save(buffer, format="PNG")
    ds = Dataset.from_dict({"images": [[{"bytes": buffer.getvalue(), "path": None},
                                        {"bytes": b"junk", "path": None}]]},
                           features=Features({"images": List(ImageFeature())})).select_columns(["images"])
    table = ds.with_format("arrow")
    assert DatasetImage(table, "images", 0, 0, "x")().size == picture(3).size
    with pytest.raises(OSError, match="UnidentifiedImageError"):
        DatasetImage(table, "images", 0, 1, "x")()
    with pytest.raises(OSError, match="no data"):
        DatasetImage(table, "images", 0, 2, "x")()


# ------------------------------------------------------------------ end to end

COMMON = ("model=tiny", "hardware=cpu", "strategy=full", "train.epochs=1", "train.global_batch_size=4",
          "train.batch_size=4", "data.num_crops=1", "eval.max_new_tokens=4",
          "optim.warmup_steps=1", "report_to=none")


def e2e_overrides(root: Path) -> dict[str, list[str]]:
    mini = f"task.mini_dataset={root / 'docvqa_mini'}"
    return {
        # nlvr2 encodes in a DataLoader worker process: lazily decoded dataset images must survive pickling.
        "nlvr2": ["task=nlvr2", f"task.dataset={root / 'cauldron'}", "task.eval_holdout=4", "data.num_workers=1"],
        "hateful_memes": ["task=hateful_memes", f"task.dataset={root / 'hateful_memes'}", "task.eval_holdout=4",
                          "data.num_workers=0"],
        "docvqa": ["task=docvqa", f"task.dataset={root / 'cauldron'}", mini, "eval.max_samples=4",
                   "data.num_workers=0"],
        "docvqa_mini": ["task=docvqa", "task.mini=true", mini, "eval.max_samples=4", "data.num_workers=0"],
    }


@pytest.fixture(scope="module")
def e2e_runs(data_root, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """All four runs at once (one thread each): most of a run is interpreter start-up and imports."""
    out = tmp_path_factory.mktemp("runs")
    overrides = e2e_overrides(data_root)
    results = run_parallel({name: ["phi3v_recipes", *args, *COMMON, f"run.output_dir={out / name}"]
                            for name, args in overrides.items()}, cwd=out)
    return {name: (out / name, results[name]) for name in overrides}


@pytest.mark.slow
@pytest.mark.parametrize("name,train_samples,metric", [
    ("nlvr2", 8, "accuracy"), ("hateful_memes", 8, "accuracy"), ("docvqa", 8, "anls"), ("docvqa_mini", 8, "anls"),
])
def test_task_trains_and_evaluates_end_to_end(e2e_runs, name, train_samples, metric):
    run_dir, out = e2e_runs[name]
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert metrics["metric"] == metric and metrics["train_samples"] == train_samples
    assert metrics["eval_samples"] == 4 and metrics["skipped_samples"] == 0 and metrics["global_steps"] == 2
    assert isinstance(metrics["train_loss"], float)
    assert 0.0 <= metrics["eval_before"] <= 1.0 and 0.0 <= metrics["eval_after"] <= 1.0
    for name_ in ("eval_before_predictions.jsonl", "eval_after_predictions.jsonl", "model.safetensors"):
        assert (run_dir / name_).is_file(), name_
    lines = (run_dir / "eval_after_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4
    if name.startswith("docvqa"):
        assert '"references": ["100 Main St", "100 main st.", "100 Main Street"]' in lines[0]


def test_seeded_answer_choice_is_independent_of_global_random_state(data_root):
    """The trained answer does not depend on the process's random state (same on every rank and worker)."""
    task = task_cfg("docvqa", mini=True, mini_dataset=str(data_root / "docvqa_mini"))
    random.seed(1)
    first = [s.turns[0].assistant for s in load_docvqa(task, "train")[0]]
    random.seed(2)
    assert first == [s.turns[0].assistant for s in load_docvqa(task, "train")[0]]


def test_dataset_rows_are_keyed_for_the_screen_cache_by_fingerprint_and_row(data_root, tmp_path):
    """The screen cache identifies an image of a dataset row by the dataset's fingerprint and the row, without
    reading it: the same saved dataset loaded again (a relaunch) gives the same keys and its verdicts come from the
    cache; each row's key is its own."""
    task = task_cfg("hateful_memes", dataset=str(data_root / "hateful_memes"), eval_holdout=4)
    first, again = load_cauldron(task, "train")[0], load_cauldron(task, "train")[0]
    keys = [sample_key(sample, "settings") for sample in first]
    assert None not in keys and len(set(keys)) == len(keys) == 8
    assert keys == [sample_key(sample, "settings") for sample in again]
    processor = build_tiny_processor(num_crops=1, num_img_tokens=36)
    with ScreenCache(tmp_path, processor, None, None, workers=1) as cache:
        assert cache.verdicts(first)[1].startswith("8 samples, 0 from cache, 8 screened")
    with ScreenCache(tmp_path, processor, None, None, workers=1) as cache:
        verdicts, how = cache.verdicts(again)
    assert how.startswith("8 samples, 8 from cache, 0 screened") and all(not problems for _, problems in verdicts)
