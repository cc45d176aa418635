"""The user's own data: the seed's jsonl format with any number of images and turns, trained and evaluated
through `python -m phi3v_recipes task=jsonl`."""

import json
import random

from phi3v_recipes.data.demo import draw
from tests.conftest import read_metrics, run_cli

COLOURS = ["red", "blue", "green"]


def write_tree(root, n: int, split: str) -> None:
    images = root / "images"
    images.mkdir(exist_ok=True)
    with (root / f"{split}.jsonl").open("w") as f:
        for i in range(n):
            rng = random.Random(f"{split}-{i}")
            a, b = rng.choice(COLOURS), rng.choice(COLOURS)
            for name, colour in ((f"{split}{i}a.png", a), (f"{split}{i}b.png", b)):
                draw(colour, "circle", rng).save(images / name)
            kind = i % 3
            if kind == 0:  # two images, then a follow-up turn without images
                turns = [{"images": [f"{split}{i}a.png", f"{split}{i}b.png"], "user": "Colour of the first?",
                          "assistant": a},
                         {"user": "And the second?", "assistant": b}]
            elif kind == 1:  # one image per turn
                turns = [{"images": [f"{split}{i}a.png"], "user": "Colour?", "assistant": a},
                         {"images": [f"{split}{i}b.png"], "user": "This one?", "assistant": b}]
            else:  # text only
                turns = [{"user": "Say yes.", "assistant": "yes"}]
            f.write(json.dumps({"id": f"{split}-{i}", "source": "test", "conversations": turns}) + "\n")


def test_jsonl_task_trains_and_evaluates_multi_image_multi_turn_data(tmp_path):
    """Samples with two images, with images in later turns, and text only train together; evaluation answers
    each sample's first turn and scores it against its first reply."""
    write_tree(tmp_path, 12, "train")
    write_tree(tmp_path, 6, "val")
    run_dir = tmp_path / "run"
    out = run_cli(["task=jsonl", "model=tiny", "hardware=cpu", f"task.train_file={tmp_path / 'train.jsonl'}",
                   f"task.eval_file={tmp_path / 'val.jsonl'}", f"task.image_root={tmp_path / 'images'}",
                   "data.num_crops=1", "data.num_workers=0", "train.epochs=2", "train.global_batch_size=4",
                   "train.batch_size=2", "train.logging_steps=1", "optim.lr=3e-3", "optim.warmup_steps=1",
                   "eval.max_new_tokens=4", f"run.output_dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = read_metrics(run_dir)
    assert (metrics["train_samples"], metrics["eval_samples"], metrics["skipped_samples"]) == (12, 6, 0)
    rows = [json.loads(line) for line in (run_dir / "eval_after_predictions.jsonl").open()]
    val = [json.loads(line) for line in (tmp_path / "val.jsonl").open()]
    assert [r["id"] for r in rows] == [v["id"] for v in val]
    assert [r["references"] for r in rows] == [[v["conversations"][0]["assistant"]] for v in val]
    assert (run_dir / "model.safetensors").is_file()
