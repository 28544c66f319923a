"""GSS on the shapes world (64x64): tokenizer upper bound, GSS-FF vs the FPN baseline, GSS-FT-W vs GSS-FF.

Phases, sequential, each appended to the JSON as soon as it finishes (an interrupted run keeps what finished):

1. ``tokenizer``: fit the small maskige VQ-VAE of ``gss_ff_resnet18`` (`train_maskige_vqvae`) on training masks,
   then the round-trip upper bound GT -> maskige -> tokens -> maskige -> classes on the validation split
   (`roundtrip_miou`).
2. ``gss_ff_resnet18``: the conditioning network trained end to end (0.8 token CE + 0.2 aux pixel CE) with
   `fastseg.engine.train`, evaluated (mIoU of ``predict``) on the validation split.
3. ``fpn_resnet18``: the baseline, same backbone, steps, batch, lr and data.
4. ``gss_ftw_resnet18``: GSS-FT-W initialised from phase 2 (``load_prior``), only the learned inverse trained.
5. ``stages_512``: per-stage inference time of ``gss_ff_resnet18`` on one 512x512 image, reference (dense logits,
   one-hot + 1x1 conv, broadcast palette argmin) vs fused path (argmax_matmul, code gather, vq_nearest).

No pretrained weights anywhere (nothing is downloaded): every network starts from random initialisation.

Usage (what produced ``benchmarks/results/experiments/gss_shapes.json``; see the JSON's ``command``)::

    python benchmarks/experiments/gss_shapes.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import fastseg
from fastseg.checkpoint import save_weights
from fastseg.data.shapes import ShapesConfig, ShapesDataset
from fastseg.engine import TrainConfig, evaluate, train
from fastseg.engine.recipes.gss import roundtrip_miou, train_maskige_vqvae

OUT = Path(__file__).resolve().parents[1] / "results" / "experiments" / "gss_shapes.json"


def _write(report: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(OUT)


def _train(model, args, world, steps: int, seed: int) -> tuple[dict, float]:
    train_set = ShapesDataset("train", length=steps * args.batch_size, config=world, seed=seed + 1)
    val_set = ShapesDataset("val", length=args.val_length, config=world, seed=0)
    cfg = TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=1e-4,
        warmup_steps=10,
        seed=seed,
        out_dir=None,
        progress=False,
        device="cpu",
        log_every=25,
        grad_clip=5.0,
    )
    start = time.perf_counter()
    result = train(model, train_set, cfg, val_set=val_set)
    wall = time.perf_counter() - start
    metrics = result.final_metrics or {}
    last = result.history[-1] if result.history else {}
    return {
        "mIoU": float(metrics["mIoU"]),
        "aAcc": float(metrics.get("aAcc", float("nan"))),
        "final_loss": {k: float(v) for k, v in last.items() if isinstance(v, (int, float))},
        "steps": steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "train_wall_s": round(wall, 1),
    }, wall


def _time(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000, out


@torch.no_grad()
def stage_times(model, size: int, repeats: int) -> dict:
    model.eval()
    x = torch.randn(1, 3, size, size)
    rows = {}
    for path, fused in (("reference", False), ("fused", True)):
        t_backbone, feats = _time(lambda: model.backbone(x), repeats)
        t_head, feat = _time(lambda f=feats: model.head.features(f), repeats)
        t_tok, ids = _time(lambda f=feat, p=fused: model.token_ids(f, p), repeats)
        t_dec, maskige = _time(lambda i=ids, p=fused: model.decode_maskige(i, p), repeats)
        t_inv, cls = _time(lambda m=maskige, p=fused: model.maskige_to_classes(m, p), repeats)
        rows[path] = {
            "backbone_ms": round(t_backbone, 1),
            "head_ms": round(t_head, 1),
            "token_argmax_ms": round(t_tok, 1),
            "decoder_ms": round(t_dec, 1),
            "palette_inverse_ms": round(t_inv, 1),
            "total_ms": round(t_backbone + t_head + t_tok + t_dec + t_inv, 1),
        }
        rows[path + "_class_map"] = cls
    same = bool(torch.equal(rows.pop("reference_class_map"), rows.pop("fused_class_map")))
    rows["identical_class_maps"] = same
    rows["note"] = (
        "CPU, torch reference kernels behind the custom ops (Triton needs a GPU); 'reference' = dense "
        "token logits + argmax, one-hot + 1x1 conv decoder input, broadcast palette argmin"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-steps", type=int, default=450)
    parser.add_argument("--tokenizer-batch", type=int, default=16)
    parser.add_argument("--tokenizer-lr", type=float, default=3e-3)
    parser.add_argument("--more-steps", type=int, default=150)
    parser.add_argument("--more-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--ftw-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stage-size", type=int, default=512)
    parser.add_argument("--phases", nargs="+", default=["tokenizer", "gss_ff", "fpn", "gss_ftw", "stages"])
    parser.add_argument("--run-dir", default="runs/gss_shapes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    world = ShapesConfig(image_size=64)
    report = json.loads(OUT.read_text()) if OUT.exists() and "tokenizer" not in args.phases else {}
    report.setdefault("commands", []).append("python " + " ".join(sys.argv))
    report.update(
        {
            "torch": torch.__version__,
            "machine": f"{platform.machine()} CPU, {args.threads} thread(s), shared with other jobs",
            "world": "shapes 64x64, 12 classes",
        }
    )
    report.setdefault("results", {})
    _write(report)
    tok_file = run_dir / "gss_ff_resnet18_tokenizer.safetensors"
    ff_file = run_dir / "gss_ff_resnet18.safetensors"

    if "tokenizer" in args.phases:
        torch.manual_seed(0)
        model = fastseg.create_model("gss_ff_resnet18", num_classes=world.num_classes)
        data = ShapesDataset("train", length=args.tokenizer_steps * args.tokenizer_batch, config=world, seed=7)
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=args.tokenizer_batch,
            shuffle=False,
            collate_fn=lambda items: torch.stack([it["mask"] for it in items]),
        )
        start = time.perf_counter()
        history = train_maskige_vqvae(
            model.tokenizer,
            model.maskige_palette,
            loader,
            steps=args.tokenizer_steps,
            lr=args.tokenizer_lr,
            log_every=50,
            log=lambda r: print("tokenizer", r, flush=True),
        )
        wall = time.perf_counter() - start
        save_weights(model.tokenizer, tok_file)
        val = ShapesDataset("val", length=args.val_length, config=world, seed=0)
        rt = roundtrip_miou(
            model.tokenizer,
            model.maskige_palette,
            (val[i] for i in range(len(val))),
            world.num_classes,
            maskige_scale=model.maskige_scale,
        )
        pal = model.maskige_palette
        from fastseg.models.gss import palette_min_distance

        report["results"]["tokenizer"] = {
            "roundtrip_mIoU": float(rt["mIoU"]),
            "roundtrip_IoU": [float(v) for v in rt["IoU"]],
            "steps": args.tokenizer_steps,
            "batch_size": args.tokenizer_batch,
            "lr": args.tokenizer_lr,
            "train_wall_s": round(wall, 1),
            "val_images": args.val_length,
            "history": history,
            "palette": pal.tolist(),
            "palette_min_distance": palette_min_distance(pal[: world.num_classes]),
            "tokens_used_of": [int(model.tokenizer.quantizer.cluster_size.gt(0.05).sum()), model.tokenizer.vocab_size],
        }
        print("roundtrip mIoU", rt["mIoU"], flush=True)
        _write(report)

    if "tokenizer_more" in args.phases:  # continue the phase-1 fit (same data stream, fresh seed, lower lr)
        torch.manual_seed(1)
        model = fastseg.create_model(
            "gss_ff_resnet18", num_classes=world.num_classes, tokenizer_checkpoint=str(tok_file)
        )
        done_before = len(report["results"].get("tokenizer_continued_runs", [])) or int(
            "tokenizer_continued" in report["results"]
        )
        # fresh images for every continuation: seeds 8, 9, ...
        data = ShapesDataset("train", length=args.more_steps * args.tokenizer_batch, config=world, seed=8 + done_before)
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=args.tokenizer_batch,
            shuffle=False,
            collate_fn=lambda items: torch.stack([it["mask"] for it in items]),
        )
        start = time.perf_counter()
        history = train_maskige_vqvae(
            model.tokenizer,
            model.maskige_palette,
            loader,
            steps=args.more_steps,
            lr=args.more_lr,
            log_every=50,
            init_codebook=False,
            log=lambda r: print("tokenizer+", r, flush=True),
        )
        wall = time.perf_counter() - start
        save_weights(model.tokenizer, tok_file)
        val = ShapesDataset("val", length=args.val_length, config=world, seed=0)
        rt = roundtrip_miou(
            model.tokenizer,
            model.maskige_palette,
            (val[i] for i in range(len(val))),
            world.num_classes,
            maskige_scale=model.maskige_scale,
        )
        # Each continuation is appended, so the JSON always tells the tokenizer's whole training.
        runs = report["results"].setdefault("tokenizer_continued_runs", [])
        if not runs and "tokenizer_continued" in report["results"]:  # written by the one-entry format before
            runs.append(report["results"].pop("tokenizer_continued"))
        runs.append(
            {
                "roundtrip_mIoU": float(rt["mIoU"]),
                "roundtrip_IoU": [float(v) for v in rt["IoU"]],
                "extra_steps": args.more_steps,
                "batch_size": args.tokenizer_batch,
                "lr": args.more_lr,
                "train_wall_s": round(wall, 1),
                "threads": args.threads,
                "history": history,
            }
        )
        report["results"]["tokenizer_total_steps"] = report["results"]["tokenizer"]["steps"] + sum(
            r["extra_steps"] for r in runs
        )
        print("roundtrip mIoU after continuing", rt["mIoU"], flush=True)
        _write(report)

    if "gss_ff" in args.phases:
        torch.manual_seed(0)
        model = fastseg.create_model(
            "gss_ff_resnet18", num_classes=world.num_classes, tokenizer_checkpoint=str(tok_file)
        )
        res, _ = _train(model, args, world, args.steps, seed=0)
        save_weights(model, ff_file)
        report["results"]["gss_ff_resnet18"] = res
        print("gss_ff", res["mIoU"], flush=True)
        _write(report)

    if "fpn" in args.phases:
        torch.manual_seed(0)
        model = fastseg.create_model("fpn_resnet18", num_classes=world.num_classes)
        res, _ = _train(model, args, world, args.steps, seed=0)
        report["results"]["fpn_resnet18"] = res
        print("fpn", res["mIoU"], flush=True)
        _write(report)

    if "gss_ftw" in args.phases:
        torch.manual_seed(0)
        ff = fastseg.create_model("gss_ff_resnet18", num_classes=world.num_classes, checkpoint_path=str(ff_file))
        model = fastseg.create_model("gss_ftw_resnet18", num_classes=world.num_classes)
        model.load_prior(ff)
        val = ShapesDataset("val", length=args.val_length, config=world, seed=0)
        ff_val = evaluate(ff, val, batch_size=16, progress=False)
        res, _ = _train(model, args, world, args.ftw_steps, seed=0)
        res["gss_ff_same_weights_mIoU"] = float(ff_val["mIoU"])
        report["results"]["gss_ftw_resnet18"] = res
        print("gss_ftw", res["mIoU"], "ff", ff_val["mIoU"], flush=True)
        _write(report)

    if "stages" in args.phases:
        torch.manual_seed(0)
        kwargs = {"checkpoint_path": str(ff_file)} if ff_file.exists() else {}
        model = fastseg.create_model("gss_ff_resnet18", num_classes=world.num_classes, **kwargs)
        report["results"]["stages_512"] = {
            "size": args.stage_size,
            "batch": 1,
            **stage_times(model, args.stage_size, repeats=2),
        }
        print("stages", report["results"]["stages_512"], flush=True)
        _write(report)


if __name__ == "__main__":
    main()
