"""`python -m phi3v_recipes`: a smoke run of the native model, offline, on CPU.

Builds the tiny model and its processor, processes an image drawn with Pillow through the HD transform, and
generates. (The Hydra recipe entrypoint replaces this.)
"""

import time


def main() -> None:
    import torch
    from PIL import Image, ImageDraw

    from phi3v_recipes.model import Phi3VForCausalLM
    from phi3v_recipes.model.tiny import TINY_NUM_IMG_TOKENS, build_tiny_processor, tiny_model_config

    start = time.perf_counter()
    torch.manual_seed(0)
    processor = build_tiny_processor(num_crops=4, num_img_tokens=TINY_NUM_IMG_TOKENS)
    model = Phi3VForCausalLM._from_config(tiny_model_config()).eval()
    image = Image.new("RGB", (500, 300), "white")
    ImageDraw.Draw(image).ellipse((150, 50, 350, 250), fill="red")
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|>\nWhat colour is the circle?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = processor(prompt, images=image)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Phi-3-V: {n_params:,} parameters, attention {model.config._attn_implementation}")
    print(f"image 500x300 -> pixel_values {tuple(inputs['pixel_values'].shape)}, "
          f"image_sizes {inputs['image_sizes'].tolist()}, {int((inputs['input_ids'] < 0).sum())} image tokens")
    print(f"generated (random weights): {answer!r}  [{time.perf_counter() - start:.1f} s]")


if __name__ == "__main__":
    main()
