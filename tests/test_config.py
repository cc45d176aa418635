"""Composition of task x strategy x hardware: expected values for every combination, early errors for the
impossible ones, and the CLI's `--cfg job` and error output."""

import importlib.util
import itertools

import bitsandbytes  # noqa: F401  (imported before `gpu_machine` pretends CUDA exists)
import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from phi3v_recipes.config import gradient_accumulation, uses_deepspeed, validate
from phi3v_recipes.errors import ConfigError
from tests.conftest import ROOT, compose_config, run_cli

TASKS = ("demo", "docvqa", "hateful_memes", "nlvr2", "ucf101", "jsonl")
STRATEGIES = ("full", "frozen_vision", "lora", "qlora")
HARDWARE = ("a100", "h100", "v100", "rtx8000", "cpu")

PRECISION = {"a100": "bf16", "h100": "bf16", "v100": "fp16", "rtx8000": "fp16", "cpu": "fp32"}
ATTENTION = {"a100": "flash_attention_2", "h100": "flash_attention_2", "v100": "sdpa", "rtx8000": "sdpa",
             "cpu": "sdpa"}
QLORA_COMPUTE = {"a100": "bfloat16", "h100": "bfloat16", "v100": "float16", "rtx8000": "float16", "cpu": "float32"}
# (task, strategy) -> (lr, epochs, lora rank, lora alpha): the seed's published recipes.
SEED = {
    ("nlvr2", "full"): (1e-5, 3, None, None),
    ("nlvr2", "frozen_vision"): (2e-5, 2, None, None),
    ("docvqa", "full"): (5e-6, 2, None, None),
    ("docvqa", "frozen_vision"): (1e-4, 2, None, None),
    ("docvqa", "lora"): (2e-4, 2, 32, 16),
    ("docvqa", "qlora"): (2e-4, 2, 32, 16),
    ("hateful_memes", "full"): (5e-5, 2, None, None),
    ("hateful_memes", "frozen_vision"): (1e-4, 3, None, None),
    ("hateful_memes", "lora"): (2e-4, 2, 128, 256),
    ("hateful_memes", "qlora"): (2e-4, 2, 128, 256),
}


def combo(task: str, strategy: str, hardware: str, *extra: str):
    overrides = [f"task={task}", f"strategy={strategy}", f"hardware={hardware}", *extra]
    if task == "jsonl":
        overrides.append("task.train_file=train.jsonl")
    return compose_config(*overrides)


@pytest.fixture
def gpu_machine(monkeypatch):
    """Pretend to be a CUDA machine with flash-attn installed (what the GPU profiles need to validate)."""
    # validate's scheduler check imports transformers' Trainer utilities, which read the installed version of every
    # package find_spec finds: imported before find_spec pretends that flash_attn is there.
    import transformers.trainer_utils  # noqa: F401

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))


@pytest.mark.parametrize("task,strategy,hardware", list(itertools.product(TASKS, STRATEGIES, HARDWARE)))
def test_every_combination_composes_with_the_expected_values(task, strategy, hardware, gpu_machine):
    """Each of the 120 combinations composes and validates (on 8 ranks of a GPU machine, or 1 CPU process) with
    the hardware's precision and attention, the strategy's switches, and the seed's per-task hyper-parameters."""
    cfg = combo(task, strategy, hardware)
    assert (cfg.task.name, cfg.strategy.name, cfg.hardware.name) == (task, strategy, hardware)
    assert cfg.hardware.precision == PRECISION[hardware]
    assert cfg.model.attn_implementation == ATTENTION[hardware]
    assert cfg.strategy.freeze_vision == (strategy == "frozen_vision")
    assert (cfg.strategy.get("deepspeed") is not None) == (strategy in ("full", "frozen_vision"))
    assert uses_deepspeed(cfg) == (strategy in ("full", "frozen_vision") and hardware != "cpu")
    if cfg.strategy.get("deepspeed"):
        zero = cfg.strategy.deepspeed.zero_optimization
        assert (zero.stage, zero.allgather_bucket_size, zero.reduce_bucket_size) == (2, 5e8, 5e8)
        assert zero.overlap_comm and zero.reduce_scatter and zero.contiguous_gradients and zero.round_robin_gradients
    if strategy == "qlora":
        quant = cfg.strategy.quantization
        assert (quant.bits, quant.quant_type, quant.compute_dtype) == (4, "nf4", QLORA_COMPUTE[hardware])
    lr, epochs, rank, alpha = SEED.get((task, strategy), (None, None, None, None))
    if lr is not None:
        assert (cfg.optim.lr, cfg.train.epochs) == (lr, epochs)
    if strategy in ("lora", "qlora"):
        assert cfg.strategy.lora.rank == (rank or 64)
        assert cfg.strategy.lora.alpha == (alpha or 2 * cfg.strategy.lora.rank)
        assert cfg.strategy.lora.dropout == 0.0 and cfg.strategy.lora.init == "gaussian"
    world = 1 if hardware == "cpu" else 8
    if cfg.train.global_batch_size % (world * cfg.train.batch_size) == 0:
        validate(cfg, world=world)


def test_seed_defaults():
    """Without a task recipe, the defaults are the seed's: AdamW (0.9, 0.95), eps 1e-7, weight decay 0.01,
    linear schedule, 50 warm-up steps, clipping 1.0, non-reentrant checkpointing, 16 crops, global batch 64."""
    cfg = compose_config("task=nlvr2", "strategy=lora", "hardware=a100")
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.eps == 1e-7 and cfg.optim.weight_decay == 0.01
    assert cfg.optim.scheduler == "linear" and cfg.optim.warmup_steps == 50 and cfg.optim.max_grad_norm == 1.0
    assert cfg.train.gradient_checkpointing and cfg.data.num_crops == 16 and cfg.train.global_batch_size == 64
    assert list(cfg.strategy.lora.target_modules) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"]
    assert gradient_accumulation(cfg, world=8) == 8


def test_demo_defaults_to_the_tiny_model_on_cpu():
    """`python -m phi3v_recipes` with no arguments is the demo: tiny model, CPU, fp32, sdpa, no DeepSpeed."""
    cfg = compose_config()
    assert (cfg.task.name, cfg.model.name, cfg.hardware.name) == ("demo", "tiny", "cpu")
    assert not uses_deepspeed(cfg) and cfg.model.attn_implementation == "sdpa"
    validate(cfg, world=1)


@pytest.mark.parametrize("hardware", ["a100", "h100"])
def test_gpu_profiles_pick_flex_attention_without_flash_attn(hardware, monkeypatch):
    """On a CUDA machine without flash-attn, the bf16 GPU profiles choose PyTorch's FlexAttention (packed rows
    still attended per sample) and the configuration validates; with flash-attn they choose flash-attention 2
    (test_every_combination_composes_with_the_expected_values)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    cfg = combo("docvqa", "lora", hardware, "data.packing=true")
    assert cfg.model.attn_implementation == "flex_attention"
    validate(cfg, world=8)


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["hardware=v100", "model.attn_implementation=flash_attention_2", "model.dtype=bfloat16"], 1,
         "flash attention cannot run with fp16"),
        (["hardware=cpu", "model.attn_implementation=flash_attention_2", "model.dtype=bfloat16"], 1,
         "flash-attn is not installed"),
        (["hardware=cpu", "model.attn_implementation=flash_attention_2"], 1, "half-precision weights"),
        (["hardware=cpu", "model.attn_implementation=flex_attention"], 1, "flex_attention cannot train on CPU"),
        (["hardware=a100", "model.attn_implementation=sdpa"], 1, "needs a CUDA GPU"),
        (["hardware=cpu", "train.global_batch_size=64", "train.batch_size=3"], 1, "not divisible"),
        (["hardware=cpu", "train.global_batch_size=16", "train.batch_size=4"], 3, "multiple of 12"),
        (["task=jsonl", "hardware=cpu"], 1, "task.train_file is required"),
        (["hardware=cpu", "data.num_crops=17"], 1, "data.num_crops=17 is out of range"),
        (["hardware=cpu", "data.on_error=ignore"], 1, "choose raise or skip"),
    ],
)
def test_impossible_configurations_fail_early_with_one_sentence(overrides, world, message, monkeypatch):
    """Contradictions stop in validate() with a ConfigError that says what to change (GPU profiles checked as on
    a CUDA machine, except where the missing GPU is the point)."""
    if "needs a CUDA GPU" not in message:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = compose_config(*overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world=world)


def test_qlora_without_a_working_bitsandbytes_fails_early(monkeypatch):
    """If bitsandbytes cannot be imported, strategy=qlora stops at start-up and suggests strategy=lora."""
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("no backend for this machine")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    cfg = compose_config("strategy=qlora")
    with pytest.raises(ConfigError, match="use strategy=lora"):
        validate(cfg, world=1)


def test_unknown_task_names_the_available_ones():
    with pytest.raises(MissingConfigException, match="task"):
        compose_config("task=imagenet")


def test_cli_cfg_job_shows_zero2_bf16_flash_and_the_seed_lr(tmp_path):
    """`--cfg job` for task=nlvr2 strategy=full hardware=a100 prints the composed config: ZeRO stage 2, bf16,
    the profile's attention (flash-attention, or FlexAttention without flash-attn), lr 1e-5 and 3 epochs."""
    out = run_cli(["--cfg", "job", "--resolve", "task=nlvr2", "strategy=full", "hardware=a100"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.strategy.deepspeed.zero_optimization.stage == 2
    # the a100 profile's attention: flash-attention where flash-attn is installed, else FlexAttention
    gpu_attention = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"
    assert cfg.hardware.precision == "bf16" and cfg.model.attn_implementation == gpu_attention
    assert cfg.optim.lr == 1e-5 and cfg.train.epochs == 3
    assert "stage: 2" in out.stdout and gpu_attention in out.stdout and "lr: 1.0e-05" in out.stdout


def test_an_unreachable_model_is_one_sentence_naming_the_setting(tmp_path):
    """Offline, a hub model id (or a missing directory) stops with the setting to change, not a download
    traceback."""
    (tmp_path / "train.jsonl").write_text('{"id": 1, "conversations": [{"user": "hi", "assistant": "yo"}]}\n')
    out = run_cli(["task=jsonl", "hardware=cpu", f"task.train_file={tmp_path / 'train.jsonl'}",
                   "train.global_batch_size=1", "train.batch_size=1", "model.name_or_path=no-such-org/no-such-model"],
                  cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: cannot load the processor from model.name_or_path=no-such-org/no-such-model" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_configuration_error_is_one_line_without_traceback(tmp_path):
    """A configuration mistake exits with code 2 and one `error:` sentence, before any model or data work."""
    out = run_cli(["train.global_batch_size=20", "train.batch_size=8"], cwd=tmp_path)
    assert out.returncode == 2
    assert "error: train.global_batch_size=20 is not divisible" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not any(tmp_path.rglob("*.safetensors"))


def test_configs_ship_inside_the_package():
    """Hydra reads the configs from the installed package `phi3v_recipes.conf`, which is the top-level conf/."""
    import phi3v_recipes.conf

    assert list(phi3v_recipes.conf.__path__) == [str(ROOT / "conf")] or (ROOT / "conf").samefile(
        list(phi3v_recipes.conf.__path__)[0]
    )


def test_the_checkpointing_switch_takes_the_name_of_the_installed_transformers():
    """TrainingArguments calls activation checkpointing `activation_checkpointing` from transformers 5.2x on (the
    old name warns there) and `gradient_checkpointing` before (the lent GPU image's 5.17 rejects the new name:
    every training run failed there at start-up); the recipe passes whichever the installed class declares."""
    import dataclasses

    from phi3v_recipes.train import checkpointing_arguments

    @dataclasses.dataclass
    class Before:  # the fields of transformers 5.17's TrainingArguments
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    @dataclasses.dataclass
    class After:
        activation_checkpointing: bool = False
        activation_checkpointing_kwargs: dict | None = None

    assert checkpointing_arguments(True, Before) == {"gradient_checkpointing": True,
                                                     "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    assert checkpointing_arguments(False, After) == {"activation_checkpointing": False,
                                                     "activation_checkpointing_kwargs": {"use_reentrant": False}}
    Before(**checkpointing_arguments(True, Before))  # each class accepts what it is given
    After(**checkpointing_arguments(True, After))
