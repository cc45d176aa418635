"""A sample that passes the pre-training screen but cannot be read once training runs (an image deleted or
rewritten meanwhile) follows data.on_error through `python -m phi3v_recipes`, with 0 and with 2 DataLoader
workers: `skip` replaces it with another sample, lists it in skipped.txt and trains to the end; `raise` stops with
one sentence naming file, line and id. Neither ever shows a (worker) traceback.

The vanishing image is a pipe the run reads as /proc/self/fd/N: the screen reads its PNG bytes, every later read
finds the pipe empty, exactly like a file deleted after the screen, with no race against the run.
"""

import os

import pytest

from phi3v_recipes.data.demo import draw
from tests.conftest import read_metrics, run_parallel

EPOCHS = 2  # the vanishing sample is drawn once per epoch
MODES = [("skip", 0), ("skip", 2), ("raise", 0), ("raise", 2)]


def vanishing_png(source) -> int:
    """The read end of a pipe holding the PNG file `source`, readable once."""
    read, write = os.pipe()
    os.write(write, source.read_bytes())  # a few hundred bytes: fits in the pipe's buffer
    os.close(write)
    return read


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(jsonl, image path, run dir, finished process) for each (data.on_error, data.num_workers), run together."""
    import random

    root = tmp_path_factory.mktemp("vanish")
    for i, colour in enumerate(["red", "blue", "green"]):
        draw(colour, "circle", random.Random(i)).save(root / f"{colour}.png")
    commands, cases, fds = {}, {}, []
    for on_error, workers in MODES:
        name = f"{on_error}{workers}"
        fd = vanishing_png(root / "red.png")
        fds.append(fd)
        images = ["red.png", f"/proc/self/fd/{fd}", "blue.png", "green.png"]
        ids = ["first", "vanishing", "third", "fourth"]
        jsonl = root / f"{name}.jsonl"
        jsonl.write_text("".join(
            f'{{"id": "{i}", "conversations": [{{"images": ["{image}"], "user": "Colour?", "assistant": "red"}}]}}\n'
            for i, image in zip(ids, images, strict=True)))
        run_dir = root / name
        commands[name] = ["phi3v_recipes", "task=jsonl", "model=tiny", "hardware=cpu", f"task.train_file={jsonl}",
                          f"task.image_root={root}", f"data.on_error={on_error}", f"data.num_workers={workers}",
                          "data.num_crops=1", f"train.epochs={EPOCHS}", "train.global_batch_size=2",
                          "train.batch_size=2", "optim.warmup_steps=0", "eval.before=false", "eval.after=false",
                          "report_to=none", f"run.output_dir={run_dir}"]
        cases[name] = (jsonl, f"/proc/self/fd/{fd}", run_dir)
    try:
        results = run_parallel(commands, cwd=root, pass_fds=tuple(fds))
    finally:
        for fd in fds:
            os.close(fd)
    return {name: (*case, results[name]) for name, case in cases.items()}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_skip_replaces_a_sample_that_vanished_and_trains_on(runs, workers):
    """Under data.on_error=skip, an image that the pre-training screen read but that is gone when the DataLoader
    (in the main process or a worker) reads it: the sample is replaced, listed in skipped.txt with file:line and id
    once per epoch, and the run finishes with every step and a saved model; no traceback."""
    jsonl, image, run_dir, out = runs[f"skip{workers}"]
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    skipped = (run_dir / "skipped.txt").read_text().splitlines()
    assert len(skipped) == EPOCHS, skipped
    for line in skipped:
        assert line.startswith(f"{jsonl}:2 (id vanishing): image {image} cannot be read"), line
    assert (run_dir / "model.safetensors").is_file()
    metrics = read_metrics(run_dir)
    assert metrics["train_samples"] == 4 and metrics["global_steps"] == 2 * EPOCHS


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_raise_stops_with_one_sentence_naming_the_sample(runs, workers):
    """Under data.on_error=raise, the same vanished image stops the run with exit 2 and one `error:` sentence naming
    the file, line and id, never a DataLoader-worker traceback; no final model or metrics are written."""
    jsonl, image, run_dir, out = runs[f"raise{workers}"]
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    # (the sentence may follow a progress bar's carriage return on its line)
    errors = [line[line.index("error: "):] for line in out.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, out.stderr[-3000:]
    assert errors[0].startswith(f"error: {jsonl}:2 (id vanishing): image {image} cannot be read"), errors[0]
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "metrics.json").exists()


def test_dataset_items_follow_on_error(tmp_path):
    """EncodedDataset, item by item: under skip a failing sample is replaced by the next one that encodes
    (cyclically, so the same index always gives the same substitute) and its sentence is in `skipped`; under raise
    the item is exactly {"error": sentence}; when no sample can be read any more, even skip returns an error."""
    import torch
    from PIL import Image

    from phi3v_recipes.data.dataset import EncodedDataset
    from phi3v_recipes.data.encode import encode_sample
    from phi3v_recipes.data.sample import Sample, Turn
    from phi3v_recipes.model.tiny import build_tiny_processor

    processor = build_tiny_processor(num_crops=1, num_img_tokens=4)
    for name in ("a", "c"):
        Image.new("RGB", (40, 30), "red").save(tmp_path / f"{name}.png")
    samples = [Sample(id=name, turns=[Turn("Colour?", name, (tmp_path / f"{name}.png",))], origin=f"t.jsonl:{i}")
               for i, name in enumerate(["a", "b", "c"], start=1)]  # b.png does not exist
    missing = f"t.jsonl:2 (id b): image {tmp_path / 'b.png'} does not exist; fix the path or the image root."

    skip = EncodedDataset(samples, processor, on_error="skip")
    item = skip[1]
    assert item.pop("skipped") == [missing]
    expected = encode_sample(samples[2], processor)
    assert item.keys() == expected.keys() and all(torch.equal(item[k], expected[k]) for k in item)
    assert "skipped" not in skip[0] and "skipped" not in skip[2]
    assert EncodedDataset(samples[1:2] + samples[:1], processor, on_error="skip")[0]["skipped"] == [missing]

    assert EncodedDataset(samples, processor, on_error="raise")[1] == {"error": missing}
    gone = EncodedDataset(samples[1:2], processor, on_error="skip")[0]
    assert list(gone) == ["error"] and gone["error"].startswith("no training sample can be read any more")
