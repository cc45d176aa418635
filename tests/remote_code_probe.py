"""Run by a clean interpreter (no phi3v-recipes): load an export through transformers' Auto classes with
`trust_remote_code=True`, and save what it computes for the test to compare.

    python remote_code_probe.py <export dir> <out.pt> [--model]

Writes `{"facts": {...}, "inputs": {...}, "logits": ..., "generated": ..., "generated_no_cache": ...}` with
torch.save. Imports nothing but the standard library, torch, transformers and PIL: importing phi3v_recipes here
would defeat the test, and the probe checks that it cannot.
"""

import importlib.util
import sys

import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoProcessor

PROMPT = "<|user|>\n<|image_1|>\nWhat colour is it?<|end|>\n<|assistant|>\n"
TWO_IMAGES = "<|user|>\n<|image_1|>\n<|image_2|>\nSame colour?<|end|>\n<|assistant|>\n"


def images() -> list[Image.Image]:
    return [Image.new("RGB", (500, 300), (200, 30, 30)), Image.new("RGB", (200, 900), (20, 40, 220))]


def main(directory: str, out: str, with_model: bool) -> None:
    facts = {"transformers": transformers.__version__,
             "phi3v_recipes_importable": importlib.util.find_spec("phi3v_recipes") is not None}
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    facts.update(config_class=type(config).__module__ + "." + type(config).__name__,
                 rope_scaling=getattr(config, "rope_scaling", None), img_processor=config.img_processor,
                 embd_layer=config.embd_layer, vocab_size=config.vocab_size)

    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    sixteen = AutoProcessor.from_pretrained(directory, trust_remote_code=True, num_crops=16)
    red, blue = images()
    one = processor(PROMPT, [red], return_tensors="pt")
    two = processor(text=TWO_IMAGES, images=[red, blue], num_crops=16, return_tensors="pt")
    facts.update(
        processor_class=type(processor).__module__ + "." + type(processor).__name__,
        num_crops_default=processor.image_processor.num_crops,
        num_crops_from_pretrained=sixteen.image_processor.num_crops,
        # What vLLM's Phi-3-V loader calls on the remote-code processor.
        calc_tokens={f"{w}x{h}@{c}": processor.calc_num_image_tokens_from_image_size(width=w, height=h)
                     if c is None else sixteen.calc_num_image_tokens_from_image_size(width=w, height=h)
                     for w, h, c in ((500, 300, None), (200, 900, 16), (1200, 400, None))},
        img_tokens=list(processor.img_tokens[:3]),
        num_img_tokens=processor.num_img_tokens,
        image_positions_two=int((two["input_ids"] < 0).sum()),
    )
    result = {"facts": facts, "inputs": dict(one), "inputs_two": dict(two)}

    if with_model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        facts["model_class"] = type(model).__module__ + "." + type(model).__name__
        with torch.no_grad():
            result["logits"] = model(**one).logits
            generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
            result["generated"] = model.generate(**one, **generate, use_cache=True)
            result["generated_no_cache"] = model.generate(**one, **generate, use_cache=False)
    torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--model" in sys.argv[3:])
