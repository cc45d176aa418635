"""The benchmark (`python -m phi3v_recipes.bench`): a short run on the tiny model through the entrypoint, and the
cookbook baseline's CLIP-on-padding behaviour."""

import json

import torch
from omegaconf import OmegaConf

from phi3v_recipes.bench import all_crops_through_clip
from phi3v_recipes.model.architecture import build_random_model
from phi3v_recipes.workload import draw_workload
from tests.conftest import ROOT, run_cli


def test_bench_smoke_run_on_tiny_writes_both_paths(tmp_path):
    """`bench model=tiny baseline=cookbook` runs both paths interleaved and writes speedup, samples/s statistics,
    tokens/s, padding fraction, peak memory and equal first losses (same samples, same initial weights); with
    `progress=` where the time goes (model build, matmul rate, each path's first passes, each step), every path's
    first loss and every step are appended as JSON lines, then the results (what scripts/gpu_check.sh keeps when a
    phase is cut off)."""
    out, progress = tmp_path / "bench.json", tmp_path / "results.jsonl"
    proc = run_cli(["model=tiny", "workload=hateful_memes", "data.num_crops=4", "bench.steps=2",
                    "bench.warmup_steps=0", "bench.samples_per_step=3", "baseline=cookbook", f"output={out}",
                    f"progress={progress}"],
                   cwd=tmp_path, module="phi3v_recipes.bench")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speedup" in proc.stdout and "samples/s (median)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["speedup"] > 0 and result["first_loss_equal"] is True
    ours, base = result["ours"], result["baseline"]
    for path in (ours, base):
        speed = path["samples_per_s"]
        assert speed["min"] <= speed["median"] <= speed["max"]
        assert path["tokens_per_s"] > 0 and path["mfu"] is None  # CPU: no MFU
        assert 0 < path["peak_memory_mb"] < path["peak_rss_mb"]  # above the interpreter's own resident set
        assert abs(path["first_loss"] - ours["first_loss"]) <= 1e-4 * abs(ours["first_loss"])
    assert ours["packing"] and ours["supervised_logits"] and not ours["clip_on_padding_crops"]
    assert not base["packing"] and not base["supervised_logits"] and base["clip_on_padding_crops"]
    assert base["attn_implementation"] == "eager" and ours["attn_implementation"] == "sdpa"
    assert ours["padding_fraction"] == 0.0
    assert set(result["flop_shares_percent"]) == {"clip", "lm_body", "lm_head"}
    assert not (tmp_path / "outputs").exists()
    records = [json.loads(line) for line in progress.read_text().splitlines()]
    phases = [r["what"].split(":")[0] for r in records if r["kind"] == "bench_phase"]  # where the time went
    assert phases == ["model built", "matmul rate measured (CPU",
                      "first loss of ours (its first forward passes, compilation included)",
                      "first loss of baseline (its first forward passes, compilation included)",
                      "step 0 of ours", "step 0 of baseline", "step 1 of baseline", "step 1 of ours"]
    assert all(r["seconds"] >= 0 for r in records if r["kind"] == "bench_phase")
    assert "bench: model built in " in proc.stdout
    lines = [r for r in records if r["kind"] != "bench_phase"]
    assert [(r["kind"], r.get("path"), r.get("step")) for r in lines] == [
        ("bench_first_loss", "ours", None), ("bench_first_loss", "baseline", None),
        ("bench_step", "ours", 0), ("bench_step", "baseline", 0),
        ("bench_step", "baseline", 1), ("bench_step", "ours", 1), ("bench_result", None, None)]
    assert lines[0]["first_loss"] == ours["first_loss"] and lines[-1]["speedup"] == result["speedup"]
    measured = sorted(r["samples_per_s"] for r in lines if r["kind"] == "bench_step" and r["path"] == "ours")
    assert measured == sorted([ours["samples_per_s"]["min"], ours["samples_per_s"]["max"]])


def test_cookbook_baseline_runs_clip_on_padding_crops_without_changing_outputs():
    """The baseline wrapper feeds CLIP every crop slot (zero padding included), as the reference does, while the
    model's features, and so its loss, stay exactly those of our real-crops-only path."""
    model = build_random_model(OmegaConf.load(ROOT / "conf/model/tiny.yaml"), "sdpa", 0)
    workload = OmegaConf.create({"images": [2, 2], "turns": [1, 1], "aspect": [0.3, 0.4], "width": [600, 800],
                                 "prompt_tokens": [4, 4], "answer_tokens": [2, 2], "samples": 1})
    sample = draw_workload(workload, 4, 36, seed=0)[0]
    batch = sample.tensors(model.config.vocab_size)
    assert sum(sample.real_crops) < 2 * 5  # wide images: fewer real crops than slots
    seen = []
    clip = model.model.vision_embed_tokens.img_processor.vision_model
    clip.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    embed = model.model.vision_embed_tokens
    with torch.no_grad():
        ours = embed(batch["pixel_values"], batch["image_sizes"])
        with all_crops_through_clip(model, enabled=True):
            cookbook = embed(batch["pixel_values"], batch["image_sizes"])
        again = embed(batch["pixel_values"], batch["image_sizes"])
    assert seen == [sum(sample.real_crops), 2 * 5, sum(sample.real_crops)]
    torch.testing.assert_close(cookbook, ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


def _mean_shares(model: str, samples: list) -> dict:
    from phi3v_recipes.flops import sample_flops, shares
    from phi3v_recipes.model.architecture import architecture_config

    config = architecture_config(OmegaConf.load(ROOT / f"conf/model/{model}.yaml"))
    mean = {k: sum(sample_flops(config, s)[k] for s in samples) / len(samples)
            for k in ("clip", "lm_body", "lm_head", "total")}
    return shares(mean)


def test_docvqa_workload_has_the_seeds_length_and_small_keeps_the_real_flop_shares():
    """The DocVQA-shaped workload averages the seed's 2443 tokens per sample (+-5%) at num_crops 16 with the real
    144 tokens per crop, and model=small spends CLIP / LM body / LM head shares of its training FLOPs within 5 points
    of the real-size model's on it."""
    samples = draw_workload(OmegaConf.load(ROOT / "conf/workload/docvqa.yaml"), 16, 144, seed=0, samples=1000)
    mean = sum(s.length for s in samples) / len(samples)
    assert abs(mean / 2443 - 1) <= 0.05, mean
    real, small = _mean_shares("phi3_5_vision", samples), _mean_shares("small", samples)
    assert 20 < real["clip"] < 26 and 72 < real["lm_body"] < 78  # the issue's ~23 / ~75 / ~2
    for part in ("clip", "lm_body", "lm_head"):
        assert abs(small[part] - real[part]) <= 5, (part, small, real)
