"""phi3v-recipes: declarative fine-tuning recipes for Phi-3 / Phi-3.5-vision.

Importing the package registers the native Phi-3-V classes with transformers' Auto classes,
so `AutoConfig`, `AutoModelForCausalLM` and `AutoProcessor` resolve them without
`trust_remote_code`.
"""

from phi3v_recipes import model as _model  # noqa: F401  (registers the Auto classes)

__version__ = "0.1.0"
