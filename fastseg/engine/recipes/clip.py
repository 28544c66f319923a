"""`fastseg clip train`: contrastive training of a small CLIP on the shapes world's captions, and its evaluation.

No CLIP weights can be downloaded here, so SemPLeS on the shapes world uses a CLIP trained on the world itself:
each image is paired with one of its captions (`fastseg.data.weak.caption_variants`: the full description with
colours and textures, or a short "a photo of {shape / texture}." form, drawn at random each step), and the
symmetric InfoNCE loss of CLIP (learned logit scale) is minimised with AdamW. Captions are image-level text: no
pixel label is used. The result is a plain open_clip state dict that `fastseg.models.clip.build_clip` loads.

`clip_retrieval_accuracy` reports image->text and text->image top-1 retrieval over a held-out set (a retrieved
caption counts as correct when its text equals the image's own, since identical captions occur), and the zero-shot
accuracy of naming a present shape from the "a photo of {shape}." prompts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ...data.shapes import ShapesDataset
from ...data.weak import caption_variants
from ...models.clip import FrozenCLIP, build_clip
from ..trainer import TrainConfig, TrainResult, train

__all__ = ["CaptionedShapes", "clip_retrieval_accuracy", "train_clip"]


class CaptionedShapes(Dataset):
    """World images with their caption variants joined by newlines (``"captions"``)."""

    def __init__(self, split: str = "train", length: int | None = None, seed: int = 0) -> None:
        self.world = ShapesDataset(split, length=length, seed=seed)

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.world[index]
        return {"image": sample["image"], "captions": "\n".join(caption_variants(sample, self.world.config))}


def _contrastive_loss(model: torch.nn.Module, batch: dict[str, Any], tokenizer: Any) -> dict[str, torch.Tensor]:
    images = batch["image"]
    if bool(torch.rand(()) < 0.5):
        images = images.flip(-1)
    choices = [c.split("\n") for c in batch["captions"]]
    texts = [opts[int(torch.randint(0, len(opts), ()))] for opts in choices]
    tokens = tokenizer(texts, context_length=model.context_length).to(images.device)
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
    # pairs with identical texts are not negatives of each other: soft targets over equal captions
    same = torch.tensor([[a == b for b in texts] for a in texts], dtype=logits.dtype, device=logits.device)
    target = same / same.sum(1, keepdim=True)
    loss = 0.5 * (
        torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.t().log_softmax(1), 1).mean()
    )
    return {"loss": loss, "logit_scale": model.logit_scale.exp().detach()}


def train_clip(
    out_dir: str | os.PathLike,
    config_name: str = "shapes-tiny-clip",
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 5e-4,
    weight_decay: float = 0.1,
    seed: int = 0,
    train_length: int = 4096,
    eval_length: int = 256,
    resume: str | None = "auto",
    save_every: int = 100,
    device: str = "auto",
    stop_at_step: int | None = None,
) -> tuple[TrainResult, dict[str, float]]:
    """Train CLIP ``config_name`` from scratch; writes ``model.safetensors`` and ``retrieval.json`` to ``out_dir``."""
    clip = build_clip(config_name)
    model = clip.trainable()
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=min(50, steps // 10),
        poly_power=1.0,
        out_dir=str(out_dir),
        seed=seed,
        save_every=save_every,
        device=device,
        progress=False,
        log_every=max(1, min(10, steps)),
    )
    result = train(
        model,
        CaptionedShapes("train", length=train_length),
        cfg,
        resume=resume,
        loss_fn=lambda m, b: _contrastive_loss(m, b, clip.tokenizer),
        stop_at_step=stop_at_step,
    )
    clip.freeze()
    metrics: dict[str, float] = {}
    if result.end_step >= steps:
        metrics = clip_retrieval_accuracy(clip, CaptionedShapes("val", length=eval_length))
        metrics.update({"config": config_name, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed})
        Path(out_dir, "retrieval.json").write_text(json.dumps(metrics, indent=2))
    return result, metrics


@torch.no_grad()
def clip_retrieval_accuracy(clip: FrozenCLIP, dataset: CaptionedShapes, batch_size: int = 64) -> dict[str, float]:
    """Top-1 image->text and text->image retrieval on full captions, and zero-shot shape naming accuracy."""
    from ...data.weak import weak_class_names

    device = clip.model.token_embedding.weight.device
    images, captions = [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        images.append(sample["image"])
        captions.append(sample["captions"].split("\n"))
    img = torch.cat(
        [
            clip.encode_image(torch.stack(images[i : i + batch_size]).to(device))
            for i in range(0, len(images), batch_size)
        ]
    )
    full = [c[0] for c in captions]
    txt = torch.cat([clip.encode_text(full[i : i + batch_size]) for i in range(0, len(full), batch_size)])
    sim = img @ txt.t()
    i2t = sum(full[int(j)] == full[i] for i, j in enumerate(sim.argmax(1))) / len(full)
    t2i = sum(full[int(j)] == full[i] for i, j in enumerate(sim.argmax(0))) / len(full)
    shapes = list(weak_class_names(dataset.world.config)[1:])
    names = clip.encode_text([f"a photo of {s}." for s in shapes])
    guess = (img @ names.t()).argmax(1)
    present = [{s for s in shapes if f"a photo of {s}." in c} for c in captions]
    zero_shot = sum(shapes[int(g)] in p for g, p in zip(guess, present)) / len(present)
    return {
        "image_to_text_top1": i2t,
        "text_to_image_top1": t2i,
        "zero_shot_shape_top1": zero_shot,
        "chance_image_to_text": 1 / len(set(full)),
        "num_images": len(full),
    }
