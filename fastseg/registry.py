"""Model registry in timm's style: `register_model`, `list_models`, `create_model`, and `PretrainedCfg`.

Architecture hyper-parameters live in the registered entrypoints (plain Python functions), never in string-typed
config graphs. Weights are only ever loaded from local files: nothing here touches the network.

This module never imports `fastseg.models`: importing the ``fastseg`` package does, and each model file registers its
entrypoints with `register_model` (any ``import fastseg.<anything>`` runs ``fastseg/__init__.py`` first).

Tags (timm's ``name.tag``): an entrypoint that shrinks its paper's configuration (a CPU-trainable head for the
shapes world, a small VQ-VAE instead of DALL-E, ...) is registered with a tag, e.g. ``ecenet_resnet18.shapes_small``,
and with what differs from the paper (``PretrainedCfg.differs_from_paper``, shown by ``fastseg list``).
``create_model`` takes the plain name or the tagged one.
"""

from __future__ import annotations

import colorsys
import dataclasses
import difflib
import fnmatch
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

__all__ = [
    "PretrainedCfg",
    "create_model",
    "default_palette",
    "is_model",
    "list_models",
    "model_tag",
    "register_model",
    "split_model_name",
]


def default_palette(num_classes: int, base: Sequence[tuple[int, int, int]] = ()) -> tuple[tuple[int, int, int], ...]:
    """The one palette function: ``base`` colours first (a dataset's hand-picked ones), then distinct colours from a
    golden-ratio hue walk (alternating saturation / value so that neighbours stay apart) for the remaining classes."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    colours = [tuple(int(c) for c in rgb) for rgb in base[:num_classes]]
    for k in range(len(colours), num_classes):
        hue = (k * 0.618033988749895) % 1.0
        sat, val = (0.65, 0.95) if k % 2 == 0 else (0.9, 0.7)
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return tuple(colours)  # type: ignore[return-value]


@dataclasses.dataclass
class PretrainedCfg:
    """What a model needs to be used and deployed: classes, colours, normalisation, input geometry.

    It travels with the model (``model.pretrained_cfg``), into checkpoints' metadata and into the export sidecar.

    Attributes:
        num_classes: number of output classes K.
        class_names: K names (used for tables and, by zero-shot methods, for text embeddings).
        palette: K RGB colours for visualisation.
        mean, std: per-channel normalisation of [0, 1] RGB inputs.
        ignore_index: label id that counts nowhere (boundary band, unlabelled pixels).
        input_size: (C, H, W) the model is trained at.
        output_stride: logits are at 1/output_stride of the input.
        divisible_by: inputs are padded internally to a multiple of this; export sizes must be multiples of it.
        dataset: dataset the classes come from.
        file: local weights file for ``pretrained=True`` (never downloaded).
        metrics: reported metrics (e.g. ``{"mIoU": 0.71}``) with the command that measured them in the README.
        tag: the registered variant (timm's pretrained tag: ``ecenet_resnet18.shapes_small`` has tag
            ``shapes_small``); empty for an entrypoint that follows its paper.
        differs_from_paper: what this configuration changes from the paper's (empty when nothing does).
        stuff_classes, thing_classes: the panoptic split (class ids); empty when unknown (panoptic / instance
            post-processing then treats every class as a thing).
        label_divisor: panoptic ids are ``class_id * label_divisor + instance_id`` (stuff: instance 0).
        seen_classes, unseen_classes: the zero-shot split (class ids; empty when the model is not zero-shot).
        class_embeddings: where a zero-shot model's class embeddings come from (``"attributes"``, ``"file:PATH"``,
            ``"clip:CHECKPOINT"``; `fastseg.models.class_embeddings`); empty otherwise.
    """

    num_classes: int
    class_names: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    ignore_index: int = 255
    input_size: tuple[int, int, int] = (3, 64, 64)
    output_stride: int = 4
    divisible_by: int = 32
    dataset: str = "shapes"
    file: str | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    tag: str = ""
    differs_from_paper: str = ""
    stuff_classes: tuple[int, ...] = ()
    thing_classes: tuple[int, ...] = ()
    label_divisor: int = 1000
    seen_classes: tuple[int, ...] = ()
    unseen_classes: tuple[int, ...] = ()
    class_embeddings: str = ""

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not self.class_names:
            self.class_names = tuple(f"class_{k}" for k in range(self.num_classes))
        if not self.palette:
            self.palette = default_palette(self.num_classes)
        if len(self.class_names) != self.num_classes or len(self.palette) != self.num_classes:
            raise ValueError(
                f"PretrainedCfg: {len(self.class_names)} class names and {len(self.palette)} palette colours given "
                f"for num_classes={self.num_classes}"
            )
        self.class_names = tuple(self.class_names)
        self.palette = tuple(tuple(int(c) for c in rgb) for rgb in self.palette)  # type: ignore[misc]
        self.stuff_classes = tuple(int(c) for c in self.stuff_classes)
        self.thing_classes = tuple(int(c) for c in self.thing_classes)
        bad = [c for c in self.stuff_classes + self.thing_classes if not 0 <= c < self.num_classes]
        if bad or set(self.stuff_classes) & set(self.thing_classes):
            raise ValueError(
                f"PretrainedCfg: stuff_classes {self.stuff_classes} and thing_classes {self.thing_classes} must be "
                f"disjoint class ids in [0, {self.num_classes})"
            )
        self.seen_classes = tuple(int(c) for c in self.seen_classes)
        self.unseen_classes = tuple(int(c) for c in self.unseen_classes)
        bad = [c for c in self.seen_classes + self.unseen_classes if not 0 <= c < self.num_classes]
        if bad or set(self.seen_classes) & set(self.unseen_classes):
            raise ValueError(
                f"PretrainedCfg: seen_classes {self.seen_classes} and unseen_classes {self.unseen_classes} must be "
                f"disjoint class ids in [0, {self.num_classes})"
            )
        if self.label_divisor < 1:
            raise ValueError(f"PretrainedCfg: label_divisor must be >= 1, got {self.label_divisor}")
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"ignore_index {self.ignore_index} is a class id; it must lie outside [0, {self.num_classes})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainedCfg:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in (
            "class_names",
            "mean",
            "std",
            "input_size",
            "stuff_classes",
            "thing_classes",
            "seen_classes",
            "unseen_classes",
        ):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if "palette" in kwargs:
            kwargs["palette"] = tuple(tuple(c) for c in kwargs["palette"])
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class _Entry:
    fn: Callable[..., nn.Module]
    tag: str = ""
    differs_from_paper: str = ""


_MODEL_ENTRYPOINTS: dict[str, _Entry] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, tag: str = "", differs_from_paper: str = "") -> Any:
    """Decorator: register a model entrypoint under its function name.

    ``@register_model`` for an entrypoint that follows its paper; ``@register_model(tag="shapes_small",
    differs_from_paper="...")`` for a shrunk variant (then ``create_model("name.tag")`` works too and the model's
    ``pretrained_cfg`` carries both).
    """
    if bool(tag) != bool(differs_from_paper):
        raise ValueError("register_model: a tagged variant needs both tag and differs_from_paper")
    if tag and not tag.replace("_", "").isalnum():
        raise ValueError(f"register_model: tag {tag!r} must be letters, digits and underscores")

    def decorate(entrypoint: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = entrypoint.__name__
        if name in _MODEL_ENTRYPOINTS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODEL_ENTRYPOINTS[name] = _Entry(entrypoint, tag, differs_from_paper)
        return entrypoint

    return decorate(fn) if fn is not None else decorate


def split_model_name(model_name: str) -> tuple[str, str]:
    """``"ecenet_resnet18.shapes_small"`` -> ``("ecenet_resnet18", "shapes_small")``; no tag -> ``(name, "")``."""
    name, _, tag = model_name.partition(".")
    return name, tag


def model_tag(name: str) -> tuple[str, str]:
    """``(tag, differs_from_paper)`` of a registered model (both empty for one that follows its paper)."""
    entry = _MODEL_ENTRYPOINTS.get(split_model_name(name)[0])
    if entry is None:
        raise ValueError(f"unknown model {name!r}; see fastseg.list_models()")
    return entry.tag, entry.differs_from_paper


def list_models(pattern: str | Sequence[str] = "", exclude: str | Sequence[str] = ()) -> list[str]:
    """Registered model names (plain, without tags) matching shell-style ``pattern`` (e.g. ``"ecenet*"``), sorted."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    excludes = [exclude] if isinstance(exclude, str) else list(exclude)
    names = sorted(_MODEL_ENTRYPOINTS)
    if any(patterns):
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns if p)]
    return [n for n in names if not any(fnmatch.fnmatch(n, e) for e in excludes)]


def is_model(name: str) -> bool:
    """True for a registered name, plain or with its own tag."""
    base, tag = split_model_name(name)
    return base in _MODEL_ENTRYPOINTS and tag in ("", _MODEL_ENTRYPOINTS[base].tag)


def create_model(
    model_name: str,
    num_classes: int | None = None,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, timm-style.

    Args:
        model_name: a name from `list_models()`, optionally with its tag (``"ecenet_resnet18.shapes_small"``).
        num_classes: number of classes; defaults to the built-in shapes world's.
        pretrained: load the weights file named by the model's ``pretrained_cfg.file`` (a local path; nothing is
            downloaded). Raises ``FileNotFoundError`` when there is none.
        checkpoint_path: a local weights file (.safetensors, or .pt/.pth read with ``weights_only=True``) to load
            after building; its keys and shapes must fit the model exactly.
        **kwargs: architecture options of the entrypoint (e.g. ``backbone_checkpoint=...``, ``impl="torch"``).
    """
    base, tag = split_model_name(model_name)
    if base not in _MODEL_ENTRYPOINTS:
        close = difflib.get_close_matches(base, _MODEL_ENTRYPOINTS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {model_name!r}.{hint} See fastseg.list_models() for all names.")
    entry = _MODEL_ENTRYPOINTS[base]
    if tag and tag != entry.tag:
        known = f"its only tag is {entry.tag!r}" if entry.tag else "it has no tags"
        raise ValueError(f"unknown tag {tag!r} of model {base!r}: {known}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = entry.fn(**kwargs)
    model.model_name = base
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, PretrainedCfg) and entry.tag:
        cfg.tag, cfg.differs_from_paper = entry.tag, entry.differs_from_paper
    if pretrained or checkpoint_path is not None:
        from .checkpoint import load_weights
    if pretrained:
        file = getattr(getattr(model, "pretrained_cfg", None), "file", None)
        if not file:
            raise FileNotFoundError(
                f"{model_name} has no local pretrained weights file: fastseg never downloads weights. Train one "
                f"(`fastseg train {model_name}`) and pass checkpoint_path=..., or set pretrained_cfg.file."
            )
        load_weights(model, Path(file))
    if checkpoint_path is not None:
        load_weights(model, Path(checkpoint_path))
    return model
