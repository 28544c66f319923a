"""ECENet (Liu et al., "Explicit Class Embeddings for Semantic Segmentation", ICCV 2023; arXiv 2308.12894).

Written from ``specs/gss_ecenet.md`` part B, which reads the MindSpore port of the official head
(``SegDecodingTransformer``). Module names follow the official checkpoint (``layer_slcts``, ``norms``, ``laterals``,
``learner``, ``token_emb``, ``transfer``, ``gated_tokens``, ``ghost_up_layers``, ``proj``, ``trans``, ``conv_seg``) so
that `convert_official_state_dict` maps keys almost one to one.

Data flow (C = head width, K = classes, levels at strides 4, 8, 16, 32)::

    backbone -> FR on every level (`FeatureReconstruction` + channel LayerNorm) -> 1x1 laterals L1..L4
    ECE:  M4 = learner(L4)                      (mask logits at 1/32)
          E  = token_emb[3](M4)                 (class embeddings from multi-scale pooled masks, B x K x C)
    SAU, top-down on L3 (1/16), L2 (1/8), L1 (1/4):
          x_s, mask_s = transfer[s](L_s, E)     (pixel->class attention, softmax(-A); mask = head-mean of A; Mix-FFN)
          E = gated_tokens[s](token_emb[s](mask_s), E)
    ghost pixel-shuffle upsampling of x_{1/8}, x_{1/16}, L4 to 1/4; concat; 3x3 conv (``proj``) -> F
    total = M4 + mask_3 + mask_2 + mask_1 (bilinear to 1/4)
    logits = conv_seg(dropout(F)) + diagonal(softmax(trans(E)))[..., None, None] * sigmoid(total)

The class-embedding term of the logits is, for class k, one scalar per image (the k-th diagonal entry of the
softmax of the class scores of the final embeddings, in [0, 1]) times the sigmoid of class k's summed mask logits:
not a weighted sum of masks, and bounded to [0, 1] per pixel. The embeddings also shape the pixel features through
the SAU attention, which feeds the classifier.

Losses (the port has no training code; spec B.4 marks the mask and diversity losses as inferred): pixel
cross-entropy on the logits, the mask loss ``5 * BCE + 2 * Dice`` of the first three masks against the one-hot
ground truth, and the diversity loss (weight 0.2) on the diverse branch of every FR block.

Export notes: the pooled-mask embedding is one matrix product with a pooling matrix built from integer arithmetic
(`pooling_matrix`; no adaptive pooling with non-dividing sizes, which TensorRT dislikes), and the final fusion uses
``torch.diagonal``, not einsum.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastseg.kernels import pixel_class_attention

from ..layers.blocks import ChannelLayerNorm, ConvNormAct
from ..registry import register_model
from ._base import SegmentationModel, crop_to, resize, resolve_cfg
from .backbones import create_backbone

__all__ = [
    "ECENet",
    "ECENetSemanticsAttention",
    "ECENetTransferBlock",
    "FeatureReconstruction",
    "GhostUpsample",
    "PooledMaskEmbedding",
    "TokenUpdater",
    "convert_official_state_dict",
    "diversity_loss",
    "mask_loss",
    "pool_length",
    "pool_sizes",
    "pooling_matrix",
]


# ----------------------------------------------------------------------------------------------------------------
# Explicit Class Extraction: class embeddings from multi-scale pooled masks
# ----------------------------------------------------------------------------------------------------------------
def pool_length(num_classes: int, ratio: float = 1.0) -> int:
    """The largest pooling size L = int(sqrt(K) * ratio), bumped to the next odd number (K=150 -> 13, K=59 -> 7)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    length = max(1, int(math.sqrt(num_classes) * ratio))
    return length if length % 2 else length + 1


def pool_sizes(num_classes: int, ratio: float = 1.0) -> tuple[int, ...]:
    """Pyramid of pooled-mask sizes: (1, 2, 3, 6, L) ("1236length" in the official config name)."""
    return (1, 2, 3, 6, pool_length(num_classes, ratio))


def _pooling_matrix_1d(size: int, out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(out, size) matrix of adaptive average pooling along one axis: bin i averages [floor(i*n/o), ceil((i+1)*n/o))."""
    bins = torch.arange(out, device=device)
    start = (bins * size) // out
    end = ((bins + 1) * size + out - 1) // out
    pos = torch.arange(size, device=device)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return inside.to(dtype) / (end - start).to(dtype)[:, None]


def pooling_matrix(
    height: int,
    width: int,
    sizes: Sequence[int],
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Adaptive average pooling to every size in ``sizes`` as one (sum s^2, height*width) matrix.

    Row ``offset_s + i*s + j`` holds the weights of output cell (i, j) of the s x s pooling, in the order of
    ``torch.cat([adaptive_avg_pool2d(x, s).flatten(2) for s in sizes], -1)``; built from integer arithmetic only, so
    it exports as constant ops (no AdaptiveAvgPool with sizes that do not divide the input).
    """
    rows = []
    for s in sizes:
        ph = _pooling_matrix_1d(height, s, device, dtype)  # (s, H)
        pw = _pooling_matrix_1d(width, s, device, dtype)  # (s, W)
        rows.append((ph[:, None, :, None] * pw[None, :, None, :]).reshape(s * s, height * width))
    return torch.cat(rows, 0)


class PooledMaskEmbedding(nn.Module):
    """``TokenEmbedding_noCoord_seg``: per-class mask logits -> class embeddings (B, K, C).

    Each class map is average-pooled to 1x1, 2x2, 3x3, 6x6 and LxL, flattened and concatenated (L^2 + 50 values),
    then ``cls_learner`` (Linear with bias) maps them to C channels. Linear in the mask, so it is computed as one
    matrix product ``mask (B, K, HW) @ G + b`` with ``G = P^T W^T`` and ``P`` the `pooling_matrix` (constant for a
    given input size: export folds ``G``).

    Args:
        num_classes: K (sets L).
        channels: C.
        ratio: L = int(sqrt(K) * ratio), bumped to odd (the official config uses 1).
        mode: ``"matrix"`` (one product, default) or ``"pool"`` (``adaptive_avg_pool2d`` per size; the readable
            reference the tests compare with).
    """

    def __init__(self, num_classes: int, channels: int, ratio: float = 1.0, mode: str = "matrix") -> None:
        super().__init__()
        if mode not in ("matrix", "pool"):
            raise ValueError(f"PooledMaskEmbedding mode must be 'matrix' or 'pool', got {mode!r}")
        self.sizes = pool_sizes(num_classes, ratio)
        self.mode = mode
        self.cls_learner = nn.Linear(sum(s * s for s in self.sizes), channels)

    def forward(self, masks: Tensor) -> Tensor:
        """masks (B, K, H, W) logits -> (B, K, C)."""
        if self.mode == "pool":
            pooled = torch.cat([F.adaptive_avg_pool2d(masks, s).flatten(2) for s in self.sizes], -1)
            return self.cls_learner(pooled)
        height, width = masks.shape[-2:]
        pool = pooling_matrix(height, width, self.sizes, masks.device, masks.dtype)  # (D, HW)
        fused = pool.t() @ self.cls_learner.weight.t()  # (HW, C): a constant for export
        return masks.flatten(2) @ fused + self.cls_learner.bias


class TokenUpdater(nn.Module):
    """``TokenUpdator``: the gated update of class embeddings E with the stage's pooled-mask embeddings U.

    ``[p_in | p_out] = dynamic_layer(U)``; ``g = sigmoid(norm_in(update_gate(input_layer(E) * p_in)))``;
    ``E' = relu(fc_norm(fc_layer(g * norm_out(p_out) + E)))`` -- the residual adds the previous E itself (spec
    B.3.2, read from the port).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dynamic_layer = nn.Linear(channels, 2 * channels)
        self.input_layer = nn.Linear(channels, channels)
        self.update_gate = nn.Linear(channels, channels)
        self.fc_layer = nn.Linear(channels, channels)
        self.norm_in = nn.LayerNorm(channels)
        self.norm_out = nn.LayerNorm(channels)
        self.fc_norm = nn.LayerNorm(channels)

    def forward(self, update: Tensor, embeddings: Tensor) -> Tensor:
        p_in, p_out = self.dynamic_layer(update).chunk(2, dim=-1)
        gate = torch.sigmoid(self.norm_in(self.update_gate(self.input_layer(embeddings) * p_in)))
        return F.relu(self.fc_norm(self.fc_layer(gate * self.norm_out(p_out) + embeddings)))


# ----------------------------------------------------------------------------------------------------------------
# Semantics Attention Update: pixel->class cross-attention (fused op) and the transfer block
# ----------------------------------------------------------------------------------------------------------------
class _ConvHolder(nn.Module):
    """mmcv's ConvModule without norm / activation: only ``.conv`` (keeps checkpoint keys ``*.conv.weight``)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _DepthwiseSeparableConv(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, both with bias, no norm, no activation (mmcv ``act_cfg=None``; spec B.3.2
    notes that one port silently adds a ReLU -- mmcv semantics are followed here)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise_conv = _ConvHolder(nn.Conv2d(channels, channels, 3, padding=1, groups=channels))
        self.pointwise_conv = _ConvHolder(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class ECENetSemanticsAttention(nn.Module):
    """ECENet's pixel->class cross-attention (``cross_attn``), one fused op for attention + stage mask.

    ``Q = pointwise(depthwise3x3(x))``; ``[K | V] = Linear(C, 2C, bias=False)(e)``; head ``h`` owns channels
    ``[h*d, (h+1)*d)`` of Q, K and V; ``A = Q K^T * d**-0.5``; weights ``softmax(rowmax(A) - A) = softmax(-A)`` over
    the classes; ``out = proj(weights @ V)`` (1x1 conv with bias, heads concatenated); ``mask = mean_h A`` reshaped to
    (B, K, H, W). The inputs are expected to be LayerNorm-ed already (see `ECENetTransferBlock`); no residual here.

    Args:
        channels: C (256 in ECENet).
        num_heads: heads (4 in ECENet); C must be divisible by it.
        impl: kernel implementation, passed to `fastseg.kernels.pixel_class_attention`.
    """

    def __init__(self, channels: int = 256, num_heads: int = 4, impl: str = "auto") -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels, self.num_heads, self.impl = channels, num_heads, impl
        self.scale = (channels // num_heads) ** -0.5
        self.q = _DepthwiseSeparableConv(channels)
        self.kv = nn.Linear(channels, 2 * channels, bias=False)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """Args: x (B, C, H, W) pixel features; classes (B, K, C) class embeddings.
        Returns: out (B, C, H, W) (before the residual) and the stage mask (B, K, H, W)."""
        if x.dim() != 4 or classes.dim() != 3 or x.shape[1] != self.channels or classes.shape[-1] != self.channels:
            raise ValueError(
                f"ECENetSemanticsAttention: expected x (B, {self.channels}, H, W) and classes (B, K, {self.channels}), "
                f"got {tuple(x.shape)} and {tuple(classes.shape)}"
            )
        bsz, channels, height, width = x.shape
        heads, head_dim = self.num_heads, channels // self.num_heads
        q = self.q(x).flatten(2).view(bsz, heads, head_dim, height * width).transpose(2, 3)  # (B, h, N, d)
        k, v = self.kv(classes).view(bsz, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)  # each (B, h, K, d)
        out, mean = pixel_class_attention(
            q, k, v, scale=self.scale, negate=True, return_logits_mean=True, impl=self.impl
        )
        out = out.transpose(2, 3).reshape(bsz, channels, height, width)
        return self.proj(out), mean.view(bsz, -1, height, width)


class ECENetTransferBlock(nn.Module):
    """One ECENet stage update of pixel features (``transfer.{i}``): attention + residual, then MixFFN + residual.

    ``a, mask = cross_attn(norm_low(x), norm_high(e)); x = x + a; x = x + mlp(norm_mlp(x))`` with
    ``mlp = 1x1 C->4C, dw3x3 4C, GELU, Dropout, 1x1 4C->C`` (indices 0, 1, 4 carry weights, as in the checkpoint).
    ``norm_low`` normalises the pixel features (the query input) and ``norm_high`` the class embeddings (the key /
    value input), as spec B.3.2 prescribes (q-input = LN(X), kv-input = LN(E)). The names alone do not say which is
    which; a related public mmseg head with the same block (``CFTBlock``: ``norm_low``, ``norm_high``, ``cross_attn``
    with a depthwise-separable q and softmax(max - A), ``norm_mlp`` + Mix-FFN) applies ``norm_low`` to the
    lower-level (pixel, query) input and ``norm_high`` to the key / value input, which agrees. That head uses
    LayerNorm eps 1e-6; ECENet's eps is not in our sources, so PyTorch's default (1e-5) is kept.
    """

    def __init__(
        self, channels: int = 256, num_heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0, impl: str = "auto"
    ) -> None:
        super().__init__()
        hidden = channels * mlp_ratio
        self.norm_low = ChannelLayerNorm(channels)
        self.norm_high = nn.LayerNorm(channels)
        self.cross_attn = ECENetSemanticsAttention(channels, num_heads, impl)
        self.norm_mlp = ChannelLayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the updated pixel features (B, C, H, W) and the stage mask (B, K, H, W)."""
        attended, mask = self.cross_attn(self.norm_low(x), self.norm_high(classes))
        x = x + attended
        return x + self.mlp(self.norm_mlp(x)), mask


# ----------------------------------------------------------------------------------------------------------------
# Feature Reconstruction and the aggregation blocks
# ----------------------------------------------------------------------------------------------------------------
class FeatureReconstruction(nn.Module):
    """``AdaptiveFeatureSelector_1_layers`` (FR), GhostNet-like, on one backbone level of C channels.

    ``x1 = BN(conv1x1(x))`` (C -> C/2, intrinsic); ``x2 = BN(dw3x3(x1))`` (diverse); ``g = W2 relu(W1 GAP(x2))``
    with **no sigmoid** (an unbounded channel scaling, as in the port); ``x2' = x2 * g``;
    ``out = conv1x1(cat[x2', x1])`` (C -> C, diverse first). Returns ``out`` and ``x2'`` (for the diversity loss).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 4:
            raise ValueError(f"FeatureReconstruction needs channels divisible by 4, got {channels}")
        half = channels // 2
        self.primary = nn.Sequential(nn.Conv2d(channels, half, 1, bias=False), nn.BatchNorm2d(half))
        self.cheap = nn.Sequential(nn.Conv2d(half, half, 3, padding=1, groups=half), nn.BatchNorm2d(half))
        self.layer_channel_slct = nn.Sequential(
            nn.Linear(half, channels // 4, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // 4, half, bias=False),
        )
        self.conv_out = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        intrinsic = self.primary(x)
        diverse = self.cheap(intrinsic)
        scale = self.layer_channel_slct(diverse.mean((2, 3)))
        diverse = diverse * scale[:, :, None, None]
        return self.conv_out(torch.cat([diverse, intrinsic], 1)), diverse


class _GhostUpStep(nn.Module):
    """One x2 ghost upsampling: primary 1x1 (C -> 2C), cheap dw3x3 (2C), concat (4C), pixel_shuffle(2) -> C."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.primary = ConvNormAct(channels, 2 * channels, 1, norm="bn")
        self.cheap = ConvNormAct(2 * channels, 2 * channels, 3, groups=2 * channels, norm="bn")

    def forward(self, x: Tensor) -> Tensor:
        primary = self.primary(x)
        return F.pixel_shuffle(torch.cat([primary, self.cheap(primary)], 1), 2)


class GhostUpsample(nn.Module):
    """``steps`` ghost pixel-shuffle x2 upsamplings (``ghost_up_layers.{i}.layers.{j}``)."""

    def __init__(self, channels: int, steps: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[_GhostUpStep(channels) for _ in range(steps)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
def mask_loss(
    mask_logits: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    bce_weight: float = 5.0,
    dice_weight: float = 2.0,
    dice_classes: str = "all",
) -> tuple[Tensor, Tensor]:
    """ECENet's ``SDTLoss`` as inferred in spec B.4: BCE and Dice of sigmoid(mask logits) vs the one-hot ground truth.

    Ignored pixels count nowhere. BCE is the mean over valid pixels and classes; Dice is ``1 - (2 sum(p t) + 1) /
    (sum p + sum t + 1)`` per image and class, then averaged over the (image, class) pairs that ``dice_classes``
    selects:

    * ``"all"``: every class of every image. An absent class's term is ``1 - 1 / (sum p + 1)`` (pushes its mask
      towards empty), and the mean over K dilutes the present classes' terms by about K / (classes present).
    * ``"present"``: only the classes that have at least one valid (non-ignored) ground-truth pixel in that image,
      as Mask2Former's Dice covers only the masks matched to ground truth; absent classes are then pushed down by
      the BCE term alone. A class that only the prediction contains does not count (a false positive costs BCE,
      not Dice). With no valid pixel in the batch, the Dice term is 0.

    Args:
        mask_logits: (B, K, H, W) at label size.
        target: (B, H, W) class ids with ``ignore_index``.
        num_classes: K.
        ignore_index: label that counts nowhere.
        bce_weight, dice_weight: the weights (5 and 2, the Mask2Former convention the config's values match).
        dice_classes: ``"all"`` or ``"present"`` (see above).

    Returns:
        ``(bce_weight * bce, dice_weight * dice)``.
    """
    if mask_logits.shape[0] != target.shape[0] or mask_logits.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"mask_loss: logits {tuple(mask_logits.shape)} do not match target {tuple(target.shape)}")
    if dice_classes not in ("all", "present"):
        raise ValueError(f"mask_loss: dice_classes must be 'all' or 'present', got {dice_classes!r}")
    valid = (target != ignore_index).unsqueeze(1).to(mask_logits.dtype)  # (B, 1, H, W)
    onehot = F.one_hot(torch.where(target == ignore_index, 0, target).long(), num_classes).permute(0, 3, 1, 2)
    onehot = onehot.to(mask_logits.dtype) * valid
    bce_map = F.binary_cross_entropy_with_logits(mask_logits, onehot, reduction="none") * valid
    bce = bce_map.sum() / (valid.sum() * num_classes).clamp_min(1.0)
    prob = torch.sigmoid(mask_logits) * valid
    inter = (prob * onehot).flatten(2).sum(-1)
    area = onehot.flatten(2).sum(-1)  # (B, K) valid ground-truth pixels per image and class
    dice = 1.0 - (2.0 * inter + 1.0) / (prob.flatten(2).sum(-1) + area + 1.0)
    if dice_classes == "all":
        return bce_weight * bce, dice_weight * dice.mean()
    present = (area > 0).to(dice.dtype)
    return bce_weight * bce, dice_weight * (dice * present).sum() / present.sum().clamp_min(1.0)


def diversity_loss(diverse_features: Sequence[Tensor]) -> Tensor:
    """The MC-Loss diversity term on the FR diverse branches (spec B.4, inferred).

    Per level: each channel is softmax-ed over the pixels, the channel-wise max is summed over the pixels and divided
    by the number of channels C' (a value in [1/C', 1]: 1 when every channel peaks at a different place); the loss is
    ``1 - that``, averaged over images and levels.
    """
    if not diverse_features:
        raise ValueError("diversity_loss needs at least one feature map")
    terms = []
    for feat in diverse_features:
        channels = feat.shape[1]
        spatial = torch.softmax(feat.flatten(2).float(), dim=-1)  # (B, C', HW)
        terms.append(1.0 - spatial.max(dim=1).values.sum(-1).mean() / channels)
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
class ECENet(SegmentationModel):
    """Backbone + ECENet head (``SegDecodingTransformer``), see the module docstring for the data flow.

    Args:
        backbone: fastseg backbone name (4 levels at strides 4, 8, 16, 32).
        num_classes: K (default: the shapes world's); at most 256 for the fused attention kernel (above that the
            ``impl="auto"`` path runs the reference).
        channels: head width C (256 in the paper).
        num_heads: attention heads (4 in the paper).
        mlp_ratio: Mix-FFN expansion (4).
        ratio: pooled-mask size factor, L = int(sqrt(K) * ratio) bumped to odd (1 in the official config).
        dropout: Dropout2d before ``conv_seg`` (0.1).
        ghost_up: ghost pixel-shuffle upsampling of the coarse levels (True, the paper); False = bilinear.
        class_embeddings: True = ECENet. False = the ablation without *explicit* class embeddings (our
            construction, not the paper's). Removed: ECE (the 1/32 mask learner and every pooled-mask embedding)
            and the gated updates, i.e. everything that makes the class embeddings depend on the image. Kept: the
            three SAU stages, which attend to one learned, image-independent K x C class table (implicit queries, as
            in query-based heads) and still produce stage masks (the head-mean attention logits); the mask loss on
            those masks (the first two, there is no 1/32 mask); and the final fusion, where the per-class scalar
            ``diag(softmax(trans(table)))`` is then the same for every image. So the ablation measures
            image-conditioned embeddings from pooled masks against a static learned table, not "class path vs none".
        embedding_mode: ``"matrix"`` (pooled masks as one matrix product, export-friendly) or ``"pool"``
            (``adaptive_avg_pool2d``); the same numbers.
        mask_loss_weight: weight of the mask loss (1.0); 0 disables it.
        mask_bce_weight, mask_dice_weight: its BCE / Dice weights (5, 2; config values).
        mask_dice_classes: **inferred**. ``"all"`` (default): the Dice term averages over all K classes of every
            image, absent ones included; ``"present"``: only over the classes present in each image's ground truth
            (the Mask2Former convention); see `mask_loss`.
        mask_loss_on: **inferred**. ``"sum"`` (default): the loss sees ``wo_mask`` = sum of the first three masks
            (M4, mask_3, mask_2) upsampled to 1/4, which is what the port's training forward returns; ``"each"``:
            the mean of the loss over the three masks separately.
        div_loss_weight: weight of the diversity loss (0.2); 0 disables it. **Inferred** form, see `diversity_loss`.
        impl: ``"auto" | "triton" | "torch"`` for the pixel->class attention op.
        backbone_checkpoint: local weights file for the backbone.
    """

    has_fused_ops = True

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int | None = None,
        channels: int = 256,
        num_heads: int = 4,
        mlp_ratio: int = 4,
        ratio: float = 1.0,
        dropout: float = 0.1,
        ghost_up: bool = True,
        class_embeddings: bool = True,
        embedding_mode: str = "matrix",
        mask_loss_weight: float = 1.0,
        mask_bce_weight: float = 5.0,
        mask_dice_weight: float = 2.0,
        mask_dice_classes: str = "all",
        mask_loss_on: str = "sum",
        div_loss_weight: float = 0.2,
        impl: str = "auto",
        backbone_checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if mask_loss_on not in ("sum", "each"):
            raise ValueError(f"mask_loss_on must be 'sum' or 'each', got {mask_loss_on!r}")
        if mask_dice_classes not in ("all", "present"):
            raise ValueError(f"mask_dice_classes must be 'all' or 'present', got {mask_dice_classes!r}")
        if impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.backbone = create_backbone(backbone, checkpoint=backbone_checkpoint)
        if len(self.backbone.channels) != 4:
            raise ValueError(f"ECENet needs a 4-level backbone, {backbone!r} has {len(self.backbone.channels)}")
        self.pretrained_cfg = resolve_cfg(
            num_classes, output_stride=self.backbone.reductions[0], divisible_by=self.backbone.divisible_by
        )
        k = self.num_classes
        self.channels, self.impl = channels, impl
        self.class_embeddings, self.ghost_up = class_embeddings, ghost_up
        self.mask_loss_weight, self.mask_bce_weight, self.mask_dice_weight = (
            mask_loss_weight,
            mask_bce_weight,
            mask_dice_weight,
        )
        self.mask_loss_on, self.div_loss_weight = mask_loss_on, div_loss_weight
        self.mask_dice_classes = mask_dice_classes

        in_channels = self.backbone.channels
        self.layer_slcts = nn.ModuleList(FeatureReconstruction(c) for c in in_channels)
        self.norms = nn.ModuleList(ChannelLayerNorm(c) for c in in_channels)
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1, bias=False) for c in in_channels)
        if class_embeddings:
            self.learner = nn.Sequential(
                nn.Conv2d(channels, channels, 1, groups=num_heads, bias=False),  # the port: groups=num_heads
                nn.Conv2d(channels, k, 1, bias=False),
            )
            # index s < 3 re-embeds the mask of stage s (0 = 1/4); index 3 is the ECE embedding of M4
            self.token_emb = nn.ModuleList(PooledMaskEmbedding(k, channels, ratio, embedding_mode) for _ in range(4))
            self.gated_tokens = nn.ModuleList(TokenUpdater(channels) for _ in range(3))
        else:
            self.class_table = nn.Parameter(torch.randn(k, channels) * channels**-0.5)
        self.transfer = nn.ModuleList(ECENetTransferBlock(channels, num_heads, mlp_ratio, impl=impl) for _ in range(3))
        if ghost_up:  # index i upsamples level i + 1 (1/8, 1/16, 1/32) with i + 1 steps
            self.ghost_up_layers = nn.ModuleList(GhostUpsample(channels, i + 1) for i in range(3))
        self.proj = ConvNormAct(4 * channels, channels, 3, norm="bn")
        self.trans = nn.Linear(channels, k)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, k, 1)

    def set_impl(self, impl: str) -> None:
        """Switch the attention implementation (``"auto" | "triton" | "torch"``) of every SAU stage."""
        if impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
        self.impl = impl
        for block in self.transfer:
            block.cross_attn.impl = impl

    def forward_head(self, images: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """Everything the head computes on padded ``images``.

        Returns a dict with ``logits`` (B, K, H/4, W/4), ``masks`` (the 3 or 4 mask logits at 1/4, coarsest first:
        M4, mask_3, mask_2, mask_1; without class embeddings the 3 stage masks), ``diverse`` (the FR diverse
        features x2' per level, for the diversity loss) and ``class_term``, the class-embedding part of the logits:
        ``diag(softmax(trans(E)))[k] * sigmoid(sum of masks)[k]``, a per-image, per-class scalar in [0, 1] times a
        sigmoid, so it moves each logit by at most 1 (``logits = conv_seg(dropout(F)) + class_term``).
        """
        feats = self.backbone(images)
        recon, diverse = [], []
        for fr, norm, x in zip(self.layer_slcts, self.norms, feats):
            out, div = fr(x)
            recon.append(norm(out))
            diverse.append(div)
        lat = [conv(x) for conv, x in zip(self.laterals, recon)]
        bsz = images.shape[0]
        masks: list[Tensor] = []
        if self.class_embeddings:
            m4 = self.learner(lat[3])
            masks.append(m4)
            emb = self.token_emb[3](m4)
        else:
            emb = self.class_table.unsqueeze(0).expand(bsz, -1, -1)
        stage_out: dict[int, Tensor] = {}
        for s in (2, 1, 0):  # top-down: 1/16, 1/8, 1/4
            x, mask = self.transfer[s](lat[s], emb)
            stage_out[s] = x
            masks.append(mask)
            if self.class_embeddings:
                emb = self.gated_tokens[s](self.token_emb[s](mask), emb)
        size = lat[0].shape[-2:]
        levels = [stage_out[0], stage_out[1], stage_out[2], lat[3]]
        upsampled = [levels[0]]
        for i, level in enumerate(levels[1:]):
            if self.ghost_up:
                level = self.ghost_up_layers[i](level)
            if level.shape[-2:] != size:
                level = resize(level, size)
            upsampled.append(level)
        fused = self.proj(torch.cat(upsampled, 1))
        masks = [m if m.shape[-2:] == size else resize(m, size) for m in masks]
        total = torch.stack(masks, 0).sum(0)
        scores = torch.softmax(self.trans(emb), dim=-1)  # (B, K, K): class embedding k classified as class j
        diag = torch.diagonal(scores, dim1=1, dim2=2)  # (B, K): P[b, k, k]
        class_term = diag[:, :, None, None] * torch.sigmoid(total)  # in [0, 1]: one scalar per image and class
        logits = self.conv_seg(self.dropout(fused)) + class_term
        return {"logits": logits, "masks": masks, "diverse": diverse, "class_term": class_term}

    def forward_logits(self, images: Tensor) -> Tensor:
        return self.forward_head(images)["logits"]

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``ce + mask_loss_weight * (5 BCE + 2 Dice) + div_loss_weight * diversity`` (see the class docstring).

        Returns ``loss`` and the detached components ``ce``, ``mask_bce``, ``mask_dice``, ``div``.
        """
        images, masks = self.check_batch(batch)
        h, w = images.shape[-2:]
        padded, out_size = self.pad_input(images)
        out = self.forward_head(padded)
        target = masks.long()
        logits = self.upsample_logits(crop_to(out["logits"], out_size), (h, w))
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        total = ce
        result = {"ce": ce.detach()}
        if self.mask_loss_weight:
            first = [crop_to(m, out_size) for m in out["masks"][: 3 if self.class_embeddings else 2]]
            groups = [torch.stack(first, 0).sum(0)] if self.mask_loss_on == "sum" else first
            bce = dice = logits.new_zeros(())
            for group in groups:
                b, d = mask_loss(
                    self.upsample_logits(group, (h, w)),
                    target,
                    self.num_classes,
                    self.ignore_index,
                    self.mask_bce_weight,
                    self.mask_dice_weight,
                    self.mask_dice_classes,
                )
                bce, dice = bce + b / len(groups), dice + d / len(groups)
            total = total + self.mask_loss_weight * (bce + dice)
            result.update(mask_bce=bce.detach(), mask_dice=dice.detach())
        if self.div_loss_weight:
            div = diversity_loss(out["diverse"])
            total = total + self.div_loss_weight * div
            result["div"] = div.detach()
        result["loss"] = total
        return result


# ----------------------------------------------------------------------------------------------------------------
# Converter from the official checkpoint names (spec B.6)
# ----------------------------------------------------------------------------------------------------------------
_MINDSPORE_SUFFIXES = {
    ".gamma": ".weight",
    ".beta": ".bias",
    ".moving_mean": ".running_mean",
    ".moving_variance": ".running_var",
}


def convert_official_state_dict(
    state_dict: Mapping[str, Tensor], model: nn.Module | None = None, strict: bool = True
) -> dict[str, Tensor]:
    """Map an official ECENet checkpoint (mmseg ``decode_head.*`` names, spec B.6) onto fastseg's `ECENet` names.

    * ``decode_head.<name>`` -> ``<name>``: the head's modules carry the official names. The FR channel MLP
      (``layer_channel_slct.{0,2}``) is a 1x1 conv in some exports: its (out, in, 1, 1) weights become Linear
      (out, in) weights. ``conv_seg`` / ``trans`` / everything else keep their shapes.
    * MindSpore names (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``) become PyTorch's.
    * ``backbone.*`` (mmseg's Swin / ResNet names) is **not** converted: timm's names differ; load backbone weights
      separately (``backbone_checkpoint=``). Such keys are dropped.
    * ``num_batches_tracked`` and ``auxiliary_head.*`` are dropped.

    Args:
        state_dict: the official checkpoint's ``state_dict`` (tensors).
        model: when given, the result is checked against ``model.state_dict()`` (keys and shapes) and missing BN
            ``num_batches_tracked`` buffers are filled in, so ``model.load_state_dict(result)`` works.
        strict: with ``model``, raise ``ValueError`` on head keys that are missing, unexpected or of the wrong shape.

    Returns:
        The converted state dict (head keys only, plus the model's own backbone tensors when ``model`` is given).
    """
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):  # ValueError, as for every bad input in fastseg
            raise ValueError(f"convert_official_state_dict: {key!r} is a {type(value).__name__}, not a tensor")  # noqa: TRY004
        if key.endswith("num_batches_tracked") or not key.startswith("decode_head."):
            continue
        name = key[len("decode_head.") :]
        for old, new in _MINDSPORE_SUFFIXES.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        if re.fullmatch(r"layer_slcts\.\d+\.layer_channel_slct\.[02]\.weight", name) and value.dim() == 4:
            value = value.flatten(1)
        converted[name] = value
    if model is None:
        return converted
    own = model.state_dict()
    problems = []
    for name, value in converted.items():
        if name not in own:
            problems.append(f"unexpected key {name!r}")
        elif own[name].shape != value.shape:
            problems.append(f"{name!r}: checkpoint {tuple(value.shape)} vs model {tuple(own[name].shape)}")
    head_missing = [
        n for n in own if not n.startswith("backbone.") and n not in converted and not n.endswith("num_batches_tracked")
    ]
    problems += [f"missing key {n!r}" for n in head_missing]
    if problems and strict:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise ValueError(f"official ECENet checkpoint does not fit this model: {shown}")
    for name, value in own.items():
        if name not in converted and (name.startswith("backbone.") or name.endswith("num_batches_tracked")):
            converted[name] = value
    return converted


# ----------------------------------------------------------------------------------------------------------------
# Registered models
# ----------------------------------------------------------------------------------------------------------------
def _ecenet(backbone: str, **kwargs) -> ECENet:
    return ECENet(backbone=backbone, **kwargs)


@register_model(
    tag="shapes_small",
    differs_from_paper="head width 128 (paper: 256); ResNet-18 backbone (paper: "
    "ResNet-101 / Swin), for the 64 x 64 shapes world",
)
def ecenet_resnet18(**kwargs) -> ECENet:
    """ECENet on ResNet-18 with a 128-wide head (the CPU-trainable configuration; compare with fpn_resnet18)."""
    kwargs.setdefault("channels", 128)
    return _ecenet("resnet18", **kwargs)


@register_model
def ecenet_resnet50(**kwargs) -> ECENet:
    """ECENet on ResNet-50, head width 256, 4 heads."""
    return _ecenet("resnet50", **kwargs)


@register_model
def ecenet_resnet101(**kwargs) -> ECENet:
    """ECENet on ResNet-101, head width 256, 4 heads."""
    return _ecenet("resnet101", **kwargs)


@register_model
def ecenet_swin_tiny(**kwargs) -> ECENet:
    """ECENet on Swin-T, head width 256, 4 heads."""
    return _ecenet("swin_tiny", **kwargs)


@register_model
def ecenet_swin_base(**kwargs) -> ECENet:
    """ECENet on Swin-B (window 12): the paper's configuration (official config uses 640x640 ADE20K crops)."""
    return _ecenet("swin_base", **kwargs)
