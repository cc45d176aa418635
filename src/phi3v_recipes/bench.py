"""`python -m phi3v_recipes.bench workload=<docvqa|hateful_memes|nlvr2> model=<tiny|small|phi3_5_vision>
baseline=cookbook output=<file.json>`: our training step against the upstream cookbook's, side by side.

One process, one randomly initialised model built from `model.architecture` (no download), one optimizer, one
stream of synthetic samples with the workload's shape (`workload.py`). Optimizer steps alternate between the two
paths (the order flips every step), each step consuming the same `bench.samples_per_step` samples:

- **ours**: the recipe's training path as configured: samples packed into padding-free rows of at most
  `data.max_tokens_per_row` tokens (null: the workload's longest sample) (`data/batching.py` `pack_rows`, `data/collate.py` `PackingCollator`; with
  flash-attention its variable-length arguments), `train.batch_size` rows per micro-batch, supervised-only logits
  (`train.supervised_logits`), CLIP on the real crops only, the hardware profile's attention;
- **baseline** (`baseline=cookbook`): the cookbook's way: one sample per micro-batch with gradient accumulation,
  CLIP on all `num_crops + 1` crop slots of every image (zero padding included, as the reference runs them),
  full-vocabulary logits, no packing, and its attention: flash-attention where the hardware profile has it (its
  `--use_flash_attention`), else eager (its only other path).

Both compute the mean loss over all supervised tokens of the step (`num_items_in_batch`), clip gradients at
`optim.max_grad_norm` and take one AdamW step (fp32 weights and states; on a GPU under bf16 autocast, so the fp32
weights are the master weights of full fine-tuning; LoRA adapters are fp32 over frozen bf16 / 4-bit weights).
`first_loss` of each path is its loss on the first step's samples at the initial weights (before any update).

Micro-batches are built one at a time (as a DataLoader hands them over; building them is off the clock) and the
clock runs over the forward and backward passes and the optimizer step.
Reported per path: samples/s (median, min, max over the measured steps), tokens/s (median), padding fraction
(padding tokens / tokens processed), peak memory (`peak_memory_mb`: on GPU `torch.cuda.max_memory_allocated`; on
CPU the process's resident set sampled every millisecond during the path's steps, after freed heap pages went back
to the OS, minus the resident set of the interpreter and its libraries measured before the model was built, so that,
like CUDA's figure, it counts the model, optimizer state, batches and activations; the raw resident set is
`peak_rss_mb`. Both include the shared model and optimizer state, which either path alone needs as well), first loss, and on GPU the MFU: model FLOPs per sample
(`flops.py`) x samples/s / the bf16 matmul rate measured here.
"""

import contextlib
import ctypes
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from phi3v_recipes.cli import exit_on_user_error, one_sentence_errors, register_resolvers
from phi3v_recipes.config import check_hardware
from phi3v_recipes.errors import ConfigError
from phi3v_recipes.files import atomic_write_text
from phi3v_recipes.strategy import apply_strategy, base_model

register_resolvers()

PATHS = ("ours", "baseline")


# ---- measurement helpers ------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so one path's resident set does not carry the other's."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory during a block: CUDA's allocator peak on a GPU, else the resident set sampled every ms."""

    def __init__(self, device: torch.device, floor: int = 0):
        self.device, self.peak, self.floor = device, 0, floor

    @property
    def peak_mb(self) -> float:
        """Peak above the floor: on CPU the resident set beyond the interpreter and its libraries (the CPU
        counterpart of CUDA's allocator peak, which counts tensors only)."""
        return (self.peak - self.floor) / 2**20

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return
        _trim_heap()
        stop, peak = threading.Event(), [_rss_bytes()]

        def sample() -> None:
            while not stop.wait(0.001):
                peak[0] = max(peak[0], _rss_bytes())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, peak[0], _rss_bytes())


def matmul_tflops(device: torch.device, size: int, iters: int) -> float | None:
    """bf16 matmul rate of this GPU (TFLOP/s), measured on `size`-square matrices; None on CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12


# ---- model -------------------------------------------------------------------------------------------------------


def build_model(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """The random model of `model.architecture` with the strategy applied, on `device`, in training mode."""
    from phi3v_recipes.loading import load_model
    from phi3v_recipes.model.architecture import build_random_model

    attn = cfg.model.attn_implementation
    quantized = bool(cfg.strategy.get("quantization"))
    model = build_random_model(cfg.model, attn, cfg.bench.seed, "cpu" if quantized else device)
    if quantized:
        if device.type != "cuda":
            raise ConfigError(f"strategy={cfg.strategy.name} benchmarks on a GPU only (4-bit kernels); use "
                              "strategy=lora on CPU.")
        with tempfile.TemporaryDirectory() as tmp:  # 4-bit weights come from the loader, as in training
            model.save_pretrained(tmp)
            del model
            model = load_model(cfg, tmp)
    elif cfg.strategy.get("lora"):
        model = model.to(device=device, dtype=getattr(torch, cfg.model.dtype))  # frozen base in the model dtype
    else:
        model = model.to(device)  # trained weights stay fp32: the master weights (bf16 autocast on GPU)
    if cfg.train.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # its name before transformers 5.2x (the GPU image's 5.17)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_strategy(model, cfg)
    for p in model.parameters():  # adapters (and anything trained) in fp32
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model.train()


def set_attention(model: torch.nn.Module, attn: str) -> None:
    from transformers.utils import logging

    base = base_model(model)
    if base.config._attn_implementation != attn:
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # "sub-config vision_config set without its sub-model": it is ours, it is
        try:                           # read at every forward
            base.set_attn_implementation(attn)
        finally:
            logging.set_verbosity(verbosity)


@contextlib.contextmanager
def all_crops_through_clip(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """While enabled, CLIP runs on every crop slot of every image, the zero padding included (the reference's way);
    the padding's features are then dropped, so outputs and gradients are unchanged, only the work grows."""
    if not enabled:
        yield
        return
    embedding = base_model(model).model.vision_embed_tokens
    real_features, padding = embedding.crop_features, [0]

    def count_padding(module: Any, args: tuple, kwargs: dict) -> None:
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        image_sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        sizes = torch.as_tensor(image_sizes).reshape(-1, 2).long() // embedding.crop_size
        padding[0] = pixel_values.shape[0] * pixel_values.shape[1] - int((sizes[:, 0] * sizes[:, 1] + 1).sum())

    def with_padding(crops: torch.Tensor) -> torch.Tensor:
        zeros = crops.new_zeros(padding[0], *crops.shape[1:])
        return real_features(torch.cat([crops, zeros]))[: crops.shape[0]]

    hook = embedding.register_forward_pre_hook(count_padding, with_kwargs=True)
    embedding.crop_features = with_padding
    try:
        yield
    finally:
        hook.remove()
        del embedding.crop_features


# ---- batches -----------------------------------------------------------------------------------------------------


def row_budget(cfg: DictConfig, samples: list) -> int:
    """Token budget of ours' packed rows: `data.max_tokens_per_row`, or (null) the longest sample given."""
    return int(cfg.data.max_tokens_per_row or max(s.length for s in samples))


def micro_batches(path: str, samples: list, cfg: DictConfig, budget: int, pad_token_id: int, vocab_size: int,
                  device: torch.device) -> Iterator[dict]:
    """The micro-batches of one optimizer step, built one at a time as a DataLoader hands them over: packed rows of
    `train.batch_size` rows (ours), or one sample each (the cookbook)."""
    from phi3v_recipes.data.batching import pack_rows
    from phi3v_recipes.data.collate import PackingCollator, PaddingCollator

    singles = [[i] for i in range(len(samples))]
    if path == "baseline":
        groups, collate = singles, PaddingCollator(pad_token_id)
    else:
        if cfg.data.packing:
            rows = pack_rows([s.length for s in samples], budget)
            collate: Any = PackingCollator(flash_kwargs=cfg.model.attn_implementation.startswith("flash"))
        else:
            rows, collate = singles, PaddingCollator(pad_token_id)
        k = int(cfg.train.batch_size)
        groups = [[i for r in rows[j : j + k] for i in r] for j in range(0, len(rows), k)]
    for group in groups:
        yield _to(collate([samples[i].tensors(vocab_size) for i in group]), device)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---- the benchmark -----------------------------------------------------------------------------------------------


class TrainingPath:
    """One training path: how its micro-batches are built and how the model runs them."""

    def __init__(self, name: str, cfg: DictConfig):
        self.name = name
        flash = cfg.model.attn_implementation.startswith("flash")
        cookbook = cfg.bench.cookbook_attn_implementation
        if name == "baseline":
            self.attn = (cfg.model.attn_implementation if flash else "eager") if cookbook == "auto" else cookbook
        else:
            self.attn = cfg.model.attn_implementation
        self.supervised = bool(cfg.train.supervised_logits) if name == "ours" else False
        self.all_crops = name == "baseline"
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.padding = [0, 0]  # padding tokens, tokens processed
        self.first_loss: float | None = None


def run(cfg: DictConfig) -> dict[str, Any]:
    from phi3v_recipes.flops import sample_flops, shares
    from phi3v_recipes.loading import local_device
    from phi3v_recipes.model.architecture import architecture_config
    from phi3v_recipes.workload import draw_workload

    check_hardware(cfg, training=True)
    if cfg.baseline not in ("cookbook", None, "none"):
        raise ConfigError(f"baseline={cfg.baseline}: choose cookbook, or none (our path alone).")
    bench = cfg.bench
    if bench.steps < 1 or bench.samples_per_step < 1 or bench.warmup_steps < 0:
        raise ConfigError("bench.steps and bench.samples_per_step must be >= 1, bench.warmup_steps >= 0.")
    device = torch.device("cpu") if cfg.hardware.name == "cpu" else local_device()
    torch.manual_seed(bench.seed)
    config = architecture_config(cfg.model)
    samples = draw_workload(cfg.workload, cfg.data.num_crops, config.img_processor["num_img_tokens"], bench.seed)
    total_steps = bench.warmup_steps + bench.steps
    if len(samples) < bench.samples_per_step:
        raise ConfigError(f"workload.samples={len(samples)} is below bench.samples_per_step={bench.samples_per_step}.")

    def step_samples(step: int) -> list:
        n = bench.samples_per_step
        return [samples[(step * n + j) % len(samples)] for j in range(n)]

    progress = Path(cfg.progress) if cfg.get("progress") else None
    label = {"workload": cfg.workload.name, "model": cfg.model.name, "strategy": cfg.strategy.name}
    clock = [time.perf_counter()]

    def done(what: str) -> None:
        """Where the time before and between the measured steps goes (model build, compilation), on the console
        and in the progress file: a run cut off at a time limit still says how far it got."""
        seconds, clock[0] = time.perf_counter() - clock[0], time.perf_counter()
        print(f"bench: {what} in {seconds:.1f} s", flush=True)
        if progress:
            append_json_line(progress, {"kind": "bench_phase", **label, "what": what, "seconds": seconds})

    # CPU: the resident set of the interpreter and its libraries, before any model tensor exists
    floor = _rss_bytes() if device.type == "cpu" else 0
    model = build_model(cfg, device)
    done("model built")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                and cfg.hardware.precision == "bf16" else contextlib.nullcontext())
    pad = config.pad_token_id
    budget = row_budget(cfg, samples)
    paths = [TrainingPath(name, cfg) for name in (PATHS if cfg.baseline == "cookbook" else PATHS[:1])]
    memory = {p.name: PeakMemory(device, floor) for p in paths}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward_backward(path: TrainingPath, chosen: list, num_items: int, train: bool) -> tuple[float, float, int]:
        """Loss of the step, seconds of compute (building the micro-batches is the data loader's work, off the
        clock), and tokens processed (padding included)."""
        set_attention(model, path.attn)
        total, seconds, processed = torch.zeros((), device=device), 0.0, 0
        with all_crops_through_clip(model, path.all_crops):
            for batch in micro_batches(path.name, chosen, cfg, budget, pad, config.vocab_size, device):
                processed += batch["input_ids"].numel()
                sync()
                start = time.perf_counter()
                with autocast, (contextlib.nullcontext() if train else torch.no_grad()):
                    out = model(**batch, num_items_in_batch=num_items, supervised_logits=path.supervised,
                                use_cache=False)
                if train:
                    out.loss.backward()
                total += out.loss.detach().float()
                sync()
                seconds += time.perf_counter() - start
                del out, batch  # one micro-batch resident at a time, as in training
        return float(total), seconds, processed

    rate = matmul_tflops(device, bench.matmul_size, bench.matmul_iters)
    done(f"matmul rate measured ({rate:.0f} TFLOP/s bf16)" if rate else "matmul rate measured (CPU: none)")

    # first_loss: each path's loss on the first step's samples at the initial weights
    first = step_samples(0)
    for path in paths:
        path.first_loss = forward_backward(path, first, sum(s.supervised for s in first), train=False)[0]
        done(f"first loss of {path.name} (its first forward passes, compilation included)")
        if progress:
            append_json_line(progress, {"kind": "bench_first_loss", **label, "path": path.name,
                                        "attn_implementation": path.attn, "first_loss": path.first_loss})

    for step in range(total_steps):
        chosen = step_samples(step)
        num_items = sum(s.supervised for s in chosen)
        real_tokens = sum(s.length for s in chosen)
        for path in paths if step % 2 == 0 else paths[::-1]:
            with memory[path.name].measure():
                _, elapsed, processed = forward_backward(path, chosen, num_items, train=True)
                sync()
                start = time.perf_counter()
                if cfg.optim.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync()
                elapsed += time.perf_counter() - start
            done(f"step {step} of {path.name}{' (warm-up)' if step < bench.warmup_steps else ''}: "
                 f"{elapsed:.2f} s measured")
            if step >= bench.warmup_steps:
                path.times.append(elapsed)
                path.tokens.append(real_tokens)
                path.padding[0] += processed - real_tokens
                path.padding[1] += processed
            if progress:  # each step as soon as it is measured: a run cut off still leaves its figures
                step_flops = sum(sample_flops(config, s)["total"] for s in chosen)
                append_json_line(progress, {
                    "kind": "bench_step", **label, "path": path.name, "step": step,
                    "warmup": step < bench.warmup_steps, "seconds": elapsed,
                    "samples_per_s": bench.samples_per_step / elapsed, "tokens_per_s": real_tokens / elapsed,
                    "mfu": step_flops / elapsed / (rate * 1e12) if rate else None,
                    "peak_memory_mb": memory[path.name].peak_mb})

    measured = [s for step in range(bench.warmup_steps, total_steps) for s in step_samples(step)]
    flops = [sample_flops(config, s) for s in measured]
    per_sample = {k: statistics.fmean(f[k] for f in flops) for k in flops[0]}
    result: dict[str, Any] = {
        "workload": cfg.workload.name, "model": cfg.model.name, "strategy": cfg.strategy.name,
        "hardware": cfg.hardware.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "samples_per_step": bench.samples_per_step, "steps": bench.steps,
        "warmup_steps": bench.warmup_steps, "num_crops": cfg.data.num_crops,
        "max_tokens_per_row": budget if cfg.data.packing else None,
        "mean_sample_tokens": round(statistics.fmean(s.length for s in measured), 1),
        "model_flops_per_sample": per_sample["total"], "flop_shares_percent": {
            k: round(v, 1) for k, v in shares(per_sample).items()},
        "matmul_tflops": rate,
    }
    for path in paths:
        speeds = [bench.samples_per_step / t for t in path.times]
        tokens_per_s = [n / t for n, t in zip(path.tokens, path.times, strict=True)]
        median = statistics.median(speeds)
        result[path.name] = {
            "attn_implementation": path.attn, "packing": path.name == "ours" and bool(cfg.data.packing),
            "supervised_logits": path.supervised, "clip_on_padding_crops": path.all_crops,
            "samples_per_s": {"median": median, "min": min(speeds), "max": max(speeds)},
            "tokens_per_s": statistics.median(tokens_per_s),
            "padding_fraction": path.padding[0] / path.padding[1] if path.padding[1] else 0.0,
            "peak_memory_mb": memory[path.name].peak_mb,
            "peak_rss_mb": memory[path.name].peak / 2**20 if device.type == "cpu" else None,
            "first_loss": path.first_loss,
            "mfu": per_sample["total"] * median / (rate * 1e12) if rate else None,
        }
    if cfg.baseline == "cookbook":
        ours, base = result["ours"], result["baseline"]
        result["speedup"] = ours["samples_per_s"]["median"] / base["samples_per_s"]["median"]
        result["peak_memory_ratio"] = ours["peak_memory_mb"] / base["peak_memory_mb"]
        result["first_loss_rel_diff"] = abs(ours["first_loss"] - base["first_loss"]) / abs(base["first_loss"])
        result["first_loss_equal"] = result["first_loss_rel_diff"] <= 1e-4
    if cfg.output:
        atomic_write_text(Path(cfg.output), json.dumps(result, indent=2) + "\n")
    if progress:
        append_json_line(progress, {"kind": "bench_result", **result})
    print(table(result), flush=True)
    return result


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    """Append `record` to the JSON-lines file `path` at once (flushed, so a run killed later keeps it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def table(result: dict[str, Any]) -> str:
    paths = [p for p in PATHS if p in result]
    lines = [
        f"== bench: workload={result['workload']} model={result['model']} strategy={result['strategy']} "
        f"on {result['device']} ({result['samples_per_step']} samples per step, {result['steps']} steps, mean "
        f"{result['mean_sample_tokens']:.0f} tokens per sample) ==",
        f"{'':<22}" + "".join(f"{p:>16}" for p in paths),
    ]

    def row(label: str, fmt: str, get: Any) -> None:
        cells = []
        for p in paths:
            value = get(result[p])
            cells.append(f"{'-':>16}" if value is None else f"{value:>16{fmt}}")
        lines.append(f"{label:<22}" + "".join(cells))

    row("samples/s (median)", ".3f", lambda r: r["samples_per_s"]["median"])
    row("samples/s (min)", ".3f", lambda r: r["samples_per_s"]["min"])
    row("samples/s (max)", ".3f", lambda r: r["samples_per_s"]["max"])
    row("tokens/s", ".0f", lambda r: r["tokens_per_s"])
    row("padding fraction", ".4f", lambda r: r["padding_fraction"])
    row("peak memory (MB)", ".0f", lambda r: r["peak_memory_mb"])
    row("peak RSS (MB, CPU)", ".0f", lambda r: r["peak_rss_mb"])
    row("first loss", ".6f", lambda r: r["first_loss"])
    row("MFU", ".3f", lambda r: r["mfu"])
    if "speedup" in result:
        lines.append(f"speedup {result['speedup']:.3f}x, peak memory ratio {result['peak_memory_ratio']:.3f}, "
                     f"first loss relative difference {result['first_loss_rel_diff']:.2e}")
    shares_ = ", ".join(f"{k} {v}%" for k, v in result["flop_shares_percent"].items())
    lines.append(f"model FLOPs per sample {result['model_flops_per_sample']:.3e} ({shares_})")
    return "\n".join(lines)


@one_sentence_errors
@hydra.main(version_base="1.3", config_path="pkg://phi3v_recipes.conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(run, cfg)


if __name__ == "__main__":
    main()
