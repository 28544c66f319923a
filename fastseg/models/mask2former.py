"""Mask2Former (Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation", CVPR 2022).

One model for semantic, instance and panoptic segmentation: Q learnable queries each predict a class (K classes +
"no object") and a mask; the masks come from a dot product of the query's mask embedding with per-pixel features.
Architecture and post-processing follow the official COCO configuration (``specs/pading_semples_s4mim.md`` C.2,
C.8); the registered defaults are sized for CPU training on the shapes world, the ``mask2former_paper_*`` variants
use the paper's sizes.

Data flow (C = hidden width, D = mask width, levels at strides 4, 8, 16, 32)::

    backbone -> pixel decoder:
        "msdeform": 1x1 proj + GN of the 1/8, 1/16, 1/32 maps + sine positions + level embeddings,
                    ``enc_layers`` x (multi-scale deformable self-attention + FFN)  (fastseg.layers.MSDeformAttn),
                    then a lateral + 3x3 conv for 1/4 (FPN style);
        "fpn":      laterals + top-down sums + 3x3 convs (the light option);
        -> mask features (B, D, H/4, W/4) and multi-scale features at 1/32, 1/16, 1/8
    transformer decoder: learnable query features + query positions; prediction heads on the learnable queries, then
        per layer l (level l % 3): masked cross-attention (fused op ``fastseg::masked_class_attention`` through
        `MaskedCrossAttentionLayer`; mask = previous prediction's sigmoid >= 0.5 at the level's size, empty rows
        attend everywhere) -> self-attention -> FFN -> prediction heads.  ``dec_layers + 1`` predictions, each
        supervised (auxiliary losses).
    prediction heads: q = LayerNorm(decoder output); class = class_embed(q) (K+1); mask = mask_embed(q) . features.

Interface for methods built on top (PADing's stage 2 freezes the segmenter and replaces the classifier):

* ``model.forward_queries(images)`` -> dict with ``query_embeddings`` (list over predictions of the normalised
  decoder outputs (B, Q, C); the last one is PADing's ``pred_embed``), ``mask_embeddings`` (list of (B, Q, D)),
  ``pred_logits`` / ``pred_masks`` (final), ``aux_outputs`` (earlier predictions) and ``mask_features``;
* ``model.class_head`` (the ``nn.Linear(C, K + 1)`` applied to every prediction; ``model.replace_class_head(m)``
  swaps in any module mapping (..., C) -> (..., K' + 1) and updates the class count used by post-processing);
* ``model.freeze_segmenter()`` sets ``requires_grad=False`` on everything except the class head and returns the
  still-trainable parameters; ``model.segmenter_modules()`` names the frozen parts (backbone, pixel decoder,
  transformer decoder without the class head);
* ``model.criterion`` (matcher + losses, `fastseg.models.mask2former_criterion`) and ``model.targets(batch)``.

Outputs: ``model(images)`` (eval) -> semantic scores (B, K, H/4, W/4) = ``sum_q softmax(class)[q, :K] *
sigmoid(mask_q)``; ``model.forward_raw(images)`` -> (class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4)) for
export; ``model.predict(images, task=...)`` with the official post-processing:

* ``"semantic"``: (B, H, W) class ids in the official order: the mask logits are resized to the input before the
  sigmoid and the class product. This is *not* the argmax of ``model(images)`` resized (what the other models and
  an exported ``--argmax`` graph compute): on the 64 x 64 shapes world the official order scores 2.4 mIoU points
  higher (0.766 vs 0.743 on the same weights, benchmarks/results/experiments/mask2former_shapes.json), because
  sharpening before the sigmoid keeps thin shapes that blurred probabilities lose;
* ``"panoptic"``: (B, H, W) int64 panoptic ids ``class * label_divisor + instance`` (stuff: instance 0, things
  numbered 1..n per image), ``-1`` = void. Queries with class != no-object and score > ``object_mask_threshold``
  (0.8) compete per pixel by ``score * sigmoid(mask)``; a segment is dropped when the pixels it wins (and where its
  own mask >= 0.5) are less than ``overlap_threshold`` (0.8) of its mask; stuff segments of one class merge;
* ``"instance"``: per image a dict ``masks`` (N, H, W) bool, ``scores`` (N,), ``labels`` (N,): the top
  ``test_topk`` (query, class) pairs of the Q x K probabilities (thing classes only when the model knows its stuff
  classes), mask = logit > 0, score = class probability x mean sigmoid inside the mask.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.class_attention import (
    MaskedCrossAttentionLayer,
    attention_mask_from_logits,
)
from ..layers.ms_deform_attn import MSDeformAttn, reference_points
from ..registry import register_model
from ._base import SegmentationModel, check_images, crop_to, resize, resolve_cfg
from .backbones import create_backbone
from .mask2former_criterion import (
    HungarianMatcher,
    SegmentTargets,
    SetCriterion,
    targets_from_batch,
)

__all__ = [
    "VOID",
    "FFNLayer",
    "FPNPixelDecoder",
    "MSDeformAttnPixelDecoder",
    "Mask2Former",
    "Mask2FormerRaw",
    "MaskedTransformerDecoder",
    "SelfAttentionLayer",
]

VOID = -1  # panoptic id of unassigned pixels in `predict(task="panoptic")`


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else 8 if channels % 8 == 0 else 1, channels)


def sine_positions(x: Tensor, channels: int, temperature: float = 10000.0) -> Tensor:
    """DETR's normalised sine positional embedding of a (B, *, H, W) map -> (B, channels, H, W) (y half, x half)."""
    h, w = x.shape[-2:]
    feats = channels // 2
    eps, scale = 1e-6, 2 * math.pi
    y = (torch.arange(1, h + 1, device=x.device, dtype=torch.float32) / (h + eps) * scale)[:, None].expand(h, w)
    xx = (torch.arange(1, w + 1, device=x.device, dtype=torch.float32) / (w + eps) * scale)[None, :].expand(h, w)
    dim_t = temperature ** (2 * (torch.arange(feats, device=x.device) // 2).float() / feats)
    pos_x, pos_y = xx[..., None] / dim_t, y[..., None] / dim_t
    pos_x = torch.stack([pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()], dim=-1).flatten(2)
    pos_y = torch.stack([pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()], dim=-1).flatten(2)
    pos = torch.cat([pos_y, pos_x], dim=-1).permute(2, 0, 1)  # (channels, H, W)
    return pos[None].expand(x.shape[0], -1, -1, -1).to(x.dtype)


class _ConvGN(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, act: bool = False) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), _group_norm(cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _DeformEncoderLayer(nn.Module):
    """Post-norm deformable self-attention + FFN over the flattened multi-scale tokens."""

    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, ref: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
        src = self.norm1(src + self.dropout(self.self_attn(src + pos, ref, src, shapes)))
        return self.norm2(src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder: deformable-attention encoder on 1/8..1/32, FPN step to 1/4.

    ``forward(features) -> (mask_features (B, D, H/4, W/4), [1/32, 1/16, 1/8] maps with conv_dim channels)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        enc_layers: int = 6,
        heads: int = 8,
        points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_dim = conv_dim
        coarse = list(in_channels[1:])[::-1]  # 1/32, 1/16, 1/8
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, conv_dim, 1), _group_norm(conv_dim)) for c in coarse)
        self.level_embed = nn.Parameter(torch.randn(len(coarse), conv_dim) * 0.02)
        self.layers = nn.ModuleList(
            _DeformEncoderLayer(conv_dim, heads, len(coarse), points, ffn_dim, dropout) for _ in range(enc_layers)
        )
        self.lateral_conv = _ConvGN(in_channels[0], conv_dim, 1)
        self.output_conv = _ConvGN(conv_dim, conv_dim, 3, act=True)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        maps = [proj(f) for proj, f in zip(self.input_proj, list(features[1:])[::-1])]
        shapes = [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]
        src = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
        pos = torch.cat(
            [
                (sine_positions(m, self.conv_dim) + self.level_embed[i, :, None, None]).flatten(2).transpose(1, 2)
                for i, m in enumerate(maps)
            ],
            dim=1,
        )
        ref = reference_points(shapes, src.device, src.dtype)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes)
        outs, start = [], 0
        for h, w in shapes:
            outs.append(src[:, start : start + h * w].transpose(1, 2).reshape(src.shape[0], -1, h, w))
            start += h * w
        fine = self.lateral_conv(features[0])
        fine = self.output_conv(
            fine + F.interpolate(outs[-1], size=fine.shape[-2:], mode="bilinear", align_corners=False)
        )
        return self.mask_features(fine), outs


class FPNPixelDecoder(nn.Module):
    """The light option: laterals + top-down sums + 3x3 conv per level (MaskFormer's simple FPN decoder)."""

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(_ConvGN(c, conv_dim, 1) for c in in_channels)
        self.outputs = nn.ModuleList(_ConvGN(conv_dim, conv_dim, 3, act=True) for _ in in_channels)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        lat = [conv(f) for conv, f in zip(self.laterals, features)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.outputs, lat)]
        return self.mask_features(outs[0]), outs[1:][::-1]


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention among the queries (positions added to queries and keys, not values)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        q = tgt + query_pos
        return self.norm(tgt + self.dropout(self.self_attn(q, q, tgt, need_weights=False)[0]))


class FFNLayer(nn.Module):
    """Post-norm feed-forward block: ``norm(x + W2 relu(W1 x))``."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor) -> Tensor:
        return self.norm(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class _MLP(nn.Sequential):
    def __init__(self, dim: int, out_dim: int, layers: int = 3) -> None:
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dim, out_dim if i == layers - 1 else dim))
            if i < layers - 1:
                mods.append(nn.ReLU(inplace=True))
        super().__init__(*mods)


class MaskedTransformerDecoder(nn.Module):
    """Mask2Former's multi-scale masked-attention transformer decoder (see the module docstring)."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dec_layers: int = 9,
        mask_dim: int = 256,
        num_levels: int = 3,
        dropout: float = 0.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.hidden_dim, self.num_levels = hidden_dim, num_levels
        self.cross_attention_layers = nn.ModuleList(
            MaskedCrossAttentionLayer(hidden_dim, num_heads, dropout, impl=impl) for _ in range(dec_layers)
        )
        self.self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(dec_layers)
        )
        self.ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, ffn_dim, dropout) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.input_proj = nn.ModuleList(
            nn.Identity() if in_dim == hidden_dim else nn.Conv2d(in_dim, hidden_dim, 1) for _ in range(num_levels)
        )
        self.class_embed: nn.Module = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = _MLP(hidden_dim, mask_dim, 3)

    def set_impl(self, impl: str) -> None:
        for layer in self.cross_attention_layers:
            layer.impl = impl

    def _heads(self, output: Tensor, mask_features: Tensor, attn_size: tuple[int, int] | None) -> dict[str, Any]:
        query = self.decoder_norm(output)
        mask_emb = self.mask_embed(query)
        masks = torch.einsum("bqc,bchw->bqhw", mask_emb, mask_features)
        out = {
            "pred_logits": self.class_embed(query),
            "pred_masks": masks,
            "query_embedding": query,
            "mask_embedding": mask_emb,
        }
        if attn_size is not None:
            out["attn_mask"] = attention_mask_from_logits(masks, attn_size)
        return out

    def forward(self, features: Sequence[Tensor], mask_features: Tensor) -> dict[str, Any]:
        """``features``: the multi-scale maps (coarsest first); returns the final prediction's ``pred_logits``,
        ``pred_masks``, ``aux_outputs`` (earlier predictions), ``query_embeddings`` / ``mask_embeddings`` (every
        prediction, first to last)."""
        if len(features) != self.num_levels:
            raise ValueError(
                f"MaskedTransformerDecoder: expected {self.num_levels} feature levels, got {len(features)}"
            )
        srcs, pos, sizes = [], [], []
        for i, f in enumerate(features):
            sizes.append((int(f.shape[-2]), int(f.shape[-1])))
            pos.append(sine_positions(f, self.hidden_dim).flatten(2).transpose(1, 2))
            srcs.append((self.input_proj[i](f).flatten(2) + self.level_embed.weight[i][None, :, None]).transpose(1, 2))
        bsz = mask_features.shape[0]
        query_pos = self.query_embed.weight[None].expand(bsz, -1, -1)
        output = self.query_feat.weight[None].expand(bsz, -1, -1)
        preds = [self._heads(output, mask_features, sizes[0])]
        for i, (cross, self_attn, ffn) in enumerate(
            zip(self.cross_attention_layers, self.self_attention_layers, self.ffn_layers)
        ):
            level = i % self.num_levels
            output = cross(output, srcs[level], mask=preds[-1]["attn_mask"], pos=pos[level], query_pos=query_pos)
            output = ffn(self_attn(output, query_pos))
            preds.append(self._heads(output, mask_features, sizes[(i + 1) % self.num_levels]))
        keep = ("pred_logits", "pred_masks")
        return {
            **{k: preds[-1][k] for k in keep},
            "aux_outputs": [{k: p[k] for k in keep} for p in preds[:-1]],
            "query_embeddings": [p["query_embedding"] for p in preds],
            "mask_embeddings": [p["mask_embedding"] for p in preds],
        }


class Mask2Former(SegmentationModel):
    """Backbone + pixel decoder + masked-attention transformer decoder (see the module docstring).

    Args:
        backbone: fastseg backbone name.
        num_classes: K (default: the shapes world's).
        num_queries: Q object queries (paper: 100).
        hidden_dim: decoder width C (256); also the pixel decoder width ``conv_dim`` unless given.
        mask_dim: mask embedding width D (256).
        num_heads: decoder attention heads (8).
        ffn_dim: decoder FFN width (2048).
        dec_layers: decoder layers (9; there are ``dec_layers + 1`` supervised predictions).
        pixel_decoder: ``"msdeform"`` (the paper's) or ``"fpn"`` (light).
        conv_dim: pixel decoder width (default ``hidden_dim``).
        enc_layers, enc_heads, enc_points, enc_ffn_dim: deformable encoder (6, 8, 4, 1024).
        dropout: decoder / encoder dropout (0 in the paper).
        train_num_points: points per mask in the matcher and the mask losses (12544 in the paper).
        oversample_ratio, importance_sample_ratio: importance sampling (3.0, 0.75).
        eos_coef: no-object class weight (0.1); class_weight / mask_weight / dice_weight: 2 / 5 / 5.
        object_mask_threshold, overlap_threshold: panoptic post-processing (0.8, 0.8).
        test_topk: instance detections kept per image (100).
        train_task: ``"panoptic"`` trains on instance segments when the batch has them; ``"semantic"`` always
            on one segment per class.
        impl: masked attention implementation (``"auto" | "triton" | "torch"``).
        backbone_checkpoint: local weights file for the backbone.
    """

    has_fused_ops = True

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int | None = None,
        num_queries: int = 100,
        hidden_dim: int = 256,
        mask_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dec_layers: int = 9,
        pixel_decoder: str = "msdeform",
        conv_dim: int | None = None,
        enc_layers: int = 6,
        enc_heads: int = 8,
        enc_points: int = 4,
        enc_ffn_dim: int = 1024,
        dropout: float = 0.0,
        train_num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        eos_coef: float = 0.1,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        test_topk: int = 100,
        train_task: str = "panoptic",
        impl: str = "auto",
        backbone_checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
        if pixel_decoder not in ("msdeform", "fpn"):
            raise ValueError(f"pixel_decoder must be 'msdeform' or 'fpn', got {pixel_decoder!r}")
        if train_task not in ("panoptic", "semantic"):
            raise ValueError(f"train_task must be 'panoptic' or 'semantic', got {train_task!r}")
        if num_queries < 1 or dec_layers < 1:
            raise ValueError(f"need num_queries >= 1 and dec_layers >= 1, got {num_queries}, {dec_layers}")
        self.backbone = create_backbone(backbone, checkpoint=backbone_checkpoint)
        if list(self.backbone.reductions) != [4, 8, 16, 32]:
            raise ValueError(
                f"Mask2Former needs backbone levels at strides 4, 8, 16, 32, got {self.backbone.reductions}"
            )
        self.pretrained_cfg = resolve_cfg(num_classes, output_stride=4, divisible_by=self.backbone.divisible_by)
        conv_dim = hidden_dim if conv_dim is None else conv_dim
        if pixel_decoder == "msdeform":
            self.pixel_decoder: nn.Module = MSDeformAttnPixelDecoder(
                self.backbone.channels, conv_dim, mask_dim, enc_layers, enc_heads, enc_points, enc_ffn_dim, dropout
            )
        else:
            self.pixel_decoder = FPNPixelDecoder(self.backbone.channels, conv_dim, mask_dim)
        self.predictor = MaskedTransformerDecoder(
            conv_dim,
            self.num_classes,
            hidden_dim,
            num_queries,
            num_heads,
            ffn_dim,
            dec_layers,
            mask_dim,
            3,
            dropout,
            impl,
        )
        self.num_queries, self.impl, self.train_task = num_queries, impl, train_task
        self.object_mask_threshold, self.overlap_threshold, self.test_topk = (
            object_mask_threshold,
            overlap_threshold,
            test_topk,
        )
        matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, train_num_points)
        self.criterion = SetCriterion(
            self.num_classes,
            matcher,
            eos_coef,
            class_weight,
            mask_weight,
            dice_weight,
            train_num_points,
            oversample_ratio,
            importance_sample_ratio,
        )

    # -- the interface PADing builds on ------------------------------------------------------------------------
    @property
    def class_head(self) -> nn.Module:
        return self.predictor.class_embed

    def replace_class_head(self, head: nn.Module, num_classes: int | None = None) -> None:
        """Use ``head`` ((..., C) -> (..., K' + 1)) for every prediction; ``num_classes`` = K' when it changes."""
        self.predictor.class_embed = head
        if num_classes is not None and num_classes != self.num_classes:
            cfg = self.pretrained_cfg.to_dict()
            cfg.update(num_classes=num_classes, class_names=(), palette=())
            self.pretrained_cfg = type(self.pretrained_cfg).from_dict(cfg)
            self.criterion.num_classes = num_classes
            weight = torch.ones(num_classes + 1, device=self.criterion.empty_weight.device)
            weight[-1] = self.criterion.empty_weight[-1]
            self.criterion.empty_weight = weight

    def segmenter_modules(self) -> dict[str, nn.Module]:
        """The parts PADing freezes: everything but the class head."""
        return {"backbone": self.backbone, "pixel_decoder": self.pixel_decoder, "predictor": self.predictor}

    def freeze_segmenter(self) -> list[nn.Parameter]:
        """``requires_grad=False`` on all but the class head; returns the class head's parameters."""
        for module in self.segmenter_modules().values():
            module.requires_grad_(False)
        self.class_head.requires_grad_(True)
        return list(self.class_head.parameters())

    def set_impl(self, impl: str) -> None:
        if impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
        self.impl = impl
        self.predictor.set_impl(impl)

    def forward_queries(self, images: Tensor) -> dict[str, Any]:
        """Everything the decoder computes on (padded) ``images``; see the module docstring."""
        mask_features, multi_scale = self.pixel_decoder(self.backbone(images))
        out = self.predictor(multi_scale, mask_features)
        out["mask_features"] = mask_features
        return out

    # -- the model contract ------------------------------------------------------------------------------------
    def forward_raw(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(class logits (B, Q, K+1), mask logits (B, Q, ceil(H/4), ceil(W/4))) for any input size."""
        padded, out_size = self.pad_input(check_images(images))
        out = self.forward_queries(padded)
        return out["pred_logits"], crop_to(out["pred_masks"], out_size)

    @staticmethod
    def semantic_scores(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
        """``sum_q softmax(class)[q, :K] * sigmoid(mask_q)`` -> (B, K, h, w)."""
        probs = class_logits.softmax(-1)[..., :-1]
        return torch.einsum("bqk,bqhw->bkhw", probs, mask_logits.sigmoid())

    def forward_logits(self, images: Tensor) -> Tensor:
        out = self.forward_queries(images)
        return self.semantic_scores(out["pred_logits"], out["pred_masks"])

    def _full_size_masks(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits and mask logits upsampled to the padded input, cropped to the input (official order)."""
        padded, _ = self.pad_input(check_images(images))
        out = self.forward_queries(padded)
        return out["pred_logits"], crop_to(resize(out["pred_masks"], padded.shape[-2:]), images.shape[-2:])

    @torch.no_grad()
    def predict(self, images: Tensor, task: str = "semantic") -> Tensor | list[dict[str, Tensor]]:
        """Semantic class ids, panoptic ids or instances at input size (module docstring); call ``eval()`` first."""
        if task not in ("semantic", "panoptic", "instance"):
            raise ValueError(f"task must be 'semantic', 'panoptic' or 'instance', got {task!r}")
        class_logits, mask_logits = self._full_size_masks(images)
        if task == "semantic":
            return self.semantic_scores(class_logits, mask_logits).argmax(1)
        if task == "panoptic":
            return torch.stack([self._panoptic(c, m) for c, m in zip(class_logits, mask_logits)])
        return [self._instances(c, m) for c, m in zip(class_logits, mask_logits)]

    def _thing_mask(self, device: torch.device) -> Tensor:
        """(K,) bool: True for thing classes (every class not listed as stuff)."""
        is_thing = torch.ones(self.num_classes, dtype=torch.bool, device=device)
        stuff = [c for c in getattr(self.pretrained_cfg, "stuff_classes", ()) if 0 <= c < self.num_classes]
        is_thing[stuff] = False
        return is_thing

    def _panoptic(self, class_logits: Tensor, mask_logits: Tensor) -> Tensor:
        divisor = int(getattr(self.pretrained_cfg, "label_divisor", 1000))
        scores, labels = class_logits.softmax(-1).max(-1)
        keep = (labels != self.num_classes) & (scores > self.object_mask_threshold)
        scores, labels, probs = scores[keep], labels[keep], mask_logits[keep].sigmoid()
        panoptic = torch.full(mask_logits.shape[-2:], VOID, dtype=torch.long, device=mask_logits.device)
        if labels.numel() == 0:
            return panoptic
        is_thing = self._thing_mask(labels.device)
        winner = (scores[:, None, None] * probs).argmax(0)
        next_instance = 1
        for k in range(labels.numel()):
            cls = int(labels[k])
            won = winner == k
            own = probs[k] >= 0.5
            segment = won & own
            won_area, own_area, area = int(won.sum()), int(own.sum()), int(segment.sum())
            if won_area == 0 or own_area == 0 or area == 0 or won_area / own_area < self.overlap_threshold:
                continue
            if is_thing[cls]:
                panoptic[segment] = cls * divisor + next_instance
                next_instance += 1
            else:  # stuff segments of one class merge into one (same id)
                panoptic[segment] = cls * divisor
        return panoptic

    def _instances(self, class_logits: Tensor, mask_logits: Tensor) -> dict[str, Tensor]:
        k = self.num_classes
        probs = class_logits.softmax(-1)[:, :k]
        topk = min(self.test_topk, probs.numel())
        scores, flat = probs.flatten().topk(topk, sorted=True)
        labels, query = flat % k, flat // k
        things = self._thing_mask(labels.device)[labels]
        scores, labels, query = scores[things], labels[things], query[things]
        masks = mask_logits[query] > 0
        mask_scores = (mask_logits[query].sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
        return {"masks": masks, "scores": scores * mask_scores, "labels": labels}

    def targets(self, batch: dict[str, Tensor]) -> list[SegmentTargets]:
        """Ground-truth segments of ``batch`` (checked); raises ``ValueError`` when an image has more than Q."""
        self.check_batch(batch)
        stuff = getattr(self.pretrained_cfg, "stuff_classes", ())
        targets = targets_from_batch(
            batch, self.num_classes, self.ignore_index, stuff, use_instances=self.train_task == "panoptic"
        )
        for b, t in enumerate(targets):
            if t.labels.numel() > self.num_queries:
                raise ValueError(
                    f"image {b} has {t.labels.numel()} ground-truth segments but the model has only "
                    f"{self.num_queries} queries: segments {self.num_queries + 1}.. could never be "
                    "matched; raise num_queries"
                )
        return targets

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mask2Former's set loss on the final and every auxiliary prediction (`SetCriterion`)."""
        targets = self.targets(batch)
        out = self.forward_queries(self.pad_input(batch["image"])[0])
        return self.criterion(out, targets)


class Mask2FormerRaw(nn.Module):
    """``images -> (class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4))``: the raw outputs as one module, for
    export (e.g. ``fastseg.export.onnx.export_onnx_file(Mask2FormerRaw(model), x, path,
    output_names=("class_logits", "mask_logits"))``), where a deployment runs its own post-processing."""

    def __init__(self, model: Mask2Former) -> None:
        super().__init__()
        self.model = model
        self.pretrained_cfg = model.pretrained_cfg

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.forward_raw(images)


def _mask2former(backbone: str, **kwargs: Any) -> Mask2Former:
    return Mask2Former(backbone=backbone, **kwargs)


# CPU sizes for the shapes world: a few queries and layers, narrow widths, fewer sampled points.
SHAPES_SMALL = "shapes_small"
_CPU: dict[str, Any] = {
    "num_queries": 16,
    "hidden_dim": 64,
    "mask_dim": 64,
    "num_heads": 4,
    "ffn_dim": 256,
    "dec_layers": 3,
    "enc_layers": 2,
    "enc_heads": 4,
    "enc_points": 4,
    "enc_ffn_dim": 256,
    "train_num_points": 1024,
}
_SMALL = (
    "16 queries, 3 decoder layers, width 64, 4 heads, FFN 256, 2 deformable encoder layers, 1024 sampled "
    "points per mask (paper: 100, 9, 256, 8, 2048, 6, 12544), for the 64 x 64 shapes world"
)


def _with_defaults(kwargs: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **kwargs}


@register_model(tag=SHAPES_SMALL, differs_from_paper=f"{_SMALL}; ResNet-18 is not a backbone of the paper")
def mask2former_resnet18(**kwargs: Any) -> Mask2Former:
    """Mask2Former on ResNet-18, CPU-sized (16 queries, 3 decoder layers, width 64)."""
    return _mask2former("resnet18", **_with_defaults(kwargs, _CPU))


@register_model(tag=SHAPES_SMALL, differs_from_paper=_SMALL)
def mask2former_resnet50(**kwargs: Any) -> Mask2Former:
    """Mask2Former on ResNet-50, CPU-sized head (see `mask2former_paper_resnet50` for the paper's sizes)."""
    return _mask2former("resnet50", **_with_defaults(kwargs, _CPU))


@register_model(tag=SHAPES_SMALL, differs_from_paper=_SMALL)
def mask2former_swin_tiny(**kwargs: Any) -> Mask2Former:
    """Mask2Former on Swin-T, CPU-sized head (see `mask2former_paper_swin_tiny` for the paper's sizes)."""
    return _mask2former("swin_tiny", **_with_defaults(kwargs, _CPU))


@register_model
def mask2former_paper_resnet50(**kwargs: Any) -> Mask2Former:
    """Mask2Former R50 at the paper's COCO sizes: 100 queries, 9 decoder layers, width 256, 6 encoder layers."""
    return _mask2former("resnet50", **kwargs)


@register_model
def mask2former_paper_swin_tiny(**kwargs: Any) -> Mask2Former:
    """Mask2Former Swin-T at the paper's COCO sizes."""
    return _mask2former("swin_tiny", **kwargs)
