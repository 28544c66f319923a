"""GSS stage 1 (Chen et al., CVPR 2023): fitting the small maskige tokenizer, and the tokenizer's round-trip upper bound.

These are training procedures over a `fastseg.models.gss` model's parts, so they live here rather than in the model
file: `train_maskige_vqvae` (``fastseg gss fit-tokenizer``) and `roundtrip_miou` (``fastseg gss roundtrip``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ...layers.vq import PaletteInverse
from ...metrics import ConfusionMatrix
from ...models.gss import masks_to_maskige, upsample_labels
from ...models.gss_tokenizers import MaskigeTokenizer, MaskigeVQVAE

__all__ = ["roundtrip_miou", "train_maskige_vqvae"]


def train_maskige_vqvae(
    tokenizer: MaskigeVQVAE,
    palette: torch.Tensor,
    masks: Iterable[torch.Tensor],
    steps: int,
    lr: float = 3e-3,
    ignore_index: int = 255,
    palette_ce_weight: float = 1.0,
    temperature: float = 0.05,
    log_every: int = 50,
    log: Any = None,
    init_codebook: bool = True,
) -> list[dict[str, float]]:
    """Fit a `MaskigeVQVAE` on maskiges of ``masks`` (an iterable of (B, H, W) class-id batches, cycled).

    Loss: MSE of the reconstruction in [0, 1] + the VQ loss (EMA codebook, commitment 0.25) + ``palette_ce_weight`` x
    cross-entropy of the soft palette assignment ``softmax(-||rgb - palette_k||^2 / temperature)`` against the class
    (a maskige-aware term that aims the tokenizer at the round trip rather than at RGB fidelity; our addition).
    Ignore pixels are dropped from the palette term and rendered in the ignore colour.

    ``init_codebook`` puts the codes on encoder outputs of the first batch (pass False to continue a fit).
    Returns the logged history. The tokenizer is left frozen (``requires_grad=False``) and in eval mode.
    """
    if steps < 1:
        raise ValueError(f"train_maskige_vqvae: steps must be >= 1, got {steps}")
    k = palette.shape[0] - 1
    pal = palette[:k].float() / 255.0
    params = [p for n, p in tokenizer.named_parameters() if not n.startswith("quantizer.")]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    tokenizer.train()
    history: list[dict[str, float]] = []
    it = iter(masks)
    start = time.perf_counter()
    for step in range(steps):
        try:
            m = next(it)
        except StopIteration:
            it = iter(masks)
            m = next(it)
        target = masks_to_maskige(m, palette, ignore_index)
        z = tokenizer.enc(target * 2 - 1)
        tokenizer.quantizer.eval()  # EMA / restart updates are applied after the step (see below)
        out = tokenizer.quantizer(z)
        recon = tokenizer.decode_codes(out.quantized)
        if step == 0 and init_codebook:  # data-dependent codebook init: codes start on encoder outputs, not in a collapsed clump
            with torch.no_grad():
                flat0 = z.detach().permute(0, 2, 3, 1).reshape(-1, tokenizer.code_dim)
                picks = torch.randint(0, flat0.shape[0], (tokenizer.vocab_size,))
                q = tokenizer.quantizer
                q.codebook.copy_(flat0[picks])
                if q.ema:
                    q.embed_sum.copy_(q.codebook * q.cluster_size[:, None])
            out = tokenizer.quantizer(z)
            recon = tokenizer.decode_codes(out.quantized)
        mse = F.mse_loss(recon, target)
        d = ((recon[:, None] - pal[None, :, :, None, None]) ** 2).sum(2)
        ce = F.cross_entropy(-d / temperature, m.long(), ignore_index=ignore_index)
        loss = mse + out.loss + palette_ce_weight * ce
        opt.param_groups[0]["lr"] = lr * (1 - step / steps) ** 0.9
        opt.zero_grad()
        loss.backward()
        opt.step()
        # VectorQuantizer updates its codebook in place during a training forward, which invalidates the tensors
        # vq_nearest saved for backward; so the quantizer runs in eval mode and its EMA / dead-code update is
        # applied here, after the backward, on the same assignments.
        with torch.no_grad():
            flat = z.detach().permute(0, 2, 3, 1).reshape(-1, tokenizer.code_dim)
            idx = out.indices.reshape(-1)
            tokenizer.quantizer.train()
            tokenizer.quantizer._update(flat, idx, torch.bincount(idx, minlength=tokenizer.vocab_size).float())
            tokenizer.quantizer.eval()
        if step % log_every == 0 or step == steps - 1:
            rec = {"step": step, "loss": float(loss.detach()), "mse": float(mse.detach()), "palette_ce": float(ce.detach()),
                   "perplexity": float(out.perplexity), "seconds": time.perf_counter() - start}
            history.append(rec)
            if log is not None:
                log(rec)
    tokenizer.requires_grad_(False)
    tokenizer.eval()
    return history


@torch.no_grad()
def roundtrip_miou(
    tokenizer: MaskigeTokenizer,
    palette: torch.Tensor,
    dataset: Iterable[dict[str, torch.Tensor]],
    num_classes: int,
    maskige_scale: int = 1,
    ignore_index: int = 255,
    batch_size: int = 16,
    impl: str = "auto",
) -> dict[str, Any]:
    """The tokenizer's upper bound (``fastseg gss roundtrip``): GT -> X -> tokens -> decoder -> X^-1 -> classes.

    GT is upsampled to the maskige resolution (`upsample_labels`), ignore pixels rendered in the ignore colour,
    the class map voted back to the input resolution, and mIoU taken against GT (ignore excluded).

    Args:
        tokenizer: a `MaskigeTokenizer` (frozen).
        palette: (K + 1, 3) maskige palette in 0..255 (e.g. ``model.maskige_palette``).
        dataset: items (or batches) with a ``"mask"`` (H, W) / (B, H, W).
        num_classes: K.
        maskige_scale: maskige / input resolution (``tokenizer.downsample / 4`` for GSS geometry).

    Returns:
        The `ConfusionMatrix.compute` dict (``mIoU``, ``IoU`` per class, ...) plus ``images``.
    """
    tokenizer.eval()
    inverse = PaletteInverse(palette[:num_classes].float(), impl=impl)
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    buf: list[torch.Tensor] = []
    count = 0

    def flush() -> None:
        masks = torch.stack(buf) if buf[0].dim() == 2 else torch.cat(buf)
        buf.clear()
        labels = upsample_labels(masks.long(), maskige_scale, num_classes, ignore_index)
        maskige = masks_to_maskige(labels, palette, ignore_index)
        rec = tokenizer.decode(tokenizer.encode(maskige))
        cls = inverse(rec * 255.0)
        onehot = F.one_hot(cls, num_classes).permute(0, 3, 1, 2).float()
        votes = F.avg_pool2d(onehot, maskige_scale, maskige_scale) if maskige_scale > 1 else onehot
        cm.update(votes.argmax(1), masks)

    for item in dataset:
        mask = item["mask"] if isinstance(item, dict) else item
        buf.append(mask)
        count += 1 if mask.dim() == 2 else mask.shape[0]
        if len(buf) >= batch_size:
            flush()
    if buf:
        flush()
    result = dict(cm.compute())
    result["images"] = count
    return result
