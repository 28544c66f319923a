"""fastseg.metrics: dataset-level segmentation metrics."""

from .confusion import ConfusionMatrix
from .instance_ap import InstanceAP
from .panoptic import PanopticQuality

__all__ = ["ConfusionMatrix", "InstanceAP", "PanopticQuality"]
