"""GSS stage 1 (Chen et al., CVPR 2023): fitting the small tokenizer, and the tokenizer's round trip.

GSS's premise is that an off-the-shelf **image** tokenizer, never trained on masks, can carry maskiges (the paper uses
the frozen DALL-E dVAE). The DALL-E weights cannot be downloaded here, so fastseg fits the small `MaskigeVQVAE`
itself, in one of two clearly different ways:

* `fit_image_tokenizer` (``fastseg gss fit-tokenizer --on images``): **the faithful setting.** Trained only on the
  world's RGB images (reconstruction + VQ loss); it never sees a label, a maskige or the palette. It is then frozen
  and used for maskiges, as GSS uses DALL-E.
* `train_maskige_vqvae` (``fastseg gss fit-tokenizer --on masks``): **ours, not the paper's.** Trained on maskiges of
  the training masks with a class-aware palette term: what a mask-specialised tokenizer gives.

`roundtrip_miou` (``fastseg gss roundtrip``) measures either tokenizer's round trip: GT -> maskige -> tokens ->
maskige -> classes (what GSS-FF reaches if it predicts the encoder's tokens exactly). These are training procedures
over a `fastseg.models.gss` model's parts, so they live here rather than in the model file. `TOKENIZER_TRAINED_ON` is
the safetensors metadata key the CLI writes to say which fit produced a tokenizer file (read back by
`GSSSegmenter.tokenizer_trained_on`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ...data.shapes import MEAN, STD, unnormalize
from ...layers.vq import PaletteInverse
from ...metrics import ConfusionMatrix
from ...models.gss import TOKENIZER_TRAINED_ON, fill_ignore_from_neighbours, masks_to_maskige, upsample_labels
from ...models.gss_tokenizers import MaskigeTokenizer, MaskigeVQVAE

__all__ = ["TOKENIZER_TRAINED_ON", "fit_image_tokenizer", "roundtrip_miou", "train_maskige_vqvae"]


def _fit_vqvae(
    tokenizer: MaskigeVQVAE,
    batches: Iterable[Any],
    steps: int,
    lr: float,
    make_target: Callable[[Any], torch.Tensor],
    extra_loss: Callable[[Any, torch.Tensor], tuple[str, torch.Tensor]] | None,
    log_every: int,
    log: Any,
    init_codebook: bool,
    who: str,
) -> list[dict[str, float]]:
    """The VQ-VAE fitting loop shared by both fits: ``make_target(batch)`` gives the (B, 3, H, W) [0, 1] image to
    reconstruct; loss = MSE + VQ loss (+ ``extra_loss(batch, recon)``, named). Batches are cycled."""
    if steps < 1:
        raise ValueError(f"{who}: steps must be >= 1, got {steps}")
    params = [p for n, p in tokenizer.named_parameters() if not n.startswith("quantizer.")]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    tokenizer.train()
    history: list[dict[str, float]] = []
    it = iter(batches)
    start = time.perf_counter()
    for step in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(batches)
            batch = next(it)
        target = make_target(batch)
        z = tokenizer.enc(target * 2 - 1)
        tokenizer.quantizer.eval()  # EMA / restart updates are applied after the step (see below)
        out = tokenizer.quantizer(z)
        if step == 0 and init_codebook:  # data-dependent codebook init: codes start on encoder outputs, not in a clump
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
        loss = mse + out.loss
        extra_name, extra = ("", None) if extra_loss is None else extra_loss(batch, recon)
        if extra is not None:
            loss = loss + extra
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
            rec = {
                "step": step,
                "loss": float(loss.detach()),
                "mse": float(mse.detach()),
                "perplexity": float(out.perplexity),
                "seconds": time.perf_counter() - start,
            }
            if extra is not None:
                rec[extra_name] = float(extra.detach())
            history.append(rec)
            if log is not None:
                log(rec)
    tokenizer.requires_grad_(False)
    tokenizer.eval()
    return history


def fit_image_tokenizer(
    tokenizer: MaskigeVQVAE,
    batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor],
    steps: int,
    lr: float = 3e-3,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    log_every: int = 50,
    log: Any = None,
    init_codebook: bool = True,
    colour_augment: bool = False,
) -> list[dict[str, float]]:
    """GSS's premise: fit a `MaskigeVQVAE` on **images only** (``fastseg gss fit-tokenizer --on images``).

    The tokenizer learns to reconstruct RGB images (MSE in [0, 1] + the VQ loss: EMA codebook, commitment 0.25) and
    never sees a label, a maskige or the palette; frozen afterwards, it carries maskiges the way GSS uses the
    off-the-shelf DALL-E dVAE.

    Args:
        tokenizer: the `MaskigeVQVAE` to fit (in place).
        batches: an iterable (cycled) of batches: a mapping whose ``"image"`` (B, 3, H, W) is normalised with
            ``mean`` / ``std`` (a dataset batch; **only** ``"image"`` is read, any ``"mask"`` is ignored), or a
            (B, 3, H, W) tensor already in [0, 1].
        steps: optimiser steps (Adam, ``lr`` with a poly-0.9 decay).
        mean, std: the normalisation to undo (default: the shapes world's).
        init_codebook: put the codes on encoder outputs of the first batch (False to continue a fit).
        colour_augment: per image, a random permutation of the RGB channels and, with probability 1/2, the
            negative ``1 - x`` (global generator). Still label-free: it widens the colours a small world's images
            cover, standing in for the breadth of the natural images DALL-E's tokenizer was trained on.

    Returns:
        The logged history (``loss``, ``mse``, ``perplexity``). The tokenizer is left frozen and in eval mode.
    """
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def image_of(batch: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            if batch.dim() != 4 or batch.shape[1] != 3 or not batch.is_floating_point():
                raise ValueError(
                    f"fit_image_tokenizer: a tensor batch must be float (B, 3, H, W), got "
                    f"{batch.dtype} {tuple(batch.shape)}"
                )
            if float(batch.min()) < 0 or float(batch.max()) > 1:
                raise ValueError(
                    "fit_image_tokenizer: a tensor batch must hold RGB in [0, 1]; pass dataset batches "
                    "(mappings with a normalised 'image') to have them unnormalised"
                )
            return batch.float()
        if not isinstance(batch, Mapping) or "image" not in batch:
            raise ValueError(
                f"fit_image_tokenizer: a batch must be a mapping with 'image' or a tensor, got {type(batch).__name__}"
            )
        return unnormalize(batch["image"].float(), mean, std)

    def target_of(batch: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        image = image_of(batch)
        if not colour_augment:
            return image
        perms = torch.stack([torch.randperm(3) for _ in range(image.shape[0])])  # (B, 3)
        image = torch.gather(image, 1, perms[:, :, None, None].expand_as(image))
        invert = torch.rand(image.shape[0]) < 0.5
        return torch.where(invert[:, None, None, None], 1 - image, image)

    return _fit_vqvae(
        tokenizer, batches, steps, lr, target_of, None, log_every, log, init_codebook, "fit_image_tokenizer"
    )


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
    """**Ours, not GSS's**: fit a `MaskigeVQVAE` on maskiges of ``masks`` (``fastseg gss fit-tokenizer --on masks``).

    ``masks`` is an iterable of (B, H, W) class-id batches, cycled. Loss: MSE of the reconstruction in [0, 1] + the
    VQ loss (EMA codebook, commitment 0.25) + ``palette_ce_weight`` x cross-entropy of the soft palette assignment
    ``softmax(-||rgb - palette_k||^2 / temperature)`` against the class (a class-aware term that aims the tokenizer
    at the round trip rather than at RGB fidelity). A tokenizer trained on label maps departs from GSS's premise
    (an off-the-shelf image tokenizer); `fit_image_tokenizer` is the faithful setting. Ignore pixels are dropped from
    the palette term and filled from their labelled neighbours in the maskige (`fill_ignore_from_neighbours`): GSS
    never encodes the ignore colour.

    ``init_codebook`` puts the codes on encoder outputs of the first batch (pass False to continue a fit).
    Returns the logged history. The tokenizer is left frozen (``requires_grad=False``) and in eval mode.
    """
    k = palette.shape[0] - 1
    pal = palette[:k].float() / 255.0

    def palette_ce(m: torch.Tensor, recon: torch.Tensor) -> tuple[str, torch.Tensor]:
        d = ((recon[:, None] - pal[None, :, :, None, None]) ** 2).sum(2)
        ce = F.cross_entropy(-d / temperature, m.long(), ignore_index=ignore_index)
        return "palette_ce", palette_ce_weight * ce

    return _fit_vqvae(
        tokenizer,
        masks,
        steps,
        lr,
        lambda m: masks_to_maskige(fill_ignore_from_neighbours(m, k, ignore_index), palette, ignore_index),
        palette_ce,
        log_every,
        log,
        init_codebook,
        "train_maskige_vqvae",
    )


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
    """The tokenizer's round trip (``fastseg gss roundtrip``): GT -> X -> tokens -> decoder -> X^-1 -> classes.

    GT is upsampled to the maskige resolution (`upsample_labels`), its ignore pixels filled from their labelled
    neighbours (`fill_ignore_from_neighbours`: GSS fills them with its auxiliary head's prediction and never encodes
    the ignore colour, so neither does its round trip), the class map voted back to the input resolution, and mIoU
    taken against GT (ignore excluded).

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
        maskige = masks_to_maskige(
            fill_ignore_from_neighbours(labels, num_classes, ignore_index), palette, ignore_index
        )
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
