"""CLIP for SemPLeS: an open_clip model built from a config name, weights from a local file only, frozen.

SemPLeS (spec D.3) uses OpenAI CLIP ViT-B/32 frozen: image and text embeddings are L2-normalised and compared by
cosine (no logit scale); gradients flow to the *inputs* (the CAM-masked images, the learnable prompt embeddings),
never to CLIP's weights. `FrozenCLIP` enforces that: every parameter has ``requires_grad=False``, the module stays
in eval mode, and `FrozenCLIP.trainable` exists only for `fastseg clip train`.

Configs: any open_clip architecture name (``"ViT-B-32"`` for real use, its weights from ``--clip-checkpoint``),
plus ``"shapes-tiny-clip"``: a small CLIP for the 64 x 64 shapes world (ViT patch 8, width 128, 4 layers; text
width 128, 4 layers, a 48-token context (prompts need 37) and the standard BPE vocabulary) that `fastseg clip train` trains on the
world's captions, since no CLIP weights can be downloaded here. The tokenizer is open_clip's bundled BPE (offline).

`FrozenCLIP.encode_prompts` implements the learned background prompt of D.3: token sequence ``[SOT] + tok("a photo
of") + n learnable embeddings + tok(".") + [EOT]`` padded to the context length, through CLIP's text transformer
(causal mask, positional embeddings), feature at the EOT position (index ``1 + 3 + n + 1``) times the projection.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLIP_CONFIGS", "FrozenCLIP", "build_clip", "list_clip_configs"]

# fastseg's own CLIP configurations (open_clip CLIP(**cfg) keyword arguments).
CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "shapes-tiny-clip": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
    },
}
PROMPT_PREFIX = "a photo of"


def list_clip_configs() -> list[str]:
    import open_clip

    return sorted(CLIP_CONFIGS) + open_clip.list_models()


class FrozenCLIP(nn.Module):
    """An open_clip ``CLIP`` with frozen weights; see the module docstring."""

    def __init__(self, model: nn.Module, config_name: str, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.config_name = config_name
        self.tokenizer = tokenizer
        self.image_size = int(
            model.visual.image_size[0]
            if isinstance(model.visual.image_size, (tuple, list))
            else model.visual.image_size
        )
        self.width = int(model.token_embedding.weight.shape[1])
        self.context_length = int(model.context_length)
        self.freeze()

    def freeze(self) -> FrozenCLIP:
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> FrozenCLIP:  # frozen CLIP never leaves eval mode
        return super().train(False)

    def trainable(self) -> nn.Module:
        """The underlying open_clip model with gradients on, for contrastive training (`fastseg clip train`)."""
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.model.train()
        return self.model

    # -- encoders ---------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, context_length=self.context_length).to(self.model.token_embedding.weight.device)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings; inputs of another size are resized bilinearly to CLIP's input size."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return F.normalize(self.model.encode_image(images), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenize(texts)), dim=-1)

    def encode_prompts(self, prompts: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features of learned prompts ``(K, n, width)``: "a photo of" + n vectors + "."."""
        if prompts.dim() != 3 or prompts.shape[-1] != self.width:
            raise ValueError(
                f"prompts must have shape (K, n, {self.width}) for CLIP {self.config_name!r}, got "
                f"{tuple(prompts.shape)}"
            )
        num, length = prompts.shape[:2]
        if 1 + 3 + length + 2 > self.context_length:
            raise ValueError(f"prompt length {length} does not fit CLIP's context of {self.context_length} tokens")
        model = self.model
        template = self.tokenize([f"{PROMPT_PREFIX} ."])[0]  # [SOT] a photo of . [EOT] 0 ...
        head, tail = template[:4], template[4:6]  # [SOT] a photo of  |  . [EOT]
        pad = template.new_zeros(self.context_length - 4 - length - 2)
        emb = model.token_embedding
        fixed_head = emb(head).unsqueeze(0).expand(num, -1, -1)
        fixed_tail = emb(torch.cat([tail, pad])).unsqueeze(0).expand(num, -1, -1)
        cast = model.transformer.get_cast_dtype()
        x = torch.cat([fixed_head, prompts.to(fixed_head.dtype), fixed_tail], 1).to(cast)
        x = x + model.positional_embedding.to(cast)
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)[:, 4 + length + 1]  # the EOT position
        proj = model.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)


def _create(config_name: str) -> nn.Module:
    import open_clip

    if config_name in CLIP_CONFIGS:
        return open_clip.CLIP(**copy.deepcopy(CLIP_CONFIGS[config_name]))
    if config_name not in open_clip.list_models():
        raise ValueError(
            f"unknown CLIP config {config_name!r}; use one of {sorted(CLIP_CONFIGS)} or an open_clip "
            f"architecture name such as 'ViT-B-32'"
        )
    return open_clip.create_model(config_name, pretrained=None)


def build_clip(
    config_name: str = "shapes-tiny-clip", checkpoint: str | os.PathLike | None = None, require_checkpoint: bool = False
) -> FrozenCLIP:
    """Build CLIP ``config_name`` and load ``checkpoint`` (a local .safetensors / .pt file) into it; frozen.

    Raises:
        ValueError: unknown config, no checkpoint while one is required, or a checkpoint of another architecture
            (missing / unexpected keys or mismatched shapes; the message lists some).
        FileNotFoundError: the checkpoint path does not exist.
    """
    import open_clip

    model = _create(config_name)
    if checkpoint is None and require_checkpoint:
        raise ValueError(
            f"CLIP {config_name!r} needs weights: pass --clip-checkpoint FILE (fastseg never downloads "
            f"weights; `fastseg clip train` trains the shapes-tiny-clip)"
        )
    if checkpoint is not None:
        from ..checkpoint import load_state_dict

        state = load_state_dict(checkpoint)
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
        state = {k[len("model.") :] if k.startswith("model.") else k: v for k, v in state.items()}
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [
            f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{checkpoint} is not a checkpoint of CLIP {config_name!r}: {len(missing)} missing keys "
                f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, shape mismatches "
                f"{wrong[:3]}"
            )
        model.load_state_dict(state)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the bundled BPE vocabulary: no download
    return FrozenCLIP(model, config_name, tokenizer)
