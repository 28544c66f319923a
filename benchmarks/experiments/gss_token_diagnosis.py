"""Why GSS-FF scored above its tokenizer's round trip: the round trip encoded a colour GSS never encodes.

GSS-FF is trained to predict the tokens the frozen tokenizer's encoder gives the maskige of the ground truth, with the
ignore pixels first filled by its auxiliary head (spec A.4: the ignore colour is never encoded). The round trip used
to render them in the ignore colour instead, so on the shapes world, where a thin ignore band surrounds every thing,
it decoded other tokens than the ones GSS-FF learns. For one finished GSS-FF job of the ``gss_shapes`` experiment,
on the experiment's validation images, this script compares three decodings through the same decoder and inverse:

* ``roundtrip_ignore_colour``: the encoder's tokens of the maskige with the ignore band in the ignore colour (the
  round trip as it was measured before);
* ``roundtrip``: the encoder's tokens of the maskige with the band filled from the labelled neighbours (the round
  trip now, `fastseg.engine.recipes.gss.roundtrip_miou`);
* ``prediction``: GSS-FF's own tokens (the prior head's argmax);

and for each round trip the share of token positions where the head's token equals the encoder's, and the pixel
accuracy of both decodings inside the patches where they differ.

Usage (after ``python -m fastseg.experiments run gss_shapes`` has finished the job)::

    python benchmarks/experiments/gss_token_diagnosis.py --variant gss_ff_images --seed 0 \\
        [--runs runs/experiments] [--out benchmarks/results/experiments/gss_token_diagnosis.json]

A diagnosis of one trained model, not an experiment: no seeds are averaged and no claim is decided here.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fastseg.checkpoint import load_state_dict
from fastseg.data.shapes import ShapesConfig, ShapesDataset
from fastseg.experiments.core import RUNS_DIR, job_folder, machine_info, versions
from fastseg.experiments.declarations import EXPERIMENTS
from fastseg.metrics import ConfusionMatrix
from fastseg.models.gss import GSSSegmenter, fill_ignore_from_neighbours
from fastseg.registry import create_model


@torch.no_grad()
def diagnose(model: GSSSegmenter, data: ShapesDataset, batch_size: int = 16) -> dict:
    """The three decodings of one GSS-FF ``model`` (eval mode, training-free inverse) on ``data``."""
    if model.inverse is not None:
        raise ValueError("the diagnosis compares the training-free inverse: give a GSS-FF model, not GSS-FT-W")
    if model.maskige_scale != 1:
        raise ValueError("the per-patch comparison assumes the maskige at the input resolution (maskige_scale 1)")
    model.eval()
    k, patch, ignore = model.num_classes, model.tokenizer.downsample, data.config.ignore_index
    names = ("roundtrip_ignore_colour", "roundtrip", "prediction")
    matrices = {name: ConfusionMatrix(k, ignore_index=ignore) for name in names}
    compared = {
        name: {"agree": 0, "tokens": 0, "pixels": 0, "encoder_correct": 0, "head_correct": 0} for name in names[:2]
    }
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        images = torch.stack([item["image"] for item in items])
        masks = torch.stack([item["mask"] for item in items]).long()
        stages = model.stages(images)
        matrices["prediction"].update(stages["output"].argmax(1), masks)
        for name, labels in (
            ("roundtrip_ignore_colour", masks),
            ("roundtrip", fill_ignore_from_neighbours(masks, k, ignore)),
        ):
            ids = model.tokenizer.encode(model.encode_masks(labels))
            class_map = model.maskige_to_classes(model.decode_maskige(ids))
            matrices[name].update(model.vote(class_map).argmax(1), masks)
            differ = ids != stages["tokens"]
            in_differing = F.interpolate(differ[:, None].float(), scale_factor=patch, mode="nearest")[:, 0].bool()
            in_differing &= masks != ignore
            c = compared[name]
            c["agree"] += int((~differ).sum())
            c["tokens"] += differ.numel()
            c["pixels"] += int(in_differing.sum())
            c["encoder_correct"] += int(((class_map == masks) & in_differing).sum())
            c["head_correct"] += int(((stages["class_map"] == masks) & in_differing).sum())
    report: dict = {"images": len(data)}
    for name, matrix in matrices.items():
        metrics = matrix.compute()
        report[name] = {
            "mIoU": float(metrics["mIoU"]),
            "IoU": {c: float(v) for c, v in zip(data.config.class_names, metrics["IoU"])},
        }
    for name, c in compared.items():
        report[name].update(
            token_agreement_with_head=c["agree"] / c["tokens"],
            pixels_where_tokens_differ=c["pixels"],
            pixel_accuracy_where_tokens_differ={
                "encoder": c["encoder_correct"] / max(c["pixels"], 1),
                "head": c["head_correct"] / max(c["pixels"], 1),
            },
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="gss_shapes", help="the declared GSS experiment")
    parser.add_argument("--variant", default="gss_ff_images", help="a GSS-FF variant of it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=str(RUNS_DIR), help="the experiments' run folder (`run --runs`)")
    parser.add_argument("--out", default="benchmarks/results/experiments/gss_token_diagnosis.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    experiment = EXPERIMENTS[args.experiment]
    variant = next((v for v in experiment.variants if v.name == args.variant), None)
    if variant is None:
        raise SystemExit(f"{args.experiment} has no variant {args.variant!r}")
    weights = job_folder(args.runs, experiment, args.variant, args.seed) / "model.safetensors"
    if not weights.exists():
        raise SystemExit(f"{weights} does not exist: finish the job first (python -m fastseg.experiments run ...)")
    world = ShapesConfig(image_size=experiment.budget.image_size)
    model = create_model(variant.model, num_classes=world.num_classes, **variant.model_kwargs)
    model.load_state_dict(load_state_dict(weights))
    data = ShapesDataset("val", length=experiment.budget.val_length, config=world, seed=0)
    report = diagnose(model, data)
    report.update(
        command=shlex.join(["python", *sys.argv]),
        experiment=args.experiment,
        variant=args.variant,
        seed=args.seed,
        weights=weights.as_posix(),
        versions=versions(),
        machine=machine_info(1),
    )
    for name in ("roundtrip_ignore_colour", "roundtrip", "prediction"):
        entry = report[name]
        line = f"{name:24s} mIoU {entry['mIoU']:.4f}"
        if "token_agreement_with_head" in entry:
            acc = entry["pixel_accuracy_where_tokens_differ"]
            line += (
                f"  tokens equal to the head's {entry['token_agreement_with_head']:.4f}; pixel accuracy where they "
                f"differ: encoder {acc['encoder']:.4f}, head {acc['head']:.4f}"
            )
        print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
