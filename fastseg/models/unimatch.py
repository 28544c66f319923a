"""UniMatch (Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic Segmentation", CVPR 2023):
the semi-supervised base of S4MIM (specs/pading_semples_s4mim.md E.3), on a compact DeepLabV3+.

One training step sees a labelled batch ``x, y`` and two unlabelled batches ``u`` (trained on) and ``u_mix`` (the
CutMix source). Weak view = the image as given; two strong views per unlabelled image (colour jitter p=0.8, grayscale
p=0.2, Gaussian blur p=0.5, then CutMix p=0.5 with a box from the ``u_mix`` strong view). Pseudo-labels are the
argmax of the weak-view prediction (train mode, detached); for the pasted boxes they come from the prediction on
``u_mix`` in **eval mode, without gradient** (UniMatch's teacher is the same network, no EMA). Pixels count in the
unsupervised terms only where the confidence reaches ``tau``; every unsupervised term is divided by the number of
valid pixels (not by the confident ones), as upstream. The feature-perturbation stream decodes ``Dropout2d(0.5)``
of the low-level (c1) and high-level (c4) encoder features of ``u``::

    L = (CE(x, y) + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2

Differences from upstream, all deliberate: augmentations run batched on tensors (GPU friendly) in a fixed order
(jitter -> grayscale -> blur) with a YIQ rotation for the hue jitter, and draw every random number from a
``torch.Generator`` seeded by the batch (``"aug_seed"``) so that a resumed run repeats them exactly; the
feature-perturbation stream decodes only the unlabelled half (upstream decodes the labelled half too and discards
it); the head uses GroupNorm (small CPU batches) where upstream uses BatchNorm.

The strong views are UniMatch's unless ``strong_aug`` overrides them: on the 64 x 64 shapes world its hue jitter,
grayscale and sigma-2 blur erase what tells the classes apart (colour, thin shapes), so a colour-preserving view is an
option there (issue 18).

The data side (`SemiSupervisedPairs`, the strong augmentations, CutMix boxes) is in `fastseg.data.semi`; the
training recipe (`build_training`: pairs dataset + loss for ``fastseg train --labelled-fraction``) in
`fastseg.engine.recipes.semi`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.semi import batch_generator, check_strong_augment_options, cutmix_boxes, strong_augment
from ..layers.blocks import ConvNormAct
from ..registry import register_model
from ._base import SegmentationModel, crop_to, resize, resolve_cfg
from .backbones import create_backbone

__all__ = ["ASPP", "DeepLabV3PlusSemi", "masked_pixel_ce"]


def masked_pixel_ce(
    logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """UniMatch's unsupervised CE: per-pixel CE kept where ``keep``, summed, divided by the number of ``valid``
    pixels (all pixels when None), not by the kept ones."""
    ce = F.cross_entropy(logits, target.long(), reduction="none")
    denominator = ce.new_tensor(float(target.numel())) if valid is None else valid.sum().clamp(min=1).to(ce.dtype)
    return (ce * keep.to(ce.dtype)).sum() / denominator


# ----------------------------------------------------------------------------------------------------------------
# DeepLabV3+
# ----------------------------------------------------------------------------------------------------------------
class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): a 1x1 branch, one 3x3 branch per dilation ``rate``, an image-pooling
    branch, concatenated and projected. UniMatch's projection is conv-norm-ReLU with no dropout (torchvision's
    DeepLabV3 ASPP adds Dropout(0.5)); ``dropout`` > 0 adds one after it."""

    def __init__(
        self, in_channels: int, out_channels: int, rates: Sequence[int] = (6, 12, 18), dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ASPP: dropout must lie in [0, 1), got {dropout!r}")
        self.branches = nn.ModuleList([ConvNormAct(in_channels, out_channels, 1)])
        self.branches.extend(ConvNormAct(in_channels, out_channels, 3, dilation=rate) for rate in rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvNormAct(in_channels, out_channels, 1))
        # Index 1 stays a module either way, so checkpoints keep their keys (neither holds parameters).
        after = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.project = nn.Sequential(ConvNormAct(out_channels * (len(rates) + 2), out_channels, 1), after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1))


class DeepLabV3PlusSemi(SegmentationModel):
    """DeepLabV3+ (encoder at output stride 16, ASPP, a stride-4 decoder) trained with UniMatch when the batch
    carries unlabelled images, and with plain cross-entropy otherwise.

    Args:
        backbone: fastseg backbone name (a ResNet; its last stage is dilated to output stride 16).
        num_classes: K (default: the shapes world's).
        aspp_channels: ASPP / decoder width (256 in DeepLabV3+).
        aspp_rates: ASPP dilations (6, 12, 18 at output stride 16 in the paper; smaller for small images).
        low_level_channels: width of the projected c1 features (48 in DeepLabV3+).
        tau: confidence threshold of the pseudo-labels (0.95 on Pascal, 0 on Cityscapes in UniMatch).
        fp_dropout: Dropout2d rate of the feature-perturbation stream.
        aspp_dropout: dropout after the ASPP projection (0: UniMatch's head; 0.5 until issue 18, by mistake).
        unsup_weights: weights of ``(L_s1, L_s2, L_fp)``; the total is ``(L_sup + sum) / 2``.
        cutmix_p: probability of a CutMix box per strong view.
        strong_aug: keyword overrides of `fastseg.data.semi.strong_augment` for the two strong views (None:
            UniMatch's colour jitter (0.5, 0.5, 0.5, 0.25) p=0.8, grayscale p=0.2, blur sigma U[0.1, 2] p=0.5).
        backbone_checkpoint: local weights file for the backbone.

    ``model.loss(batch)``: with ``"image_u"`` and ``"image_u_mix"`` in the batch the UniMatch loss (components
    ``sup``, ``s1``, ``s2``, ``fp``, ``conf_ratio``), else the supervised cross-entropy alone.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int | None = None,
        aspp_channels: int = 256,
        aspp_rates: Sequence[int] = (6, 12, 18),
        low_level_channels: int = 48,
        tau: float = 0.95,
        fp_dropout: float = 0.5,
        aspp_dropout: float = 0.0,
        unsup_weights: tuple[float, float, float] = (0.25, 0.25, 0.5),
        cutmix_p: float = 0.5,
        strong_aug: Mapping[str, Any] | None = None,
        backbone_checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if not backbone.startswith("resnet"):
            raise ValueError(f"DeepLabV3+ here dilates a ResNet's last stage; got backbone {backbone!r}")
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must lie in [0, 1], got {tau!r}")
        self.backbone = create_backbone(backbone, checkpoint=backbone_checkpoint, output_stride=16)
        self.pretrained_cfg = resolve_cfg(
            num_classes, output_stride=self.backbone.reductions[0], divisible_by=self.backbone.divisible_by
        )
        c1, c4 = self.backbone.channels[0], self.backbone.channels[-1]
        self.aspp = ASPP(c4, aspp_channels, aspp_rates, dropout=aspp_dropout)
        self.reduce_low = ConvNormAct(c1, low_level_channels, 1)
        self.fuse = nn.Sequential(
            ConvNormAct(aspp_channels + low_level_channels, aspp_channels, 3),
            ConvNormAct(aspp_channels, aspp_channels, 3),
        )
        self.classifier = nn.Conv2d(aspp_channels, self.num_classes, 1)
        self.decoder_channels = aspp_channels
        self.tau, self.fp_dropout, self.cutmix_p = float(tau), float(fp_dropout), float(cutmix_p)
        self.unsup_weights = tuple(float(w) for w in unsup_weights)
        self.strong_aug = check_strong_augment_options(strong_aug)

    # -- network ------------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-level (stride 4) and high-level (stride 16) encoder features of padded images."""
        feats = self.backbone(images)
        return feats[0], feats[-1]

    def decode(self, c1: torch.Tensor, c4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, decoder features)``, both at the resolution of ``c1`` (stride 4)."""
        high = resize(self.aspp(c4), c1.shape[-2:])
        feats = self.fuse(torch.cat([high, self.reduce_low(c1)], 1))
        return self.classifier(feats), feats

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(images))[0]

    def encode_padded(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Encoder features of images of any size, plus the stride-4 size to crop decoder outputs to."""
        padded, crop = self.pad_input(images)
        c1, c4 = self.encode(padded)
        return c1, c4, crop

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, decoder features)`` at stride 4 (cropped) for images of any size, in the current mode."""
        c1, c4, (h, w) = self.encode_padded(images)
        logits, feats = self.decode(c1, c4)
        return crop_to(logits, (h, w)), crop_to(feats, (h, w))

    # -- losses -------------------------------------------------------------------------------------------------
    def supervised_terms(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CE, logits at stride 4)`` of a labelled batch."""
        logits, _ = self.run(images)
        ce = F.cross_entropy(
            self.upsample_logits(logits, masks.shape[-2:]), masks.long(), ignore_index=self.ignore_index
        )
        return ce, logits

    def unimatch_terms(
        self, batch: dict[str, Any], generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """UniMatch's loss terms and a context for methods built on top (``logits_x``, ``logits_u`` at stride 4 with
        gradient, ``pseudo`` (B_u, H, W) with ``ignore_index`` below ``tau``)."""
        images, masks = self.check_batch(batch)
        u, u_mix = batch["image_u"], batch["image_u_mix"]
        if u.shape != u_mix.shape or u.shape[1:] != images.shape[1:]:
            raise ValueError(
                f"batch['image_u'] {tuple(u.shape)} and batch['image_u_mix'] {tuple(u_mix.shape)} must "
                f"have the same shape, with the labelled images' C, H, W {tuple(images.shape[1:])}"
            )
        n_l, n_u, size = images.shape[0], u.shape[0], tuple(images.shape[-2:])
        cfg = self.pretrained_cfg
        strong = [
            strong_augment(torch.cat([u, u_mix]), cfg.mean, cfg.std, generator, **self.strong_aug) for _ in range(2)
        ]
        boxes = [cutmix_boxes(n_u, *size, generator, u.device, p=self.cutmix_p) for _ in range(2)]

        with torch.no_grad():  # the teacher on the CutMix source: same network, eval mode
            was_training = self.training
            self.eval()
            conf_mix, label_mix = self.upsample_logits(self.run(u_mix)[0], size).softmax(1).max(1)
            self.train(was_training)

        c1, c4, (h, w) = self.encode_padded(torch.cat([images, u]))
        logits, _ = self.decode(c1, c4)
        logits = crop_to(logits, (h, w))
        drop = F.dropout2d
        logits_fp, _ = self.decode(
            drop(c1[n_l:], self.fp_dropout, self.training), drop(c4[n_l:], self.fp_dropout, self.training)
        )
        logits_fp = crop_to(logits_fp, (h, w))
        mixed = [torch.where(box[:, None], view[n_u:], view[:n_u]) for view, box in zip(strong, boxes)]
        logits_s1, logits_s2 = self.upsample_logits(self.run(torch.cat(mixed))[0], size).chunk(2)

        logits_x, logits_u = logits[:n_l], logits[n_l:]
        with torch.no_grad():
            conf_u, label_u = self.upsample_logits(logits_u.detach(), size).softmax(1).max(1)
        sup = F.cross_entropy(self.upsample_logits(logits_x, size), masks.long(), ignore_index=self.ignore_index)
        w1, w2, w_fp = self.unsup_weights
        terms: dict[str, torch.Tensor] = {"sup": sup}
        for name, logits_s, box in (("s1", logits_s1, boxes[0]), ("s2", logits_s2, boxes[1])):
            target = torch.where(box, label_mix, label_u)
            conf = torch.where(box, conf_mix, conf_u)
            terms[name] = masked_pixel_ce(logits_s, target, conf >= self.tau)
        terms["fp"] = masked_pixel_ce(self.upsample_logits(logits_fp, size), label_u, conf_u >= self.tau)
        terms["loss"] = (sup + w1 * terms["s1"] + w2 * terms["s2"] + w_fp * terms["fp"]) / 2
        terms["conf_ratio"] = (conf_u >= self.tau).float().mean().detach()
        pseudo = torch.where(conf_u >= self.tau, label_u, torch.full_like(label_u, self.ignore_index))
        return terms, {
            "logits_x": logits_x,
            "logits_u": logits_u,
            "pseudo": pseudo,
            "images": images,
            "masks": masks,
            "u": u,
        }

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "image_u" not in batch:
            images, masks = self.check_batch(batch)
            ce, _ = self.supervised_terms(images, masks)
            return {"loss": ce, "sup": ce.detach()}
        terms, _ = self.unimatch_terms(batch, batch_generator(batch, batch["image"].device))
        return {k: (v if k == "loss" else v.detach()) for k, v in terms.items()}


# ----------------------------------------------------------------------------------------------------------------
# Registered models
# ----------------------------------------------------------------------------------------------------------------
# The shapes-world models (64 x 64 inputs: a 4 x 4 map at stride 16) use small ASPP dilations; the full-size ones keep
# DeepLabV3+'s (6, 12, 18). `fastseg.models.s4mim` builds on the same sizes.
SMALL_DEEPLAB = {"aspp_channels": 128, "aspp_rates": (1, 2, 3), "low_level_channels": 32}
SMALL_DEEPLAB_DIFFERS = (
    "ASPP / decoder width 128 (paper: 256), ASPP dilations (1, 2, 3) (paper: 6, 12, 18), "
    "low-level width 32 (paper: 48), for the 64 x 64 shapes world; ResNet-18 backbone"
)


@register_model(tag="shapes_small", differs_from_paper=SMALL_DEEPLAB_DIFFERS)
def unimatch_resnet18(**kwargs: Any) -> DeepLabV3PlusSemi:
    """UniMatch base on a compact DeepLabV3+ / ResNet-18 (the CPU-trainable shapes-world configuration)."""
    for key, value in SMALL_DEEPLAB.items():
        kwargs.setdefault(key, value)
    return DeepLabV3PlusSemi(backbone="resnet18", **kwargs)


@register_model
def unimatch_resnet50(**kwargs: Any) -> DeepLabV3PlusSemi:
    """UniMatch base on DeepLabV3+ / ResNet-50."""
    return DeepLabV3PlusSemi(backbone="resnet50", **kwargs)


@register_model
def unimatch_resnet101(**kwargs: Any) -> DeepLabV3PlusSemi:
    """UniMatch base on DeepLabV3+ / ResNet-101 (UniMatch's Pascal / Cityscapes configuration)."""
    return DeepLabV3PlusSemi(backbone="resnet101", **kwargs)
