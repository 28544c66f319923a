"""fastseg models: one file per method; importing this package registers every model."""

from . import ecenet, fpn, gss, mask2former, pading, s4mim, unimatch, weaktr  # noqa: F401  (each registers its models on import)
from ._base import SegmentationModel
from .backbones import create_backbone, list_backbones

__all__ = ["SegmentationModel", "create_backbone", "list_backbones"]
