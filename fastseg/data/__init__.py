"""fastseg.data: the built-in shapes world, readers of real datasets on disk, transforms, validation, visualisation."""

from .datasets import build_dataset, list_datasets
from .shapes import (
    CLASS_NAMES,
    IGNORE_INDEX,
    MEAN,
    PALETTE,
    SEEN_CLASSES,
    STD,
    STUFF_CLASSES,
    THING_CLASSES,
    UNSEEN_CLASSES,
    ShapesConfig,
    ShapesDataset,
    make_palette,
    pretrained_cfg_fields,
    unnormalize,
)
from .transforms import EvalProtocol, TrainPipeline
from .validate import check_sample
from .visualize import colorize, overlay, render_grid, save_png, to_uint8_image

__all__ = [
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "MEAN",
    "PALETTE",
    "SEEN_CLASSES",
    "STD",
    "STUFF_CLASSES",
    "THING_CLASSES",
    "UNSEEN_CLASSES",
    "EvalProtocol",
    "ShapesConfig",
    "ShapesDataset",
    "TrainPipeline",
    "build_dataset",
    "check_sample",
    "colorize",
    "list_datasets",
    "make_palette",
    "overlay",
    "pretrained_cfg_fields",
    "render_grid",
    "save_png",
    "to_uint8_image",
    "unnormalize",
]
