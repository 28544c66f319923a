"""S4MIM (Li, Hao, Shang, Jiao, "Masked Image Modeling Boosting Semi-Supervised Semantic Segmentation", arXiv
2411.08756): UniMatch plus class-wise masked image modelling, per-class masked/visible feature aggregation and
masked modelling in label space.

**Provenance.** Only the abstract is public (specs/pading_semples_s4mim.md E.1-E.2). Verified: (1) class regions are
reconstructed independently, so masked<->visible connections form only within a class; (2) features of the masked and
the visible part of the same class are pulled together; (3) MIM ideas are applied in the semantic (label) space; MIM
means pixel reconstruction. **Everything else here is our interpretation** (spec E.4), exposed as options so that the
paper's choices can be dropped in:

* base framework: UniMatch on DeepLabV3+ (`fastseg.models.unimatch`; probable, unconfirmed);
* class map: ground truth on labelled images, the weak-view pseudo-label on unlabelled ones with pixels below ``tau``
  ignored (they define no class and are never masked alone);
* masking (``patch_size``, ``mask_ratio``, ``mask_ownership``): `fastseg.layers.masking.classwise_patch_mask` masks a
  random ``mask_ratio`` of the patches of every class region. ``"pixel"`` (default): a class's patches are all those
  containing its pixels and a chosen patch hides only that class's pixels, so masking class c never hides a minority
  class's pixels in the same patch, and classes thinner than a patch are masked too; ``"majority"`` (the rule
  before issue 18): a patch belongs to its majority class and hides all its pixels;
* independence (``mim_input``): ``"per_class"`` builds one input per (image, class) slot, ``x_c = x`` on the visible
  pixels of class c and ``fill`` everywhere else, so the masked pixels of c can only be inferred from visible pixels
  of c (up to CNN padding effects); ``"single"`` is the cheaper variant with one masked image per image and a
  per-class loss only (context is not isolated);
* slots and budget (``mim_budget``, ``max_classes_per_image``): a slot is any (image, class) with a pixel of the
  class. The cost is bounded by a per-step budget of ``ceil(mim_budget * B)`` inputs for the B images of the MIM
  branch: every slot gets an input while they fit, and when they do not, the budget is shared class-balanced
  (`select_class_slots`: round-robin over the classes present, random images), so every class present in the batch
  gets MIM before any class gets a second input (on Cityscapes-like data, ~12 classes per image, a cap per image
  leaves most classes of an image out). ``max_classes_per_image`` (3 before issue 18, default None now) keeps the
  old per-image cap for the ablation. A slot whose class gets no masked pixel (a class touching a single patch at
  ratio 0.5: probability 1/2) costs an input and adds no loss;
* which pixels to reconstruct (``mask_signal``): in a per-class input the masked pixels of class c and the removed
  pixels of other classes hold the same ``fill``, so without a signal the network cannot tell which blank pixels it
  must reconstruct. ``"indicator"`` (default) gives it a binary mask channel (1 on the input's masked pixels),
  implemented as a zero-initialised extra input channel of the first convolution (a conv with conv1's geometry
  whose output is added to conv1's, only in the MIM branch). We chose it over a learned RGB mask token
  (``"token"``, also available) because any RGB value is also a possible image colour, so a token stays ambiguous
  with real pixels of that colour (and equals the other-class fill until it has moved away from 0), while the
  indicator is a value no real pixel sets; it starts at zero, so ImageNet weights and every forward outside the MIM
  branch (supervised, UniMatch, inference, export) are unchanged. ``"none"``: both hold ``fill`` (before issue 18);
* reconstruction: a SimMIM-style light decoder (1x1 conv to 3 * 4 * 4 channels + pixel shuffle) on the DeepLab
  decoder features, the loss `fastseg.kernels.classwise_masked_recon_loss` (mean over (image, class) groups of the MSE
  over the masked pixels of the class; MAE per-patch normalised targets when ``normalize_target``);
* aggregation: `ClasswiseFeatureAggregationLoss` (``classwise_reduce``) on the decoder features of the masked
  inputs, masked-part prototype vs stop-gradient visible-part prototype, ``agg_distance`` cosine or mse;
* label-space MIM (``semantic_mim``): ``"consistency"`` (MaskMatch-style: the prediction on the masked input must
  match the class map on the masked pixels) or ``"reconstruct"`` (the class probabilities predicted on the full image
  are masked with the same class-wise mask (plain MIM: its image-level mask) and a light label decoder must reconstruct the masked part of the class map
  from the visible part; gradients reach the segmenter through the visible probabilities), or ``"none"``;
* ablation ``mim="plain"``: image-level MIM. It differs from class-wise MIM in exactly two things, which together
  are what "class-wise" means: (a) **the mask**: a random ``mask_ratio`` of the patches of the whole image,
  irrespective of classes (ignored pixels included), instead of ``mask_ratio`` of each class region's patches;
  (b) **the visible context**: the whole image but its masked patches, instead of the visible pixels of the input's
  class only. Everything else is shared (`S4MIM.mim_batch`): the same (image, class) slots, chosen from the class
  map before any mask is drawn (same budget, same random draws), hence the same number of encoder inputs; with
  ``mim_input="per_class"`` one input per slot (plain: each with its own image-level mask) and every loss of input
  n restricted to the pixels of its class: the reconstruction over its masked pixels, the aggregation of its masked
  vs visible pixels, the label-space term on its masked pixels; the same fill, decoder, loss modules and weights.
  With ``mim_input="single"`` both run one input per image, the losses over all labelled masked pixels per
  (image, class). (Before issue 18 plain MIM ran one input per image where class-wise ran up to three, and its
  reconstruction loss was one group per image over every masked pixel, ignored ones included.) ``mim="none"``
  turns the MIM branch off (then the model is UniMatch);
* total: ``L = L_UniMatch + w_rec L_rec + w_agg L_agg + w_sem L_sem`` with placeholder weights (none are published).

``model.loss(batch)`` on a plain labelled batch (``"image"``, ``"mask"``) returns the supervised CE plus the MIM terms
on the labelled images (class map = ground truth); with ``"image_u"`` / ``"image_u_mix"`` (see `fastseg.data.semi.SemiSupervisedPairs`)
the full semi-supervised loss. Every random draw comes from a generator seeded by the batch (``"aug_seed"``).

Registered: ``s4mim_resnet18`` (the CPU-trainable shapes-world model), ``s4mim_resnet50``, ``s4mim_resnet101``; the
base ``unimatch_*`` models are in `fastseg.models.unimatch`. `fastseg.engine.recipes.semi.build_training` returns the
model, the training set and the loss for ``fastseg train MODEL --labelled-fraction F``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastseg.layers.masking import classwise_patch_mask

from ..data.semi import batch_generator
from ..layers.classwise import ClasswiseFeatureAggregationLoss, ClasswiseMaskedReconLoss
from ..registry import register_model
from ._base import crop_to
from .unimatch import SMALL_DEEPLAB, SMALL_DEEPLAB_DIFFERS, DeepLabV3PlusSemi

__all__ = ["S4MIM", "per_class_inputs", "select_class_slots"]

_MIM = ("classwise", "plain", "none")
_MIM_INPUTS = ("per_class", "single")
_SEMANTIC = ("consistency", "reconstruct", "none")
_FILLS = ("zero", "mean")
_MASK_SIGNALS = ("indicator", "token", "none")


def select_class_slots(
    present: torch.Tensor,
    generator: torch.Generator | None = None,
    max_inputs: int | None = None,
    max_classes_per_image: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the (image, class) slots of the per-class MIM inputs among the ``present`` pairs.

    Two optional limits, applied in this order:

    * ``max_classes_per_image``: keep at most this many classes per image, drawn uniformly (the cap used before
      issue 18, kept for the ablation);
    * ``max_inputs``: a per-step budget. When more pairs remain, they are taken **class-balanced**: every class's
      pairs are put in a random order, then the slots are filled round-robin over the classes (all first picks of
      every class in random class order, then all second picks, ...), so that each class present in the batch
      gets a slot before any class gets a second one (max-min fair shares), and the images of a class are drawn
      uniformly.

    Args:
        present: ``(B, K)`` bool, the pairs that may get an input.
        generator: draws the random orders (``B * K`` keys when the cap is set, one key per remaining pair when the
            budget binds, nothing otherwise).
        max_inputs: the per-step budget (None: no budget).
        max_classes_per_image: the per-image cap (None: no cap).

    Returns:
        ``(source image (N,), class (N,))`` in (image, class) order.
    """
    if max_inputs is not None and max_inputs < 0:
        raise ValueError(f"select_class_slots: max_inputs must be >= 0 or None, got {max_inputs!r}")
    b, k = present.shape
    if max_classes_per_image is not None:
        keys = torch.rand(b, k, generator=generator, device=present.device)
        keys = torch.where(present, keys, 2.0)
        rank = keys.argsort(1).argsort(1)
        present = present & (rank < max_classes_per_image)
    src, cls = present.nonzero(as_tuple=True)
    n = src.numel()
    if max_inputs is not None and n > max_inputs:
        keys = torch.rand(n, generator=generator, device=present.device, dtype=torch.float64)
        order = torch.argsort(keys)
        order = order[torch.argsort(cls[order], stable=True)]  # by class, then by random key
        counts = torch.bincount(cls, minlength=k)
        starts = torch.cumsum(counts, 0) - counts
        round_ = torch.empty_like(order)
        round_[order] = torch.arange(n, device=present.device) - starts[cls[order]]
        # the round a pair is picked in, ties inside a round broken by the (uniform) key: a random class order
        take = torch.argsort(round_.double() + keys)[:max_inputs].sort().values
        src, cls = src[take], cls[take]
    return src, cls


def per_class_inputs(
    images: torch.Tensor,
    labels: torch.Tensor,
    masked: torch.Tensor,
    num_classes: int,
    max_classes_per_image: int | None,
    generator: torch.Generator | None = None,
    fill: str = "zero",
    ignore_index: int = 255,
    max_inputs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One input per (image, class) with masked pixels: the visible pixels of that class, ``fill`` elsewhere.

    Args:
        images: (B, C, H, W) normalised images.
        labels: (B, H, W) class map with ``ignore_index``.
        masked: (B, H, W) bool mask (`classwise_patch_mask`).
        num_classes: K.
        max_classes_per_image: keep at most this many classes per image (drawn uniformly); None keeps all.
        generator: draws the kept classes.
        fill: ``"zero"`` (0 after normalisation: the dataset mean) or ``"mean"`` (the image's channel mean).
        ignore_index: label of pixels in no class.
        max_inputs: per-step budget of inputs, filled class-balanced (`select_class_slots`); None: no budget.

    Returns:
        ``(inputs (N, C, H, W), labels_n (N, H, W), source image index (N,), class (N,))`` where ``labels_n`` keeps
        only the pixels of the input's class (``ignore_index`` elsewhere), so losses on input n see class k only.
    """
    if fill not in _FILLS:
        raise ValueError(f"per_class_inputs: fill must be one of {_FILLS}, got {fill!r}")
    present = class_presence(labels, num_classes, masked)  # classes with a masked pixel: the only ones with a loss
    src, cls = select_class_slots(present, generator, max_inputs, max_classes_per_image)
    inputs, labels_n = class_inputs(images, labels, masked, src, cls, fill, ignore_index)
    return inputs, labels_n, src, cls


def fill_value(images: torch.Tensor, fill: str) -> torch.Tensor:
    """The value of removed pixels: 0 (``"zero"``: the dataset mean after normalisation) or each image's channel
    mean (``"mean"``), broadcastable against ``images``."""
    return images.new_zeros(()) if fill == "zero" else images.mean((2, 3), keepdim=True)


def class_presence(labels: torch.Tensor, num_classes: int, where: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, K)`` bool: the classes with at least one pixel in image b (restricted to ``where`` when given)."""
    b = labels.shape[0]
    lab = labels.long()
    valid = (lab >= 0) & (lab < num_classes)
    if where is not None:
        valid &= where
    index = torch.where(valid, lab, num_classes).view(b, -1)
    hist = torch.zeros(b, num_classes + 1, dtype=torch.int64, device=labels.device)
    hist.scatter_add_(1, index, torch.ones_like(index))
    return hist[:, :num_classes] > 0


def class_inputs(
    images: torch.Tensor,
    labels: torch.Tensor,
    masked: torch.Tensor,
    src: torch.Tensor,
    cls: torch.Tensor,
    fill: str = "zero",
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-class inputs of the slots ``(src, cls)``: image ``src[n]`` on the visible (not ``masked``) pixels of
    class ``cls[n]``, ``fill`` elsewhere; and their class maps (class ``cls[n]`` only, ``ignore_index`` elsewhere)."""
    lab = labels.long()[src]
    region = lab == cls.view(-1, 1, 1)
    keep = (region & ~masked[src]).unsqueeze(1)
    base = images[src]
    inputs = torch.where(keep, base, fill_value(base, fill))
    return inputs, torch.where(region, lab, torch.full_like(lab, ignore_index))


class S4MIM(DeepLabV3PlusSemi):
    """UniMatch + class-wise MIM (see the module docstring for what is verified and what is interpretation).

    Args (beyond `DeepLabV3PlusSemi`'s):
        mim: ``"classwise"`` (S4MIM), ``"plain"`` (image-level MIM, the ablation: the same inputs and losses, another
            mask and context; module docstring) or ``"none"``.
        mim_input: ``"per_class"`` (independent per-class inputs) or ``"single"`` (one masked image per input image).
        patch_size: masking unit in pixels.
        mask_ratio: fraction of each class region's patches (of the image's, for plain MIM) to mask.
        mask_ownership: ``"pixel"`` (a chosen patch hides only its class's pixels) or ``"majority"`` (a patch belongs
            to its majority class and hides all its pixels); class-wise MIM only.
        mim_budget: per-step budget of per-class inputs (``mim_input="per_class"``), as a multiple of the number of images in the MIM branch
            (``ceil(mim_budget * B)`` inputs, filled class-balanced when the pairs do not fit); None: no budget.
        max_classes_per_image: cap on the per-class inputs per image (None: no cap; 3 before issue 18).
        fill: value of removed pixels, ``"zero"`` (the dataset mean) or ``"mean"`` (the image's mean).
        mask_signal: how the network tells the pixels to reconstruct from other removed pixels: ``"indicator"`` (a
            binary mask channel, as a zero-initialised extra input channel of the first convolution), ``"token"``
            (a learned RGB value replaces the masked pixels) or ``"none"`` (both are ``fill``, before issue 18).
        normalize_target: MAE-style per-patch normalised reconstruction targets.
        agg_distance: ``"cosine"`` or ``"mse"``.
        semantic_mim: ``"consistency"``, ``"reconstruct"`` or ``"none"``.
        weights: ``(w_rec, w_agg, w_sem)``; placeholders, none are published.
        mim_on: ``"both"``, ``"labelled"`` or ``"unlabelled"`` images take part in the MIM branch.
        mim_updates_bn: True (default, as every other train-mode forward): the MIM inputs' statistics enter the
            BatchNorm running averages that evaluation uses. False (our option, not the paper's): the MIM forwards
            normalise with their batch statistics but leave the running averages as the other forwards set them, so
            blank-filled inputs do not shift the statistics clean test images are normalised with.
        impl: ``"auto" | "triton" | "torch"`` for the fused class-wise ops.
        deterministic: atomic-free class-wise reductions (None: follow torch's global flag).
    """

    has_fused_ops = True

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int | None = None,
        mim: str = "classwise",
        mim_input: str = "per_class",
        patch_size: int = 16,
        mask_ratio: float = 0.5,
        mask_ownership: str = "pixel",
        mim_budget: float | None = 4.0,
        max_classes_per_image: int | None = None,
        fill: str = "zero",
        mask_signal: str = "indicator",
        normalize_target: bool = True,
        agg_distance: str = "cosine",
        semantic_mim: str = "consistency",
        weights: tuple[float, float, float] = (0.5, 0.1, 0.25),
        mim_on: str = "both",
        mim_updates_bn: bool = True,
        impl: str = "auto",
        deterministic: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, **kwargs)
        for name, value, allowed in (
            ("mim", mim, _MIM),
            ("mim_input", mim_input, _MIM_INPUTS),
            ("semantic_mim", semantic_mim, _SEMANTIC),
            ("fill", fill, _FILLS),
            ("mask_ownership", mask_ownership, ("pixel", "majority")),
            ("mask_signal", mask_signal, _MASK_SIGNALS),
            ("mim_on", mim_on, ("both", "labelled", "unlabelled")),
            ("impl", impl, ("auto", "triton", "torch")),
        ):
            if value not in allowed:
                raise ValueError(f"S4MIM: {name} must be one of {allowed}, got {value!r}")
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"S4MIM: mask_ratio must lie in (0, 1], got {mask_ratio!r}")
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"S4MIM: patch_size must be a positive int, got {patch_size!r}")
        if max_classes_per_image is not None and max_classes_per_image < 1:
            raise ValueError(f"S4MIM: max_classes_per_image must be >= 1 or None, got {max_classes_per_image!r}")
        if mim_budget is not None and not mim_budget > 0:
            raise ValueError(f"S4MIM: mim_budget must be > 0 or None, got {mim_budget!r}")
        if len(weights) != 3 or any(w < 0 for w in weights):
            raise ValueError(f"S4MIM: weights must be three non-negative numbers (rec, agg, sem), got {weights!r}")
        self.mim, self.mim_input, self.semantic_mim, self.fill, self.mim_on = mim, mim_input, semantic_mim, fill, mim_on
        self.mask_signal = mask_signal if mim != "none" else "none"
        self.patch_size, self.mask_ratio, self.mask_ownership = patch_size, float(mask_ratio), mask_ownership
        self.max_classes_per_image = max_classes_per_image
        self.mim_budget = None if mim_budget is None else float(mim_budget)
        self.weights = tuple(float(w) for w in weights)
        self.mim_updates_bn = bool(mim_updates_bn)
        self.impl = impl
        stride = self.pretrained_cfg.output_stride
        k, ignore = self.num_classes, self.ignore_index
        self._pending_indicator: torch.Tensor | None = None
        if self.mask_signal == "indicator":
            # The indicator is a 4th input channel of the first convolution: conv1([x; m]) = conv1(x) + conv_m(m).
            # conv_m has conv1's geometry and starts at zero (the pretrained RGB path is unchanged); a forward hook
            # adds it to conv1's output only while `run_mim` passes a mask, so every other forward is untouched.
            stem = self.backbone.body.conv1
            self.mask_indicator = nn.Conv2d(
                1, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, stem.dilation, bias=False
            )
            nn.init.zeros_(self.mask_indicator.weight)
            stem.register_forward_hook(self._add_mask_indicator)
        elif self.mask_signal == "token":
            self.mask_token = nn.Parameter(torch.zeros(1, 3, 1, 1))  # SimMIM-style, learned (starts at the fill 0)
        if mim != "none":
            # SimMIM-style light decoder: stride-4 decoder features -> 3 * s * s channels -> pixel shuffle to pixels.
            self.recon_head = nn.Sequential(
                nn.Conv2d(self.decoder_channels, 3 * stride * stride, 1), nn.PixelShuffle(stride)
            )
            self.recon_loss = ClasswiseMaskedReconLoss(
                k,
                normalize_target=normalize_target,
                patch_size=patch_size,
                ignore_index=ignore,
                deterministic=deterministic,
                impl=impl,
            )
            self.agg_loss = ClasswiseFeatureAggregationLoss(
                k, distance=agg_distance, ignore_index=ignore, deterministic=deterministic, impl=impl
            )
            if semantic_mim == "reconstruct":
                hidden = 64
                self.label_decoder = nn.Sequential(
                    nn.Conv2d(k + 1, hidden, 3, padding=1),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(hidden, k, 1),
                )

    # -- the MIM branch -----------------------------------------------------------------------------------------
    def budget(self, num_images: int) -> int | None:
        """Per-step budget of per-class MIM inputs for ``num_images`` images in the MIM branch."""
        return None if self.mim_budget is None else max(1, math.ceil(self.mim_budget * num_images))

    def _add_mask_indicator(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self._pending_indicator is None:
            return None  # any forward outside `run_mim`: conv1's output as it is
        return output + self.mask_indicator(self._pending_indicator.to(output.dtype))

    def run_mim(self, inputs: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`run` on MIM inputs, telling the network which pixels are ``masked`` when ``mask_signal="indicator"``, and
        with the BatchNorm running averages held when ``mim_updates_bn`` is False."""
        if self.mim_updates_bn:
            return self._run_mim(inputs, masked)
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        try:
            for m in norms:
                m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: batch statistics used, averages kept
            return self._run_mim(inputs, masked)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum

    def _run_mim(self, inputs: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask_signal != "indicator":
            return self.run(inputs)
        padded, (h, w) = self.pad_input(inputs)
        indicator = masked[:, None].to(padded.dtype)
        pad_h, pad_w = padded.shape[-2] - indicator.shape[-2], padded.shape[-1] - indicator.shape[-1]
        indicator = F.pad(indicator, (0, pad_w, 0, pad_h))  # padding is not masked
        self._pending_indicator = indicator
        try:
            c1, c4 = self.encode(padded)
        finally:
            self._pending_indicator = None
        logits, feats = self.decode(c1, c4)
        return crop_to(logits, (h, w)), crop_to(feats, (h, w))

    def image_mask(
        self, num: int, height: int, width: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        """Plain MIM's mask: a random ``mask_ratio`` of the patches of the whole image, irrespective of classes."""
        whole = torch.zeros(num, height, width, dtype=torch.long, device=device)
        return classwise_patch_mask(whole, self.patch_size, self.mask_ratio, generator=generator, num_classes=1)

    def mim_batch(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The MIM branch's encoder inputs and the pixel sets its losses use.

        Returns a dict: ``inputs`` (N, C, H, W); ``source`` (N,) image of each input; ``targets`` (N, C, H, W) its
        unmasked image; ``labels`` (N, H, W) the class map the losses of input n see (per-class inputs: its class
        only, ``ignore_index`` elsewhere); ``masked`` (N, H, W) the pixels hidden from input n (filled); ``image_mask``
        (B, H, W) one mask per image (the label-space reconstruction term's). Class-wise and plain MIM build the
        same slots and differ only in the mask and the visible context (module docstring).
        """
        k, ignore = self.num_classes, self.ignore_index
        b, _, height, width = images.shape
        classwise, dev = self.mim == "classwise", images.device
        if self.mim_input == "per_class":
            # Slots first, from the class map alone: both variants get the same ones for the same batch and seed.
            src, cls = select_class_slots(
                class_presence(labels, k), generator, self.budget(b), self.max_classes_per_image
            )
        else:
            src = torch.arange(b, device=dev)
        if classwise:
            image_mask = classwise_patch_mask(
                labels,
                self.patch_size,
                self.mask_ratio,
                generator=generator,
                ignore_index=ignore,
                num_classes=k,
                ownership=self.mask_ownership,
            )
        else:
            image_mask = self.image_mask(b, height, width, generator, dev)
        targets = images[src]
        if self.mim_input == "single":
            labels_n, masked_n = labels.long(), image_mask
            inputs = torch.where(masked_n.unsqueeze(1), fill_value(targets, self.fill), targets)
        elif classwise:  # only the class's visible pixels are kept; only its pixels count as hidden
            inputs, labels_n = class_inputs(images, labels, image_mask, src, cls, self.fill, ignore)
            masked_n = image_mask[src] & (labels_n != ignore)
        else:  # an independent image-level mask per input; the whole image is visible but its masked patches
            masked_n = self.image_mask(src.numel(), height, width, generator, dev)
            lab = labels.long()[src]
            labels_n = torch.where(lab == cls.view(-1, 1, 1), lab, torch.full_like(lab, ignore))
            inputs = torch.where(masked_n.unsqueeze(1), fill_value(targets, self.fill), targets)
        if self.mask_signal == "token":
            inputs = torch.where(masked_n.unsqueeze(1), self.mask_token.to(inputs.dtype), inputs)
        return {
            "inputs": inputs,
            "source": src,
            "targets": targets,
            "labels": labels_n,
            "masked": masked_n,
            "image_mask": image_mask,
        }

    def mim_terms(
        self, images: torch.Tensor, labels: torch.Tensor, logits_full: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """``rec``, ``agg``, ``sem`` losses of the MIM branch on ``images`` with class map ``labels``.

        Args:
            images: (B, 3, H, W) normalised images (labelled and / or weak unlabelled views).
            labels: (B, H, W) ground truth or confident pseudo-labels, ``ignore_index`` elsewhere.
            logits_full: (B, K, H/4, W/4) predictions on the unmasked images (with gradient), for
                ``semantic_mim="reconstruct"``.
            generator: the batch's generator.
        """
        ignore = self.ignore_index
        size = tuple(images.shape[-2:])
        mb = self.mim_batch(images, labels, generator)
        inputs, targets, labels_n, masked_n, masked = (
            mb["inputs"],
            mb["targets"],
            mb["labels"],
            mb["masked"],
            mb["image_mask"],
        )
        zero = images.new_zeros(())
        if inputs.shape[0] == 0:  # no class anywhere (e.g. every pixel ignored)
            return {"rec": zero, "agg": zero, "sem": zero, "mask_ratio": zero, "mim_inputs": zero}
        logits_m, feats_m = self.run_mim(inputs, masked_n)
        recon = self.recon_head(feats_m)[..., : size[0], : size[1]]
        terms = {
            "rec": self.recon_loss(recon, targets, labels_n, masked_n),
            "agg": self.agg_loss(feats_m, labels_n, masked_n),
        }
        if self.semantic_mim == "consistency":
            target = torch.where(masked_n, labels_n.long(), ignore)
            if bool((target != ignore).any()):
                terms["sem"] = F.cross_entropy(self.upsample_logits(logits_m, size), target, ignore_index=ignore)
            else:
                terms["sem"] = zero
        elif self.semantic_mim == "reconstruct":
            h, w = logits_full.shape[-2:]
            small = F.interpolate(masked[:, None].float(), size=(h, w), mode="nearest")
            visible_probs = logits_full.softmax(1) * (1 - small)
            rec_logits = self.label_decoder(torch.cat([visible_probs, small], 1))
            target = torch.where(masked, labels.long(), ignore)
            if bool((target != ignore).any()):
                terms["sem"] = F.cross_entropy(self.upsample_logits(rec_logits, size), target, ignore_index=ignore)
            else:
                terms["sem"] = zero
        else:
            terms["sem"] = zero
        terms["mask_ratio"] = masked.float().mean().detach()
        terms["mim_inputs"] = images.new_tensor(float(inputs.shape[0]))  # encoder inputs of the MIM branch
        return terms

    def _combine(self, base: torch.Tensor, mim: dict[str, torch.Tensor]) -> torch.Tensor:
        w_rec, w_agg, w_sem = self.weights
        return base + w_rec * mim["rec"] + w_agg * mim["agg"] + w_sem * mim["sem"]

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Semi-supervised loss with ``"image_u"`` in the batch, else supervised CE + MIM on the labelled images."""
        if self.mim == "none":
            return super().loss(batch)
        images = batch.get("image")
        device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        generator = batch_generator(batch, device)
        if "image_u" not in batch:
            images, masks = self.check_batch(batch)
            ce, logits = self.supervised_terms(images, masks)
            mim = self.mim_terms(images, masks, logits, generator)
            out = {"loss": self._combine(ce, mim), "sup": ce}
        else:
            terms, ctx = self.unimatch_terms(batch, generator)
            parts = {
                "labelled": ([ctx["images"]], [ctx["masks"]], [ctx["logits_x"]]),
                "unlabelled": ([ctx["u"]], [ctx["pseudo"]], [ctx["logits_u"]]),
            }
            chosen = ["labelled", "unlabelled"] if self.mim_on == "both" else [self.mim_on]
            mim_images = torch.cat([parts[c][0][0] for c in chosen])
            mim_labels = torch.cat([parts[c][1][0].long() for c in chosen])
            mim_logits = torch.cat([parts[c][2][0] for c in chosen])
            mim = self.mim_terms(mim_images, mim_labels, mim_logits, generator)
            out = dict(terms)
            out["loss"] = self._combine(terms["loss"], mim)
        out.update({name: mim[name] for name in ("rec", "agg", "sem", "mask_ratio", "mim_inputs")})
        return {k: (v if k == "loss" else v.detach()) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# Registered models
# ----------------------------------------------------------------------------------------------------------------
# The shapes-world models (64 x 64 inputs: a 4 x 4 map at stride 16) use UniMatch's small DeepLabV3+ and 8-pixel
# patches; the full-size ones keep DeepLabV3+'s ASPP dilations (6, 12, 18) and 16-pixel patches.


@register_model(
    tag="shapes_small", differs_from_paper=SMALL_DEEPLAB_DIFFERS + "; 8-pixel masking patches (16 at full size)"
)
def s4mim_resnet18(**kwargs: Any) -> S4MIM:
    """S4MIM on a compact DeepLabV3+ / ResNet-18 (CPU-trainable; 8-pixel patches for the 64 x 64 shapes world)."""
    for key, value in SMALL_DEEPLAB.items():
        kwargs.setdefault(key, value)
    kwargs.setdefault("patch_size", 8)
    return S4MIM(backbone="resnet18", **kwargs)


@register_model
def s4mim_resnet50(**kwargs: Any) -> S4MIM:
    """S4MIM on DeepLabV3+ / ResNet-50."""
    return S4MIM(backbone="resnet50", **kwargs)


@register_model
def s4mim_resnet101(**kwargs: Any) -> S4MIM:
    """S4MIM on DeepLabV3+ / ResNet-101 (the probable configuration of the paper)."""
    return S4MIM(backbone="resnet101", **kwargs)
