"""phi3v-recipes: declarative fine-tuning recipes for Phi-3 / Phi-3.5-vision.

Importing the package itself loads neither torch nor transformers, so that every command checks its settings
and answers a mistake within a second or two of start-up (torch and transformers take about 8 s to import on our 2-core CI machines).
`import phi3v_recipes.model` registers the native Phi-3-V classes with transformers' Auto classes, so that
`AutoConfig`, `AutoModelForCausalLM` and `AutoProcessor` resolve them without `trust_remote_code`.
"""

__version__ = "0.1.0"
