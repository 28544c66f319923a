"""fastseg models: one file per method; importing this package registers every model."""

from . import fpn  # noqa: F401
from ._base import SegmentationModel
from .backbones import create_backbone, list_backbones

__all__ = ["SegmentationModel", "create_backbone", "list_backbones"]
