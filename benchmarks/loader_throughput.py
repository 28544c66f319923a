"""Images per second of the real-dataset training loader alone (decode + augment + normalise + collate), no model.

Writes a Cityscapes-layout fixture (``leftImg8bit`` PNGs rendered by the shapes world, ``gtFine`` labelIds), builds
``fastseg.data.build_dataset("cityscapes", ..., "train")`` with the standard pipeline (keep-ratio resize x 0.5-2.0 of
the base scale, crop with cat_max_ratio 0.75, flip, photometric distortion) and times a ``DataLoader`` with 0, 1, 2
... worker processes (pinned memory when CUDA is present), after one warm-up batch per setting. It also times the
stages of one sample in the main process (decode, augment, normalise). The JSON records the command, configuration,
environment and the 1-minute load average before and after, since a shared CPU inflates every figure.

    python benchmarks/loader_throughput.py                      # 512 x 1024 images, 512 x 512 crops, batch 8
    python benchmarks/loader_throughput.py --image-size 1024,2048 --scale 2048,1024   # full Cityscapes size
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastseg.bench.env import device_slug, environment_info
from fastseg.data import ShapesConfig, ShapesDataset, build_dataset
from fastseg.data.datasets._base import read_image
from fastseg.data.shapes import unnormalize
from fastseg.experiments.render import render_loader_markdown

# Shapes classes -> Cityscapes labelIds (sky, vegetation, water -> terrain, sand -> road; things -> car / person).
_LABEL_IDS = {"sky": 23, "grass": 21, "water": 22, "sand": 7}


def write_fixture(root: Path, n: int, size: tuple[int, int], seed: int) -> None:
    world = ShapesConfig(image_size=size)
    shapes = ShapesDataset("train", length=n, config=world, seed=seed)
    lut = np.full(256, 0, np.uint8)
    for i, name in enumerate(world.class_names):
        lut[i] = _LABEL_IDS.get(name, 26 if i % 2 else 24)
    for i in range(n):
        sample = shapes[i]
        rgb = (unnormalize(sample["image"]).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        key = f"bench_{i // 100:06d}_{i % 100:06d}"
        img_dir = root / "leftImg8bit" / "train" / "bench"
        gt_dir = root / "gtFine" / "train" / "bench"
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(img_dir / f"{key}_leftImg8bit.png")
        Image.fromarray(lut[sample["mask"].numpy().clip(0, 255)]).save(gt_dir / f"{key}_gtFine_labelIds.png")


def time_loader(dataset, batch_size: int, workers: int, batches: int, seed: int) -> dict[str, float]:
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    it = iter(loader)
    next(it)  # warm-up: worker start-up and first decode
    start, cpu_start = time.perf_counter(), time.process_time()
    done = 0
    while done < batches:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        done += 1
        assert batch["image"].shape[0] == batch_size
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    del it, loader
    images = batches * batch_size
    row = {
        "workers": workers,
        "batches": batches,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "ms_per_image": 1000 * seconds / images,
    }
    if workers == 0:
        # CPU time of this process (all the work when there are no workers): what one uncontended core would take.
        row["cpu_ms_per_image"] = 1000 * cpu_seconds / images
        row["images_per_s_per_uncontended_core"] = images / cpu_seconds
    return row


def time_stages(dataset, n: int) -> dict[str, float]:
    """Mean milliseconds per sample of each stage, in this process."""
    decode = augment = total = 0.0
    for i in range(n):
        record = dataset.records[i % len(dataset.records)]
        t0 = time.perf_counter()
        read_image(record.image)
        dataset._load_targets(record)
        t1 = time.perf_counter()
        dataset[i % len(dataset)]
        t2 = time.perf_counter()
        decode += t1 - t0
        total += t2 - t1
    augment = total - decode  # __getitem__ = decode + augment + normalise
    return {
        "decode_ms": 1000 * decode / n,
        "augment_and_normalise_ms": 1000 * augment / n,
        "getitem_ms": 1000 * total / n,
    }


def time_train_step(model_name: str, dataset, batch_size: int, steps: int) -> dict[str, float]:
    """Milliseconds per image of a training step (forward, backward, AdamW) of ``model_name`` on loader batches,
    for the question the loader must answer: does loading keep ahead of training?"""
    import fastseg

    model = fastseg.create_model(model_name, num_classes=dataset.num_classes).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    batches = [b for _, b in zip(range(steps + 1), loader)]

    def step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        model.loss(batch)["loss"].backward()
        optimizer.step()

    step(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    seconds = time.perf_counter() - start
    return {
        "model": model_name,
        "batch_size": batch_size,
        "steps": steps,
        "ms_per_image": 1000 * seconds / (steps * batch_size),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", default="512,1024", help="H,W of the fixture images")
    parser.add_argument("--scale", default="1024,512", help="base (long, short) of the random resize")
    parser.add_argument("--crop", default="512,512", help="H,W of the training crops")
    parser.add_argument("--images", type=int, default=16, help="fixture images written")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per setting")
    parser.add_argument("--workers", default="0,1,2", help="worker counts to time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="fpn_resnet18", help="also time this model's training step ('none': skip)")
    parser.add_argument("--model-batch-size", type=int, default=2)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/<device>/loader_cityscapes_<H>x<W>.json)")
    parser.add_argument("--render", metavar="JSON", help="print the README table of a stored record and exit")
    args = parser.parse_args(argv)
    if args.render:
        print(render_loader_markdown(json.loads(Path(args.render).read_text())))
        return 0
    size = tuple(int(v) for v in args.image_size.split(","))
    scale = tuple(int(v) for v in args.scale.split(","))
    crop = tuple(int(v) for v in args.crop.split(","))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cityscapes"
        t0 = time.perf_counter()
        write_fixture(root, args.images, size, args.seed)
        print(f"fixture: {args.images} images {size[0]}x{size[1]} in {time.perf_counter() - t0:.1f} s", flush=True)
        dataset = build_dataset("cityscapes", root, "train", pipeline={"scale": scale, "crop_size": crop})
        stages = time_stages(dataset, max(4, args.images // 2))
        print(f"per sample (main process): {stages}", flush=True)
        rows = []
        for workers in (int(w) for w in args.workers.split(",")):
            row = time_loader(dataset, args.batch_size, workers, args.batches, args.seed)
            rows.append(row)
            cpu = f"; {row['cpu_ms_per_image']:.0f} ms CPU / image" if "cpu_ms_per_image" in row else ""
            print(
                f"workers={workers}: {row['images_per_s']:.1f} images/s ({row['ms_per_image']:.0f} ms / image{cpu})",
                flush=True,
            )
        step = None
        if args.model != "none":
            step = time_train_step(args.model, dataset, args.model_batch_size, steps=2)
            print(
                f"{args.model} training step: {step['ms_per_image']:.0f} ms / image "
                f"(batch {args.model_batch_size}, {step['threads']} threads)",
                flush=True,
            )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = {
        "command": "python "
        + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "what": "fastseg.data cityscapes training loader alone: PNG decode, labelIds->trainIds, random resize "
        "0.5-2.0, crop with cat_max_ratio 0.75, flip, photometric distortion, normalise, collate",
        "config": {
            "image_size": size,
            "scale": scale,
            "crop_size": crop,
            "images": args.images,
            "batch_size": args.batch_size,
            "batches": args.batches,
            "seed": args.seed,
            "pin_memory": torch.cuda.is_available(),
        },
        "stages_main_process": stages,
        "results": rows,
        "train_step": step,
        "environment": environment_info(device),
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "note": "measured on a CPU shared with other jobs (see load_average_1min); figures are lower bounds",
    }
    out = (
        Path(args.out)
        if args.out
        else (Path(__file__).parent / "results" / device_slug(device) / f"loader_cityscapes_{size[0]}x{size[1]}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
