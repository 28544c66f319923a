"""fastseg models: one file per method; importing this package registers every model."""

from . import ecenet  # noqa: F401
from . import fpn  # noqa: F401
from . import gss  # noqa: F401
from . import s4mim  # noqa: F401
from . import weaktr  # noqa: F401
from ._base import SegmentationModel
from .backbones import create_backbone, list_backbones

__all__ = ["SegmentationModel", "create_backbone", "list_backbones"]
