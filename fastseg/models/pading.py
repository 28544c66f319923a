"""PADing (He et al., "Primitive Generation and Semantic-related Alignment for Universal Zero-Shot Segmentation",
CVPR 2023): zero-shot semantic / instance / panoptic segmentation on a frozen seen-only Mask2Former.

Stage 1 trains Mask2Former on seen classes only. Stage 2 (this file's modules, the loop in
`fastseg.engine.recipes.pading`) freezes the whole segmenter and trains, from the class embeddings of every class
(`fastseg.models.class_embeddings`):

* ``projection``: ``Linear(d_s, 256)``, class embedding s_c -> a_c in the query space;
* `PrimitiveGenerator`: 400 learned primitives (``nn.Embedding``, N(0, 1)) and 3 post-norm transformer decoder layers
  with sequence length 1 (the classes are the batch), 8 heads, FFN 1024, ReLU; inside every layer Gaussian noise
  N(0, I) is added after the cross-attention residual and before the second LayerNorm, in train *and* eval mode; a
  final LayerNorm. The keys / values of the primitives are computed once per call and shared by all classes
  (spec C.4: never repeated per class). Self-attention over one token is exactly ``out_proj(v_proj(x))`` (with
  ``nn.MultiheadAttention``'s dropout on the single attention weight, i.e. per (class, head));
* disentanglement: E_r, E_u = ``Linear, Linear, LeakyReLU(0.2), Dropout``; D = ``Linear(512, 256), LeakyReLU,
  Dropout, Linear, LeakyReLU, Dropout``; relation R(x, a) = sigmoid(w_2 . ReLU(W_1 [x; a] + b_1) + b_2);
* ``new_fc``: ``Linear(256, K + 1)``, initialised from the segmenter's class head, the only module used at inference.

Losses (spec C.6, exactly): multi-bandwidth MMD ``sqrt(sum_sigma s^T K_sigma s)``, ``k_sigma = exp(-d^2 / (2 sigma))``,
sigma in {2, 5, 10, 20, 40, 80}; generator classification ``0.001 CE(new_fc(f))``; reconstruction L1; unrelated part
pushed to noise with KL_T; relation CE on sigmoid scores used as logits (as the official code does); semantic-related
alignment ``KL_T(S(A, A) || S(r, r))`` (T = 0.1, normalised by numel, gradients into both sides); total
``L_G = L_MMD + L_cls + lambda_s (w1 (L_align + L_unrel) + w2 L_rel + w3 L_rec)``. The classifier step: weighted CE of
``new_fc`` on all real query embeddings (unmatched = no-object, weight 0.1) plus ``num_choose`` detached fake unseen
features (weight ``class_eco``).

Choices where the official code is tied to COCO and the shapes world needs a parameter (documented, not invented):
``cls_logits`` replaces the hard-coded ``[:, :156]`` slice ("all": the panoptic / instance no-op; "seen": the
semantic task's seen-logits-only meaning); the seen relation is scored against the projected embeddings of *all*
classes, as with CLIP embeddings in the official panoptic / semantic configs.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_model
from ._base import SegmentationModel

__all__ = [
    "GMMNGenerator",
    "PADing",
    "PADingHead",
    "PrimitiveGenerator",
    "PrimitiveGeneratorLayer",
    "RelationModule",
    "TASK_DEFAULTS",
    "apply_cfg_fields",
    "check_stage1_metadata",
    "cosine_similarity_matrix",
    "mmd_loss",
    "pading_resnet18",
    "pading_resnet50",
    "similarity_kl",
    "stage1_protocol",
]

MMD_SIGMAS: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)


# ------------------------------------------------------------------------------------------------------------ losses
def mmd_loss(fake: torch.Tensor, real: torch.Tensor, sigmas: Sequence[float] = MMD_SIGMAS) -> torch.Tensor:
    """Multi-bandwidth MMD of GMMN: ``sqrt(sum_sigma [mean k(f, f) + mean k(e, e) - 2 mean k(f, e)])``.

    ``k_sigma(x, y) = exp(-||x - y||^2 / (2 sigma))`` (sigma divides the *squared* distance). The half squared
    distances are formed once, in fp32, and reused by every bandwidth. The sum is clamped at 1e-12 before the square
    root: it is >= 0 mathematically, and the clamp keeps the gradient finite where fake and real coincide.
    """
    if fake.dim() != 2 or real.dim() != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(
            f"mmd_loss expects (M, D) and (N, D) features, got {tuple(fake.shape)} and {tuple(real.shape)}"
        )
    if fake.shape[0] == 0 or real.shape[0] == 0:
        raise ValueError("mmd_loss needs at least one fake and one real feature")
    x = torch.cat([fake, real]).float()
    sq = (x * x).sum(1, keepdim=True)
    neg_half_d2 = x @ x.t() - 0.5 * sq - 0.5 * sq.t()  # -d^2 / 2
    weights = torch.cat(
        [x.new_full((fake.shape[0],), 1.0 / fake.shape[0]), x.new_full((real.shape[0],), -1.0 / real.shape[0])]
    )
    outer = weights[:, None] * weights[None, :]
    # All bandwidths in one broadcast (a handful of launches instead of four per bandwidth); the S x (M+N)^2 block
    # is small at PADing's sizes (M + N ~ 300).
    inv_sigma = 1.0 / torch.tensor(list(sigmas), dtype=x.dtype, device=x.device)
    total = (outer * torch.exp(neg_half_d2[None] * inv_sigma[:, None, None])).sum()
    return torch.sqrt(total.clamp_min(1e-12))


def cosine_similarity_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """S(X, Y): rows L2-normalised, ``X Y^T`` (an empty side gives an empty matrix, as the official code does)."""
    return F.normalize(x, p=2, dim=1) @ F.normalize(y, p=2, dim=1).t()


def similarity_kl(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``KL_T(target || pred)``: row softmaxes at temperature T, summed, divided by ``pred.numel()``.

    Gradients flow into both arguments (the official ``kl_loss(prediction, targets)`` with ``log_target=True``).
    """
    if pred.shape != target.shape:
        raise ValueError(f"similarity_kl: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.numel() == 0:
        return pred.sum() * 0.0
    log_p = F.log_softmax(pred / temperature, dim=1)
    log_t = F.log_softmax(target / temperature, dim=1)
    return F.kl_div(log_p, log_t, reduction="sum", log_target=True) / pred.numel()


# --------------------------------------------------------------------------------------------------------- generator
class PrimitiveGeneratorLayer(nn.Module):
    """One post-norm decoder layer with sequence length 1 over the primitives (spec C.4, steps 1-4).

    The attention parameters live in ``nn.MultiheadAttention`` modules (same initialisation and state-dict names as
    the official layer); the forward is written out so that the primitives' keys / values are computed once per
    call (`primitive_kv`) and broadcast over the N classes instead of being repeated N times.
    """

    def __init__(
        self, dim: int = 256, heads: int = 8, ffn_dim: int = 1024, dropout: float = 0.1, noise: bool = True
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.noise, self.p = dim, heads, noise, dropout
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, self.training)

    def primitive_kv(self, primitives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the P primitives, (heads, P, d_h) each: one GEMM each per call, shared by all classes."""
        d = self.dim
        w, b = self.cross_attn.in_proj_weight, self.cross_attn.in_proj_bias
        k = F.linear(primitives, w[d : 2 * d], b[d : 2 * d])
        v = F.linear(primitives, w[2 * d :], b[2 * d :])
        shape = (primitives.shape[0], self.heads, d // self.heads)
        return k.view(shape).transpose(0, 1), v.view(shape).transpose(0, 1)

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (N, dim) one token per class; kv from `primitive_kv`; noise: (N, dim) or None to draw N(0, I)."""
        n, d, h = x.shape[0], self.dim, self.heads
        dh = d // h
        # 1. Self-attention over a single token: the softmax weight is 1, so the output is out_proj(v_proj(x)); the
        # attention dropout of nn.MultiheadAttention then drops that weight per (token, head).
        sa = self.self_attn
        v_self = F.linear(x, sa.in_proj_weight[2 * d :], sa.in_proj_bias[2 * d :]).view(n, h, dh)
        if self.training and self.p > 0:
            v_self = v_self * F.dropout(v_self.new_ones(n, h, 1), self.p, True)
        x = self.norm1(x + self._drop(sa.out_proj(v_self.reshape(n, d))))
        # 2. Cross-attention to the primitives with the shared keys / values.
        ca = self.cross_attn
        keys, values = kv
        q = F.linear(x, ca.in_proj_weight[:d], ca.in_proj_bias[:d]).view(n, h, dh).transpose(0, 1)  # (h, N, dh)
        attn = torch.softmax((q / math.sqrt(dh)) @ keys.transpose(1, 2), dim=-1)  # (h, N, P)
        attn = F.dropout(attn, self.p, self.training)
        out = (attn @ values).transpose(0, 1).reshape(n, d)
        x = x + self._drop(ca.out_proj(out))
        # 3. Noise injection before the second LayerNorm, also in eval mode (MODEL.MASK_FORMER.NOISE = True).
        if self.noise:
            x = x + (torch.randn_like(x) if noise is None else noise)
        x = self.norm2(x)
        # 4. FFN (dropout after the activation and on the residual branch, as the official layer).
        return self.norm3(x + self._drop(self.linear2(self._drop(F.relu(self.linear1(x))))))


class PrimitiveGenerator(nn.Module):
    """Projected class embeddings (N, dim) -> synthetic query embeddings (N, dim) assembled from the primitives."""

    def __init__(
        self,
        dim: int = 256,
        num_primitives: int = 400,
        num_layers: int = 3,
        heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        noise: bool = True,
    ) -> None:
        super().__init__()
        if num_primitives < 1 or num_layers < 1:
            raise ValueError(f"need num_primitives >= 1 and num_layers >= 1, got {num_primitives}, {num_layers}")
        self.primitives = nn.Embedding(num_primitives, dim)  # N(0, 1) init, as nn.Embedding does
        layer = PrimitiveGeneratorLayer(dim, heads, ffn_dim, dropout, noise)
        # The official decoder deep-copies one layer, so all layers start from the same weights; so do we.
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, a: torch.Tensor, noise: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        if a.dim() != 2:
            raise ValueError(f"generator input must be (N, dim), got {tuple(a.shape)}")
        if noise is not None and len(noise) != len(self.layers):
            raise ValueError(f"need one noise tensor per layer ({len(self.layers)}), got {len(noise)}")
        x = a
        prim = self.primitives.weight
        for i, layer in enumerate(self.layers):
            x = layer(x, layer.primitive_kv(prim), None if noise is None else noise[i])
        return self.norm(x)


class GMMNGenerator(nn.Module):
    """Ablation: the classic GMMN feature generator (no primitives), noise concatenated to the input.

    ``Linear(dim + noise_dim, hidden), LeakyReLU(0.2), Dropout(0.4), Linear(hidden, dim)`` with Xavier weights and
    0.01 biases, the structure of ``GMMNnetwork`` in the official repository (dead code there, the baseline here).
    """

    def __init__(self, dim: int = 256, noise_dim: int | None = None, hidden: int = 256, dropout: float = 0.4) -> None:
        super().__init__()
        self.noise_dim = dim if noise_dim is None else noise_dim
        self.net = nn.Sequential(
            nn.Linear(dim + self.noise_dim, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.01)

    def forward(self, a: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        z = torch.randn(a.shape[0], self.noise_dim, device=a.device, dtype=a.dtype) if noise is None else noise
        return self.net(torch.cat([a, z], 1))


# ------------------------------------------------------------------------------------------------ structure modules
def _encoder(dim: int, p: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.Linear(dim, dim), nn.LeakyReLU(0.2), nn.Dropout(p))


def _decoder(dim: int, p: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(2 * dim, dim), nn.LeakyReLU(0.2), nn.Dropout(p), nn.Linear(dim, dim), nn.LeakyReLU(0.2), nn.Dropout(p)
    )


class RelationModule(nn.Module):
    """R(x, a) = sigmoid(fc2(ReLU(fc1([x; a])))) for every (feature, class) pair -> (N, C) scores in (0, 1).

    ``fc1`` is applied split, ``W_1 [x; a] = W_1x x + W_1a a``: two small GEMMs and a broadcast add instead of the
    (N * C, 2 dim) concatenation (spec C.11, 4); the parameters are the official ``fc1`` / ``fc2``.
    """

    def __init__(self, dim: int = 256, embed_dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(dim + (dim if embed_dim is None else embed_dim), dim)
        self.fc2 = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        wx, wa = self.fc1.weight[:, : self.dim], self.fc1.weight[:, self.dim :]
        hidden = F.relu((x @ wx.t())[:, None, :] + F.linear(a, wa, self.fc1.bias)[None, :, :])  # (N, C, dim)
        return torch.sigmoid(self.fc2(hidden).squeeze(-1))


# ------------------------------------------------------------------------------------------------------- the head
class PADingHead(nn.Module):
    """Everything stage 2 trains: projection, generator, E_r / E_u / D / R (Adam side) and ``new_fc`` (SGD side).

    Args:
        class_embeddings: (K, d_s) embeddings of all classes in class-id order (a buffer, saved with the model).
        seen_ids / unseen_ids: the split (disjoint, both non-empty, covering 0..K-1).
        dim: query-embedding width of the segmenter (256 in Mask2Former).
        generator: "primitives" (PADing) or "gmmn" (the ablation without primitives).
        cls_logits: "all" (panoptic / instance: the official ``[:, :156]`` slice is a no-op there) or "seen" (the
            semantic task: seen logits only).
        structure_weight: lambda_s; weights: (w1, w2, w3).
        class_eco / num_choose / no_object_weight: the classifier step's unseen weight, fake unseen samples per step
            (capped at the number of unseen classes; None = all of them) and no-object weight.
    """

    def __init__(
        self,
        class_embeddings: torch.Tensor,
        seen_ids: Sequence[int],
        unseen_ids: Sequence[int],
        dim: int = 256,
        num_primitives: int = 400,
        num_layers: int = 3,
        heads: int = 8,
        ffn_dim: int = 1024,
        trans_dropout: float = 0.1,
        ed_dropout: float = 0.1,
        noise: bool = True,
        generator: str = "primitives",
        structure_weight: float = 1e-4,
        weights: tuple[float, float, float] = (1.0, 1.0, 0.5),
        cls_weight: float = 1e-3,
        cls_logits: str = "all",
        temperature: float = 0.1,
        sigmas: Sequence[float] = MMD_SIGMAS,
        class_eco: float = 5.0,
        num_choose: int | None = 5,
        no_object_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if class_embeddings.dim() != 2:
            raise ValueError(f"class_embeddings must be (K, d_s), got {tuple(class_embeddings.shape)}")
        k = class_embeddings.shape[0]
        seen, unseen = [int(i) for i in seen_ids], [int(i) for i in unseen_ids]
        if not unseen:
            raise ValueError("the seen / unseen split has no unseen class: zero-shot stage 2 needs at least one")
        if not seen:
            raise ValueError("the seen / unseen split has no seen class: the segmenter must be trained on some")
        if set(seen) & set(unseen) or sorted(seen + unseen) != list(range(k)):
            raise ValueError(f"seen {seen} and unseen {unseen} must partition the {k} class ids 0..{k - 1}")
        if generator not in ("primitives", "gmmn"):
            raise ValueError(f"generator must be 'primitives' or 'gmmn', got {generator!r}")
        if cls_logits not in ("all", "seen"):
            raise ValueError(f"cls_logits must be 'all' or 'seen', got {cls_logits!r}")
        num_choose = len(unseen) if num_choose is None else min(int(num_choose), len(unseen))
        if num_choose < 1:
            raise ValueError(f"num_choose must be >= 1 (or None for every unseen class), got {num_choose}")
        self.num_classes, self.dim = k, dim
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())
        self.register_buffer("seen_ids", torch.tensor(seen, dtype=torch.long), persistent=False)
        self.register_buffer("unseen_ids", torch.tensor(unseen, dtype=torch.long), persistent=False)
        self.projection = nn.Linear(class_embeddings.shape[1], dim)
        self.generator_kind = generator
        self.generator = (
            PrimitiveGenerator(dim, num_primitives, num_layers, heads, ffn_dim, trans_dropout, noise)
            if generator == "primitives"
            else GMMNGenerator(dim)
        )
        self.encoder_related = _encoder(dim, ed_dropout)
        self.encoder_unrelated = _encoder(dim, ed_dropout)
        self.decoder = _decoder(dim, ed_dropout)
        self.relation = RelationModule(dim)
        self.new_fc = nn.Linear(dim, k + 1)
        self.structure_weight, self.weights, self.cls_weight = structure_weight, tuple(weights), cls_weight
        self.cls_logits, self.temperature, self.sigmas = cls_logits, temperature, tuple(sigmas)
        self.class_eco, self.num_choose, self.no_object_weight = class_eco, num_choose, no_object_weight

    def generator_parameters(self) -> list[nn.Parameter]:
        """What the Adam step trains: every stage-2 parameter except ``new_fc``."""
        return [p for n, p in self.named_parameters() if not n.startswith("new_fc.")]

    def classifier_class_weights(self) -> torch.Tensor:
        """(K + 1,) CE weights of the classifier step: 1 seen, ``class_eco`` unseen, ``no_object_weight`` no-object."""
        w = torch.ones(self.num_classes + 1, device=self.new_fc.weight.device)
        w[self.unseen_ids] = self.class_eco
        w[-1] = self.no_object_weight
        return w

    def generate(self, a: torch.Tensor) -> torch.Tensor:
        return self.generator(a)

    # -- step G ------------------------------------------------------------------------------------------------
    def generator_losses(self, real: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """All generator-side losses for M matched real query embeddings ``real`` (M, dim) with class ``labels``.

        One fake feature per matched GT (same class), one per unseen class; the two sets go through the generator
        in one call, so the primitives' keys / values are computed once for the step.
        """
        if real.dim() != 2 or real.shape[1] != self.dim or labels.shape != real.shape[:1]:
            raise ValueError(
                f"expected real (M, {self.dim}) and labels (M,), got {tuple(real.shape)}, {tuple(labels.shape)}"
            )
        if real.shape[0] == 0:
            raise ValueError("generator_losses needs at least one matched real query embedding")
        a_all = self.projection(self.class_embeddings)  # (K, dim), with gradient (the alignment target trains it)
        a_seen, a_unseen = a_all[labels], a_all[self.unseen_ids]
        fake = self.generate(torch.cat([a_seen, a_unseen]))
        fake_seen, fake_unseen = fake[: len(labels)], fake[len(labels) :]
        out = {"mmd": mmd_loss(fake_seen, real, self.sigmas), "cls": self.cls_loss(fake_seen, labels)}
        out.update(self.structure_losses(fake_seen, fake_unseen, a_all, labels))
        out["loss"] = out["mmd"] + out["cls"] + self.structure_weight * out["structure"]
        return out

    def cls_loss(self, fake_seen: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.new_fc(fake_seen)
        if self.cls_logits == "seen":
            position = torch.full((self.num_classes,), -1, dtype=torch.long, device=labels.device)
            position[self.seen_ids] = torch.arange(len(self.seen_ids), device=labels.device)
            logits, labels = logits[:, self.seen_ids], position[labels]
        return self.cls_weight * F.cross_entropy(logits, labels)

    def structure_losses(
        self,
        fake_seen: torch.Tensor,
        fake_unseen: torch.Tensor,
        a_all: torch.Tensor,
        labels: torch.Tensor,
        noise_seen: torch.Tensor | None = None,
        noise_unseen: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Disentanglement, relation and alignment on *generated* features only (spec C.6, 3-6)."""
        a_seen, a_unseen = a_all[labels], a_all[self.unseen_ids]
        r_s, u_s = self.encoder_related(fake_seen), self.encoder_unrelated(fake_seen)
        r_u, u_u = self.encoder_related(fake_unseen), self.encoder_unrelated(fake_unseen)
        z_s = torch.randn_like(u_s) if noise_seen is None else noise_seen
        z_u = torch.randn_like(u_u) if noise_unseen is None else noise_unseen
        t = self.temperature
        rec = 0.5 * (
            F.l1_loss(self.decoder(torch.cat([r_s, u_s], 1)), fake_seen)
            + F.l1_loss(self.decoder(torch.cat([r_u, u_u], 1)), fake_unseen)
        )
        unrelated = 0.5 * 0.5 * (similarity_kl(u_s, z_s, t) + similarity_kl(u_u, z_u, t))
        unseen_target = torch.arange(len(self.unseen_ids), device=labels.device)
        relation = (
            0.2
            * 0.5
            * (
                F.cross_entropy(self.relation(r_s, a_all), labels)
                + F.cross_entropy(self.relation(r_u, a_unseen), unseen_target)
            )
        )
        sim = cosine_similarity_matrix
        align = (
            similarity_kl(sim(r_s, r_s), sim(a_seen, a_seen), t)
            + similarity_kl(sim(r_u, r_u), sim(a_unseen, a_unseen), t)
            + similarity_kl(sim(r_s, r_u), sim(a_seen, a_unseen), t)
        ) / 3.0
        w1, w2, w3 = self.weights
        structure = w1 * (align + unrelated) + w2 * relation + w3 * rec
        return {"align": align, "unrelated": unrelated, "relation": relation, "rec": rec, "structure": structure}

    # -- step D ------------------------------------------------------------------------------------------------
    def classifier_loss(
        self, queries: torch.Tensor, query_labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Weighted CE of ``new_fc`` on all real query embeddings (N, dim) with labels in 0..K (K = no-object)
        plus ``num_choose`` fake unseen features (detached: only ``new_fc`` learns here)."""
        if queries.dim() != 2 or queries.shape[1] != self.dim or query_labels.shape != queries.shape[:1]:
            raise ValueError(
                f"expected queries (N, {self.dim}) and labels (N,), got {tuple(queries.shape)}, "
                f"{tuple(query_labels.shape)}"
            )
        pick = torch.randperm(len(self.unseen_ids), generator=generator)[: self.num_choose].to(self.unseen_ids.device)
        with torch.no_grad():
            fake = self.generate(self.projection(self.class_embeddings[self.unseen_ids[pick]]))
        inputs = torch.cat([queries.detach(), fake])
        labels = torch.cat([query_labels, self.unseen_ids[pick]])
        ce = F.cross_entropy(self.new_fc(inputs), labels, weight=self.classifier_class_weights())
        return {"loss": ce, "classifier_ce": ce.detach()}


# ------------------------------------------------------------------------------------------------------ the model
# Per-task stage-2 settings of the official configs (spec C.2 / C.7): (CLASS_ECO, NUM_CHOOSE, lambda_s, DROP_OUT_ED,
# TRANS_DROP_RATE, generator-classification logits). NUM_CHOOSE None = every unseen class (semantic: 17 >= 15 unseen).
TASK_DEFAULTS: dict[str, dict[str, object]] = {
    "panoptic": dict(
        class_eco=5.0, num_choose=5, structure_weight=1e-4, ed_dropout=0.1, trans_dropout=0.1, cls_logits="all"
    ),
    "instance": dict(
        class_eco=2.0, num_choose=5, structure_weight=1e-3, ed_dropout=0.1, trans_dropout=0.1, cls_logits="all"
    ),
    "semantic": dict(
        class_eco=5.0, num_choose=None, structure_weight=1e-3, ed_dropout=0.2, trans_dropout=0.3, cls_logits="seen"
    ),
}


class PADing(SegmentationModel):
    """A frozen seen-only Mask2Former whose class head is PADing's ``new_fc`` (spec C.8), plus the stage-2 modules.

    Args:
        segmenter: a `Mask2Former` (stage 1, trained on seen classes only; see `load_stage1`).
        class_embeddings: (K, d_s) embeddings of all K classes (`fastseg.models.class_embeddings`).
        seen_ids / unseen_ids: the zero-shot split.
        task: "panoptic" | "instance" | "semantic": picks the official stage-2 settings (`TASK_DEFAULTS`), which
            ``head_kwargs`` may override (e.g. ``structure_weight=0`` or ``generator="gmmn"`` for the ablations).
        embeddings_source: how the embeddings were made (recorded in the checkpoint metadata).

    Inference (``model(images)``, ``predict(images, task=...)``, ``forward_raw``) is the segmenter's own, with
    ``new_fc`` in place of its class head: semantic ``sum_q softmax(new_fc(e_q))[:K] sigmoid(m_q)``, panoptic and
    instance post-processing unchanged. The generator is never used at inference.
    """

    def __init__(
        self,
        segmenter: nn.Module,
        class_embeddings: torch.Tensor,
        seen_ids: Sequence[int],
        unseen_ids: Sequence[int],
        task: str = "panoptic",
        embeddings_source: str = "attributes",
        **head_kwargs: object,
    ) -> None:
        super().__init__()
        if task not in TASK_DEFAULTS:
            raise ValueError(f"task must be one of {sorted(TASK_DEFAULTS)}, got {task!r}")
        for attr in ("forward_queries", "replace_class_head", "freeze_segmenter", "targets", "criterion"):
            if not hasattr(segmenter, attr):
                raise ValueError(f"PADing needs a Mask2Former segmenter; {type(segmenter).__name__} has no {attr!r}")
        k = segmenter.num_classes
        if class_embeddings.shape[0] != k:
            raise ValueError(f"{class_embeddings.shape[0]} class embeddings for a segmenter with {k} classes")
        self.task, self.embeddings_source = task, embeddings_source
        dim = segmenter.class_head.in_features
        opts = {**TASK_DEFAULTS[task], **head_kwargs}
        self.head = PADingHead(class_embeddings, seen_ids, unseen_ids, dim=dim, **opts)  # type: ignore[arg-type]
        self.segmenter = segmenter
        # Matching in stage 2 uses the frozen stage-1 class head (the official matcher reads the pretrained
        # class_embed, new_fc is a separate module); new_fc starts from it and then replaces it for inference.
        self.stage1_class_head = copy.deepcopy(segmenter.class_head)
        self.stage1_class_head.requires_grad_(False)
        self.head.new_fc.load_state_dict(segmenter.class_head.state_dict())
        segmenter.replace_class_head(self.head.new_fc)
        segmenter.freeze_segmenter()
        # The split and the embedding source travel in the PretrainedCfg (checkpoints, export sidecars).
        apply_cfg_fields(
            segmenter,
            {
                "seen_classes": tuple(self.seen_classes),
                "unseen_classes": tuple(self.unseen_classes),
                "class_embeddings": embeddings_source,
            },
        )
        self.pretrained_cfg = segmenter.pretrained_cfg

    @property
    def seen_classes(self) -> list[int]:
        return self.head.seen_ids.tolist()

    @property
    def unseen_classes(self) -> list[int]:
        return self.head.unseen_ids.tolist()

    def train(self, mode: bool = True) -> PADing:
        """Stage 2 trains only the head: the frozen segmenter stays in eval mode (no BatchNorm statistics move)."""
        super().train(mode)
        self.segmenter.eval()
        return self

    def reset_classifier_from_stage1(self) -> None:
        """``new_fc`` <- the stage-1 class head (the official weight conversion, spec C.7)."""
        self.head.new_fc.load_state_dict(self.stage1_class_head.state_dict())

    # -- inference: the segmenter with new_fc ------------------------------------------------------------------
    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmenter.forward_logits(images)

    def forward_raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.segmenter.forward_raw(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, task: str = "semantic"):  # type: ignore[override]
        return self.segmenter.predict(images, task=task)

    # -- stage 2 -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def matched_queries(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen forward + Hungarian matching: query embeddings (B, Q, C) (the normalised final decoder output,
        ``pred_embed``) and ``all_classes`` (B, Q): the matched GT class, or K (no-object) for unmatched queries."""
        seg = self.segmenter
        targets = seg.targets(batch)
        images, _ = seg.pad_input(batch["image"])
        out = seg.forward_queries(images)
        embed = out["query_embeddings"][-1]
        logits = self.stage1_class_head(embed)
        indices = seg.criterion.matcher(logits, out["pred_masks"], targets, generator=generator)
        all_classes = torch.full(embed.shape[:2], self.num_classes, dtype=torch.long, device=embed.device)
        for b, (rows, cols) in enumerate(indices):
            all_classes[b, rows.to(embed.device)] = targets[b].labels[cols.to(embed.device)]
        return embed, all_classes

    def generator_step_losses(self, embed: torch.Tensor, all_classes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Step G's losses from `matched_queries` (M matched real embeddings vs M fake seen + all fake unseen)."""
        matched = all_classes != self.num_classes
        if not bool(matched.any()):
            raise ValueError("no query matched a ground-truth segment in this batch: the generator step needs one")
        return self.head.generator_losses(embed[matched], all_classes[matched])

    def classifier_step_loss(
        self, embed: torch.Tensor, all_classes: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Step D's loss: ``new_fc`` on all B * Q real queries plus ``num_choose`` fake unseen features."""
        return self.head.classifier_loss(embed.flatten(0, 1), all_classes.flatten(), generator)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Both stage-2 objectives summed, for code that drives one optimiser (the model contract). The faithful
        procedure, two optimisers and two steps per iteration, is `fastseg.engine.recipes.pading.train_stage2`."""
        self.check_batch(batch)
        embed, all_classes = self.matched_queries(batch)
        cls = self.classifier_step_loss(embed, all_classes)
        if bool((all_classes != self.num_classes).any()):
            gen = self.generator_step_losses(embed, all_classes)
        else:  # nothing matched: no generator signal in this batch
            gen = {"loss": sum(p.sum() for p in self.head.generator_parameters()) * 0.0}
        out = {k: v.detach() for k, v in gen.items() if k != "loss"}
        out.update(generator_loss=gen["loss"].detach(), classifier_loss=cls["loss"].detach())
        out["loss"] = gen["loss"] + cls["loss"]
        return out

    def load_stage1(self, path: str | os.PathLike) -> None:
        """Load a seen-only Mask2Former checkpoint into the segmenter (see `check_stage1_metadata`), then
        initialise ``new_fc`` and the frozen matching head from its class head."""
        from ..checkpoint import load_state_dict, read_metadata

        check_stage1_metadata(read_metadata(path), path, self.unseen_classes, self.num_classes)
        state = load_state_dict(path)
        head_keys = {k for k in state if k.startswith("predictor.class_embed.")}
        seg_state = self.segmenter.state_dict()
        missing = [k for k in seg_state if k not in state]
        unexpected = [k for k in state if k not in seg_state]
        bad = [k for k in seg_state if k in state and state[k].shape != seg_state[k].shape]
        if missing or unexpected or bad:
            raise ValueError(
                f"stage-1 checkpoint {path} does not fit the segmenter of {type(self).__name__}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {bad[:3]}"
            )
        self.segmenter.load_state_dict(state)
        self.stage1_class_head.load_state_dict({k.removeprefix("predictor.class_embed."): state[k] for k in head_keys})
        self.reset_classifier_from_stage1()


STAGE1_PROTOCOL_KEY = "zero_shot_protocol"


def stage1_protocol(task: str, unseen_ids: Sequence[int]) -> dict[str, str]:
    """Checkpoint metadata that marks a seen-only stage-1 Mask2Former (read back by `check_stage1_metadata`)."""
    return {STAGE1_PROTOCOL_KEY: json.dumps({"seen_only": task, "unseen_classes": sorted(int(i) for i in unseen_ids)})}


def check_stage1_metadata(metadata: dict[str, str], path: object, unseen_ids: Sequence[int], num_classes: int) -> None:
    """Raise ``ValueError`` unless ``metadata`` says: a Mask2Former trained seen-only on exactly ``unseen_ids``."""
    arch = metadata.get("architecture", "")
    if arch and not arch.startswith("mask2former"):
        raise ValueError(f"stage-2 PADing needs a seen-only Mask2Former checkpoint; {path} is a {arch!r} checkpoint")
    raw = metadata.get(STAGE1_PROTOCOL_KEY)
    if raw is None:
        raise ValueError(
            f"{path} is not a seen-only Mask2Former checkpoint (no {STAGE1_PROTOCOL_KEY!r} in its metadata): train "
            "stage 1 with `fastseg train mask2former_<backbone> --seen-only` so unseen classes never reach it"
        )
    protocol = json.loads(raw)
    if sorted(protocol.get("unseen_classes", [])) != sorted(int(i) for i in unseen_ids):
        raise ValueError(
            f"{path} was trained seen-only with unseen classes {protocol.get('unseen_classes')}, but "
            f"this PADing model's unseen classes are {sorted(int(i) for i in unseen_ids)}"
        )
    if "num_classes" in metadata and int(metadata["num_classes"]) != num_classes:
        raise ValueError(f"{path} has {metadata['num_classes']} classes, this PADing model {num_classes}")


# ------------------------------------------------------------------------------------------------- registered models
def apply_cfg_fields(model: nn.Module, fields: dict[str, object]) -> None:
    """Overwrite ``model.pretrained_cfg`` fields (e.g. a world's names, palette and stuff / thing split from
    `fastseg.data.shapes.pretrained_cfg_fields`); unknown keys are ignored."""
    from ..registry import PretrainedCfg

    cfg = model.pretrained_cfg.to_dict()
    cfg.update({k: v for k, v in fields.items() if k in cfg})
    model.pretrained_cfg = PretrainedCfg.from_dict(cfg)


def _pading(
    segmenter_name: str,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    unseen_classes: Sequence[int | str] | None = None,
    embeddings: str | None = None,
    task: str = "panoptic",
    segmenter_kwargs: dict[str, object] | None = None,
    **head_kwargs: object,
) -> PADing:
    """PADing on ``segmenter_name`` for the shapes world's zero-shot split (`zero_shot_config`: unseen snow,
    ellipse, diamond) with ``"attributes"`` embeddings by default; for another class count, ``class_names``,
    ``unseen_classes`` (default: the last class) and ``embeddings`` say what the classes are."""
    import warnings

    from ..data.shapes import ShapesConfig, pretrained_cfg_fields, zero_shot_config
    from ..registry import create_model
    from .class_embeddings import class_embeddings as make_embeddings

    # The zero-shot world (13 classes) by default; the default world (12 classes, unseen ellipse and diamond) when
    # that class count is asked for.
    world = zero_shot_config() if num_classes != ShapesConfig().num_classes else ShapesConfig()
    seg_kwargs = dict(segmenter_kwargs or {})
    if task == "semantic":
        seg_kwargs.setdefault("train_task", "semantic")
    if num_classes is None or (num_classes == world.num_classes and class_names is None):
        fields: dict[str, object] | None = pretrained_cfg_fields(world)
        names = list(world.class_names)
        default_unseen: list[int] = list(world.unseen_ids)
        source = embeddings or "attributes"
    else:
        fields = None
        names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for num_classes={num_classes}")
        default_unseen = [num_classes - 1]
        if embeddings is None:
            warnings.warn(
                "PADing built for classes without a description: 'random:64' placeholder embeddings carry "
                "no semantics; pass embeddings='file:PATH' or 'clip:CHECKPOINT' for zero-shot transfer",
                stacklevel=3,
            )
        source = embeddings or "random:64"
    unseen = (
        default_unseen
        if unseen_classes is None
        else [names.index(u) if isinstance(u, str) and u in names else u for u in unseen_classes]
    )
    bad = [u for u in unseen if not isinstance(u, int) or not 0 <= u < len(names)]
    if bad:
        raise ValueError(f"unseen_classes {bad} are neither class names nor ids of {names}")
    seen = [k for k in range(len(names)) if k not in unseen]
    segmenter = create_model(segmenter_name, num_classes=len(names), **seg_kwargs)
    apply_cfg_fields(segmenter, fields if fields is not None else {"class_names": tuple(names)})
    model = PADing(
        segmenter, make_embeddings(source, names), seen, unseen, task=task, embeddings_source=source, **head_kwargs
    )
    return model


_SHAPES_DIFFERS = (
    "built on the CPU-sized Mask2Former (16 queries, width 64, 3 decoder layers; paper: 100, 256, 9) "
    "for the 64 x 64 shapes world; class embeddings from the world's geometry and appearance "
    "('attributes'; paper: CLIP ViT-B/16 text, word2vec for instance segmentation)"
)


@register_model(tag="shapes_small", differs_from_paper="ResNet-18 backbone (paper: ResNet-50); " + _SHAPES_DIFFERS)
def pading_resnet18(**kwargs: object) -> PADing:
    """PADing on `mask2former_resnet18` (CPU-sized: 16 queries, width 64), 400 primitives, 3 generator layers."""
    return _pading("mask2former_resnet18", **kwargs)  # type: ignore[arg-type]


@register_model(tag="shapes_small", differs_from_paper=_SHAPES_DIFFERS)
def pading_resnet50(**kwargs: object) -> PADing:
    """PADing on `mask2former_resnet50` (CPU-sized head)."""
    return _pading("mask2former_resnet50", **kwargs)  # type: ignore[arg-type]
