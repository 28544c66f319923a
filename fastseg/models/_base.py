"""The model contract shared by every fastseg method.

* ``model(images) -> logits (B, K, ceil(H/s), ceil(W/s))``, ``s = pretrained_cfg.output_stride``;
* ``model.predict(images) -> (B, H, W)`` int64 class ids at input size;
* ``model.loss(batch) -> dict[str, Tensor]`` with a ``"loss"`` total, ``batch`` holding at least
  ``"image"`` (B, 3, H, W) and ``"mask"`` (B, H, W) with ``ignore_index`` on unlabelled pixels.

Inputs of any size work: `forward` pads them (replicate) to a multiple of ``pretrained_cfg.divisible_by`` and crops
the logits back, so that odd sizes give the same logits as the padded computation would. `pad_to_multiple`,
`crop_to` and `resize` are the one pad / crop / upsample of every model (``SegmentationModel.pad_input`` and
``upsample_logits`` use them); `Backbone` is the interface every encoder implements.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import PretrainedCfg

__all__ = [
    "Backbone",
    "SegmentationModel",
    "check_images",
    "check_masks",
    "crop_to",
    "pad_to_multiple",
    "resize",
    "resolve_cfg",
]


class Backbone(nn.Module):
    """Common interface: ``forward(images) -> list of NCHW maps`` at ``reductions`` with ``channels``.

    ``divisible_by`` is the input multiple the encoder needs (the model pads to it).
    """

    channels: list[int]
    reductions: list[int]
    divisible_by: int = 32


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float | None = None) -> torch.Tensor:
    """Pad the last two dims of ``x`` at the bottom / right up to a multiple of ``multiple``.

    ``value=None`` replicates the border (images: no artificial edge); a number pads with it (label maps, with the
    ignore index). Returns ``x`` itself when nothing is missing.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if not (pad_h or pad_w):
        return x
    if value is None:
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return F.pad(x, (0, pad_w, 0, pad_h), value=value)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The top-left ``size`` of the last two dims (undoes `pad_to_multiple` on an output); ``x`` when it fits."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return x[..., : size[0], : size[1]]


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of a (B, C, H, W) map to ``size``: logits to label size, feature
    maps to a common size."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resolve_cfg(num_classes: int | None, **overrides: Any) -> PretrainedCfg:
    """A `PretrainedCfg` for the built-in shapes world (its class names and palette when K matches), with overrides."""
    from ..data.shapes import pretrained_cfg_fields

    fields = pretrained_cfg_fields()
    if num_classes is not None and num_classes != fields["num_classes"]:
        fields = {
            "num_classes": num_classes,
            "mean": fields["mean"],
            "std": fields["std"],
            "ignore_index": fields["ignore_index"],
            "input_size": fields["input_size"],
        }
    fields.update(overrides)
    return PretrainedCfg.from_dict(fields)


def check_images(images: object, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (normalised RGB), got {images.dtype}")
    if images.shape[-1] == 0 or images.shape[-2] == 0:
        raise ValueError(f"{name} has zero area: {tuple(images.shape)}")
    return images


def check_masks(masks: torch.Tensor, images: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Raise ``ValueError`` for a mask that does not fit the images or holds an id that is neither a class nor ignore."""
    if masks.dim() != 3 or masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"mask shape {tuple(masks.shape)} does not match images {tuple(images.shape)}: expected "
            f"({images.shape[0]}, {images.shape[-2]}, {images.shape[-1]})"
        )
    if masks.is_floating_point():
        raise ValueError(f"mask must hold integer class ids, got {masks.dtype}")
    bad = (masks != ignore_index) & ((masks < 0) | (masks >= num_classes))
    if bool(bad.any()):
        value = int(masks[bad][0])
        raise ValueError(
            f"mask holds label {value}, which is neither a class id in [0, {num_classes}) nor the ignore index "
            f"{ignore_index}"
        )
    return masks


class SegmentationModel(nn.Module):
    """Base class: subclasses implement `forward_logits` on padded inputs and may override `loss`."""

    pretrained_cfg: PretrainedCfg
    # Models whose hot paths run fastseg's fused ops accept ``impl="auto" | "triton" | "torch"`` and set this.
    has_fused_ops: bool = False

    @property
    def num_classes(self) -> int:
        return self.pretrained_cfg.num_classes

    @property
    def ignore_index(self) -> int:
        return self.pretrained_cfg.ignore_index

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pad_input(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``images`` padded (replicate) to a multiple of ``divisible_by``, and the size ``(ceil(H/s), ceil(W/s))``
        to `crop_to` the outputs at stride ``s = output_stride`` back to."""
        h, w = images.shape[-2:]
        stride = self.pretrained_cfg.output_stride
        return pad_to_multiple(images, self.pretrained_cfg.divisible_by), (math.ceil(h / stride), math.ceil(w / stride))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        padded, out_size = self.pad_input(images)
        return crop_to(self.forward_logits(padded), out_size)

    def upsample_logits(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return resize(logits, size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class ids (B, H, W) at input size. Uses the current train/eval mode; call ``model.eval()`` first."""
        logits = self(images)
        return self.upsample_logits(logits, images.shape[-2:]).argmax(1)

    def check_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "image" not in batch or "mask" not in batch:
            raise ValueError(f"batch must hold 'image' and 'mask', got keys {sorted(batch)}")
        images = check_images(batch["image"], "batch['image']")
        masks = check_masks(batch["mask"], images, self.num_classes, self.ignore_index)
        return images, masks

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pixel cross-entropy of the logits upsampled to label size, ignoring ``ignore_index``."""
        images, masks = self.check_batch(batch)
        logits = self.upsample_logits(self(images), masks.shape[-2:])
        ce = F.cross_entropy(logits, masks.long(), ignore_index=self.ignore_index)
        return {"loss": ce, "ce": ce.detach()}
