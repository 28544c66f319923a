"""Maskige tokenizers for GSS behind one interface: the DALL-E dVAE and a small VQ-VAE that fastseg fits itself.

Interface (`MaskigeTokenizer`): a maskige is an RGB image in [0, 1] (palette colours / 255) at ``downsample`` times
the token grid.

* ``encode(maskige) -> ids (B, h, w)`` int64 token ids, no gradient (the tokenizer is the frozen posterior q(z|x));
* ``embed(ids) -> codes (B, code_dim, h, w)``: the decoder's first layer as a **gather** (ONNX ``Gather``);
* ``embed_dense(ids)``: the same through one-hot + dense 1x1 conv (the reference, what the official code runs);
* ``decode_codes(codes) -> maskige (B, 3, h * d, w * d)`` in [0, 1];
* ``decode(ids) = decode_codes(embed(ids))``.

DALL-E dVAE (Ramesh et al. 2021; the frozen tokenizer of GSS), spec A.3.1. Parameter names equal those of the
official pickled modules (``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.b``, ...) so a converted
state dict loads without renaming.

* Encoder: 7x7 conv 3 -> n_hid, 4 groups x 2 residual blocks (widths n_hid x 1, 2, 4, 8), 2x2 max-pool after groups
  1-3, ReLU + 1x1 conv -> vocab logits; the token is the argmax (no codebook distance anywhere). Input is
  ``map_pixels(v) = 0.8 v + 0.1``.
* Residual block: identity (1x1 conv when the width changes) + (1 / n_layers^2) * res_path, n_layers = 8; encoder
  res_path ReLU,3x3,ReLU,3x3,ReLU,3x3,ReLU,1x1, decoder res_path ReLU,1x1,ReLU,3x3,ReLU,3x3,ReLU,3x3, hidden out / 4.
* Decoder: 1x1 conv vocab -> 128 on one-hot ids (= gather of column ``id`` of the 128 x vocab weight + bias), 4 groups
  x 2 blocks (widths n_hid x 8, 4, 2, 1), nearest 2x upsampling after groups 1-3, ReLU + 1x1 conv -> 6 channels of which
  0..2 are the logit-Laplace means: ``maskige = unmap(sigmoid(mu)) = clamp((sigmoid(mu) - 0.1) / 0.8, 0, 1)``. Only
  the 3 mean channels are computed here (the scale channels are discarded by GSS anyway).
* fp16 (``use_mixed_precision=True``, as the official wrapper): on CUDA every conv runs in fp16 except the decoder's
  input conv and the encoder's output conv, which stay fp32; on CPU everything is fp32. Results then differ from an
  fp32 run at fp16 level (ties in the encoder argmax may flip).

OpenAI's DALL-E weights are pickled modules (``encoder.pkl`` / ``decoder.pkl``): `convert_dalle_pickle` turns them
into safetensors, and only unpickles arbitrary objects when called with ``trust_pickle=True``. These are the frozen
tokenizer's weights; GSS's own checkpoints (mmseg ``.pth`` files of the prior head) have no converter here.
"""

from __future__ import annotations

import math
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.vq import VectorQuantizer

__all__ = [
    "LOGIT_LAPLACE_EPS",
    "DalleDVAE",
    "DalleDecoder",
    "DalleEncoder",
    "MaskigeTokenizer",
    "MaskigeVQVAE",
    "convert_dalle_pickle",
    "map_pixels",
    "unmap_pixels",
]

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [0.1, 0.9], the dVAE encoder's input range."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


class MaskigeTokenizer(nn.Module):
    """Common interface of the GSS tokenizers (see the module docstring). Frozen: no parameter requires grad."""

    vocab_size: int
    code_dim: int
    downsample: int

    @torch.no_grad()
    def encode(self, maskige: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_dense(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(self.embed(ids))

    def _check_maskige(self, maskige: torch.Tensor) -> None:
        if maskige.dim() != 4 or maskige.shape[1] != 3 or not maskige.is_floating_point():
            raise ValueError(f"maskige must be a float (B, 3, H, W) tensor in [0, 1], got {tuple(maskige.shape)}")
        h, w = maskige.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"maskige size {h}x{w} is not a multiple of the tokenizer's downsampling {self.downsample}"
            )

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 3 or ids.is_floating_point():
            raise ValueError(f"token ids must be an integer (B, h, w) tensor, got {ids.dtype} {tuple(ids.shape)}")


# --------------------------------------------------------------------------------------------------------------------
# DALL-E dVAE
# --------------------------------------------------------------------------------------------------------------------


class _DalleConv(nn.Module):
    """Square conv with 'same' padding and parameters named ``w`` / ``b`` (the official names).

    ``half_on_cuda``: run in fp16 when the weights live on a CUDA device (the official mixed precision).
    """

    def __init__(self, n_in: int, n_out: int, kw: int, half_on_cuda: bool = True) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw), requires_grad=False)
        self.b = nn.Parameter(torch.zeros(n_out), requires_grad=False)
        # Official init (std 1/sqrt(fan_in)) so that random-weight models keep activations of order one.
        nn.init.normal_(self.w, std=1 / math.sqrt(n_in * kw * kw))
        self.half_on_cuda = half_on_cuda
        self.use_mixed_precision = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.w, self.b
        if self.half_on_cuda and self.use_mixed_precision and w.is_cuda:
            x, w, b = x.half(), w.half(), b.half()
        else:
            x = x.float()
        return F.conv2d(x, w, b, padding=(w.shape[-1] - 1) // 2)


class _DalleBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int, decoder: bool) -> None:
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = _DalleConv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        kernels = (1, 3, 3, 3) if decoder else (3, 3, 3, 1)
        widths = (n_in, hid, hid, hid, n_out)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, k in enumerate(kernels):
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = _DalleConv(widths[i], widths[i + 1], k)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(blocks: list[nn.Module], tail: tuple[str, nn.Module] | None) -> nn.Sequential:
    items: list[tuple[str, nn.Module]] = [(f"block_{i + 1}", blk) for i, blk in enumerate(blocks)]
    if tail is not None:
        items.append(tail)
    return nn.Sequential(OrderedDict(items))


class DalleEncoder(nn.Module):
    """DALL-E dVAE encoder: map_pixels'd RGB (B, 3, H, W) -> vocab logits (B, vocab, H/8, W/8)."""

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192) -> None:
        super().__init__()
        n_layers = 4 * n_blk_per_group
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
        groups: list[tuple[str, nn.Module]] = [("input", _DalleConv(3, n_hid, 7))]
        for g in range(4):
            blocks = [
                _DalleBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1], n_layers, decoder=False)
                for i in range(n_blk_per_group)
            ]
            groups.append((f"group_{g + 1}", _group(blocks, ("pool", nn.MaxPool2d(2)) if g < 3 else None)))
        groups.append(
            (
                "output",
                nn.Sequential(
                    OrderedDict(
                        [("relu", nn.ReLU()), ("conv", _DalleConv(8 * n_hid, vocab_size, 1, half_on_cuda=False))]
                    )
                ),
            )
        )
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).float()


class DalleDecoder(nn.Module):
    """DALL-E dVAE decoder. ``blocks.input`` is the vocab -> n_init "codebook" conv; see `DalleDVAE.embed`."""

    def __init__(self, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192) -> None:
        super().__init__()
        n_layers = 4 * n_blk_per_group
        widths = [n_init, 8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid]
        groups: list[tuple[str, nn.Module]] = [("input", _DalleConv(vocab_size, n_init, 1, half_on_cuda=False))]
        for g in range(4):
            blocks = [
                _DalleBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1], n_layers, decoder=True)
                for i in range(n_blk_per_group)
            ]
            up = ("upsample", nn.Upsample(scale_factor=2, mode="nearest")) if g < 3 else None
            groups.append((f"group_{g + 1}", _group(blocks, up)))
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _DalleConv(n_hid, 6, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One-hot (or any) (B, vocab, h, w) float input -> the 6 raw output channels (the official forward)."""
        return self.blocks(x).float()

    def forward_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, n_init, h, w) codes (the input conv's output) -> the 3 mean channels only (B, 3, 8h, 8w)."""
        x = codes
        for name in ("group_1", "group_2", "group_3", "group_4"):
            x = getattr(self.blocks, name)(x)
        x = F.relu(x)
        conv = self.blocks.output.conv
        w, b = conv.w[:3], conv.b[:3]  # the scale channels 3..5 are never used by GSS: skip half the output conv
        if conv.use_mixed_precision and w.is_cuda:
            x, w, b = x.half(), w.half(), b.half()
        return F.conv2d(x.to(w.dtype), w, b).float()


class DalleDVAE(MaskigeTokenizer):
    """The DALL-E dVAE as a `MaskigeTokenizer` (vocab 8192, code dim 128, downsampling 8 by default).

    Args:
        n_hid, n_blk_per_group, vocab_size, n_init: architecture (official: 256, 2, 8192, 128); smaller values build
            test-size models.
        use_mixed_precision: fp16 convs on CUDA as the official wrapper does (see the module docstring).
        build_encoder: the encoder is only needed in training (target tokens); inference-only models can skip it.
    """

    def __init__(
        self,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        vocab_size: int = 8192,
        n_init: int = 128,
        use_mixed_precision: bool = True,
        build_encoder: bool = True,
    ) -> None:
        super().__init__()
        self.vocab_size, self.code_dim, self.downsample = vocab_size, n_init, 8
        self.encoder = DalleEncoder(n_hid, n_blk_per_group, vocab_size) if build_encoder else None
        self.decoder = DalleDecoder(n_init, n_hid, n_blk_per_group, vocab_size)
        self.set_mixed_precision(use_mixed_precision)
        self.requires_grad_(False)

    def set_mixed_precision(self, enabled: bool) -> None:
        for m in self.modules():
            if isinstance(m, _DalleConv):
                m.use_mixed_precision = enabled

    @torch.no_grad()
    def encode(self, maskige: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise ValueError("this DalleDVAE was built with build_encoder=False; it cannot make target tokens")
        self._check_maskige(maskige)
        return self.encoder(map_pixels(maskige.float())).argmax(1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(ids)
        conv = self.decoder.blocks.input
        table = conv.w.reshape(conv.w.shape[0], -1).t()  # (vocab, 128): row id = column id of the 1x1 conv
        return (F.embedding(ids, table) + conv.b).permute(0, 3, 1, 2)

    def embed_dense(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(ids)
        onehot = F.one_hot(ids, self.vocab_size).permute(0, 3, 1, 2).float()
        return self.decoder.blocks.input(onehot)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return unmap_pixels(torch.sigmoid(self.decoder.forward_codes(codes)))


def convert_dalle_pickle(
    src: str | os.PathLike, dst: str | os.PathLike, trust_pickle: bool = False, prefix: str = ""
) -> Path:
    """Convert OpenAI's DALL-E dVAE ``encoder.pkl`` / ``decoder.pkl`` (pickled modules) to a safetensors file.

    These are the weights of GSS's frozen tokenizer, not a GSS checkpoint (fastseg has no converter for those).

    A pickled module can run arbitrary code when loaded. Files holding only tensors (a plain state dict) are read
    with ``torch.load(weights_only=True)``; anything else is refused unless ``trust_pickle=True`` is given, which
    should only be done for files from a source you trust (the OpenAI CDN). Unpickling the official files also needs
    the ``dall-e`` package importable (``pip install dall-e attrs``).

    Args:
        src: the pickle.
        dst: the safetensors file to write (never the source; an existing file is replaced atomically).
        trust_pickle: allow a full unpickle of ``src``.
        prefix: prepended to every key (e.g. ``"encoder."`` or ``"decoder."`` to load into a `DalleDVAE`).

    Returns:
        The path written. Keys are those of the official module (``blocks.input.w``, ...).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: the file needs a full unpickle and ``trust_pickle`` is False, or it holds no tensors, or
            ``dst`` is ``src``.
    """
    from ..checkpoint import save_weights

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"DALL-E pickle {src} does not exist")
    if src.resolve() == dst.resolve():
        raise ValueError(f"convert_dalle_pickle: refusing to overwrite the source {src} with its conversion")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as err:
        if not trust_pickle:
            raise ValueError(
                f"{src} is a pickled object, not plain tensors: loading it would execute code from the file. "
                f"Refusing without trust_pickle=True (pass it only for a file from a source you trust, e.g. the "
                f"official cdn.openai.com/dall-e/{{encoder,decoder}}.pkl). Reason: {str(err).splitlines()[0][:200]}"
            ) from None
        obj = torch.load(src, map_location="cpu", weights_only=False)  # the caller vouched for this file
    if isinstance(obj, nn.Module):
        state = obj.state_dict()
    elif isinstance(obj, dict):
        state = obj.get("state_dict", obj)
    else:
        raise ValueError(f"{src} holds a {type(obj).__name__}, neither a module nor a state dict")  # noqa: TRY004
    tensors = {prefix + k: v.detach().float().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{src} holds no tensors")
    return save_weights(tensors, dst)


# --------------------------------------------------------------------------------------------------------------------
# The small maskige VQ-VAE (trained by fastseg on CPU in minutes)
# --------------------------------------------------------------------------------------------------------------------


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class MaskigeVQVAE(MaskigeTokenizer):
    """A small VQ-VAE for maskiges: strided convs down by ``downsample``, nearest-code quantisation
    (`VectorQuantizer`, i.e. `vq_nearest`), nearest-upsampling conv decoder, output in [0, 1] through a sigmoid.

    Unlike the dVAE its tokens come from a nearest-code search, not an argmax: this is the stand-in for the DALL-E
    weights that cannot be downloaded here. It is fitted once, then frozen, in one of two ways:
    `fastseg.engine.recipes.gss.fit_image_tokenizer` on images only (GSS's premise: an image tokenizer never trained
    on masks), or `fastseg.engine.recipes.gss.train_maskige_vqvae` on maskiges of the training masks with a
    class-aware palette term (ours; it departs from the premise).

    Args:
        vocab_size: codebook size.
        code_dim: code dimension.
        width: conv width.
        downsample: a power of two (4 gives tokens at the input's 1/4 with maskiges at input resolution).
    """

    def __init__(self, vocab_size: int = 512, code_dim: int = 32, width: int = 64, downsample: int = 4) -> None:
        super().__init__()
        if downsample < 2 or downsample & (downsample - 1):
            raise ValueError(f"MaskigeVQVAE: downsample must be a power of two >= 2, got {downsample}")
        self.vocab_size, self.code_dim, self.downsample = vocab_size, code_dim, downsample
        steps = downsample.bit_length() - 1
        enc: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
        for _ in range(steps):
            enc += [nn.ReLU(), nn.Conv2d(width, width, 4, stride=2, padding=1)]
        enc += [_ResBlock(width), _ResBlock(width), nn.ReLU(), nn.Conv2d(width, code_dim, 1)]
        self.enc = nn.Sequential(*enc)
        self.quantizer = VectorQuantizer(vocab_size, code_dim, beta=0.25, ema=True, dead_code_threshold=1.0)
        dec: list[nn.Module] = [nn.Conv2d(code_dim, width, 3, padding=1), _ResBlock(width), _ResBlock(width)]
        for _ in range(steps):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        dec += [nn.Conv2d(width, 3, 1)]
        self.dec = nn.Sequential(*dec)
        self.requires_grad_(False)

    def quantize(self, maskige: torch.Tensor):
        """Training entry: (B, 3, H, W) in [0, 1] -> `VQOutput` of the encoder features (straight-through)."""
        self._check_maskige(maskige)
        return self.quantizer(self.enc(maskige * 2 - 1))

    @torch.no_grad()
    def encode(self, maskige: torch.Tensor) -> torch.Tensor:
        self._check_maskige(maskige)
        flat = self.enc(maskige.float() * 2 - 1)
        return self.quantizer(flat).indices

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(ids)
        return F.embedding(ids, self.quantizer.codebook).permute(0, 3, 1, 2)

    def embed_dense(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(ids)
        onehot = F.one_hot(ids, self.vocab_size).permute(0, 3, 1, 2).float()
        return F.conv2d(onehot, self.quantizer.codebook.t()[:, :, None, None])

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dec(codes))
