"""`python -m phi3v_recipes.verify_checkpoint`: passes on checkpoints we write (tiny, and a real-size layout read
from headers only), and fails, naming the requirement, on copies broken the ways that stop serving."""

import json
import shutil
import struct

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

from phi3v_recipes.model import Phi3VConfig, Phi3VForCausalLM
from phi3v_recipes.model.metadata import finish_saved_model, write_serving_metadata
from phi3v_recipes.model.modeling_phi3v import OFFICIAL_MAX_SHARD_SIZE
from phi3v_recipes.model.tiny import TINY_NUM_IMG_TOKENS, build_tiny_processor, tiny_model_config
from phi3v_recipes.verify_checkpoint import main, verify
from tests.conftest import official_preprocessor_config, run_cli
from tests.test_modeling import OFFICIAL_CONFIG

REPO = "microsoft/Phi-3.5-vision-instruct"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny long-context model (su rope scaling, 8192 positions over 4096) and its processor, saved by our
    save_pretrained and finished as a run's final model is (serving metadata, shipped code)."""
    path = tmp_path_factory.mktemp("saved") / "model"
    torch.manual_seed(0)
    config = tiny_model_config(max_position_embeddings=8192,
                               rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    Phi3VForCausalLM._from_config(config).save_pretrained(path)
    build_tiny_processor(num_img_tokens=TINY_NUM_IMG_TOKENS).save_pretrained(path)
    finish_saved_model(path)
    return path


def failed(checks) -> dict[str, str]:
    return {c.requirement: c.detail for c in checks if not c.ok}


def test_a_checkpoint_we_save_meets_every_requirement(saved):
    """Our save_pretrained (model and processor) writes a directory that meets every requirement (checked at its
    own size)."""
    assert failed(verify(saved, any_size=True)) == {}


def test_at_tiny_size_the_vllm_width_and_the_clip_names_fail(saved):
    """Without --any-size a tiny model fails the CLIP ViT-L/14-336 width and tensor names that vLLM builds."""
    assert {"img_processor", "tensor names"} <= set(failed(verify(saved)))


def broken_copy(saved, tmp_path, breakage: str):
    copy = tmp_path / breakage
    shutil.copytree(saved, copy)
    config = json.loads((copy / "config.json").read_text())
    if breakage == "rope_scaling removed":
        del config["rope_scaling"]
    elif breakage == "absolute _name_or_path":
        config["_name_or_path"] = str(tmp_path / "base")
    elif breakage == "use_cache false":
        config["use_cache"] = False
    elif breakage == "shipped modeling file missing":
        (copy / "modeling_phi3v.py").unlink()
    elif breakage == "shipped configuration file missing":
        (copy / "configuration_phi3v.py").unlink()
    elif breakage == "unresolvable auto_map":
        config["auto_map"] = {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                              "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}
    elif breakage in ("stray lora_A", "missing glb_GN"):
        state = load_file(copy / "model.safetensors")
        if breakage == "stray lora_A":
            state["model.layers.0.self_attn.qkv_proj.lora_A.weight"] = torch.zeros(8, 64)
        else:
            del state["model.vision_embed_tokens.glb_GN"]
        save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(("breakage", "requirement", "named"), [
    ("rope_scaling removed", "rope_scaling", "absent from config.json"),
    ("stray lora_A", "no adapter or quantisation leftovers", "qkv_proj.lora_A.weight"),
    ("missing glb_GN", "tensor names", "model.vision_embed_tokens.glb_GN"),
    ("unresolvable auto_map", "auto_map resolvable", "configuration_phi3_v.py is not in the directory"),
    ("absolute _name_or_path", "serving metadata", "config.json records a local absolute path (_name_or_path"),
    ("use_cache false", "serving metadata", "use_cache is False"),
    ("shipped modeling file missing", "auto_map resolvable", "modeling_phi3v.py is not in the directory"),
    ("shipped configuration file missing", "auto_map resolvable", "imports configuration_phi3v, which is not"),
])
def test_a_broken_copy_fails_naming_the_requirement(saved, tmp_path, breakage, requirement, named):
    """Each breakage that stops the reference code or vLLM fails the requirement it breaks, with the culprit
    named in the detail."""
    failures = failed(verify(broken_copy(saved, tmp_path, breakage), any_size=True))
    assert requirement in failures and named in failures[requirement], failures


def test_the_command_prints_one_line_per_requirement_and_exits_1_on_failure(saved, tmp_path, capsys):
    """`python -m phi3v_recipes.verify_checkpoint <dir> --any-size` prints PASS/FAIL per requirement and exits 1
    when one fails; a path that is not a directory exits 2 with one sentence."""
    out = run_cli([str(broken_copy(saved, tmp_path, "rope_scaling removed")), "--any-size"], cwd=tmp_path,
                  module="phi3v_recipes.verify_checkpoint")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL  rope_scaling: absent from config.json" in out.stdout and "PASS  tensor names" in out.stdout
    assert "failed: rope_scaling" in out.stdout
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def write_header_only_safetensors(path, tensors: dict[str, tuple[int, ...]]) -> None:
    """A bf16 safetensors file with these tensors' header and a sparse (unwritten) data section."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 2 * int(torch.tensor(shape).prod()) if shape else 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)


def test_a_real_size_official_layout_passes_from_headers_alone(tmp_path):
    """The official Phi-3.5-vision config.json as our config writes it, with the official tensor names and
    shapes of our real-size model (meta device) in bf16 shards split at our default shard size (the official two
    files, 8,293,242,880 bytes) and an index, and the official processor files, meets every requirement without
    --any-size; dropping a shard fails the tensor names."""
    config = Phi3VConfig(**OFFICIAL_CONFIG)
    with torch.device("meta"):
        state = Phi3VForCausalLM(config).state_dict()
    config.save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    config_json["auto_map"] = {k: f"{REPO}--{v}" for k, v in config_json["auto_map"].items()}
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    # Sharded as our save_pretrained shards (transformers' splitter, our default size): the official two files.
    split = split_torch_state_dict_into_shards({n: t.to(torch.bfloat16) for n, t in state.items()},
                                               filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=OFFICIAL_MAX_SHARD_SIZE)
    shards = split.filename_to_tensors
    assert list(shards) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert split.metadata["total_size"] == 8_293_242_880  # the official checkpoint's bytes
    for file, members in shards.items():
        write_header_only_safetensors(tmp_path / file, {n: tuple(state[n].shape) for n in members})
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    build_tiny_processor().save_pretrained(tmp_path)
    write_serving_metadata(tmp_path)
    preprocessor = official_preprocessor_config()
    preprocessor["auto_map"] = {k: f"{REPO}--{v}" for k, v in preprocessor["auto_map"].items()}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))

    assert failed(verify(tmp_path)) == {}
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    assert "missing" in failed(verify(tmp_path))["tensor names"]


def test_a_full_runs_final_model_meets_every_requirement(default_demo):
    """The final model of a full run (README's demo) is saved servable: use_cache true although it trained with
    the cache off, no absolute path of the training machine, the stop ids, the shipped code; `verify_checkpoint`
    passes on the run directory (checked at its own size)."""
    run_dir = default_demo[1]
    assert failed(verify(run_dir, any_size=True)) == {}
    assert json.loads((run_dir / "config.json").read_text())["use_cache"] is True
