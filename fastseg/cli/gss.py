"""``fastseg gss ...``: the GSS stage commands (wired into `fastseg.cli.main` by ``add_gss_commands(subparsers)``).

* ``fastseg gss roundtrip MODEL [--checkpoint F | --tokenizer-checkpoint F]``: the tokenizer's round trip,
  GT -> maskige -> tokens -> maskige -> classes, as mIoU on the shapes world (`roundtrip_miou`).
* ``fastseg gss fit-tokenizer MODEL --on images|masks --out F``: stage 1 for the small VQ-VAE, then roundtrip.
  ``--on images`` (default; `fit_image_tokenizer`) is GSS's premise: a tokenizer fitted on RGB images only, never on
  labels. ``--on masks`` (`train_maskige_vqvae`) fits it on maskiges with a class-aware palette term: ours, not the
  paper's. The weights file records which (`TOKENIZER_TRAINED_ON` metadata).
* ``fastseg gss convert-dalle SRC DST [--prefix encoder.] [--trust-pickle]``: OpenAI's DALL-E dVAE pickles (the
  tokenizer's weights, not GSS checkpoints) -> safetensors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import parse_size, shapes_world

__all__ = ["add_gss_commands"]


def _model(args: argparse.Namespace, num_classes: int):
    from ..registry import create_model

    kwargs = {}
    if getattr(args, "tokenizer_checkpoint", None):
        kwargs["tokenizer_checkpoint"] = args.tokenizer_checkpoint
    model = create_model(
        args.model, num_classes=num_classes, checkpoint_path=getattr(args, "checkpoint", None), **kwargs
    )
    if not hasattr(model, "tokenizer") or not hasattr(model, "maskige_palette"):
        raise ValueError(f"{args.model} is not a GSS model (no maskige tokenizer); use a gss_* model")
    return model


def _roundtrip(model, args: argparse.Namespace, world) -> dict:
    from ..data.shapes import ShapesDataset
    from ..engine.recipes.gss import roundtrip_miou
    from ..models.gss import palette_min_distance

    data = ShapesDataset(args.split, length=args.length, config=world, seed=args.seed)
    res = roundtrip_miou(
        model.tokenizer,
        model.maskige_palette,
        (data[i] for i in range(len(data))),
        world.num_classes,
        maskige_scale=model.maskige_scale,
        batch_size=args.batch_size,
    )
    out = {
        "mIoU": float(res["mIoU"]),
        "IoU": [float(v) for v in res["IoU"]],
        "images": res["images"],
        "palette_min_distance": palette_min_distance(model.maskige_palette[: world.num_classes]),
        "tokenizer_trained_on": model.tokenizer_trained_on,
    }
    print(
        f"round trip ({args.split}, {res['images']} images, tokenizer fitted on "
        f"{model.tokenizer_trained_on or 'nothing (random weights)'}): mIoU {out['mIoU']:.4f}  "
        f"(palette min pairwise distance {out['palette_min_distance']:.1f})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def cmd_roundtrip(args: argparse.Namespace) -> int:
    world = shapes_world(args)
    _roundtrip(_model(args, world.num_classes), args, world)
    return 0


def cmd_fit_tokenizer(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import save_weights
    from ..data.shapes import ShapesDataset
    from ..engine.recipes.gss import TOKENIZER_TRAINED_ON, fit_image_tokenizer, train_maskige_vqvae
    from ..models.gss_tokenizers import MaskigeVQVAE

    world = shapes_world(args)
    if args.colour_augment and args.on != "images":
        raise ValueError("--colour-augment applies to --on images only")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    model = _model(args, world.num_classes)
    if not isinstance(model.tokenizer, MaskigeVQVAE):
        raise ValueError(f"{args.model} uses a frozen pretrained tokenizer; only the small VQ-VAE is fitted here")  # noqa: TRY004 (a bad argument, reported as the CLI does)
    torch.manual_seed(args.seed)
    data = ShapesDataset("train", length=args.steps * args.batch_size, config=world, seed=args.seed + 7)

    def log(rec: dict) -> None:
        print(json.dumps(rec))

    if args.on == "images":  # GSS's premise: the tokenizer never sees a label (only "image" is collated)
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=args.batch_size,
            collate_fn=lambda items: {"image": torch.stack([it["image"] for it in items])},
        )
        fit_image_tokenizer(
            model.tokenizer,
            loader,
            steps=args.steps,
            lr=args.lr,
            mean=data.mean,
            std=data.std,
            log=log,
            colour_augment=args.colour_augment,
        )
    else:  # ours: maskiges of the training masks + the class-aware palette term
        loader = torch.utils.data.DataLoader(
            data, batch_size=args.batch_size, collate_fn=lambda items: torch.stack([it["mask"] for it in items])
        )
        train_maskige_vqvae(model.tokenizer, model.maskige_palette, loader, steps=args.steps, lr=args.lr, log=log)
    model.tokenizer_trained_on = args.on
    save_weights(
        model.tokenizer,
        out,
        metadata={
            TOKENIZER_TRAINED_ON: args.on,
            "steps": str(args.steps),
            "batch_size": str(args.batch_size),
            "seed": str(args.seed),
            "colour_augment": str(args.colour_augment),
        },
    )
    print(f"tokenizer weights (fitted on {args.on}): {out}  (use create_model(..., tokenizer_checkpoint='{out}'))")
    _roundtrip(model, args, world)
    return 0


def cmd_convert_dalle(args: argparse.Namespace) -> int:
    from ..models.gss_tokenizers import convert_dalle_pickle

    path = convert_dalle_pickle(args.src, args.dst, trust_pickle=args.trust_pickle, prefix=args.prefix)
    print(f"wrote {path}")
    return 0


def add_gss_commands(subparsers) -> None:
    """Add ``fastseg gss {roundtrip,fit-tokenizer,convert-dalle}`` to the ``fastseg`` sub-command parser."""
    gss = subparsers.add_parser(
        "gss", help="GSS stages: tokenizer round trip, tokenizer fitting, DALL-E weights conversion"
    )
    sub = gss.add_subparsers(dest="gss_command", required=True, metavar="GSS_COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="a gss_* model name, e.g. gss_ff_resnet18")
        p.add_argument("--image-size", type=parse_size, default=(64, 64), metavar="H[,W]")
        p.add_argument("--split", default="val", choices=("train", "val", "test"))
        p.add_argument("--length", type=int, default=256, help="images for the round trip")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", help="also write the result here")

    p = sub.add_parser("roundtrip", help="tokenizer round trip: GT -> maskige -> tokens -> maskige -> classes (mIoU)")
    common(p)
    p.add_argument("--checkpoint", help="full model weights (safetensors)")
    p.add_argument("--tokenizer-checkpoint", help="tokenizer weights only (safetensors)")
    p.set_defaults(func=cmd_roundtrip)

    p = sub.add_parser(
        "fit-tokenizer", help="fit the small VQ-VAE tokenizer on shapes-world images (GSS's premise) or masks (ours)"
    )
    common(p)
    p.add_argument(
        "--on",
        choices=("images", "masks"),
        default="images",
        help="images: RGB images only, never a label (GSS's premise, the faithful setting; default); "
        "masks: maskiges of the training masks with a class-aware palette term (ours)",
    )
    p.add_argument(
        "--colour-augment",
        action="store_true",
        help="--on images: random RGB channel permutation and negative per image (label-free), to widen "
        "the colours the tokenizer sees",
    )
    p.add_argument("--out", required=True, help="tokenizer weights file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--lr", type=float, default=3e-3)
    p.set_defaults(func=cmd_fit_tokenizer, checkpoint=None, tokenizer_checkpoint=None)

    p = sub.add_parser(
        "convert-dalle",
        help="OpenAI's DALL-E dVAE encoder.pkl / decoder.pkl (the tokenizer's "
        "weights, not a GSS checkpoint) -> safetensors",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--prefix", default="", help="key prefix, e.g. 'encoder.' or 'decoder.' for DalleDVAE")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling arbitrary objects (runs code from the file: only for trusted sources)",
    )
    p.set_defaults(func=cmd_convert_dalle)
