"""fastseg: fused-kernel semantic segmentation with export and benchmarks.

>>> import fastseg
>>> fastseg.list_models("fpn*")
>>> model = fastseg.create_model("fpn_resnet18", num_classes=12)
"""

from . import models  # noqa: F401  (registers every model; registry.py never imports fastseg.models)
from .registry import PretrainedCfg, create_model, is_model, list_models, register_model
from .version import __version__


def load_checkpoint(model, path, strict: bool = True):
    """Load a weights file (.safetensors, or .pt/.pth through ``torch.load(weights_only=True)``) into ``model``."""
    from .checkpoint import load_weights

    return load_weights(model, path, strict=strict)


__all__ = [
    "__version__",
    "PretrainedCfg",
    "create_model",
    "is_model",
    "list_models",
    "load_checkpoint",
    "register_model",
]
