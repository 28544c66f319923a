"""`verify`: run PyTorch and an exported artefact on the same inputs and judge the differences.

Inputs: a fixed set of shapes-world validation images (seeded, so every run sees the same pixels) at the artefact's
opt shape, plus random normal inputs at the opt shape and, for dynamic artefacts, at the min and max profile shapes.

Reported: max and median absolute error of the logits, the logits' scale (max |reference logit|), cosine
similarity of the flattened logits, argmax agreement of the class maps at input size, and the mIoU of both against
the shapes-world labels with its change. Labels-only artefacts (``argmax=True``) report agreement and mIoU.

Default thresholds (``specs/reliability.md`` section 3; ``fastseg verify`` exits 1 past any of them):

=========  ==========================================  ====================  ================
precision  max abs error                               cosine (logits)       argmax agreement
=========  ==========================================  ====================  ================
fp32       <= 1e-4 x logits scale                      reported              >= 99.9 %
fp16       reported                                    >= 0.99               >= 99.5 %, |dmIoU| <= 1.0 point
=========  ==========================================  ====================  ================
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .sidecar import read_sidecar

__all__ = ["THRESHOLDS", "Thresholds", "VerifyReport", "artefact_runner", "verify"]


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Pass limits; None means "reported, not judged"."""

    max_abs_err_rel: float | None = 1e-4  # max |artefact - torch| / max |torch logits|
    min_cosine: float | None = None
    min_argmax_agreement: float = 0.999
    max_miou_delta_points: float | None = None  # |mIoU change| in points (percent)


THRESHOLDS = {
    "fp32": Thresholds(max_abs_err_rel=1e-4, min_cosine=None, min_argmax_agreement=0.999),
    "fp16": Thresholds(max_abs_err_rel=None, min_cosine=0.99, min_argmax_agreement=0.995, max_miou_delta_points=1.0),
}
THRESHOLDS["int8"] = THRESHOLDS["fp16"]


@dataclasses.dataclass
class VerifyReport:
    """Differences between PyTorch (fp32, the reference) and the artefact."""

    artefact: str
    backend: str
    precision: str
    shapes: list[list[int]]
    num_images: int
    num_random: int
    max_abs_err: float | None
    median_abs_err: float | None
    logits_scale: float | None
    cosine: float | None
    argmax_agreement: float
    miou_torch: float | None
    miou_artefact: float | None
    thresholds: Thresholds
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def miou_delta_points(self) -> float | None:
        if self.miou_torch is None or self.miou_artefact is None:
            return None
        return 100.0 * (self.miou_artefact - self.miou_torch)

    def format(self) -> str:
        def fmt(value: float | None, spec: str) -> str:
            return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

        rel = None if self.max_abs_err is None or not self.logits_scale else self.max_abs_err / self.logits_scale
        lines = [
            f"verify {self.artefact} ({self.backend}, {self.precision}) against PyTorch fp32",
            (
                f"  inputs            {self.num_images} shapes-world images + {self.num_random} random batches; "
                f"shapes (B,H,W) {', '.join('x'.join(map(str, s)) for s in self.shapes)}"
            ),
            (
                f"  max abs error     {fmt(self.max_abs_err, '.3e')}  (logits scale {fmt(self.logits_scale, '.3g')}, "
                f"relative {fmt(rel, '.3e')})"
            ),
            f"  median abs error  {fmt(self.median_abs_err, '.3e')}",
            f"  cosine (logits)   {fmt(self.cosine, '.7f')}",
            f"  argmax agreement  {100 * self.argmax_agreement:.3f} %",
            (
                f"  mIoU              torch {fmt(self.miou_torch and 100 * self.miou_torch, '.2f')}  artefact "
                f"{fmt(self.miou_artefact and 100 * self.miou_artefact, '.2f')}  change "
                f"{fmt(self.miou_delta_points, '+.3f')} points"
            ),
        ]
        lines.append("  PASS" if self.passed else "  FAIL: " + "; ".join(self.failures))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["passed"] = self.passed
        out["miou_delta_points"] = self.miou_delta_points
        return out


def artefact_runner(path: Path, fmt: str, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A callable running the artefact on a float32 batch (returns a CPU tensor), and the backend's name."""
    if fmt == "onnx":
        import onnxruntime as ort

        from .onnx import ort_providers

        session = ort.InferenceSession(str(path), providers=ort_providers(device))
        name = session.get_inputs()[0].name

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

        return run_onnx, f"onnxruntime {ort.__version__} ({session.get_providers()[0]})"
    if fmt == "aoti":
        from .aoti import load_aoti

        runner = load_aoti(path)
        return (lambda x: runner(x.to(device)).cpu()), f"aoti torch {torch.__version__}"
    if fmt == "engine":
        from .tensorrt import require_tensorrt, run_engine

        trt = require_tensorrt()
        return (lambda x: run_engine(path, x, trt)), f"tensorrt {trt.__version__}"
    raise ValueError(f"unknown artefact format {fmt!r} in the sidecar")


def _inputs(sidecar: dict[str, Any], num_images: int, num_random: int, seed: int):
    """(images batches, masks batches or None, random batches) as float32 CPU tensors."""
    from ..data.shapes import ShapesConfig, ShapesDataset

    profile = sidecar["inputs"][0]["profile"]
    b, h, w = profile["opt"]
    n = max(1, math.ceil(num_images / b)) * b if num_images else 0
    dataset = ShapesDataset("val", length=max(n, 1), config=ShapesConfig(image_size=(h, w)), seed=seed)
    samples = [dataset[i] for i in range(n)]
    image_batches = [torch.stack([s["image"] for s in samples[i : i + b]]) for i in range(0, n, b)]
    mask_batches = [torch.stack([torch.as_tensor(s["mask"]) for s in samples[i : i + b]]) for i in range(0, n, b)]
    gen = torch.Generator().manual_seed(seed)
    shapes = [tuple(profile["opt"])] * num_random
    if profile["min"] != profile["max"]:
        shapes += [tuple(profile["min"]), tuple(profile["max"])]
    random_batches = [torch.randn(bb, 3, hh, ww, generator=gen) for bb, hh, ww in shapes]
    return image_batches, mask_batches, random_batches, dataset.num_classes


def verify(
    artefact: str | os.PathLike,
    model: torch.nn.Module | None = None,
    model_name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    num_images: int = 8,
    num_random: int = 2,
    thresholds: Thresholds | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> VerifyReport:
    """Compare an exported artefact with its PyTorch model (see the module docstring for what and how).

    Args:
        artefact: an ``.onnx``, ``.pt2`` or ``.engine`` file with its sidecar beside it.
        model: the PyTorch model to compare with; default: rebuilt from the sidecar (model name, checkpoint, or the
            seed that drew the weights of an export without checkpoint).
        model_name, checkpoint: override the sidecar's model name / weights file.
        num_images: shapes-world images (rounded up to whole batches of a static batch size).
        num_random: random batches at the opt shape (dynamic artefacts add one at min and one at max).
        thresholds: pass limits; default ``THRESHOLDS[precision]``.
        device: where PyTorch and the artefact run (CUDA selects ONNX Runtime's CUDA provider when present).

    Raises:
        FileNotFoundError: the artefact, its sidecar or the checkpoint is missing.
        ValueError: the sidecar is invalid, or its checkpoint's sha256 differs from the recorded one.
    """
    from .api import DeployModule, build_model

    path = Path(artefact)
    if not path.is_file():
        raise FileNotFoundError(f"artefact {path} does not exist")
    if fmt_is_engine_without_sidecar(path):
        # An engine built with the printed trtexec line has no sidecar of its own: use its ONNX file's.
        sidecar = dict(read_sidecar(path.with_suffix(".onnx")), format="engine")
    else:
        sidecar = read_sidecar(path)
    fmt = sidecar["format"]
    precision = sidecar.get("precision", "fp32")
    device = torch.device(device)
    export_opts = sidecar.get("export", {})
    argmax = bool(export_opts.get("argmax"))
    if model is None:
        weights = sidecar.get("weights", {})
        ckpt = checkpoint if checkpoint is not None else weights.get("checkpoint")
        if ckpt is not None and checkpoint is None and weights.get("sha256"):
            from .api import _file_sha256

            if not Path(ckpt).is_file():
                raise FileNotFoundError(f"checkpoint {ckpt} named by the sidecar does not exist; pass --checkpoint")
            if _file_sha256(Path(ckpt)) != weights["sha256"]:
                raise ValueError(f"checkpoint {ckpt} changed since the export (sha256 differs); pass --checkpoint")
        if ckpt is None and weights.get("init_seed") is None:
            raise ValueError(f"{path} was exported from an in-memory model: pass model= or a checkpoint")
        model = build_model(
            model_name or sidecar["model"],
            ckpt,
            num_classes=sidecar["pretrained_cfg"]["num_classes"],
            init_seed=weights.get("init_seed"),
        )
    reference = DeployModule(model.float().eval(), argmax, export_opts.get("labels_dtype") or "int32").to(device)
    stride = int(sidecar["pretrained_cfg"]["output_stride"])
    run, backend = artefact_runner(path, fmt, device)
    image_batches, mask_batches, random_batches, world_classes = _inputs(sidecar, num_images, num_random, seed)
    num_classes = int(sidecar["pretrained_cfg"]["num_classes"])

    def classes(out: torch.Tensor) -> torch.Tensor:
        if argmax:
            return out.long()
        up = F.interpolate(out.float(), scale_factor=float(stride), mode="bilinear", align_corners=False)
        return up.argmax(1)

    from ..metrics import ConfusionMatrix

    with_miou = world_classes == num_classes and bool(image_batches)
    cm_ref = ConfusionMatrix(num_classes, ignore_index=int(sidecar["pretrained_cfg"]["ignore_index"]))
    cm_art = ConfusionMatrix(num_classes, ignore_index=int(sidecar["pretrained_cfg"]["ignore_index"]))
    diffs, dots, ref_sq, art_sq, agree, total = [], 0.0, 0.0, 0.0, 0, 0
    scale = 0.0
    shapes = []
    batches = [(x, m) for x, m in zip(image_batches, mask_batches)] + [(x, None) for x in random_batches]
    for x, mask in batches:
        shapes.append([x.shape[0], x.shape[2], x.shape[3]])
        with torch.no_grad():
            ref = reference(x.to(device)).cpu()
        out = run(x)
        if tuple(out.shape) != tuple(ref.shape):
            raise ValueError(
                f"{path} returned shape {tuple(out.shape)} for input {tuple(x.shape)}; PyTorch gives {tuple(ref.shape)}"
            )
        if not argmax:
            r64, a64 = ref.double(), out.double()
            diffs.append((a64 - r64).abs().flatten())
            dots += float((a64 * r64).sum())
            ref_sq += float((r64 * r64).sum())
            art_sq += float((a64 * a64).sum())
            scale = max(scale, float(r64.abs().max()))
        pred_ref, pred_art = classes(ref), classes(out)
        agree += int((pred_ref == pred_art).sum())
        total += pred_ref.numel()
        if mask is not None and with_miou:
            cm_ref.update(pred_ref, mask)
            cm_art.update(pred_art, mask)
    if diffs:
        d = torch.cat(diffs)
        max_err, median_err = float(d.max()), float(d.median())
        cosine = dots / max(math.sqrt(ref_sq * art_sq), 1e-300)
    else:
        max_err = median_err = cosine = None
        scale = None
    report = VerifyReport(
        artefact=str(path),
        backend=backend,
        precision=precision,
        shapes=shapes,
        num_images=sum(x.shape[0] for x in image_batches),
        num_random=len(random_batches),
        max_abs_err=max_err,
        median_abs_err=median_err,
        logits_scale=scale,
        cosine=cosine,
        argmax_agreement=agree / max(total, 1),
        miou_torch=float(cm_ref.compute()["mIoU"]) if with_miou else None,
        miou_artefact=float(cm_art.compute()["mIoU"]) if with_miou else None,
        thresholds=thresholds or THRESHOLDS.get(precision, THRESHOLDS["fp32"]),
    )
    _judge(report)
    return report


def fmt_is_engine_without_sidecar(path: Path) -> bool:
    """A ``.engine`` with no ``.engine.json`` but an ``.onnx.json`` beside it (the trtexec route)."""
    from .sidecar import sidecar_path

    onnx_sidecar = sidecar_path(path.with_suffix(".onnx"))
    return path.suffix == ".engine" and not sidecar_path(path).is_file() and onnx_sidecar.is_file()


def _judge(report: VerifyReport) -> None:
    t = report.thresholds
    if t.max_abs_err_rel is not None and report.max_abs_err is not None:
        limit = t.max_abs_err_rel * (report.logits_scale or 0.0)
        if not report.max_abs_err <= limit:
            report.failures.append(
                f"max abs error {report.max_abs_err:.3e} > {t.max_abs_err_rel:g} x logits scale "
                f"{report.logits_scale:.3g} = {limit:.3e}"
            )
    if t.min_cosine is not None and report.cosine is not None and not report.cosine >= t.min_cosine:
        report.failures.append(f"cosine {report.cosine:.6f} < {t.min_cosine}")
    if not report.argmax_agreement >= t.min_argmax_agreement:
        report.failures.append(
            f"argmax agreement {100 * report.argmax_agreement:.3f} % < {100 * t.min_argmax_agreement:g} %"
        )
    delta = report.miou_delta_points
    if t.max_miou_delta_points is not None and delta is not None and not abs(delta) <= t.max_miou_delta_points:
        report.failures.append(f"mIoU change {delta:+.3f} points exceeds {t.max_miou_delta_points} points")
