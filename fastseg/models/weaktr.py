"""WeakTr: the plain-ViT CAM generator SemPLeS refines (spec D.2; hustvl/WeakTr, SemPLeS ``models123.py``).

A timm DeiT whose single CLS token is replaced by **K class tokens** (one per foreground class). From one forward:

* ``cls_logits (B, K)``: the mean over channels of each class token's output;
* ``coarse (B, K, h, w)``: a 3x3 conv CAM head on the patch-token map (``h, w = H / patch, W / patch``);
* Adaptive Attention Fusion (AAF) over every layer's and head's attention map (M = depth x heads): each map's
  per-head attention output is pooled over the tokens (max, or mean), a feature FFN (head_dim -> head_dim / 8 -> 1,
  two linear layers without an activation, as upstream) gives one scalar per map, and a map FFN (M -> M / r -> M,
  sigmoid) gives the map weights ``w``. The weighted mean ``mean_m(w ⊙ A_m)`` is cut into ``cross (B, K, h, w)``
  (class -> patch) and ``patch_attn (B, P, P)`` (patch -> patch) by the fused op `fastseg.kernels.attention_fusion`
  in one read of the stacked maps;
* ``fused = cross ⊙ ReLU(coarse)`` and the fine CAM ``fine = patch_attn · fused`` (affinity propagation).

Phase-1 training (`WeakTr.loss`): multilabel soft-margin loss on ``cls_logits``, GAP(coarse) and GAP(fine), summed.

Gradient paths (``detach_backbone``). WeakTr phase 1 (False): the backbone trains through the class tokens and the
CAM head; the fused CAM uses a detached coarse CAM (WeakTr ``models.py``). SemPLeS runs (a), (c) (True): the patch
tokens are detached before the CAM head and the fused CAM keeps the head's gradient (``models123.py``), so only the
CAM head and the AAF FFNs receive gradients. The attention maps and head features always reach AAF detached.

AAF's inputs, as upstream (``vision_transformer.Block`` returns the attention maps and ``o = proj(attn @ v)``): the
softmax maps before attention dropout, and per-head features taken from the attention output *after* the projection,
split per head the interleaved way (channel ``c`` belongs to head ``c % heads``). The map index is layer-major
(``m = layer * heads + head``; upstream is head-major, a permutation of the map-FFN weights that changes nothing the
module can express).

`model(images)` (eval) returns ``(B, 1 + K, h, w)`` scores for the model contract: channel 0 is the constant
background threshold, channels 1..K the fine CAM of each class divided by its per-image maximum and zeroed where the
classifier says the class is absent (``cls_logits <= 0``); ``predict`` is their argmax. Pseudo masks use the
multi-scale inference of `fastseg.engine.recipes.semples` instead (labels known, per-class min-max).

Registered: ``weaktr_deit_small`` (DeiT-S/16, 224, the paper's), ``weaktr_deit_tiny`` (DeiT-Ti/16) and
``weaktr_shapes_tiny`` (patch 8, width 96, depth 4, 3 heads: the CPU-trainable variant for the 64 x 64 shapes world)
and ``weaktr_shapes_clip`` (the shape of ``shapes-tiny-clip``'s image tower, whose weights ``backbone_checkpoint``
can load: `WeakTr.load_deit_checkpoint` reads DeiT / timm files and open_clip files alike).
``num_classes`` counts the background: K = num_classes - 1 class tokens. The default class list is the shapes world's
WSSS one (`fastseg.data.weak.weak_class_names`: background + the 8 shapes).
"""

from __future__ import annotations

import math
import os
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from fastseg.kernels import attention_fusion

from ..data.weak import weak_class_names
from ..registry import register_model
from ._base import SegmentationModel, check_images, resolve_cfg

__all__ = [
    "AdaptiveAttentionFusion",
    "WeakTr",
    "weaktr_deit_small",
    "weaktr_deit_tiny",
    "weaktr_shapes_clip",
    "weaktr_shapes_tiny",
]

DEFAULT_BACKGROUND_THRESHOLD = 0.43  # SemPLeS docs/Training.md (WeakTr's README uses 0.42)


class AdaptiveAttentionFusion(nn.Module):
    """Per-map weights from the pooled head features, then the weighted mean of the maps (fused op)."""

    def __init__(
        self,
        num_maps: int,
        head_dim: int,
        reduction: int = 8,
        feat_reduction: int = 8,
        pool: str = "max",
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"AAF pool must be 'max' or 'avg', got {pool!r}")
        self.pool, self.impl = pool, impl
        hidden_feat = max(1, head_dim // feat_reduction)
        hidden_map = max(1, num_maps // reduction)
        # two linear layers with no activation between them, as upstream's ``attn_feat_ffn``
        self.feat_ffn = nn.Sequential(nn.Linear(head_dim, hidden_feat), nn.Linear(hidden_feat, 1))
        self.map_ffn = nn.Sequential(
            nn.Linear(num_maps, hidden_map, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_map, num_maps, bias=False),
            nn.Sigmoid(),
        )

    def map_weights(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats (B, M, N, head_dim)`` -> weights ``(B, M)``."""
        pooled = feats.amax(2) if self.pool == "max" else feats.mean(2)
        return self.map_ffn(self.feat_ffn(pooled).squeeze(-1))

    def forward(
        self, attn: torch.Tensor, feats: torch.Tensor, num_class_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = self.map_weights(feats)
        cross, patch = attention_fusion(attn, weights, num_class_tokens, impl=self.impl)
        return cross, patch, weights


class WeakTr(SegmentationModel):
    """DeiT with K class tokens, 3x3 CAM head and AAF (see the module docstring)."""

    has_fused_ops = True

    def __init__(
        self,
        num_classes: int | None = None,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        reduction: int = 8,
        pool: str = "max",
        feat_reduction: int = 8,
        detach_backbone: bool = False,
        pre_norm: bool = False,
        background_threshold: float = DEFAULT_BACKGROUND_THRESHOLD,
        backbone_checkpoint: str | os.PathLike | None = None,
        impl: str = "auto",
        class_names: tuple[str, ...] | None = None,
        **cfg: Any,
    ) -> None:
        super().__init__()
        if class_names is not None:
            num_classes = len(class_names)
            cfg["class_names"] = tuple(class_names)
        self.pretrained_cfg = resolve_cfg(
            num_classes, output_stride=patch_size, divisible_by=patch_size, input_size=(3, img_size, img_size), **cfg
        )
        if self.num_classes < 2:
            raise ValueError(f"WeakTr needs num_classes >= 2 (background + at least one class), got {num_classes}")
        self.num_cam_classes = self.num_classes - 1
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.detach_backbone = detach_backbone
        self.background_threshold = float(background_threshold)
        self.impl = impl
        vit = timm.models.vision_transformer.VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            class_token=False,
            num_classes=0,
            global_pool="",
            drop_path_rate=drop_path_rate,
        )
        self.patch_embed = vit.patch_embed
        self.patch_embed.strict_img_size = False  # any multiple of the patch size; position embeddings interpolate
        self.blocks = vit.blocks
        # CLIP's image tower normalises the embedded tokens before the first block (``ln_pre``); DeiT does not.
        self.norm_pre = nn.LayerNorm(embed_dim, eps=1e-5) if pre_norm else nn.Identity()
        k, grid = self.num_cam_classes, img_size // patch_size
        self.grid = grid
        self.cls_tokens = nn.Parameter(torch.zeros(1, k, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, k + grid * grid, embed_dim))
        nn.init.trunc_normal_(self.cls_tokens, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.head = nn.Conv2d(embed_dim, k, kernel_size=3, padding=1)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.aaf = AdaptiveAttentionFusion(
            depth * num_heads, embed_dim // num_heads, reduction, feat_reduction, pool, impl
        )
        if backbone_checkpoint is not None:
            self.load_deit_checkpoint(backbone_checkpoint)

    # -- weights ------------------------------------------------------------------------------------------------
    def backbone_parameters(self) -> list[nn.Parameter]:
        """The ViT's own parameters (patch embedding, blocks, class tokens, position embeddings)."""
        return [
            *self.patch_embed.parameters(),
            *self.norm_pre.parameters(),
            *self.blocks.parameters(),
            self.cls_tokens,
            self.pos_embed,
        ]

    def cam_parameters(self) -> list[nn.Parameter]:
        """What SemPLeS runs (a) and (c) train: the CAM head and the AAF FFNs."""
        return [*self.head.parameters(), *self.aaf.parameters()]

    def load_deit_checkpoint(self, path: str | os.PathLike) -> None:
        """Initialise the backbone from a local timm / DeiT checkpoint (single CLS token): the CLS token and its
        position embedding are copied to every class token; the patch position embeddings are resized bicubically
        to this model's grid. Head / norm weights of the classifier are ignored. An open_clip checkpoint (``visual.*``
        keys) loads its image tower instead (`_load_clip_visual`). Raises ``ValueError`` on a checkpoint of another
        architecture (missing or mis-shaped backbone keys)."""
        from ..checkpoint import load_state_dict

        state = load_state_dict(path)
        if "visual.conv1.weight" in state:
            self._load_clip_visual(state, path)
            return
        if "model" in state and isinstance(state["model"], dict):  # DeiT release files wrap the weights
            state = state["model"]
        own = {f"patch_embed.{n}": p for n, p in self.patch_embed.state_dict().items()}
        own.update({f"blocks.{n}": p for n, p in self.blocks.state_dict().items()})
        missing = [n for n in [*own, "cls_token", "pos_embed"] if n not in state]
        wrong = [
            f"{n}: {tuple(state[n].shape)} vs {tuple(p.shape)}"
            for n, p in own.items()
            if n in state and state[n].shape != p.shape
        ]
        if missing or wrong:
            raise ValueError(
                f"{path} is not a DeiT checkpoint of this architecture (embed {self.embed_dim}, "
                f"patch {self.patch_size}, {len(self.blocks)} blocks): missing {missing[:4]}, "
                f"shape mismatch {wrong[:4]}"
            )
        with torch.no_grad():
            self.patch_embed.load_state_dict(
                {n[len("patch_embed.") :]: state[n] for n in own if n.startswith("patch_embed.")}
            )
            self.blocks.load_state_dict({n[len("blocks.") :]: state[n] for n in own if n.startswith("blocks.")})
            self._copy_class_token(state["cls_token"], state["pos_embed"])

    @torch.no_grad()
    def _copy_class_token(self, cls_token: torch.Tensor, pos: torch.Tensor) -> None:
        """One pre-trained CLS token (and its position embedding ``pos[:, :1]``) to every class token; the patch
        position embeddings ``pos[:, 1:]`` resized bicubically to this model's grid."""
        k = self.num_cam_classes
        pos = pos.reshape(1, -1, self.embed_dim)
        self.cls_tokens.copy_(cls_token.reshape(1, 1, -1).expand(1, k, -1))
        prefix, patches = pos[:, :1], pos[:, 1:]
        side = int(math.isqrt(patches.shape[1]))
        patches = (
            F.interpolate(
                patches.reshape(1, side, side, -1).permute(0, 3, 1, 2),
                size=(self.grid,) * 2,
                mode="bicubic",
                align_corners=False,
            )
            .permute(0, 2, 3, 1)
            .flatten(1, 2)
        )
        self.pos_embed.copy_(torch.cat([prefix.expand(1, k, -1), patches], 1))

    def _load_clip_visual(self, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
        """The image tower of an open_clip ViT checkpoint (``visual.*`` keys) as the backbone: conv1 -> patch
        embedding (no bias), ``ln_pre`` -> ``norm_pre``, each residual block's fused in-projection -> ``qkv`` (same
        q, k, v row order), ``out_proj`` -> ``proj``, ``c_fc`` / ``c_proj`` -> the MLP; the class embedding and its
        position embedding go to every class token. ``ln_post`` and the projection are not used."""
        mapping = {
            "patch_embed.proj.weight": "visual.conv1.weight",
            "norm_pre.weight": "visual.ln_pre.weight",
            "norm_pre.bias": "visual.ln_pre.bias",
        }
        names = {
            "norm1": "ln_1",
            "attn.qkv": "attn.in_proj",
            "attn.proj": "attn.out_proj",
            "norm2": "ln_2",
            "mlp.fc1": "mlp.c_fc",
            "mlp.fc2": "mlp.c_proj",
        }
        for i in range(len(self.blocks)):
            for ours, theirs in names.items():
                for kind in ("weight", "bias"):
                    suffix = f"_{kind}" if theirs == "attn.in_proj" else f".{kind}"
                    mapping[f"blocks.{i}.{ours}.{kind}"] = f"visual.transformer.resblocks.{i}.{theirs}{suffix}"
        own = {f"patch_embed.{n}": p for n, p in self.patch_embed.state_dict().items()}
        own.update({f"norm_pre.{n}": p for n, p in self.norm_pre.state_dict().items()})
        own.update({f"blocks.{n}": p for n, p in self.blocks.state_dict().items()})
        extra_blocks = f"visual.transformer.resblocks.{len(self.blocks)}.ln_1.weight" in state
        missing = [theirs for ours, theirs in mapping.items() if ours in own and theirs not in state]
        unmapped = [n for n in own if n not in mapping and n != "patch_embed.proj.bias"]
        wrong = [
            f"{theirs}: {tuple(state[theirs].shape)} vs {tuple(own[ours].shape)}"
            for ours, theirs in mapping.items()
            if ours in own and theirs in state and state[theirs].shape != own[ours].shape
        ]
        pos = state.get("visual.positional_embedding")
        if pos is not None and pos.shape[-1] != self.embed_dim:
            wrong.append(f"visual.positional_embedding: {tuple(pos.shape)}")
        if "visual.ln_pre.weight" in state and "norm_pre.weight" not in own:
            wrong.append("the file normalises before the blocks (ln_pre); build the model with pre_norm=True")
        if missing or unmapped or wrong or extra_blocks or pos is None:
            raise ValueError(
                f"{path} is not an open_clip image tower of this architecture (embed {self.embed_dim}, patch "
                f"{self.patch_size}, {len(self.blocks)} blocks, pre-norm {not isinstance(self.norm_pre, nn.Identity)}):"
                f" missing {missing[:4]}, unmapped {unmapped[:4]}, shape mismatch {wrong[:4]}, "
                f"more blocks in the file: {extra_blocks}"
            )
        with torch.no_grad():
            for ours, theirs in mapping.items():
                if ours in own:
                    own[ours].copy_(state[theirs])
            if "patch_embed.proj.bias" in own:
                own["patch_embed.proj.bias"].zero_()  # CLIP's conv1 has no bias
            self._copy_class_token(state["visual.class_embedding"], pos)

    # -- forward ------------------------------------------------------------------------------------------------
    def _pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        k = self.num_cam_classes
        if grid_h == grid_w == self.grid:
            return self.pos_embed
        patches = self.pos_embed[:, k:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :k], patches.permute(0, 2, 3, 1).flatten(1, 2)], 1)

    @staticmethod
    def _block(blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A timm ViT block with its attention written out, returning the maps and the per-head outputs."""
        attn_mod = blk.attn
        batch, tokens, dim = x.shape
        heads = attn_mod.num_heads
        qkv = attn_mod.qkv(blk.norm1(x)).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * attn_mod.scale) @ k.transpose(-2, -1)).softmax(-1)
        out = (attn_mod.attn_drop(attn) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        y = attn_mod.proj_drop(attn_mod.proj(attn_mod.norm(out)))
        # AAF's per-map features: the attention output after the projection (upstream's Block returns it), split
        # into heads the interleaved way upstream does (channel c -> head c % heads)
        feats = y.reshape(batch, tokens, dim // heads, heads).permute(0, 3, 1, 2)
        x = x + blk.drop_path1(blk.ls1(y))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x, attn, feats

    def forward_cams(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """All WeakTr outputs for ``images`` whose sides are multiples of the patch size."""
        batch, _, height, width = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"WeakTr.forward_cams needs sides that are multiples of the patch size {p}, got "
                f"{height}x{width} (model(images) pads automatically)"
            )
        grid_h, grid_w = height // p, width // p
        k = self.num_cam_classes
        # A detached backbone records no graph at all (SemPLeS runs (a), (c)): same values, less memory.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_backbone):
            x = self.patch_embed(images)
            x = torch.cat([self.cls_tokens.expand(batch, -1, -1), x], 1) + self._pos_embed(grid_h, grid_w)
            x = self.norm_pre(x)
            attn_maps, head_feats = [], []
            for blk in self.blocks:
                x, attn, feats = self._block(blk, x)
                attn_maps.append(attn)
                head_feats.append(feats)
        cls_logits = x[:, :k].mean(-1)
        patch_tokens = x[:, k:].transpose(1, 2).reshape(batch, self.embed_dim, grid_h, grid_w)
        if self.detach_backbone:
            patch_tokens = patch_tokens.detach()
        coarse = self.head(patch_tokens)
        # (B, L, H, N, N) -> (B, L*H, N, N) is a free view; the maps and features reach AAF detached (WeakTr)
        attn_all = torch.stack(attn_maps, 1).flatten(1, 2).detach()
        feats_all = torch.stack(head_feats, 1).flatten(1, 2).detach()
        cross, patch_attn, weights = self.aaf(attn_all, feats_all, k)
        coarse_for_fusion = coarse if self.detach_backbone else coarse.detach()
        cross = cross.reshape(batch, k, grid_h, grid_w)
        fused = cross * F.relu(coarse_for_fusion)
        fine = torch.matmul(fused.flatten(2), patch_attn.transpose(1, 2)).reshape(batch, k, grid_h, grid_w)
        return {
            "cls_logits": cls_logits,
            "coarse": coarse,
            "coarse_logits": coarse.mean((2, 3)),
            "cross": cross,
            "fused": fused,
            "fine": fine,
            "fine_logits": fine.mean((2, 3)),
            "patch_attn": patch_attn,
            "aaf_weights": weights,
        }

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        out = self.forward_cams(images)
        fine = F.relu(out["fine"])
        scale = fine.flatten(2).amax(-1).clamp_min(1e-8)[..., None, None]
        present = (out["cls_logits"] > 0).to(fine.dtype)[..., None, None]
        scores = fine / scale * present
        background = torch.full_like(scores[:, :1], self.background_threshold)
        return torch.cat([background, scores], 1)

    # -- training -----------------------------------------------------------------------------------------------
    def image_labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, K)`` multi-hot foreground labels: ``batch["image_labels"]`` over all ``num_classes`` (background
        dropped) or over the K foreground classes, or the classes present in ``batch["mask"]`` (never 0)."""
        k = self.num_cam_classes
        if "image_labels" in batch:
            labels = batch["image_labels"]
            if labels.dim() != 2 or labels.shape[1] not in (k, k + 1):
                raise ValueError(f"image_labels must have shape (B, {k}) or (B, {k + 1}), got {tuple(labels.shape)}")
            return (labels[:, -k:] > 0).float()
        images, masks = self.check_batch(batch)
        onehot = F.one_hot(torch.where(masks == self.ignore_index, 0, masks).long(), self.num_classes)
        return (onehot.flatten(1, 2).amax(1)[:, 1:] > 0).float()

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """WeakTr phase 1: ``sum`` of the multilabel soft-margin losses of the three predictions."""
        if "image" not in batch:
            raise ValueError(f"batch must hold 'image', got keys {sorted(batch)}")
        images = check_images(batch["image"], "batch['image']")
        labels = self.image_labels(batch)
        p = self.patch_size
        pad_h, pad_w = (-images.shape[-2]) % p, (-images.shape[-1]) % p
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
        out = self.forward_cams(images)
        terms = {
            name: F.multilabel_soft_margin_loss(out[f"{name}_logits"], labels) for name in ("cls", "coarse", "fine")
        }
        total = terms["cls"] + terms["coarse"] + terms["fine"]
        return {"loss": total, **{f"{n}_loss": v.detach() for n, v in terms.items()}}


def _weaktr(num_classes: int | None, **kw: Any) -> WeakTr:
    if num_classes is None and kw.get("class_names") is None:  # the shapes world's WSSS classes by default
        kw["class_names"] = weak_class_names()
    return WeakTr(num_classes=num_classes, **kw)


@register_model
def weaktr_deit_small(num_classes: int | None = None, **kw: Any) -> WeakTr:
    """WeakTr on DeiT-S/16 (embed 384, depth 12, 6 heads, 224 input, drop-path 0.1): the paper's CAM generator."""
    return _weaktr(
        num_classes, **{"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, **kw}
    )


@register_model(
    tag="deit_tiny", differs_from_paper="DeiT-Ti/16 backbone (embed 192, 3 heads); the paper uses DeiT-S/16"
)
def weaktr_deit_tiny(num_classes: int | None = None, **kw: Any) -> WeakTr:
    """WeakTr on DeiT-Ti/16 (embed 192, depth 12, 3 heads, 224 input)."""
    return _weaktr(
        num_classes, **{"img_size": 224, "patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3, **kw}
    )


@register_model(
    tag="shapes_small",
    differs_from_paper=(
        "ViT with patch 8, embed 96, depth 4, 3 heads at 64x64, AAF reduction 4, no drop-path, trained from scratch on "
        "the shapes world; the paper uses DeiT-S/16 at 224 initialised from ImageNet"
    ),
)
def weaktr_shapes_tiny(num_classes: int | None = None, **kw: Any) -> WeakTr:
    """Small WeakTr for the 64 x 64 shapes world: patch 8 (8 x 8 patches), embed 96, depth 4, 3 heads, AAF
    reduction 4, no drop-path. Not a paper configuration: it exists so that every run trains on a CPU."""
    return _weaktr(
        num_classes,
        **{
            "img_size": 64,
            "patch_size": 8,
            "embed_dim": 96,
            "depth": 4,
            "num_heads": 3,
            "drop_path_rate": 0.0,
            "reduction": 4,
            **kw,
        },
    )


@register_model(
    tag="shapes_clip",
    differs_from_paper=(
        "ViT with patch 8, embed 128, depth 4, 2 heads, pre-norm at 64x64 (the image tower of fastseg's shapes-tiny-clip, "
        "from which its backbone is initialised), AAF reduction 4, no drop-path; the paper uses DeiT-S/16 at 224 "
        "initialised from ImageNet"
    ),
)
def weaktr_shapes_clip(num_classes: int | None = None, **kw: Any) -> WeakTr:
    """WeakTr for the 64 x 64 shapes world shaped like the image tower of ``shapes-tiny-clip`` (patch 8, embed 128,
    depth 4, 2 heads of 64, CLIP's pre-norm), so that ``backbone_checkpoint`` can be that CLIP's checkpoint: the
    backbone then starts from a network pre-trained on image-level captions, as the paper's starts from ImageNet."""
    return _weaktr(
        num_classes,
        **{
            "img_size": 64,
            "patch_size": 8,
            "embed_dim": 128,
            "depth": 4,
            "num_heads": 2,
            "pre_norm": True,
            "drop_path_rate": 0.0,
            "reduction": 4,
            **kw,
        },
    )
