"""Native Phi-3 / Phi-3.5-vision: configuration, model, image processor and processor.

Importing this package registers the classes with transformers' Auto classes, for the model type `phi3_v`
that official checkpoints and our saved directories both declare, so no `trust_remote_code` is needed:

    >>> import phi3v_recipes.model  # noqa: F401
    >>> model = AutoModelForCausalLM.from_pretrained("microsoft/Phi-3.5-vision-instruct")
    >>> processor = AutoProcessor.from_pretrained("microsoft/Phi-3.5-vision-instruct")
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoProcessor

from phi3v_recipes.model.configuration_phi3v import Phi3VConfig
from phi3v_recipes.model.image_processing_phi3v import Phi3VImageProcessor
from phi3v_recipes.model.modeling_phi3v import Phi3VForCausalLM, Phi3VModel
from phi3v_recipes.model.processing_phi3v import Phi3VProcessor

AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig, exist_ok=True)
AutoModel.register(Phi3VConfig, Phi3VModel, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
AutoImageProcessor.register(Phi3VConfig, slow_image_processor_class=Phi3VImageProcessor, exist_ok=True)
AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VImageProcessor", "Phi3VModel", "Phi3VProcessor"]
