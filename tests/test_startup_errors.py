"""Impossible runs stop at start-up with one sentence naming the setting (ConfigError; exit 2, no traceback from
the CLI): no training steps, non-numeric or out-of-range numeric settings, and a run directory that is a file."""

import copy
import subprocess
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from phi3v_recipes.cli import exit_on_user_error
from phi3v_recipes.config import SETTINGS, validate
from phi3v_recipes.errors import ConfigError
from tests.conftest import compose_config, run_parallel

# (override, words of the sentence): at least one bad value for every row of config.SETTINGS
BAD_SETTINGS = [
    ("data.num_crops=0", "data.num_crops=0 is out of range; give a whole number >= 1 and <= 16"),
    ("data.num_crops=null", "data.num_crops is null"),
    ("data.max_length=0", "data.max_length=0 is out of range"),
    ("data.num_workers=-1", "data.num_workers=-1 is out of range"),
    ("data.max_image_pixels=many", "data.max_image_pixels='many' is not a whole number"),
    ("data.screen_workers=0", "data.screen_workers=0 is out of range; give a whole number >= 1 (or null)"),
    ("data.packing=yes", "data.packing='yes' is not true or false"),
    ("data.max_tokens_per_row=0", "data.max_tokens_per_row=0 is out of range"),
    ("data.group_by_length=2", "data.group_by_length=2 is not true or false"),
    ("data.length_group_batches=0", "data.length_group_batches=0 is out of range"),
    ("train.supervised_logits=on", "train.supervised_logits='on' is not true or false"),
    ("train.global_batch_size=0", "train.global_batch_size=0 is out of range"),
    ("train.batch_size=1.5", "train.batch_size=1.5 is not a whole number"),
    ("train.epochs=abc", "train.epochs='abc' is not a number; give a number >= 0"),
    ("train.epochs=-1", "train.epochs=-1 is out of range"),
    ("train.max_steps=-2", "train.max_steps=-2 is out of range"),
    ("train.save_steps=0", "train.save_steps=0 is out of range"),
    ("train.save_total_limit=0", "train.save_total_limit=0 is out of range"),
    ("train.seed=-1", "train.seed=-1 is out of range"),
    ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing='maybe' is not true or false"),
    ("train.logging_steps=0", "train.logging_steps=0 is out of range"),
    ("optim.lr=-1", "optim.lr=-1 is out of range; give a number > 0"),
    ("optim.lr=0", "optim.lr=0 is out of range"),
    ("optim.lr=nan", "optim.lr=nan is not a number"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 is out of range"),
    ("optim.betas=[0.9,1.0]", "optim.betas.1=1.0 is out of range; give a number >= 0 and < 1"),
    ("optim.betas=[x,0.9]", "optim.betas.0='x' is not a number"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]: give two numbers, [beta1, beta2]"),
    ("optim.eps=0", "optim.eps=0 is out of range"),
    ("optim.warmup_steps=-5", "optim.warmup_steps=-5 is out of range"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm=-1 is out of range"),
    ("eval.before=1", "eval.before=1 is not true or false"),
    ("eval.after=no", "eval.after='no' is not true or false"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0 is out of range"),
    ("eval.batch_size=0", "eval.batch_size=0 is out of range"),
    ("eval.max_samples=0", "eval.max_samples=0 is out of range"),
    ("eval.every_steps=0", "eval.every_steps=0 is out of range; give a whole number >= 1 (or null)"),
    ("eval.keep_best=maybe", "eval.keep_best='maybe' is not true or false"),
    ("eval.patience=0", "eval.patience=0 is out of range"),
    ("eval.patience=3", "eval.patience=3 counts evaluations during training, but eval.every_steps is null"),
    ("task.train_size=lots", "task.train_size='lots' is not a whole number"),
    ("task.eval_size=-1", "task.eval_size=-1 is out of range"),
    ("task.seed=0.5", "task.seed=0.5 is not a whole number"),
    ("task=nlvr2 task.eval_holdout=-5", "task.eval_holdout=-5 is out of range"),
    ("task=nlvr2 task.num_images=0", "task.num_images=0 is out of range"),
    ("strategy.lora.rank=0", "strategy.lora.rank=0 is out of range"),
    ("strategy.lora.alpha=-2", "strategy.lora.alpha=-2 is out of range"),
    ("strategy.lora.dropout=1", "strategy.lora.dropout=1 is out of range"),
    ("hardware.deepspeed=yes", "hardware.deepspeed='yes' is not true or false"),
    ("strategy.freeze_vision='false'", "strategy.freeze_vision='false' is not true or false"),
    ("strategy.quantization.double_quant=maybe", "strategy.quantization.double_quant='maybe' is not true or false"),
    ("strategy.quantization.quant_type=foo", "strategy.quantization.quant_type=foo: choose one of nf4, fp4"),
    ("strategy.quantization.compute_dtype=foo", "strategy.quantization.compute_dtype=foo: choose one of float32"),
    ("strategy.lora.init=foo", "strategy.lora.init=foo is not a LoRA initialisation this recipe applies"),
    ("strategy.lora.target_modules=qkv_proj", "strategy.lora.target_modules=qkv_proj is not a list of module names"),
    ("strategy.lora.target_modules=[]", "strategy.lora.target_modules=[] puts no adapter on the language model"),
    ("hardware.precision=fp16", "hardware.precision=fp16 has no effect on hardware=cpu"),
    ("model.name_or_path=null", "model.name_or_path=None names no model"),
    ("task.metric=bleu", "task.metric=bleu is not a metric"),
    ("run.stop_signals=[SIGFOO]", "run.stop_signals: SIGFOO is not a signal this process can catch"),
    ("run.stop_signals=[SIGKILL]", "run.stop_signals: SIGKILL is not a signal this process can catch"),
    ("run.stop_signals=SIGTERM", "run.stop_signals=SIGTERM is not a list"),
    ("hardware.memory_gib=-5", "hardware.memory_gib=-5 is out of range; give a number > 0 (or null)"),
    ("data.packing=true data.group_by_length=true", "data.group_by_length=true has no effect with data.packing=true"),
    ("train.epochs=0", "train.epochs=0 with train.max_steps=-1 trains nothing"),
    ("train.max_steps=0 train.epochs=0", "train.epochs=0 with train.max_steps=0 trains nothing"),
]


# (override, words) for the keys only the plan's config has (conf/plan.yaml)
BAD_PLAN_SETTINGS = [
    ("plan.workload_samples=0", "plan.workload_samples=0 is out of range; give a whole number >= 1"),
    ("plan.workload_seed=-1", "plan.workload_seed=-1 is out of range"),
    ("plan.allocator_reserve=-1", "plan.allocator_reserve=-1 is out of range; give a number >= 1"),
    ("plan.cuda_context_gib=-0.5", "plan.cuda_context_gib=-0.5 is out of range"),
    ("plan.overlap_comm_buffers=x", "plan.overlap_comm_buffers='x' is not a number"),
    ("plan.adam_temporaries=-1", "plan.adam_temporaries=-1 is out of range"),
    ("plan.logits_fp32_copies=-3", "plan.logits_fp32_copies=-3 is out of range"),
    ("plan.max_search=0", "plan.max_search=0 is out of range"),
]


@pytest.mark.parametrize("override,words", BAD_PLAN_SETTINGS, ids=[o for o, _ in BAD_PLAN_SETTINGS])
def test_bad_plan_settings_are_one_sentence(override, words):
    """The plan's memory-model constants are physical quantities: a negative reserve or a zero search bound used to
    print a plan (`-25.94 GiB ... fits`); now it is the sentence of any bad setting."""
    from hydra import compose, initialize_config_module

    from phi3v_recipes.config import check_settings

    with initialize_config_module(config_module="phi3v_recipes.conf", version_base="1.3"):
        cfg = compose(config_name="plan", overrides=["hardware=a100", override])
    with pytest.raises(ConfigError) as err:
        check_settings(cfg)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_every_numeric_setting_is_checked():
    """The table of bad values covers every checked setting, so a new knob gets a test when it gets a row."""
    named = {words.split(" ")[0].split("=")[0] for _, words in BAD_SETTINGS + BAD_PLAN_SETTINGS}
    assert {setting.key for setting in SETTINGS} <= named


@pytest.fixture(scope="module")
def base_configs(tmp_path_factory):
    """The composed CPU configs (full and lora) that each case changes a copy of (composing per case is slow)."""
    run_dir = tmp_path_factory.mktemp("startup") / "run"
    configs = {strategy: compose_config("hardware=cpu", f"strategy={strategy}", f"run.output_dir={run_dir}")
               for strategy in ("full", "lora")}
    configs["nlvr2"] = compose_config("hardware=cpu", "task=nlvr2", f"run.output_dir={run_dir}")
    configs["qlora"] = compose_config("hardware=cpu", "strategy=qlora", f"run.output_dir={run_dir}")
    return configs


@pytest.mark.parametrize("overrides,words", BAD_SETTINGS, ids=[o for o, _ in BAD_SETTINGS])
def test_bad_numeric_settings_are_one_sentence(overrides, words, base_configs):
    """Each non-numeric, non-boolean or out-of-range value (and a run without training steps) is a ConfigError
    whose message names the setting and its value, and says what to give. Values are parsed as on the command
    line."""
    base = ("lora" if overrides.startswith("strategy.lora") else "qlora" if overrides.startswith("strategy.quant")
            else "nlvr2" if overrides.startswith("task=") else "full")
    cfg = copy.deepcopy(base_configs[base])
    for override in OverridesParser.create().parse_overrides(overrides.split()[base == "nlvr2":]):
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world=1)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_good_edge_values_pass(tmp_path):
    """The edges of each range are allowed: no step limit with epochs, epochs as a fraction, zero warm-up and
    clipping, keep-all checkpoints, no length or pixel limit."""
    cfg = compose_config("hardware=cpu", "train.epochs=0.5", "train.max_steps=-1", "optim.warmup_steps=0",
                         "optim.max_grad_norm=0", "train.save_total_limit=null", "data.max_length=null",
                         "data.max_image_pixels=null", "train.seed=0", f"run.output_dir={tmp_path / 'run'}")
    validate(cfg, world=1)
    validate(compose_config("hardware=cpu", "train.epochs=0", "train.max_steps=3",
                            f"run.output_dir={tmp_path / 'run'}"), world=1)


def test_run_directory_below_a_file_is_refused(tmp_path):
    """A run.output_dir inside a path that is a file cannot be created: validate says which part is the file."""
    (tmp_path / "taken").write_text("")
    cfg = compose_config("hardware=cpu", f"run.output_dir={tmp_path / 'taken' / 'run'}")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'taken'} is a file, not a directory; choose another"):
        validate(cfg, world=1)


def test_unwritable_run_directory_is_refused():
    """A run.output_dir under a directory that cannot be written (read-only file system, no permission; /proc/1
    refuses even root) is a ConfigError naming the directory, before anything is created."""
    cfg = compose_config("hardware=cpu", "run.output_dir=/proc/1/runs/x")
    with pytest.raises(ConfigError, match="run.output_dir=/proc/1/runs/x: /proc/1 is not writable here"):
        validate(cfg, world=1)


# Start-up is the subject of the CLI tests below, so their commands run in new interpreters (not forked from the
# tests' fork server, whose children inherit torch and transformers), each under this wrapper: it runs the module
# given first as `python -m` would and, at exit, prints which of the libraries that take seconds to import loaded.
HEAVY = ("torch", "transformers", "peft", "datasets")
IMPORT_PROBE = f"""import atexit, runpy, sys
module = sys.argv.pop(1)
atexit.register(lambda: print("heavy imports:", *[name for name in {HEAVY!r} if name in sys.modules]))
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_probed(commands: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """`run_parallel` of each command (module first) in a new interpreter under IMPORT_PROBE."""
    (cwd / "import_probe.py").write_text(IMPORT_PROBE)
    return run_parallel({name: ["import_probe", *args] for name, args in commands.items()}, cwd=cwd, fresh=True)


def heavy_imports(out: subprocess.CompletedProcess) -> list[str]:
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("heavy imports:")]
    return line.split()[2:]


def test_cli_start_up_errors_exit_2_with_one_sentence(tmp_path):
    """Through `python -m phi3v_recipes`: a non-numeric epoch count (checked in validate, like a run without
    steps) and a run directory that is a file (checked before Hydra creates it) each exit with code 2 and one
    `error:` line naming the setting, no traceback, and no model or checkpoint is written. Both are answered
    before torch, transformers, peft or datasets is imported (within a second, not after ~8 s of imports)."""
    (tmp_path / "taken").write_text("a file, not a directory\n")
    commands = {
        "abc": ["phi3v_recipes", "train.epochs=abc", f"run.output_dir={tmp_path / 'abc'}"],
        "file": ["phi3v_recipes", f"run.output_dir={tmp_path / 'taken'}"],
    }
    results = run_probed(commands, cwd=tmp_path)
    expected = {
        "abc": "error: train.epochs='abc' is not a number; give a number >= 0.",
        "file": f"error: run.output_dir={tmp_path / 'taken'}: {tmp_path / 'taken'} is a file, not a directory; "
                "choose another run.output_dir.",
    }
    for name, out in results.items():
        assert out.returncode == 2, (name, out.stderr[-2000:])
        assert "Traceback" not in out.stderr + out.stdout, name
        errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(expected[name]), (name, out.stderr[-2000:])
        assert heavy_imports(out) == [], name
    assert not any(tmp_path.rglob("checkpoint-*")) and not any(tmp_path.rglob("*.safetensors"))
    assert (tmp_path / "taken").read_text() == "a file, not a directory\n"


# (entrypoint module, overrides, the start of its one `error:` sentence): what Hydra itself finds while composing
# (unknown key, unknown group option, an unparsable override), a `+key` that adds a key nothing reads, and values
# handed to libraries, for every Hydra entrypoint; an output location that cannot be written (/proc/1 refuses
# even root, unlike a chmod).
CLI_CASES = {
    "unknown_key": ("phi3v_recipes", ["train.lrr=1"],
                    "error: train.lrr: train has no key lrr (did you mean optim.lr?); its keys are batch_size,"),
    "unknown_option": ("phi3v_recipes", ["task=nlvr"],
                       "error: task=nlvr is not an option of task (did you mean nlvr2?); choose one of demo,"),
    "added_key": ("phi3v_recipes", ["+train.epoch=3", "train.max_steps=1"],
                  "error: +train.epoch: train has no key epoch (did you mean epochs?); its keys are"),
    "scheduler": ("phi3v_recipes", ["optim.scheduler=cosin", "hardware=cpu"],
                  "error: optim.scheduler=cosin is not a transformers learning-rate schedule (did you mean cosine?)"),
    "dtype": ("phi3v_recipes", ["model.dtype=bf16", "hardware=cpu"],
              "error: model.dtype=bf16: choose one of float32, bfloat16, float16 (did you mean bfloat16"),
    "unparsable": ("phi3v_recipes", ["optim.betas=[0.9"], "error: the override 'optim.betas=[0.9' cannot be parsed"),
    "evaluate": ("phi3v_recipes.evaluate", ["eval.batchsize=2"],
                 "error: eval.batchsize: eval has no key batchsize (did you mean batch_size?)"),
    "predict": ("phi3v_recipes.predict", ["hardware=cpux", "input=a.jsonl", "output=b.jsonl"],
                "error: hardware=cpux is not an option of hardware (did you mean cpu?)"),
    "export": ("phi3v_recipes.export", ["+dtypes=float32", "output=out"],
               "error: +dtypes: the configuration has no section or key dtypes (did you mean dtype?)"),
    "plan": ("phi3v_recipes.plan", ["world_sise=4"], "error: world_sise: the configuration has no section or key"),
    # plan refuses what training refuses, with training's sentence (config.gradient_accumulation)
    "plan_world": ("phi3v_recipes.plan", ["task=nlvr2", "world_size=128"],
                   "error: train.global_batch_size=64 is not divisible by world size 128 x train.batch_size=1;"),
    "unwritable_run": ("phi3v_recipes", ["run.output_dir=/proc/1/phi3v-run"],
                       "error: run.output_dir=/proc/1/phi3v-run: /proc/1 is not writable here (a read-only file "
                       "system or no permission); choose another run.output_dir."),
    "unwritable_sweep": ("phi3v_recipes", ["-m", "hydra.sweep.dir=/proc/1/sweep", "train.max_steps=1,2"],
                         "error: hydra.sweep.dir=/proc/1/sweep: /proc/1 is not writable here"),
    "unwritable_predict": ("phi3v_recipes.predict", ["hardware=cpu", "input=a.jsonl",
                                                     "output=/proc/1/out/answers.jsonl"],
                           "error: output=/proc/1/out/answers.jsonl: /proc/1 is not writable here"),
    "unwritable_export": ("phi3v_recipes.export", ["model.name_or_path=.", "output=/proc/1/export"],
                          "error: output=/proc/1/export: /proc/1 is not writable here"),
    # data.check's answer to a mistyped path comes before the processor code loads (was 7 s of imports)
    "check_missing": ("phi3v_recipes.data.check", ["no-such.jsonl"], "error: no-such.jsonl does not exist"),
}


def test_composition_mistakes_exit_2_with_one_sentence(tmp_path):
    """Through each entrypoint: Hydra's composition errors and a `+key` that adds an unknown key end with exit
    code 2 and one `error:` sentence naming the closest valid key or option (not Hydra's report with exit code 1,
    and not silently ignored); a bad scheduler or dtype, which only a library would reject later, stops at
    start-up the same way, and so does an output location that cannot be written. No run is recorded and no
    weights are written. Mistakes that need no library to be found are answered before torch, transformers, peft
    or datasets is imported."""
    commands = {name: [module, *overrides, f"run.output_dir={tmp_path / name}"]
                if module == "phi3v_recipes" and not name.startswith("unwritable") else [module, *overrides]
                for name, (module, overrides, _) in CLI_CASES.items()}
    results = run_probed(commands, cwd=tmp_path)
    for name, out in results.items():
        expected = CLI_CASES[name][2]
        assert out.returncode == 2, (name, out.stderr[-2000:])
        assert "Traceback" not in out.stderr + out.stdout and "HYDRA_FULL_ERROR" not in out.stderr, name
        errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(expected), (name, out.stderr[-2000:])
        assert not (tmp_path / name / "config.yaml").exists(), name  # Hydra's .hydra/ and train.log at most
        if name != "scheduler":  # the schedule names are transformers' (config.check_scheduler imports it)
            assert heavy_imports(out) == [], name
    assert not any(tmp_path.rglob("*.safetensors"))


def test_a_missing_file_of_the_users_is_one_sentence_and_an_internal_one_is_not_hidden(capsys):
    """`cli.exit_on_user_error`: a FileNotFoundError that names a file (or is our own sentence) is the user's
    mistake, exit 2 with one `error:` line; one without a file name (a socket between processes that vanished) is
    not the user's and keeps its traceback, rather than an exit 2 with "[Errno 2] No such file or directory"."""
    cfg = OmegaConf.create({})

    def missing(err: FileNotFoundError):
        def run(_):
            raise err
        return run

    for err in (FileNotFoundError(2, "No such file or directory", "/data/train.jsonl"),
                FileNotFoundError("/data/train.jsonl does not exist: check the task's data file setting.")):
        with pytest.raises(SystemExit) as stop:
            exit_on_user_error(missing(err), cfg)
        assert stop.value.code == 2
        printed = capsys.readouterr().err
        assert printed.startswith("error: ") and "/data/train.jsonl" in printed and printed.count("\n") == 1
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        exit_on_user_error(missing(FileNotFoundError(2, "No such file or directory")), cfg)
