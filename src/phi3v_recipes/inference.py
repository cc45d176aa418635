"""What evaluation and prediction share: the trained model and processor a config points at, on this rank's
device, with the process group joined when launched by torchrun."""

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from phi3v_recipes.errors import ConfigError
from phi3v_recipes.loading import TINY, load_model, load_processor, local_device


def init_distributed() -> torch.device:
    """Join torchrun's process group (if any) and return this rank's device."""
    device = local_device()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def load_for_inference(cfg: DictConfig) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode on this rank's device, processor) from model.name_or_path; the processor keeps the
    crop count saved with the model unless data.num_crops sets one."""
    path = cfg.model.name_or_path
    if path == TINY:
        raise ConfigError("model.name_or_path=tiny is an untrained random model; point it at a run directory, a "
                          "checkpoint-* directory or a hub id.")
    device = init_distributed()
    processor = load_processor(path, cfg.data.num_crops)
    model = load_model(cfg, path, for_training=False).to(device).eval()
    saved = "set by data.num_crops" if cfg.data.num_crops is not None else "saved with the model"
    logging.getLogger("phi3v_recipes").info("processor: num_crops=%d (%s)", processor.image_processor.num_crops,
                                            saved)
    return model, processor
