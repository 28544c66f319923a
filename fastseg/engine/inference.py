"""Test-time inference of one image under an :class:`~fastseg.data.transforms.EvalProtocol`.

* ``whole``: one forward pass on the (resized) image;
* ``slide``: windows of ``crop_size`` every ``stride`` pixels, the last window of a row / column flush with the
  border; each window's logits (upsampled to the window) are summed into the full canvas and divided by the number of
  windows covering each pixel (mmseg's ``slide_inference``). Windows larger than the image shrink to it;
* several ``ratios`` and / or ``flip``: every pass's logits are resized to the label size, turned into softmax
  probabilities and summed (mmseg's ``aug_test``); a single pass takes the argmax of its logits directly.

Images are resized with bilinear interpolation (``align_corners=False``) to ``rescale_size(H, W, scale, ratio)``
(mmseg's keep-ratio rule) or, without a ``scale``, to ``round(H * ratio) x round(W * ratio)``; logits go back to the
label size the same way. Models follow the fastseg contract: ``model(images)`` returns class logits at some stride,
``model.predict(images)`` class ids at input size (used unchanged for a plain whole-image pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import EvalProtocol, rescale_size

__all__ = ["predict_image", "slide_logits", "whole_logits"]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def whole_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits of ``model`` at the input size."""
    return _resize(model(images), tuple(images.shape[-2:])).float()


def slide_logits(
    model: nn.Module, images: torch.Tensor, crop_size: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """(B, K, H, W) sliding-window logits (see the module docstring)."""
    b, _, h, w = images.shape
    ch, cw = min(crop_size[0], h), min(crop_size[1], w)
    sh, sw = stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, h, w, device=images.device)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh + ch, h), min(c * sw + cw, w)
            y0, x0 = max(y1 - ch, 0), max(x1 - cw, 0)
            logits = whole_logits(model, images[:, :, y0:y1, x0:x1])
            if total is None:
                total = images.new_zeros(b, logits.shape[1], h, w, dtype=torch.float32)
            total[:, :, y0:y1, x0:x1] += logits
            count[:, :, y0:y1, x0:x1] += 1
    assert total is not None and bool((count > 0).all())
    return total / count


@torch.no_grad()
def predict_image(
    model: nn.Module, images: torch.Tensor, protocol: EvalProtocol, out_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Class ids (B, H, W) at ``out_size`` (default: the input size) for images (B, 3, H, W) under ``protocol``.

    The model must already be in eval mode. A plain protocol (whole image, no resize, one scale, no flip) is exactly
    ``model.predict(images)``.
    """
    h, w = images.shape[-2:]
    out_size = (h, w) if out_size is None else tuple(out_size)
    if protocol.is_plain and out_size == (h, w):
        return model.predict(images)
    single = protocol.num_passes == 1
    total: torch.Tensor | None = None
    for ratio in protocol.ratios:
        if protocol.scale is not None:
            size = rescale_size(h, w, protocol.scale, ratio)
        else:
            size = (max(1, round(h * ratio)), max(1, round(w * ratio)))
        scaled = _resize(images, size)
        for flip in (False, True) if protocol.flip else (False,):
            x = scaled.flip(-1) if flip else scaled
            if protocol.mode == "slide":
                logits = slide_logits(model, x, protocol.crop_size, protocol.stride)
            else:
                logits = whole_logits(model, x)
            if flip:
                logits = logits.flip(-1)
            logits = _resize(logits, out_size)
            scores = logits if single else logits.softmax(dim=1)
            total = scores if total is None else total + scores
    assert total is not None
    return total.argmax(dim=1)
