"""SemPLeS (Lin et al., WACV 2025; spec D): the model-side pieces of the three training runs.

Every run masks the (normalised, augmented) training images with the soft fine CAMs of the positive
(image, class) pairs only (`fastseg.kernels.cam_masked_pairs`; ``M = (U - min U) / (max U - min U + delta)`` with
the CAM ``U`` upsampled bilinearly, ``align_corners=True``), encodes ``X_f = M X`` and ``X_b = (1 - M) X`` with a
frozen CLIP, and compares L2-normalised embeddings by cosine (no logit scale). With ``c(x) = clamp(x, 1e-4, 0.9999)``,
``t_k`` the text "a photo of {class k}." and ``p_k`` the learned background prompt of class k, the losses (means over
the positive pairs) are:

* run (a), segment-label matching, `segment_label_matching_loss`:
  ``L_a = -mean log c(<v_f, t_k>) + lambda_b * (-mean log(1 - c(<v_b, t_k>)))``; trains the CAM head + AAF;
* run (b), contrastive prompt learning, `contrastive_prompt_loss`:
  ``L_b = -mean log c(<v_b, p_k>) + lambda_p * mean log c(<t_k, p_k>)``; trains the prompts only (the CAM model
  of run (a) is frozen, ``delta = 1e-4``). The second term *minimises* the log-similarity (it is not -log(1 - s));
* run (c), prompt-guided refinement, `prompt_refinement_loss`:
  ``L_c = L_a + lambda_r * (-mean log(1 - c(<v_f, p_k>)))``; trains the CAM head + AAF of a model restarted from
  the WeakTr checkpoint (not from run (a)), prompts of run (b) frozen. Upstream encodes ``X_f`` twice per step
  (once per term); here it is encoded once, which gives the same values and gradients at two thirds of the cost.

`SemPLeSRun` binds a WeakTr CAM model (``detach_backbone=True``: no gradient reaches the ViT), a `FrozenCLIP` (never
in a parameter list, never saved with the run's weights) and a `PromptLearner`, and exposes ``loss_a``, ``loss_b``,
``loss_c``. The training loops live in `fastseg.engine.recipes.semples`.

Defaults are the VOC values of spec D.5: lambda_b 2.4, lambda_p 0.02, lambda_r 0.05, prompt length 30, prompts
initialised uniform [0, 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastseg.kernels import cam_masked_pairs

from .clip import PROMPT_PREFIX, FrozenCLIP
from .weaktr import WeakTr

__all__ = [
    "CLAMP_MAX",
    "CLAMP_MIN",
    "PromptLearner",
    "SemPLeSRun",
    "clamp_similarity",
    "class_prompt_texts",
    "contrastive_prompt_loss",
    "positive_pairs",
    "prompt_refinement_loss",
    "segment_label_matching_loss",
]

CLAMP_MIN, CLAMP_MAX = 1e-4, 0.9999
DELTA_MATCHING = 0.1  # runs (a) and (c)
DELTA_PROMPTS = 1e-4  # run (b)


def clamp_similarity(x: torch.Tensor) -> torch.Tensor:
    """``c(x) = clamp(x, 1e-4, 0.9999)``: the gradient is zero outside the range, as upstream."""
    return x.clamp(CLAMP_MIN, CLAMP_MAX)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def segment_label_matching_loss(
    v_f: torch.Tensor, v_b: torch.Tensor, t: torch.Tensor, lambda_b: float = 2.4
) -> dict[str, torch.Tensor]:
    """Run (a) on per-pair normalised features ``(P, D)``: foreground matches the class text, background not."""
    fg = -torch.log(clamp_similarity(_cos(v_f, t))).mean()
    bg = -torch.log(1 - clamp_similarity(_cos(v_b, t))).mean()
    return {"loss": fg + lambda_b * bg, "fg_text": fg.detach(), "bg_text": bg.detach()}


def contrastive_prompt_loss(
    v_b: torch.Tensor, t: torch.Tensor, p: torch.Tensor, lambda_p: float = 0.02
) -> dict[str, torch.Tensor]:
    """Run (b): the background prompt matches the masked background and moves away from the class text."""
    bg = -torch.log(clamp_similarity(_cos(v_b, p))).mean()
    text = torch.log(clamp_similarity(_cos(t, p))).mean()
    return {"loss": bg + lambda_p * text, "bg_prompt": bg.detach(), "text_prompt": text.detach()}


def prompt_refinement_loss(
    v_f: torch.Tensor,
    v_b: torch.Tensor,
    t: torch.Tensor,
    p: torch.Tensor,
    lambda_b: float = 2.4,
    lambda_r: float = 0.05,
) -> dict[str, torch.Tensor]:
    """Run (c): run (a)'s loss plus the masked foreground pushed away from the learned background prompt."""
    out = segment_label_matching_loss(v_f, v_b, t, lambda_b)
    fg_prompt = -torch.log(1 - clamp_similarity(_cos(v_f, p))).mean()
    return {**out, "loss": out["loss"] + lambda_r * fg_prompt, "fg_prompt": fg_prompt.detach()}


def positive_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pair_image, pair_class)`` of the positive entries of multi-hot ``labels (B, K)``, image-major.

    Raises ``ValueError`` naming the images without any positive class (a WSSS image must have one).
    """
    if labels.dim() != 2:
        raise ValueError(f"image labels must have shape (B, K), got {tuple(labels.shape)}")
    positive = labels > 0
    empty = (~positive.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"images {empty[:10]} of the batch have no positive class; every image of a weakly "
            f"supervised training set needs at least one image-level label"
        )
    pair_image, pair_class = positive.nonzero(as_tuple=True)
    return pair_image, pair_class


def class_prompt_texts(class_names: Sequence[str]) -> list[str]:
    """The single template of D.3: "a photo of {name}." per foreground class."""
    return [f"{PROMPT_PREFIX} {name}." for name in class_names]


class PromptLearner(nn.Module):
    """Per-class background prompts: ``(K, length, width)`` learnable token embeddings, uniform [0, 1) init."""

    def __init__(self, class_names: Sequence[str], width: int, length: int = 30) -> None:
        super().__init__()
        if not class_names:
            raise ValueError("PromptLearner needs at least one class name")
        self.class_names = tuple(class_names)
        self.prompts = nn.Parameter(torch.rand(len(class_names), length, width))

    def forward(self, clip: FrozenCLIP) -> torch.Tensor:
        return clip.encode_prompts(self.prompts)


class SemPLeSRun(nn.Module):
    """A WeakTr CAM model + learned prompts, with a frozen CLIP attached outside the module's parameters.

    Args:
        cam_model: WeakTr; set to ``detach_backbone=True`` here (runs (a), (c): only the CAM head and AAF train).
        clip: the frozen CLIP; kept out of ``state_dict`` / ``parameters`` (never trained, never saved).
        class_names: the K foreground class names, in the CAM model's class-token order (background excluded).
        prompt_length: learnable tokens per background prompt (30).
        lambda_b, lambda_p, lambda_r: loss weights (spec D.5, VOC).
        impl: ``impl`` of the fused masking op.

    Raises:
        ValueError: class names that do not match the CAM model's K classes (or its class names when it has them).
    """

    def __init__(
        self,
        cam_model: WeakTr,
        clip: FrozenCLIP,
        class_names: Sequence[str],
        prompt_length: int = 30,
        lambda_b: float = 2.4,
        lambda_p: float = 0.02,
        lambda_r: float = 0.05,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        class_names = tuple(class_names)
        k = cam_model.num_cam_classes
        model_names = tuple(cam_model.pretrained_cfg.class_names or ())[1:]
        if len(class_names) != k or (model_names and len(model_names) == k and model_names != class_names):
            raise ValueError(
                f"the CLIP prompts name {len(class_names)} classes {list(class_names)[:8]} but the CAM "
                f"model has {k} foreground classes {list(model_names)[:8]}; they must match in order"
            )
        self.cam_model = cam_model
        cam_model.detach_backbone = True
        object.__setattr__(self, "clip", clip)  # not a submodule: no parameters, no state_dict entries
        self.class_names = class_names
        self.prompt_learner = PromptLearner(class_names, clip.width, prompt_length)
        self.lambda_b, self.lambda_p, self.lambda_r = lambda_b, lambda_p, lambda_r
        self.impl = impl
        self.fused_calls = 0  # counts masking calls (tests prove the fused op is on the hot path)

    @property
    def pretrained_cfg(self):
        """The CAM model's (class names, background, ...): what the run's checkpoints record."""
        return self.cam_model.pretrained_cfg

    def class_text_features(self) -> torch.Tensor:
        """``(K, D)`` normalised features of "a photo of {class}." (no gradient: CLIP is frozen, texts fixed)."""
        with torch.no_grad():
            return self.clip.encode_text(class_prompt_texts(self.class_names))

    def masked_pairs(
        self, images: torch.Tensor, labels: torch.Tensor, delta: float, cams_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(X_f, X_b, pair_class)`` of the positive pairs from the fine CAMs of the CAM model."""
        pair_image, pair_class = positive_pairs(labels)
        if self.clip.model.token_embedding.weight.device != images.device:
            self.clip.to(images.device)
        with torch.set_grad_enabled(cams_grad):
            fine = self.cam_model.forward_cams(images)["fine"]
        self.fused_calls += 1
        x_f, x_b = cam_masked_pairs(images, fine, pair_image, pair_class, delta, impl=self.impl)
        return x_f, x_b, pair_class

    def loss_a(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run (a), segment-label matching."""
        x_f, x_b, cls = self.masked_pairs(images, labels, DELTA_MATCHING, cams_grad=True)
        t = self.class_text_features()[cls]
        return segment_label_matching_loss(self.clip.encode_image(x_f), self.clip.encode_image(x_b), t, self.lambda_b)

    def loss_b(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run (b), contrastive prompt learning: the CAM model is frozen (no gradient, eval mode)."""
        self.cam_model.eval()
        x_f, x_b, cls = self.masked_pairs(images, labels, DELTA_PROMPTS, cams_grad=False)
        with torch.no_grad():
            v_b = self.clip.encode_image(x_b)
        p = self.prompt_learner(self.clip)  # all K prompts are encoded every step
        return contrastive_prompt_loss(v_b, self.class_text_features()[cls], p[cls], self.lambda_p)

    def loss_c(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run (c), prompt-guided semantic refinement (prompts frozen)."""
        x_f, x_b, cls = self.masked_pairs(images, labels, DELTA_MATCHING, cams_grad=True)
        with torch.no_grad():
            p = self.prompt_learner(self.clip)[cls]
        v_f = self.clip.encode_image(x_f)
        return prompt_refinement_loss(
            v_f, self.clip.encode_image(x_b), self.class_text_features()[cls], p, self.lambda_b, self.lambda_r
        )
