"""Layers on the `vq` kernels: a vector quantiser, the GSS palette inverse and an argmax token head.

* `VectorQuantizer`: VQ-VAE codebook with the straight-through estimator, commitment loss and optional EMA codebook
  updates with dead-code restart (van den Oord et al. 2017; Razavi et al. 2019). The nearest-code search is
  `fastseg.kernels.vq_nearest` (no N x K matrix), whose differentiable ``sqdist`` gives the commitment loss directly.
* `PaletteInverse`: GSS's training-free maskige inverse X^-1: every RGB pixel -> index of the nearest palette colour
  (squared L2 in RGB, the first K rows only).
* `ArgmaxTokenHead`: a 1x1 conv whose logits are only arg-maxed at inference; eval mode runs
  `fastseg.kernels.argmax_matmul` (logits never written), training mode returns logits for the cross-entropy.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from fastseg.kernels import argmax_matmul, vq_nearest

__all__ = ["VQOutput", "VectorQuantizer", "PaletteInverse", "ArgmaxTokenHead"]


@dataclasses.dataclass
class VQOutput:
    """What `VectorQuantizer.forward` returns.

    Attributes:
        quantized: the input's shape; the nearest codes, with straight-through gradients to the input when it
            requires grad (then equal to the codes up to one rounding of ``z + (e - z)``).
        indices: int64 code ids, the input's shape without the code axis.
        loss: ``codebook_loss + beta * commitment_loss`` (add it to the model's loss).
        commitment_loss: mean over vectors of ``||z - sg(e)||^2 / D`` (gradient to the encoder only).
        codebook_loss: mean of ``||sg(z) - e||^2 / D`` (gradient to the codebook only); zero with EMA updates.
        perplexity: ``exp(entropy)`` of this batch's code usage (no gradient), a codebook-collapse monitor.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor
    perplexity: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with straight-through gradients, commitment loss, optional EMA and dead-code restart.

    Args:
        num_codes: codebook size K.
        dim: code dimension D.
        beta: weight of the commitment loss.
        ema: update the codebook by exponential moving averages of the assigned vectors (no codebook loss, the
            codebook is then not trained by the optimiser) instead of by gradient.
        decay: EMA decay of the code usage counts (always tracked) and, with ``ema=True``, of the code sums.
        eps: Laplace smoothing of the EMA counts.
        dead_code_threshold: in training, codes whose EMA usage count falls below this are restarted at random
            vectors of the current batch; 0 disables restarts.
        channel_dim: the axis of the input that holds the D features (1 for (B, D, H, W) maps, -1 for (B, L, D)).
        impl: kernel implementation, ``"auto" | "triton" | "torch"``.

    Not synchronised across processes: under DDP the EMA statistics and restarts are per rank.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 0.0,
        channel_dim: int = 1,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"VectorQuantizer needs num_codes >= 1 and dim >= 1, got {num_codes} and {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"VectorQuantizer: decay must be in [0, 1), got {decay}")
        if beta < 0 or dead_code_threshold < 0:
            raise ValueError(
                f"VectorQuantizer: beta and dead_code_threshold must be >= 0, got {beta}, {dead_code_threshold}"
            )
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        self.dead_code_threshold, self.channel_dim, self.impl = dead_code_threshold, channel_dim, impl
        self.codebook = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes))
        self.codebook.requires_grad_(not ema)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", self.codebook.detach().clone() if ema else torch.zeros(0))

    def forward(self, z: torch.Tensor) -> VQOutput:
        """Quantise ``z`` whose ``channel_dim`` axis has size ``dim``; see `VQOutput` for the result."""
        if z.dim() < 2 or z.shape[self.channel_dim] != self.dim:
            raise ValueError(
                f"VectorQuantizer: expected {self.dim} features on axis {self.channel_dim}, got shape {tuple(z.shape)}"
            )
        moved = z.movedim(self.channel_dim, -1)
        flat = moved.reshape(-1, self.dim)
        codebook = self.codebook.to(flat.dtype)
        updates = self.training and flat.shape[0] > 0 and (self.ema or self.dead_code_threshold > 0)
        # One search; codebook detached so sqdist's gradient reaches only z: that is the commitment loss. When this
        # call updates the codebook in place (EMA, restarts), the search gets a copy: its backward needs the codes
        # as they were.
        searched = codebook.detach().clone() if updates else codebook.detach()
        indices, sqdist = vq_nearest(flat, searched, impl=self.impl)
        codes = F.embedding(indices, codebook)  # differentiable gather: the codebook loss flows through it
        commitment = sqdist.mean() / self.dim if flat.shape[0] else sqdist.sum()
        if self.ema:
            codebook_loss = commitment.new_zeros(())
        else:
            codebook_loss = F.mse_loss(codes.float(), flat.detach().float()) if flat.shape[0] else commitment * 0
        counts = torch.bincount(indices, minlength=self.num_codes).to(torch.float32)
        if self.training and flat.shape[0]:
            self._update(flat.detach(), indices, counts)  # also tracks usage when no codebook change is asked
        # Straight-through estimator: the forward value is the code, the gradient w.r.t. z is the identity.
        straight_through = torch.is_grad_enabled() and flat.requires_grad
        quantized = flat + (codes - flat).detach() if straight_through else codes
        probs = counts / counts.sum().clamp(min=1)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())
        return VQOutput(
            quantized=quantized.reshape(moved.shape).movedim(-1, self.channel_dim),
            indices=indices.reshape(moved.shape[:-1]),
            loss=codebook_loss + self.beta * commitment,
            commitment_loss=commitment,
            codebook_loss=codebook_loss,
            perplexity=perplexity,
        )

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat.float())
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self.dead_code_threshold > 0:
            dead = (self.cluster_size < self.dead_code_threshold).nonzero().squeeze(1)
            if dead.numel():
                picks = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
                fresh = flat[picks].to(self.codebook.dtype)
                self.codebook.index_copy_(0, dead, fresh)
                # Give restarted codes a full count so that they are not restarted again at the next step.
                self.cluster_size.index_fill_(0, dead, self.dead_code_threshold)
                if self.ema:
                    self.embed_sum.index_copy_(0, dead, fresh.float() * self.dead_code_threshold)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of ``indices`` (any shape), with the code axis placed at ``channel_dim``."""
        return F.embedding(indices, self.codebook).movedim(-1, self.channel_dim)

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, ema={self.ema}, impl={self.impl!r}"


class PaletteInverse(nn.Module):
    """RGB image -> class id of the nearest palette colour (squared L2 in RGB), GSS's maskige inverse X^-1.

    Args:
        palette: (K, 3) class colours, in the value range of the images it will see (0..255 for GSS maskiges). Pass
            only the K class rows (GSS excludes the "ignore" row).
        impl: kernel implementation, ``"auto" | "triton" | "torch"``.

    Forward takes (B, 3, H, W) images (float, or uint8 which is converted to float32) and returns (B, H, W) int64 ids;
    pixels with NaN / inf get class 0 (the kernel's policy). Ties go to the lower class id.
    """

    def __init__(self, palette: torch.Tensor | list, impl: str = "auto") -> None:
        super().__init__()
        palette = torch.as_tensor(palette, dtype=torch.float32)
        if palette.dim() != 2 or palette.shape[1] != 3 or palette.shape[0] < 1:
            raise ValueError(f"PaletteInverse: palette must be (K, 3) with K >= 1, got shape {tuple(palette.shape)}")
        self.impl = impl
        self.register_buffer("palette", palette)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            raise ValueError(f"PaletteInverse: expected (B, 3, H, W) images, got shape {tuple(rgb.shape)}")
        if not rgb.is_floating_point():
            rgb = rgb.float()
        b, _, h, w = rgb.shape
        pixels = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
        index, _ = vq_nearest(pixels, self.palette.to(pixels.dtype), impl=self.impl)
        return index.reshape(b, h, w)


class ArgmaxTokenHead(nn.Module):
    """1x1 conv classifier whose inference output is the argmax id per position (the GSS token head, 2048 -> 8192).

    Training mode returns logits (B, num_tokens, H, W) for the cross-entropy; eval mode returns int64 ids (B, H, W)
    through the fused GEMM + argmax kernel, without writing the logits (8192 x 128^2 fp32 would be 537 MB). The
    weight is stored like a 1x1 conv's, (num_tokens, in_channels, 1, 1), so conv checkpoints load unchanged.

    Args:
        in_channels: C.
        num_tokens: K, the vocabulary size.
        bias: whether the conv has a bias.
        impl: kernel implementation for eval mode, ``"auto" | "triton" | "torch"``.
    """

    def __init__(self, in_channels: int, num_tokens: int, bias: bool = True, impl: str = "auto") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_tokens, kernel_size=1, bias=bias)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if self.training else self.predict(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) features -> (B, H, W) int64 token ids (lowest id on ties)."""
        if x.dim() != 4 or x.shape[1] != self.conv.in_channels:
            raise ValueError(
                f"ArgmaxTokenHead: expected (B, {self.conv.in_channels}, H, W) features, got shape {tuple(x.shape)}"
            )
        b, c, h, w = x.shape
        weight = self.conv.weight.reshape(self.conv.out_channels, c).to(x.dtype)
        bias = self.conv.bias.to(x.dtype) if self.conv.bias is not None else None
        index, _ = argmax_matmul(x.permute(0, 2, 3, 1).reshape(-1, c), weight, bias, impl=self.impl)
        return index.reshape(b, h, w)
