"""Argument helpers shared by the ``fastseg`` command groups: sizes, ``--model-arg`` pairs, devices, the world."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_world_args", "model_kwargs", "parse_device", "parse_ints", "parse_size", "shapes_world", "train_config"]


def parse_ints(text: str) -> tuple[int, ...]:
    """``"64"`` -> (64, 64); ``"64,96"`` / ``"64x96"`` -> (64, 96); ``"1,64,96"`` -> (1, 64, 96)."""
    try:
        values = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 512,1024 or 1,512,1024; got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) not in (2, 3) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected H,W or B,H,W with positive integers; got {text!r}")
    return values


def parse_size(text: str) -> tuple[int, int]:
    values = parse_ints(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"a size is H,W (or one int), got {text!r}")
    return values  # type: ignore[return-value]


def model_kwargs(pairs: list[str] | None, flag: str = "--model-arg") -> dict[str, Any]:
    """``["impl=torch", "fpn_channels=64"]`` -> kwargs, values parsed as JSON when they parse."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible")
    return torch.device(name)


def shapes_world(args: argparse.Namespace):
    from ..data.shapes import ShapesConfig, zero_shot_config

    if getattr(args, "world", "default") == "zero-shot":
        return zero_shot_config(image_size=args.image_size)
    return ShapesConfig(image_size=args.image_size)


def train_config(args: argparse.Namespace, out_dir):
    """The `TrainConfig` of ``fastseg train``'s optimisation options."""
    from ..engine import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        save_every=args.save_every,
        out_dir=str(out_dir),
        seed=args.seed,
        device=args.device,
        num_workers=args.workers,
        grad_clip=args.grad_clip,
        amp=args.amp,
    )


def add_world_args(p: argparse.ArgumentParser) -> None:
    """The shapes-world options of the commands that build one."""
    p.add_argument("--image-size", type=parse_size, default=(64, 64), metavar="H[,W]", help="shapes-world image size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra model option (repeatable)")
    p.add_argument(
        "--world",
        choices=["default", "zero-shot"],
        default="default",
        help="shapes world: default, or zero-shot (a fifth texture, snow, as unseen stuff)",
    )
