"""`python -m phi3v_recipes.export`: LoRA and QLoRA runs on a tiny checkpoint in the official on-disk layout are
merged into standalone checkpoints whose files, names and logits are the official layout's and the adapter's;
the adapters the runs save hold adapter weights only; a real-size config is written with the official values.
The export ships our own model code: it loads without phi3v-recipes through transformers' Auto classes with
`trust_remote_code=True` (transformers 5: model, processor, config; transformers 4.46: processor and config), and
the shipped files are the package's, byte for byte."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from phi3v_recipes.loading import dequantize_4bit
from phi3v_recipes.model import Phi3VConfig, Phi3VForCausalLM, Phi3VProcessor
from phi3v_recipes.model.configuration_phi3v import OFFICIAL_KEYS
from phi3v_recipes.model.remote_code import (
    HEADER_END,
    SHIPPED_CONFIG_AUTO_MAP,
    SHIPPED_MODULES,
    SHIPPED_PROCESSOR_AUTO_MAP,
)
from phi3v_recipes.model.tiny import TINY_NUM_IMG_TOKENS
from phi3v_recipes.verify_checkpoint import verify
from tests.clean_env import clean_env_vars, clean_python, transformers_4
from tests.conftest import official_preprocessor_config, run_cli
from tests.test_auto_classes import official_layout_checkpoint
from tests.test_modeling import OFFICIAL_CONFIG

# A few optimizer steps on a few demo samples: enough for the adapter to move away from its initialisation.
SHORT_RUN = ("model=tiny", "hardware=cpu", "task.train_size=8", "task.eval_size=2", "train.max_steps=3",
             "train.global_batch_size=4", "train.batch_size=4", "train.save_steps=3", "optim.warmup_steps=0",
             "optim.lr=1e-2", "eval.before=false", "eval.after=false")
# Stand-ins for Microsoft's reference modules, which a download of the official repository holds beside the weights.
REFERENCE_CODE = {
    "configuration_phi3_v.py": "class Phi3VConfig:\n    pass\n",
    "modeling_phi3_v.py": "class Phi3VForCausalLM:\n    pass\n",
    "processing_phi3_v.py": "class Phi3VProcessor:\n    pass\n",
    "image_processing_phi3_v.py": "class Phi3VImageProcessor:\n    pass\n",
}
FP32_ATOL = 1e-4  # merged vs adapter logits, both in float32 (the tiny model's logits are O(1))


def official_base(path, with_code: bool):
    """A tiny checkpoint in the official on-disk layout (see test_auto_classes), with a chat template, and the
    reference `*.py` files when `with_code`."""
    official_layout_checkpoint(path)
    for name, text in REFERENCE_CODE.items() if with_code else ():
        (path / name).write_text(text)
    return path


def train_and_export(root, strategy: str, *export_args: str):
    base = official_base(root / "base", with_code=strategy == "lora")
    run_dir, out = root / "run", root / "export"
    trained = run_cli([*SHORT_RUN, f"strategy={strategy}", f"model.name_or_path={base}",
                       f"run.output_dir={run_dir}"], cwd=root)
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = run_cli([f"model.name_or_path={run_dir}", f"output={out}", "dtype=float32", *export_args], cwd=root,
                       module="phi3v_recipes.export")
    assert exported.returncode == 0, exported.stderr[-3000:]
    return base, run_dir, out, exported.stdout


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    return train_and_export(tmp_path_factory.mktemp("lora"), "lora")


def sample_inputs(processor):
    """One prompt with an image, as the processor writes it."""
    from PIL import Image

    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat colour?"}],
                                                     tokenize=False, add_generation_prompt=True)
    return processor(prompt, images=[Image.new("RGB", (500, 300), (200, 30, 30))])


def tensor_names(directory):
    names = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            names |= set(handle.keys())
    return names


@pytest.mark.slow
def test_lora_export_gives_the_adapter_models_logits(lora_export):
    """The merged LoRA export loads as a plain model and gives, within FP32_ATOL in float32, the logits of plain
    `peft.PeftModel.from_pretrained(base, run dir)`; the export reports its own merged-vs-adapter difference."""
    base, run_dir, out, stdout = lora_export
    processor = Phi3VProcessor.from_pretrained(out)
    inputs = sample_inputs(processor)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        untrained = plain(**inputs).logits
        expected = PeftModel.from_pretrained(plain, run_dir).eval()(**inputs).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(**inputs).logits
    assert (expected - untrained).abs().max() > 1e-3  # the adapter changes the logits: the comparison can fail
    torch.testing.assert_close(got, expected, rtol=0, atol=FP32_ATOL)
    reported = float(re.search(r"max \|logit\| difference merged vs adapter model .*: (\S+)", stdout).group(1))
    assert reported <= FP32_ATOL


@pytest.mark.slow
def test_lora_export_has_the_official_files_names_and_values(lora_export):
    """The export holds the base's config.json keys and values (architecture unchanged; auto_map naming the shipped
    code), exactly the base's tensor names, the official preprocessor_config.json, the chat template, the serving
    metadata (use_cache, stop ids, tokenizer_class, num_crops in the printout), and `verify_checkpoint` passes."""
    base, run_dir, out, stdout = lora_export
    config, official = (json.loads((d / "config.json").read_text()) for d in (out, base))
    for key in OFFICIAL_KEYS:
        if key not in ("transformers_version", "auto_map"):
            assert config[key] == official[key], key
    assert config["auto_map"] == SHIPPED_CONFIG_AUTO_MAP and config["use_cache"] is True
    assert tensor_names(out) == tensor_names(base)
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    run_crops = OmegaConf.load(run_dir / "config.yaml").data.num_crops  # the run's crops, what it trained with
    assert preprocessor == {**official_preprocessor_config(TINY_NUM_IMG_TOKENS), "num_crops": run_crops,
                            "auto_map": SHIPPED_PROCESSOR_AUTO_MAP}
    tokenizer = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer["chat_template"] and tokenizer["tokenizer_class"] == "LlamaTokenizer"
    processor = Phi3VProcessor.from_pretrained(out)
    stops = processor.tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|assistant|>", "<|end|>"])
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == sorted(stops)
    assert not list(out.glob("adapter_*")) and not list(out.glob("*_phi3_v.py"))
    assert "auto_map: phi3v-recipes model code shipped" in stdout and f"num_crops: {run_crops} " in stdout
    assert [c.line() for c in verify(out, any_size=True) if not c.ok] == []


def test_shipped_code_is_the_package_code_and_imports_no_package(lora_export):
    """Each shipped file is its `phi3v_recipes/model/` source byte for byte after a header naming the version, so
    the code an export carries cannot drift from the code the package runs; and what transformers requires of a
    remote-code file's imports (its own `get_imports`, which skips optional ones under `is_*_available()`) is
    only torch, transformers, PIL, NumPy and the standard library, with the shipped siblings imported relatively."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    import phi3v_recipes
    import phi3v_recipes.model as package

    out = lora_export[2]
    allowed = {"torch", "transformers", "PIL", "numpy", *sys.stdlib_module_names}
    for module in SHIPPED_MODULES:
        shipped = (out / f"{module}.py").read_text(encoding="utf-8")
        header, marker, body = shipped.partition(HEADER_END.format(name=module))
        assert marker and header.startswith(f"# Written by phi3v-recipes {phi3v_recipes.__version__}:"), module
        assert body == (Path(package.__file__).parent / f"{module}.py").read_text(encoding="utf-8"), module
        assert set(get_imports(out / f"{module}.py")) <= allowed, module
        assert set(get_relative_imports(out / f"{module}.py")) <= set(SHIPPED_MODULES), module


def probe(python: Path, export: Path, root: Path, *args: str) -> dict:
    """What `tests/remote_code_probe.py` computes from `export` in the clean interpreter `python`."""
    out = root / "probe.pt"
    done = subprocess.run([str(python), str(Path(__file__).with_name("remote_code_probe.py")), str(export),
                           str(out), *args], cwd=root, env=clean_env_vars(root), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def our_processor_outputs(run_dir: Path) -> tuple[Phi3VProcessor, dict, dict]:
    """The run's own processor (as its checkpoint saved it, before any export) and its outputs on the probe's two
    prompts: what training fed the model."""
    from tests.remote_code_probe import PROMPT, TWO_IMAGES, images

    processor = Phi3VProcessor.from_pretrained(run_dir / "checkpoint-3")
    red, blue = images()
    return processor, processor(PROMPT, [red]), processor(TWO_IMAGES, [red, blue], num_crops=16)


def assert_same_inputs(got: dict, expected: dict) -> None:
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.slow
def test_export_loads_without_the_package_on_transformers_5(lora_export, tmp_path):
    """In a virtual environment without phi3v-recipes, AutoConfig, AutoProcessor and AutoModelForCausalLM with
    trust_remote_code=True load the LoRA export from its shipped code: the processor's input_ids, pixel_values and
    image_sizes equal the run's processor's exactly, the logits equal our model's on the export to 1e-4 in fp32,
    `generate` gives the same tokens with and without the KV cache, and what vLLM calls on the processor
    (processor(text, images, num_crops=…), calc_num_image_tokens_from_image_size(width=, height=), img_tokens,
    num_img_tokens, num_crops through from_pretrained) answers as ours does."""
    base, run_dir, out, _ = lora_export
    result = probe(clean_python(tmp_path / "env"), out, tmp_path, "--model")
    facts = result["facts"]
    assert not facts["phi3v_recipes_importable"] and facts["transformers"].startswith("5.")
    for name in ("config_class", "processor_class", "model_class"):
        assert facts[name].startswith("transformers_modules."), facts[name]  # the shipped code, not ours
    assert facts["rope_scaling"]["rope_type"] == "longrope"

    processor, one, two = our_processor_outputs(run_dir)
    assert_same_inputs(result["inputs"], one)
    assert_same_inputs(result["inputs_two"], two)
    sixteen = Phi3VProcessor.from_pretrained(run_dir / "checkpoint-3", num_crops=16)
    assert facts["calc_tokens"] == {"500x300@None": processor.calc_num_image_tokens_from_image_size(500, 300),
                                    "200x900@16": sixteen.calc_num_image_tokens_from_image_size(200, 900),
                                    "1200x400@None": processor.calc_num_image_tokens_from_image_size(1200, 400)}
    assert facts["image_positions_two"] == int((two["input_ids"] < 0).sum())
    assert facts["img_tokens"] == ["<|image_1|>", "<|image_2|>", "<|image_3|>"]
    assert facts["num_img_tokens"] == TINY_NUM_IMG_TOKENS and facts["num_crops_from_pretrained"] == 16

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(**one).logits
    torch.testing.assert_close(result["logits"], logits, rtol=0, atol=FP32_ATOL)
    generated = result["generated"]
    assert generated.shape[1] > one["input_ids"].shape[1]
    assert torch.equal(generated, result["generated_no_cache"])


@pytest.mark.slow
def test_export_processor_and_config_load_on_transformers_4_46(lora_export, tmp_path):
    """In a virtual environment without phi3v-recipes and with transformers 4.46 (the reference code's, and what
    vLLM's Phi-3-V tests pin), the shipped configuration and processor load through AutoConfig / AutoProcessor with
    trust_remote_code=True: the config carries the official rope_scaling and vision fields, and the processor's
    ids and pixels equal the run's processor's exactly. (The shipped model needs transformers 5: docs/export.md.)"""
    base, run_dir, out, _ = lora_export
    result = probe(clean_python(tmp_path / "env", first=transformers_4()), out, tmp_path)
    facts = result["facts"]
    assert facts["transformers"] == "4.46.3" and not facts["phi3v_recipes_importable"]
    official = json.loads((base / "config.json").read_text())
    assert facts["rope_scaling"]["short_factor"] == official["rope_scaling"]["short_factor"]
    assert facts["img_processor"]["num_img_tokens"] == TINY_NUM_IMG_TOKENS
    assert facts["embd_layer"] == official["embd_layer"] and facts["vocab_size"] == official["vocab_size"]
    _, one, two = our_processor_outputs(run_dir)
    assert_same_inputs(result["inputs"], one)
    assert_same_inputs(result["inputs_two"], two)
    assert facts["num_crops_from_pretrained"] == 16 and facts["img_tokens"][0] == "<|image_1|>"


@pytest.mark.slow
def test_lora_checkpoints_hold_adapter_weights_only(lora_export):
    """The final adapter and the checkpoint's adapter store LoRA weights only (no untouched base lm_head), and
    peft loads them onto the base with no missing adapter weight."""
    base, run_dir, _, _ = lora_export
    for directory in (run_dir, run_dir / "checkpoint-3"):
        names = tensor_names(directory)
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names), sorted(names)[:5]
        assert any("lm_head.lora_A" in n for n in names)


@pytest.mark.slow
def test_qlora_export_merges_into_the_dequantised_base(tmp_path):
    """A QLoRA run exports merged into its de-quantised base (compute dtype float32 on CPU): the export's logits
    equal peft's adapter on that de-quantised base within FP32_ATOL, and with no reference code beside the base the
    auto_map entries point at the given hub repository (remote_code=reference)."""
    base, run_dir, out, stdout = train_and_export(tmp_path, "qlora", "remote_code=reference",
                                                  "base_repo=microsoft/Phi-3.5-vision-instruct")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["model.vision_embed_tokens", "lm_head"])
    four_bit = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=quant,
                                                    device_map={"": "cpu"})
    adapter = PeftModel.from_pretrained(dequantize_4bit(four_bit, torch.float32), run_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    inputs = sample_inputs(Phi3VProcessor.from_pretrained(out))
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapter(**inputs).logits, rtol=0, atol=FP32_ATOL)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["auto_map"]["AutoModelForCausalLM"] == (
        "microsoft/Phi-3.5-vision-instruct--modeling_phi3_v.Phi3VForCausalLM")
    assert json.loads((out / "preprocessor_config.json").read_text())["auto_map"]["AutoProcessor"] == (
        "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VProcessor")
    assert "QLoRA adapter merged into the de-quantised" in stdout


def test_real_size_config_json_holds_every_official_key_and_value(tmp_path):
    """A model built from the official Phi-3.5-vision config.json (meta device, real size) saves a config.json
    with every official key and the official value (only transformers_version differs), and reads back to the
    same rope parameters and dtype."""
    config = Phi3VConfig(**OFFICIAL_CONFIG)
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    model.config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(OFFICIAL_CONFIG) <= set(saved)
    assert {k: v for k, v in saved.items() if k in OFFICIAL_CONFIG and k != "transformers_version"} == {
        k: v for k, v in OFFICIAL_CONFIG.items() if k != "transformers_version"}
    assert "rope_parameters" not in saved and "vision_config" not in saved
    again = Phi3VConfig.from_pretrained(tmp_path)
    assert again.rope_parameters == config.rope_parameters and again.dtype == torch.bfloat16


def test_a_model_directory_is_exported_as_is_in_bf16(tmp_path):
    """A model that is not an adapter (a full run's, or any model directory) is written as it is, in bf16 by
    default: the same tensor names, each weight the bf16 rounding of the source's; with remote_code=reference the
    base's reference code is copied and the auto_map names it, as the official files do."""
    base = official_base(tmp_path / "base", with_code=True)
    out = run_cli([f"model.name_or_path={base}", f"output={tmp_path / 'export'}", "remote_code=reference"],
                  cwd=tmp_path, module="phi3v_recipes.export")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model as is" in out.stdout and "max |logit|" not in out.stdout
    source = Phi3VForCausalLM.from_pretrained(base).state_dict()
    written = Phi3VForCausalLM.from_pretrained(tmp_path / "export", dtype="auto").state_dict()
    assert written.keys() == source.keys()
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, source[name].to(torch.bfloat16)), name
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["auto_map"]["AutoConfig"] == "configuration_phi3_v.Phi3VConfig"
    for name, text in REFERENCE_CODE.items():
        assert (tmp_path / "export" / name).read_text() == text
    assert not (tmp_path / "export" / "modeling_phi3v.py").exists()
    assert "auto_map: Microsoft's reference code copied" in out.stdout


def test_config_json_of_either_layout_reads_back_the_same(tmp_path):
    """Our from_pretrained reads the official layout we write (rope_scaling `su`) and transformers 5's
    (`rope_parameters`, `dtype`) of directories saved before, to the same configuration."""
    from transformers import Phi3Config

    config = Phi3VConfig(**{**OFFICIAL_CONFIG, "_attn_implementation": "eager"})
    official, transformers5 = tmp_path / "official", tmp_path / "transformers5"
    config.save_pretrained(official)
    transformers5.mkdir()
    (transformers5 / "config.json").write_text(json.dumps(Phi3Config.to_dict(config), default=str))
    assert "rope_parameters" in json.loads((transformers5 / "config.json").read_text())
    for directory in (official, transformers5):
        again = Phi3VConfig.from_pretrained(directory)
        assert again.rope_parameters == config.rope_parameters, directory.name
        assert (again.dtype, again.img_processor, again.embd_layer) == (torch.bfloat16, config.img_processor,
                                                                         config.embd_layer)


def test_export_refuses_a_non_empty_output(tmp_path):
    """An output directory that already holds files stops the export with one sentence, before anything loads
    or is overwritten."""
    from hydra import compose, initialize_config_module

    from phi3v_recipes.errors import ConfigError
    from phi3v_recipes.export import run

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with initialize_config_module(config_module="phi3v_recipes.conf", version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"model.name_or_path={tmp_path}", f"output={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        run(cfg)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_export_of_an_unfinished_run_names_its_newest_checkpoint(tmp_path):
    """A run directory holding only checkpoint-* directories (training did not finish) is refused with exit 2 and
    one sentence naming the newest complete checkpoint to export, before anything loads."""
    run_dir = tmp_path / "run"
    for step in (3, 6, 10):
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
        if step != 10:  # checkpoint-10 was cut short: no trainer_state.json
            (run_dir / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (run_dir / "config.yaml").write_text("task: {name: demo}\n")
    out = run_cli([f"model.name_or_path={run_dir}", f"output={tmp_path / 'export'}"], cwd=tmp_path,
                  module="phi3v_recipes.export")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "is a run that did not finish" in out.stderr and f"model.name_or_path={run_dir / 'checkpoint-6'}" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "export").exists()
