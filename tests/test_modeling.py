"""The native Phi-3-V model: checkpoint layout, batching, caching, save/load, attention back-ends."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from phi3v_recipes.model import Phi3VConfig, Phi3VForCausalLM
from phi3v_recipes.model.tiny import tiny_model_config

CROP = 336


def image_token_count(height: int, width: int, grid: int) -> int:
    rows, cols = height // CROP, width // CROP
    return (rows * cols + 1) * grid * grid + 1 + (rows + 1) * grid


def fake_image(height: int, width: int, max_crops: int, seed: int) -> torch.Tensor:
    """Random pixel values for one image of padded size (height, width), zero past its real crops."""
    pixels = torch.randn(max_crops, 3, CROP, CROP, generator=torch.Generator().manual_seed(seed))
    pixels[1 + (height // CROP) * (width // CROP) :] = 0
    return pixels


def sample(text_ids: list[list[int]], sizes: list[tuple[int, int]], grid: int, seed: int, max_crops: int = 5):
    """input_ids = BOS-started text chunks with the processor's `-N` image runs between them."""
    assert len(text_ids) == len(sizes) + 1
    ids: list[int] = []
    for n, chunk in enumerate(text_ids):
        ids += chunk
        if n < len(sizes):
            ids += [-(n + 1)] * image_token_count(*sizes[n], grid)
    pixels = torch.stack([fake_image(h, w, max_crops, seed + n) for n, (h, w) in enumerate(sizes)]) if sizes else None
    return torch.tensor([ids]), pixels, torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)


@pytest.fixture(scope="module")
def config() -> Phi3VConfig:
    return tiny_model_config()


@pytest.fixture(scope="module")
def model(config) -> Phi3VForCausalLM:
    torch.manual_seed(0)
    model = Phi3VForCausalLM._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # non-zero separators, so that a misplaced separator shows in the outputs
        model.model.vision_embed_tokens.glb_GN.normal_()
        model.model.vision_embed_tokens.sub_GN.normal_()
    return model


@pytest.fixture(scope="module")
def grid(config) -> int:
    return math.isqrt(config.img_processor["num_img_tokens"])


@pytest.fixture(scope="module")
def three_samples(grid):
    """Two images of different sizes; one image; text only."""
    return [
        sample([[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]], [(336, 672), (672, 336)], grid, seed=0),
        sample([[1, 12], [1, 13, 14]], [(336, 336)], grid, seed=10),
        sample([[1, 15, 16, 17, 18, 19]], [], grid, seed=20),
    ]


def pad_batch(samples, side: str, pad_id: int = 0):
    length = max(ids.shape[1] for ids, _, _ in samples)
    input_ids = torch.full((len(samples), length), pad_id)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, (ids, _, _) in enumerate(samples):
        span = slice(0, ids.shape[1]) if side == "right" else slice(length - ids.shape[1], length)
        input_ids[row, span] = ids[0]
        attention_mask[row, span] = 1
    pixels = torch.cat([p for _, p, _ in samples if p is not None])
    sizes = torch.cat([s for _, _, s in samples])
    return input_ids, attention_mask, pixels, sizes


OFFICIAL_CONFIG = {
    "_name_or_path": "Phi-3.5-vision-instruct",
    "architectures": ["Phi3VForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
    },
    "bos_token_id": 1,
    "embd_layer": {
        "embedding_cls": "image",
        "hd_transform_order": "sub_glb",
        "projection_cls": "mlp",
        "use_hd_transform": True,
        "with_learnable_separator": True,
    },
    "embd_pdrop": 0.0,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "img_processor": {
        "image_dim_out": 1024,
        "model_name": "openai/clip-vit-large-patch14-336",
        "name": "clip_vision_model",
        "num_img_tokens": 144,
    },
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "model_type": "phi3_v",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": [1.0 + i / 10 for i in range(48)], "short_factor": [1.0] * 48, "type": "su"},
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.1",
    "use_cache": True,
    "vocab_size": 32064,
    "_attn_implementation": "flash_attention_2",
}


def test_real_size_architecture_matches_the_official_checkpoint():
    """Built from the official config.json on the meta device, the model has the published parameter count and
    exactly the 592 tensor names and shapes of the checkpoint (and no `vision_embed_tokens.wte` alias)."""
    config = Phi3VConfig(**OFFICIAL_CONFIG)
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 4_146_621_440
    state = model.state_dict()
    assert len(state) == 592
    prefix = "model.vision_embed_tokens."
    expected_shapes = {
        "model.embed_tokens.weight": (32064, 3072),
        "model.layers.31.self_attn.qkv_proj.weight": (9216, 3072),
        "model.layers.0.self_attn.o_proj.weight": (3072, 3072),
        "model.layers.0.mlp.gate_up_proj.weight": (16384, 3072),
        "model.layers.0.mlp.down_proj.weight": (3072, 8192),
        "model.layers.0.input_layernorm.weight": (3072,),
        "model.layers.0.post_attention_layernorm.weight": (3072,),
        "model.norm.weight": (3072,),
        "lm_head.weight": (32064, 3072),
        prefix + "glb_GN": (1, 1, 4096),
        prefix + "sub_GN": (1, 1, 1, 4096),
        prefix + "img_projection.0.weight": (3072, 4096),
        prefix + "img_projection.0.bias": (3072,),
        prefix + "img_projection.2.weight": (3072, 3072),
        prefix + "img_processor.vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        prefix + "img_processor.vision_model.embeddings.position_embedding.weight": (577, 1024),
        prefix + "img_processor.vision_model.embeddings.class_embedding": (1024,),
        prefix + "img_processor.vision_model.pre_layrnorm.weight": (1024,),
        prefix + "img_processor.vision_model.encoder.layers.23.self_attn.q_proj.weight": (1024, 1024),
        prefix + "img_processor.vision_model.encoder.layers.23.mlp.fc1.weight": (4096, 1024),
        prefix + "img_processor.vision_model.post_layernorm.weight": (1024,),
    }
    for name, shape in expected_shapes.items():
        assert tuple(state[name].shape) == shape, name
    assert not any(".wte." in name for name in state)
    assert sum(name.startswith("model.layers.") for name in state) == 32 * 6
    assert sum(name.startswith(prefix + "img_processor.vision_model.encoder.layers.") for name in state) == 24 * 16


def test_official_config_json_resolves_without_remote_code(tmp_path):
    """AutoConfig reads the official config.json (rope type `su`, auto_map, flash attention recorded) into our
    class: long-rope with the 4096 original length and its 1.19 scale, CLIP ViT-L/14-336 implied, and no demand
    for flash-attn on a machine without it."""
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, Phi3VConfig)
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["original_max_position_embeddings"] == 4096
    assert config.rope_parameters["long_factor"] == OFFICIAL_CONFIG["rope_scaling"]["long_factor"]
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1024, 24, 336, 14)
    assert vision.hidden_act == "quick_gelu"
    assert config.vision_feature_layers == 23
    assert config._attn_implementation in (None, "sdpa")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    assert attention_factor == pytest.approx(math.sqrt(1 + math.log(131072 / 4096) / math.log(4096)))


def test_padded_batch_equals_each_sample_alone(model, three_samples):
    """A right-padded batch whose samples hold 2, 1 and 0 images of different sizes gives each sample the logits
    and loss it gets alone (fp32, eager attention; tolerance 1e-5)."""
    input_ids, attention_mask, pixels, sizes = pad_batch(three_samples, "right")
    labels = input_ids.clamp(min=0).masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        batch = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, image_sizes=sizes)
        for row, (ids, pix, size) in enumerate(three_samples):
            alone = model(input_ids=ids, pixel_values=pix, image_sizes=size, labels=ids.clamp(min=0))
            n = ids.shape[1]
            torch.testing.assert_close(batch.logits[row, :n], alone.logits[0], rtol=0, atol=1e-5)
            batch_loss = torch.nn.functional.cross_entropy(batch.logits[row, : n - 1], labels[row, 1:n])
            torch.testing.assert_close(batch_loss, alone.loss, rtol=0, atol=1e-5)


def test_forward_never_modifies_input_ids(model, three_samples):
    """The reference clamps input_ids in place; ours leaves the caller's tensor as it was."""
    ids, pixels, sizes = three_samples[0]
    before = ids.clone()
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, image_sizes=sizes)
    assert torch.equal(ids, before)


def test_image_features_follow_the_reference_recipe(model, config, grid):
    """Image features equal a step-by-step computation of the reference recipe: CLIP on all crops (padding
    included), hidden state `layer_idx`, CLS dropped, 2x2 merge, sub-crop grid with `sub_GN` newlines, `glb_GN`,
    global grid with newlines, MLP projector."""
    embed = model.model.vision_embed_tokens
    sizes = [(672, 1008), (336, 336)]
    pixels = torch.stack([fake_image(h, w, 7, seed=n) for n, (h, w) in enumerate(sizes)])
    with torch.no_grad():
        ours = embed(pixels, torch.tensor(sizes))

        vision = embed.img_processor.vision_model
        hidden = vision.pre_layrnorm(vision.embeddings(pixels.flatten(0, 1)))
        states = [hidden]
        for layer in vision.encoder.layers:
            states.append(layer(states[-1], None))
        feats = states[config.img_processor["layer_idx"]][:, 1:].reshape(2, 7, (2 * grid) ** 2, -1)
        c = feats.shape[-1]

        def merge(x, rows, cols):  # [rows*cols, (2g)^2, C] -> [rows*g, cols*g, 4C]
            x = x.reshape(-1, grid, 2, grid, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, grid * grid, 4 * c)
            x = x.reshape(rows, cols, grid, grid, 4 * c).permute(0, 2, 1, 3, 4)
            return x.reshape(rows * grid, cols * grid, 4 * c)

        def newline(x):
            return torch.cat([x, embed.sub_GN[0].expand(x.shape[0], 1, -1)], dim=1).reshape(-1, 4 * c)

        pieces = []
        for n, (h, w) in enumerate(sizes):
            rows, cols = h // CROP, w // CROP
            pieces += [
                newline(merge(feats[n, 1 : 1 + rows * cols], rows, cols)),
                embed.glb_GN[0],
                newline(merge(feats[n, :1], 1, 1)),
            ]
        expected = embed.img_projection(torch.cat(pieces))
    assert ours.shape == (image_token_count(672, 1008, grid) + image_token_count(336, 336, grid), config.hidden_size)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_cached_greedy_generation_equals_uncached_decoding(model, three_samples):
    """Greedy `generate` with a KV cache (images encoded once, at prefill) produces the tokens of a plain loop
    that re-runs the whole sequence at every step without a cache."""
    ids, pixels, sizes = three_samples[0]
    with torch.no_grad():
        cached = model.generate(input_ids=ids, pixel_values=pixels, image_sizes=sizes, max_new_tokens=6,
                                do_sample=False, eos_token_id=None)
        seq = ids
        for _ in range(6):
            logits = model(input_ids=seq, pixel_values=pixels, image_sizes=sizes, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)


def test_images_are_encoded_once_during_cached_generation(model, three_samples):
    """With a cache, CLIP runs at prefill only: decoding steps reuse the cached keys and values."""
    ids, pixels, sizes = three_samples[1]
    calls = []
    hook = model.model.vision_embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, pixel_values=pixels, image_sizes=sizes, max_new_tokens=5,
                           do_sample=False, eos_token_id=None)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_left_padded_batched_generation_equals_single_generation(model, three_samples):
    """Batched greedy generation over a left-padded batch (2, 1 and 0 images) gives each sample the tokens it
    gets alone."""
    input_ids, attention_mask, pixels, sizes = pad_batch(three_samples, "left")
    with torch.no_grad():
        batch = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels,
                               image_sizes=sizes, max_new_tokens=5, do_sample=False, eos_token_id=None)
        for row, (ids, pix, size) in enumerate(three_samples):
            alone = model.generate(input_ids=ids, pixel_values=pix, image_sizes=size, max_new_tokens=5,
                                   do_sample=False, eos_token_id=None)
            assert batch[row, input_ids.shape[1]:].tolist() == alone[0, ids.shape[1]:].tolist()


def test_generation_across_the_long_rope_switch_reencodes_images(config, grid):
    """Crossing `original_max_position_embeddings` switches rope factors and drops the cache; the images are
    encoded again for the re-run, and the tokens equal uncached decoding."""
    long_config = tiny_model_config(max_position_embeddings=512, original_max_position_embeddings=96)
    torch.manual_seed(1)
    model = Phi3VForCausalLM._from_config(long_config, attn_implementation="eager").eval()
    ids, pixels, sizes = sample([[1, 5], [1] + [7] * 5], [(336, 336)], grid, seed=3)
    assert ids.shape[1] < 96 < ids.shape[1] + 8
    with torch.no_grad():
        cached = model.generate(input_ids=ids, pixel_values=pixels, image_sizes=sizes, max_new_tokens=8,
                                do_sample=False, eos_token_id=None)
        uncached = model.generate(input_ids=ids, pixel_values=pixels, image_sizes=sizes, max_new_tokens=8,
                                  do_sample=False, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, uncached)


def test_save_pretrained_from_pretrained_is_bit_identical(model, tmp_path):
    """save_pretrained then from_pretrained (directly and through AutoModelForCausalLM) restores every tensor
    bit for bit, with no missing or unexpected keys, under the official tensor names."""
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert set(stored) == set(model.state_dict())
    for loader, attention in ((Phi3VForCausalLM, "eager"), (AutoModelForCausalLM, "sdpa")):
        loaded, info = loader.from_pretrained(tmp_path, output_loading_info=True, attn_implementation=attention)
        assert type(loaded) is Phi3VForCausalLM
        assert loaded.config._attn_implementation == loaded.config.vision_config._attn_implementation == attention
        frozen = {n for n, p in loaded.named_parameters() if not p.requires_grad}
        assert frozen == set(model.unused_parameter_names())  # loading re-freezes the never-run CLIP layers
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        original = model.state_dict()
        for name, tensor in loaded.state_dict().items():
            assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name]), name


def test_attention_backends_agree(model, three_samples):
    """eager and sdpa (in CLIP and the LM) give the same logits on a padded batch (fp32, tolerance 1e-5)."""
    input_ids, attention_mask, pixels, sizes = pad_batch(three_samples, "right")
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, image_sizes=sizes)
    with torch.no_grad():
        eager = model(**inputs).logits
        model.set_attn_implementation("sdpa")
        try:
            assert model.config.vision_config._attn_implementation == "sdpa"
            sdpa = model(**inputs).logits
        finally:
            model.set_attn_implementation("eager")
    valid = attention_mask.bool()
    torch.testing.assert_close(sdpa[valid], eager[valid], rtol=0, atol=1e-5)


def test_unused_clip_layers_are_frozen_and_every_trainable_parameter_gets_a_gradient(config, three_samples):
    """CLIP layers after `layer_idx` and the post-layernorm never run: they are frozen, changing them changes
    nothing, and after one backward pass every parameter that requires grad has one (DDP with
    find_unused_parameters=False and LoRA need exactly this)."""
    torch.manual_seed(0)
    model = Phi3VForCausalLM._from_config(config, attn_implementation="sdpa").train()
    unused = set(model.unused_parameter_names())
    n_layers = config.vision_config.num_hidden_layers
    assert unused and all(f"encoder.layers.{n_layers - 1}." in n or "post_layernorm" in n for n in unused)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in unused)
    ids, pixels, sizes = three_samples[0]
    model(input_ids=ids, pixel_values=pixels, image_sizes=sizes, labels=ids.clamp(min=0)).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
        for name, param in model.named_parameters():
            if name in unused:
                param.add_(1.0)
        after = model(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
    assert torch.equal(before, after)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(config, three_samples):
    """Non-reentrant gradient checkpointing (LM and CLIP layers) changes neither the loss nor the gradients."""
    ids, pixels, sizes = three_samples[0]
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = Phi3VForCausalLM._from_config(config, attn_implementation="eager").train()
        if checkpointing and hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif checkpointing:  # its name before transformers 5.2x (the GPU image's 5.17)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[0].gradient_checkpointing
        loss = model(input_ids=ids, pixel_values=pixels, image_sizes=sizes, labels=ids.clamp(min=0),
                     use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6)


def test_image_positions_without_matching_images_fail_clearly(model, three_samples, grid):
    """input_ids with image positions but no pixel_values, or with a count that the images do not fill, raise a
    ValueError that says what to pass instead of an opaque shape error."""
    ids, pixels, sizes = three_samples[1]
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)
    extra = torch.cat([ids, torch.full((1, 3), -1)], dim=1)
    with pytest.raises(ValueError, match="one processor call"):
        model(input_ids=extra, pixel_values=pixels, image_sizes=sizes)
