"""fastseg.metrics: dataset-level segmentation metrics."""

from .confusion import ConfusionMatrix

__all__ = ["ConfusionMatrix"]
