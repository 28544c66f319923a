"""README tables rendered from committed JSON, so no figure in README can drift from its file.

README marks each generated block::

    <!-- render: experiment ecenet_vs_fpn -->
    ...generated markdown...
    <!-- /render -->

The text between the markers is replaced by what the named renderer makes from the JSON; everything else in README
is left as written. ``python -m fastseg.experiments render`` rewrites README; ``--check`` only compares and fails on
any difference (the test suite runs that check).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .core import derive, new_record
from .declarations import EXPERIMENTS

RESULTS = Path("benchmarks/results")
_BLOCK = re.compile(r"(<!-- render: (?P<kind>[\w-]+)(?P<arg>[^>]*?) -->\n)(?P<body>.*?)(<!-- /render -->)", re.S)


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"README renders {path}, which does not exist")
    return json.loads(path.read_text())


def _pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def _code(command: str) -> str:
    return f"`{command}`"


_VERDICTS = {"incomplete": "pending", "holds on average": "holds on average (not on every seed)"}


def _claim_line(claim: dict[str, Any], digits: int = 2, tag: str = "") -> str:
    """One claim's verdict with its paired differences (the claimed side's advantage, in points, per seed)."""
    diffs = ", ".join(f"{float(d) * 100:+.{digits}f}" for d in claim["paired_differences"].values()) or "none yet"
    mean = claim.get("mean_difference")
    mean_text = "" if mean is None else f"; mean {mean * 100:+.{digits}f}"
    # For a lower-is-better metric the difference is worse - better, so a positive one still favours the claim.
    sign = ", positive when the claimed side is lower" if claim.get("lower_is_better") else ""
    verdict = _VERDICTS.get(claim["verdict"], claim["verdict"])
    return f"- {claim['text']}{tag}: **{verdict}** (paired differences per seed, points{sign}: {diffs}{mean_text})"


def _experiment_record(name: str, root: Path) -> dict[str, Any]:
    """The committed JSON of experiment ``name``; for a declared experiment without one yet, the record its
    declaration derives with no runs of its own (runs reused from other experiments' JSON included), so README
    shows what is pending."""
    path = root / RESULTS / "experiments" / f"{name}.json"
    if path.exists() or name not in EXPERIMENTS:
        return _load(path)
    return derive(EXPERIMENTS[name], new_record(EXPERIMENTS[name]), root / RESULTS / "experiments")


def _stats(s: dict[str, Any] | None, digits: int = 2) -> str:
    if not s or s.get("mean") is None:
        return "–"
    std = "" if s["std"] is None else f" ± {_pct(s['std'], digits)}"
    return f"{_pct(s['mean'], digits)}{std} (n={s['n']})"


def _command_line(record: dict[str, Any]) -> str:
    """The record's commands, then one sentence each for the runs `forget` dropped and the runs `merge` took in."""
    metric = record["metric"]
    notes = [  # `forget`: runs a code fix made stale, trained again
        f"Dropped as stale and run again ({drop['reason']}): "
        + ", ".join(f"{r['variant']} seed {r['seed']} ({_pct(r.get(metric))})" for r in drop["runs"])
        + "."
        for drop in record.get("dropped_runs", [])
    ]
    notes += [  # `merge`: runs made by another process into another copy of the record
        f"Run in another copy and merged ({'; '.join(_code(c) for c in merged['commands']) or 'the commands above'}): "
        + ", ".join(f"{variant} seed {seed}" for variant, seed in merged["runs"])
        + "."
        for merged in record.get("merged_from", [])
    ]
    if record["commands"]:
        head = "Commands: " + "; ".join(_code(c) for c in record["commands"]) + ("." if notes else "")
    elif record.get("merged_from"):
        return " ".join(notes)
    else:
        head = f"Not run yet: {_code('python -m fastseg.experiments run ' + record['experiment'])}."
    return " ".join([head, *notes])


def _report_lines(record: dict[str, Any]) -> list[str]:
    lines = []
    for r in record.get("reports", []):
        if r.get("mean") is None:
            lines.append(f"- {r['text']}: **pending**")
        else:
            per = " / ".join(_pct(v) for v in r["per_seed"].values())
            std = "" if r["std"] is None else f" ± {_pct(r['std'])}"
            lines.append(f"- {r['text']}: **{_pct(r['mean'])}{std}** % (n={r['n']}; per seed: {per})")
    return lines


def _cpus(record: dict[str, Any]) -> str:
    """The processors the record's runs ran on. Runs made since 2026-12 name theirs; for older runs, the record's
    machine (its last run command's) and those of the copies merged into it stand in."""
    cpus = [r["cpu"] for r in record["runs"] if "cpu" in r]
    if len(cpus) < len(record["runs"]):
        machines = [record.get("machine"), *(m.get("machine") for m in record.get("merged_from", []))]
        cpus += [m["cpu"] for m in machines if m]
    return " and ".join(dict.fromkeys(cpus)) or "CPU"


def render_experiment(name: str, root: Path) -> str:
    """Variant table (mean ± std and per seed, in %), each claim's verdict with its paired differences, commands."""
    record = _experiment_record(name, root)
    cfg = record["config"]
    budget, seeds = cfg["budget"], cfg["seeds"]
    metric = record["metric"]
    labels = {v["name"]: v.get("label") or v["name"] for v in cfg["variants"]}
    sources = {run["variant"]: run["from_experiment"] for run in record.get("reused_runs", [])}
    for variant, source in sources.items():  # say where reused numbers come from
        labels[variant] += f" (runs of `{source}`)"
    extra = record.get("summary_extra", {})
    lines = [
        f"{record['title']}: {budget['steps']} steps × {budget['batch_size']} images, seeds {seeds}, "
        f"{budget['val_length']} validation images; {_cpus(record)}."
        + ("" if record.get("complete") else " **Incomplete: runs are still missing.**"),
        "",
        f"| variant | val {metric} % (mean ± std) | per seed |" + "".join(f" {m.replace('_', ' ')} % |" for m in extra),
        "|---|---|---|" + "---|" * len(extra),
    ]
    for variant, s in record["summary"].items():
        per_seed = " / ".join(_pct(v) for v in s["per_seed"].values())
        std = "" if s["std"] is None else f" ± {_pct(s['std'])}"
        cells = "".join(f" {_stats(extra[m].get(variant))} |" for m in extra)
        lines.append(f"| {labels[variant]} | {_pct(s['mean'])}{std} (n={s['n']}) | {per_seed} |{cells}")
    if not record["summary"]:
        lines.append("| (no runs yet) | | |" + " |" * len(extra))
    report_lines = _report_lines(record)
    if report_lines:
        lines += ["", *report_lines]
    if record.get("claims"):
        lines.append("")
        lines += [_claim_line(claim) for claim in record["claims"]]
    lines += ["", _command_line(record)]
    return "\n".join(lines) + "\n"


def render_curve(name: str, root: Path) -> str:
    """The validation curve (mIoU at each evaluation) of every run of an experiment, one column per run."""
    record = _load(root / RESULTS / "experiments" / f"{name}.json")
    runs = record["runs"]
    steps = sorted({int(p[0]) for r in runs for p in r.get("curve_mIoU", [])})
    heads = [f"{r['variant']} seed {r['seed']}" for r in runs]
    lines = ["| step | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for step in steps:
        cells = []
        for r in runs:
            value = dict((int(p[0]), p[1]) for p in r.get("curve_mIoU", [])).get(step)
            cells.append(_pct(value, 1))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "Command: " + "; ".join(_code(c) for c in record["commands"])]
    return "\n".join(lines) + "\n"


def render_curve_mean(arg: str, root: Path) -> str:
    """``NAME [BETTER WORSE]``: the validation curve of every variant of experiment NAME, mean over its seeds at each
    evaluation (runs reused from other experiments included); with two variant names, also BETTER's lead over WORSE
    at each step, paired by seed, which shows whether a gap at the end of the budget was there early or was still
    closing."""
    name, *pair = arg.split()
    if len(pair) not in (0, 2):
        raise ValueError(f"curve-mean takes NAME [BETTER WORSE], got {arg!r}")
    record = _experiment_record(name, root)
    runs = list(record.get("reused_runs", [])) + list(record["runs"])
    variants = [v for v in record["config"]["variants"] if any(r["variant"] == v["name"] for r in runs)]
    unknown = [p for p in pair if p not in {v["name"] for v in record["config"]["variants"]}]
    if unknown:
        raise ValueError(f"curve-mean {arg!r}: {name} has no variant {unknown}")
    curves: dict[str, dict[int, dict[int, float]]] = {}  # variant -> step -> seed -> value
    for r in runs:
        for step, value in r.get("curve_mIoU", []):
            curves.setdefault(r["variant"], {}).setdefault(int(step), {})[r["seed"]] = value
    seeds = {v["name"]: sorted({r["seed"] for r in runs if r["variant"] == v["name"]}) for v in variants}
    heads = [f"{v.get('label') or v['name']} (seeds {seeds[v['name']]})" for v in variants]
    if pair:  # paired by seed: the lead over the seeds both variants have, not a difference of unequal means
        shared = sorted(set(seeds.get(pair[0], [])) & set(seeds.get(pair[1], [])))
        heads.append(f"`{pair[0]}` − `{pair[1]}` (paired, seeds {shared})")
    lines = ["| step | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]

    def mean(variant: str, step: int) -> float | None:
        values = curves.get(variant, {}).get(step)
        return statistics.fmean(values.values()) if values else None

    def lead(step: int) -> float | None:
        a, b = curves.get(pair[0], {}).get(step, {}), curves.get(pair[1], {}).get(step, {})
        both = sorted(set(a) & set(b))
        return statistics.fmean(a[seed] - b[seed] for seed in both) if both else None

    for step in sorted({step for c in curves.values() for step in c}):
        cells = [_pct(mean(v["name"], step), 1) for v in variants]
        if pair:
            difference = lead(step)
            cells.append("–" if difference is None else f"{100 * difference:+.1f}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "Validation mIoU % at each evaluation, mean over the seeds named in each column."]
    return "\n".join(lines) + "\n"


def render_trivial(name: str, root: Path) -> str:
    """Trivial predictors' mIoU on the validation split (what a trained model must beat)."""
    record = _load(root / RESULTS / "experiments" / f"{name}.json")
    rows = [
        ("majority class everywhere", record["majority"]),
        ("each image's true majority class (cheats)", record["stuff-oracle"]),
    ]
    lines = ["| trivial predictor | val mIoU % | val aAcc % |", "|---|---|---|"]
    lines += [f"| {label} | {_pct(m['mIoU'])} | {_pct(m['aAcc'])} |" for label, m in rows]
    lines += ["", f"{record['val_length']} validation images; command: {_code(record['command'])}"]
    return "\n".join(lines) + "\n"


def render_gss(name: str, root: Path) -> str:
    """The earlier GSS record (``legacy/gss_shapes``, written by a script since replaced by the ``gss_shapes``
    declaration): class-aware tokenizer round trip, GSS-FF / FT-W vs FPN at one short budget, one seed."""
    record = _load(root / RESULTS / "experiments" / f"{name}.json")
    r = record["results"]
    ff, ftw, fpn = r["gss_ff_resnet18"], r["gss_ftw_resnet18"], r["fpn_resnet18"]
    lines = [
        "| stage | budget | val mIoU % |",
        "|---|---|---|",
        f"| class-aware VQ-VAE tokenizer round trip (GT → maskige → tokens → maskige → classes; trained on label maps, "
        f"our setting, not the paper's) | {r['tokenizer_total_steps']} steps × {r['tokenizer']['batch_size']} | "
        f"{_pct(r['tokenizer_continued_runs'][-1]['roundtrip_mIoU'])} |",
        f"| `gss_ff_resnet18` (training-free inverse) | {ff['steps']} steps × {ff['batch_size']} | {_pct(ff['mIoU'])} |",
        f"| `fpn_resnet18`, same budget | {fpn['steps']} steps × {fpn['batch_size']} | {_pct(fpn['mIoU'])} |",
        f"| `gss_ftw_resnet18` (learned inverse, from the FF weights) | +{ftw['steps']} steps × {ftw['batch_size']} | "
        f"{_pct(ftw['mIoU'])} |",
        "",
        "One seed. Commands (of `benchmarks/experiments/gss_shapes.py`, since replaced; in the git history): "
        + "; ".join(_code(c) for c in record["commands"]),
    ]
    return "\n".join(lines) + "\n"


def render_gss_tokens(name: str, root: Path) -> str:
    """`benchmarks/experiments/gss_token_diagnosis.py`: one GSS-FF model's round trips (ignore band in the ignore
    colour, or filled) beside its prediction, and how its tokens differ from the encoder's."""
    record = _load(root / RESULTS / "experiments" / f"{name}.json")
    rows = [
        ("round trip, ignore band in the ignore colour (as measured before)", "roundtrip_ignore_colour"),
        ("round trip, ignore band filled from its neighbours (as GSS encodes; now)", "roundtrip"),
        ("GSS-FF's prediction (its own tokens)", "prediction"),
    ]
    lines = [
        "| decoding | val mIoU % | tokens equal to GSS-FF's % | pixel accuracy where they differ, encoder / GSS-FF % |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        entry = record[key]
        if "token_agreement_with_head" in entry:
            acc = entry["pixel_accuracy_where_tokens_differ"]
            extra = (
                f"{_pct(entry['token_agreement_with_head'], 1)} | {_pct(acc['encoder'], 1)} / {_pct(acc['head'], 1)}"
            )
        else:
            extra = "– | –"
        lines.append(f"| {label} | {_pct(entry['mIoU'])} | {extra} |")
    lines += [
        "",
        f"`{record['variant']}` seed {record['seed']} of `{record['experiment']}`, {record['images']} validation images. "
        f"Command: {_code(record['command'])}",
    ]
    return "\n".join(lines) + "\n"


def render_precise_bn(name: str, root: Path) -> str:
    """`benchmarks/experiments/precise_bn_diagnosis.py`: each finished job of a semi-supervised experiment as
    trained and after its BatchNorm statistics are re-estimated on clean labelled images; the claims on the latter."""
    record = _load(root / RESULTS / "experiments" / f"{name}.json")
    experiment = EXPERIMENTS[record["experiment"]]
    lines = [
        "| variant | val mIoU % as trained | BN statistics re-estimated | per seed, as trained → re-estimated |",
        "|---|---|---|---|",
    ]
    for v in experiment.variants:
        runs = sorted((r for r in record["runs"] if r["variant"] == v.name), key=lambda r: r["seed"])
        if not runs:
            continue
        per_seed = " / ".join(f"{_pct(r['recorded'])} → {_pct(r['mIoU'])}" for r in runs)
        lines.append(
            f"| {v.label or v.name} | {_stats(record['summary_recorded'].get(v.name))} | "
            f"{_stats(record['summary'].get(v.name))} | {per_seed} |"
        )
    lines.append("")
    lines += [_claim_line(c, tag=", BN statistics re-estimated") for c in record["claims"]]
    images = sorted({r["bn_images"] for r in record["runs"]})
    lines += [
        "",
        f"`{record['experiment']}`: {len(record['runs'])} finished jobs, the weights unchanged; statistics "
        f"re-estimated on {' / '.join(map(str, images))} images ({record['bn_images']}). "
        + ("Commands: " if len(record["commands"]) > 1 else "Command: ")
        + "; ".join(_code(c) for c in record["commands"]),
    ]
    return "\n".join(lines) + "\n"


def render_weaktr_check(name: str, root: Path) -> str:
    """`benchmarks/experiments/semples_cam_diagnosis.py` over several WeakTr phase-1 runs: each run's budget, its
    class-token loss beside the label-prior level, and the pseudo-mask mIoU of each of its CAM sources."""
    record = _load(root / RESULTS / "experiments" / f"{name}.json")
    sources = ("cross", "coarse", "fused", "fine")
    lines = [
        "| phase 1 (steps × batch, lr, seed) | class-token loss (last 5 logs) | pseudo mIoU % at t = "
        f"{record['threshold']}: "
        + " / ".join(sources)
        + " | fine CAM on the preferred texture % | class-token cosine |",
        "|---|---|---|---|---|",
    ]
    for entry in record["models"]:
        run = entry.get("run")  # absent for weights whose folder holds no run.json
        budget = f"{run['steps']} × {run['batch_size']}, {run['lr']:g}, seed {run['seed']}" if run else entry["cam"]
        cls_loss = entry.get("last_losses", {}).get("cls_loss")
        pseudo = " / ".join(f"{100 * entry[s]['mIoU_fixed']:.1f}" for s in sources)
        lines.append(
            f"| {budget} | {'–' if cls_loss is None else f'{cls_loss:.3f}'} | {pseudo} "
            f"| {100 * entry['fine']['leakage_mean']:.1f} | {entry['class_token_cosine']:.3f} |"
        )
    lines += [
        "",
        f"`{record['model']}` from the experiment's tiny CLIP, {record['length']} training images scored; a constant "
        f"prediction of each class's label frequency has a class-token loss of {record['label_prior_loss']:.3f}. Each "
        f"run: `fastseg semples weaktr --model {record['model']} --backbone-checkpoint CLIP --steps S --batch-size B "
        f"--lr LR --seed SEED`; scored by {_code(record['command'])}",
    ]
    return "\n".join(lines) + "\n"


def render_gss_stages(name: str, root: Path) -> str:
    """Per-stage latency of one GSS-FF forward, reference ops vs fused ops (their CPU kernels), from the record of
    ``benchmarks/gss_stages.py``."""
    record = _load(root / RESULTS / f"{name}.json")
    stages = record["stages"]
    ref, fused = stages["reference"], stages["fused"]
    lines = ["| stage | reference ms | fused ms |", "|---|---|---|"]
    for key in ("backbone", "head", "token_argmax", "decoder", "palette_inverse", "total"):
        lines.append(f"| {key.replace('_', ' ')} | {ref[key + '_ms']:.0f} | {fused[key + '_ms']:.0f} |")
    same = "identical" if stages["identical_class_maps"] else "different"
    load = record["machine"]["load_average_at_start"][0]
    lines += [
        "",
        f"One {record['size']}×{record['size']} image, batch {record['batch']}, best of {record['repeats']}, "
        f"{record['machine']['torch_threads']} thread(s) on {record['machine']['cpu']} (1-minute load {load} at the "
        f"start: other jobs shared the cores); the two paths give {same} class maps. Command: {_code(record['command'])}.",
    ]
    return "\n".join(lines) + "\n"


def render_mask2former(name: str, root: Path) -> str:
    """Mask2Former's three tasks from one panoptic training, beside the FPN baseline at the same budget."""
    record = _load(root / RESULTS / "experiments" / f"{name}.json")
    m2f = record["runs"]["mask2former_resnet18"]
    metrics = m2f["metrics"]
    pan, ins, sem = metrics["panoptic"], metrics["instance"], metrics["semantic"]
    fpn = record["runs"]["fpn_resnet18"]["metrics"]
    b = record["budget"]
    lines = [
        "| task | metric | value % |",
        "|---|---|---|",
        f"| panoptic | PQ / SQ / RQ | **{_pct(pan['PQ'], 1)}** / {_pct(pan['SQ'], 1)} / {_pct(pan['RQ'], 1)} |",
        f"| | PQ things / stuff | {_pct(pan['things']['PQ'], 1)} / {_pct(pan['stuff']['PQ'], 1)} |",
        f"| instance | mask AP / AP50 / AP75 | **{_pct(ins['AP'], 1)}** / {_pct(ins['AP50'], 1)} / "
        f"{_pct(ins['AP75'], 1)} |",
        f"| semantic | mIoU (`fpn_resnet18` at the same budget: {_pct(fpn['mIoU'], 1)}) | **{_pct(sem['mIoU'], 1)}** |",
        "",
        f"{b['steps']} steps × {b['batch_size']} images, one seed. Commands: {_code(m2f['train']['command'])}; "
        f"{_code(m2f['eval']['command'])}; the whole record: {_code(record['command'])}.",
    ]
    return "\n".join(lines) + "\n"


# Weakly supervised comparisons (the "wsss" recipe: CAM method -> pseudo masks -> segmenter)
_WSSS_COLUMNS = (
    ("pseudo_mIoU_fixed", "pseudo-mask mIoU %, t = {t}"),
    ("pseudo_mIoU_swept", "pseudo-mask mIoU %, t swept on train GT"),
    ("leakage_mean", "texture leakage % (lower is better)"),
    ("classification.mAP", "classifier mAP % (val)"),
    ("mIoU", "segmenter val mIoU %"),
)


def _run_value(run: dict[str, Any], key: str) -> float | None:
    value: Any = run
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else float(value)


def _mean_cell(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:.{digits}f} (n=1)"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f} (n={len(values)})"


def render_wsss(name: str, root: Path) -> str:
    """A weakly supervised experiment: per method the pseudo-mask mIoU at the fixed and at the swept threshold, the
    co-occurrence leakage, the classifier's mAP and the final segmenter's val mIoU; per shape its pseudo-mask IoU
    beside its preferred texture; the claims (holds / does not hold / pending). Before the experiment has run (no
    JSON), the declared table with every cell pending."""
    from ..data.shapes import ShapesConfig
    from ..data.weak import weak_class_names
    from .core import judge_claim, new_record
    from .declarations import EXPERIMENTS

    experiment = EXPERIMENTS[name]
    path = root / RESULTS / "experiments" / f"{name}.json"
    record = _load(path) if path.exists() else None
    cfg = record["config"] if record else new_record(experiment)["config"]
    runs = record["runs"] if record else []
    claims = (
        record["claims"]
        if record
        else [judge_claim(c, [], experiment.metric, experiment.seeds) for c in experiment.claims]
    )
    settings = cfg["variants"][0]["recipe_kwargs"]
    cam, semples, clip, budget = settings["cam"], settings["semples"], settings["clip"], cfg["budget"]
    cam_methods = [v for v in cfg["variants"] if v["recipe_kwargs"]["method"] != "supervised"]
    lines = [
        f"{experiment.title}. Seeds {cfg['seeds']}. Every CAM method trains {cam['steps']} steps × "
        f"{cam['batch_size']} images on image-level labels (WeakTr from the image tower of a `{clip['config']}` "
        f"trained {clip['steps']} steps × {clip['batch_size']} on captions, once per experiment); SemPLeS adds runs "
        f"(a), (b), (c) of {semples['steps']} steps × {semples['batch_size']} each. Pseudo masks of "
        f"{settings['pseudo_length']} training images (t = {settings['threshold']}, no CRF) train `"
        f"{cfg['variants'][0]['model']}` for {budget['steps']} steps × {budget['batch_size']}, scored on "
        f"{budget['val_length']} val images; pseudo masks are scored on {settings['eval_length']} training images."
        + ("" if record and record.get("complete") else " **Pending: runs are still missing.**"),
        "",
        "| method | " + " | ".join(h.format(t=settings["threshold"]) for _, h in _WSSS_COLUMNS) + " |",
        "|---" * (len(_WSSS_COLUMNS) + 1) + "|",
    ]
    for variant in cfg["variants"]:
        mine = sorted((r for r in runs if r["variant"] == variant["name"]), key=lambda r: r["seed"])
        cells = []
        for key, _ in _WSSS_COLUMNS:
            values = [v for v in (_run_value(r, key) for r in mine) if v is not None]
            cells.append(_mean_cell(values) if mine else "pending")
        lines.append(f"| {variant.get('label') or variant['name']} | " + " | ".join(cells) + " |")
    world = ShapesConfig()
    names, preferred = weak_class_names(world), world.preferred_stuff_ids
    stuff = len(world.stuff_classes)
    lines += [
        "",
        f"Per shape, pseudo-mask IoU % at t = {settings['threshold']} (in brackets: the share % of its preferred "
        "texture labelled as the shape, in the images that hold it, the spurious background SemPLeS targets):",
        "",
        "| shape (preferred texture) | " + " | ".join(v["name"] for v in cam_methods) + " |",
        "|---" * (len(cam_methods) + 1) + "|",
    ]
    for k, shape in enumerate(names[1:]):
        cells = []
        for variant in cam_methods:
            mine = [r for r in runs if r["variant"] == variant["name"]]
            iou = [r["pseudo_IoU_fixed"][shape] for r in mine]
            leak = [r["leakage"][shape] for r in mine if r["leakage"].get(shape) is not None]
            leak_text = f"{100 * sum(leak) / len(leak):.0f}" if leak else "–"
            cells.append(f"{100 * sum(iou) / len(iou):.1f} ({leak_text})" if iou else "pending")
        texture = world.class_names[preferred[stuff + k]]
        lines.append(f"| {shape} ({texture}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [_claim_line(claim, tag=f" [{claim.get('metric', experiment.metric)}]") for claim in claims]
    commands = record["commands"] if record else [f"python -m fastseg.experiments run {name} --threads 1"]
    lines += ["", ("Commands: " if record else "Command (not run yet): ") + "; ".join(_code(c) for c in commands)]
    return "\n".join(lines) + "\n"


# PADing's claims tables (the earlier records under legacy/, written by benchmarks/experiments/pading_shapes.py, since
# replaced by the pading_zero_shot declaration; and the declaration's record)
PADING_LABELS = {
    "seen_only": "seen-only Mask2Former classifier (no stage 2)",
    "pading": "PADing (primitive generator + structure losses)",
    "gmmn": "GMMN generator (MLP, noise concatenated; no primitives)",
    "no_structure": "PADing without structure losses (lambda_s = 0)",
}


def _pading_cell(stats: dict | None) -> str:
    if not stats:
        return "n/a"
    per = " / ".join("nan" if math.isnan(v) else f"{100 * v:.1f}" for v in stats["per_seed"])
    std = "" if math.isnan(stats["std"]) else f" ± {100 * stats['std']:.1f}"
    return f"{100 * stats['mean']:.1f}{std} ({per})"


def render_pading_table(report: dict) -> str:
    """The README table: per variant and metric, seen / unseen / harmonic in percent, mean ± std (per seed)."""
    summary = report["summary"]
    lines = ["| variant | metric | seen | unseen | harmonic |", "|---|---|---|---|---|"]
    for variant, label in PADING_LABELS.items():
        for metric in ("mIoU", "PQ", "AP50") if variant in summary else ():
            cells = [_pading_cell(summary[variant].get(f"{metric}_{side}")) for side in ("seen", "unseen", "harmonic")]
            lines.append(f"| {label} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_pading(name: str, root: Path) -> str:
    return render_pading_table(_load(root / RESULTS / "experiments" / f"{name}.json")) + "\n"


def render_pading_experiment(name: str, root: Path) -> str:
    """A PADing declaration's record (``fastseg.experiments`` format): the seen / unseen / harmonic table of
    `render_pading_table`, the reported figures, each claim's verdict and the commands."""
    record = _experiment_record(name, root)
    extra, cfg = record.get("summary_extra", {}), record["config"]
    summary: dict[str, dict[str, Any]] = {}
    for metric, by_variant in extra.items():
        for variant, s in by_variant.items():
            per_seed = [math.nan if v is None else v for v in s["per_seed"].values()]
            summary.setdefault(variant, {})[metric] = {
                "mean": math.nan if s["mean"] is None else s["mean"],
                "std": math.nan if s["std"] is None else s["std"],
                "per_seed": per_seed,
            }
    budget, stage1 = cfg["budget"], cfg["variants"][0]["recipe_kwargs"]["stage1"]
    lines = [
        f"{record['title']}: per seed one seen-only `mask2former_resnet18` trained {stage1['steps']} steps × "
        f"{budget['batch_size']} images, then {budget['steps']} stage-2 iterations × {budget['batch_size']} images for "
        f"every variant from it; seeds {cfg['seeds']}, {budget['val_length']} validation images with every class; "
        f"values in %, mean ± std (per seed)."
        + ("" if record.get("complete") else " **Incomplete: runs are still missing.**"),
        "",
        render_pading_table({"summary": summary}) if summary else "(no runs yet)",
    ]
    report_lines = _report_lines(record)
    claims = [_claim_line(claim, digits=1) for claim in record.get("claims", [])]
    if report_lines or claims:
        lines += ["", *report_lines, *claims]
    lines += ["", _command_line(record)]
    return "\n".join(lines) + "\n"


# The data loader's throughput (benchmarks/loader_throughput.py writes the JSON)
def render_loader_markdown(record: dict) -> str:
    """The README's loader table and its caption, from a JSON record of this script (tests compare the two)."""
    cfg, load = record["config"], record["load_average_1min"]
    lines = ["| DataLoader workers | images / s | ms / image |", "|---|---|---|"]
    for row in record["results"]:
        cpu = f" ({row['cpu_ms_per_image']:.0f} ms of CPU)" if "cpu_ms_per_image" in row else ""
        lines.append(f"| {row['workers']} | {row['images_per_s']:.1f} | {row['ms_per_image']:.0f}{cpu} |")
    first = record["results"][0]
    text = "\n".join(lines) + "\n\n"
    text += (
        f"Measured by `{record['command']}` ({cfg['images']} images {cfg['image_size'][0]} x {cfg['image_size'][1]}, "
        f"crops {cfg['crop_size'][0]} x {cfg['crop_size'][1]}, batch {cfg['batch_size']}) on "
        f"{record['environment']['device']} with {record['cpu_count']} cores shared with other jobs (1-minute load "
        f"{load['before']:.1f} before, {load['after']:.1f} after), so extra workers find no free core and the wall "
        f"figures are lower bounds."
    )
    if "cpu_ms_per_image" in first:
        text += (
            f" The CPU time per image, {first['cpu_ms_per_image']:.0f} ms, is about "
            f"{first['images_per_s_per_uncontended_core']:.0f} images / s per free core."
        )
    step = record.get("train_step")
    if step:
        text += (
            f" A `{step['model']}` training step on the same CPU takes {step['ms_per_image']:.0f} ms per image "
            f"({step['threads']} thread), so one loader process keeps "
            f"{step['ms_per_image'] / first['ms_per_image']:.0f}x ahead of it here."
        )
    return text


def render_loader(name: str, root: Path) -> str:
    return render_loader_markdown(_load(root / RESULTS / f"{name}.json")) + "\n"


def render_static(name: str, root: Path) -> str:
    """The compile report of every shipped kernel launch for sm_87 / sm_90 and the traffic model (`fastseg.bench.static`)."""
    from ..bench.static import markdown_tables

    return markdown_tables(_load(root / RESULTS / name / "static.json")) + "\n"


def render_bench(name: str, root: Path) -> str:
    """A `fastseg bench --json` record: one row per timed case, each provider's median ms and speed-up over the
    reference; the cases no provider could time here are counted, not listed."""
    record = _load(root / RESULTS / f"{name}.json")
    env, args = record["environment"], record["arguments"]
    cases: dict[tuple[str, str], list[str]] = {}
    untimed = 0
    for row in record["rows"]:
        if row["median_ms"] is None:
            untimed += 1
            continue
        speedup = "" if row.get("speedup") is None else f" ({row['speedup']:.2f}×)"
        cases.setdefault((row["name"], row["shape"]), []).append(f"{row['provider']} {row['median_ms']:.1f}{speedup}")
    lines = ["| case | shape | median ms per provider (speed-up over the reference) |", "|---|---|---|"]
    lines += [f"| `{case}` | {shape} | {' · '.join(cells)} |" for (case, shape), cells in cases.items()]
    lines += [
        "",
        f"{env['device']}, {env.get('cpu_threads')} threads, torch {env['torch']}, fastseg commit "
        f"{env.get('fastseg_commit')}; {untimed} provider rows not timed on this device (Triton needs a GPU, or the "
        f"provider is not installed). Command: `fastseg {args['command']}` with the arguments stored in the record.",
    ]
    if env.get("omp_wait_policy"):
        lines[-1] += f" OpenMP wait policy {env['omp_wait_policy']}."
    if record.get("seconds"):
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in record["seconds"].items() if k != "total")
        lines[-1] += f" The run took {record['seconds']['total']:.1f} s in process ({phases})."
    busy_path = root / RESULTS / f"{name}_beside_busy.json"
    if busy_path.exists():
        lines += ["", _slowdown_beside_busy(record, _load(busy_path), f"{RESULTS}/{name}_beside_busy.json")]
    return "\n".join(lines) + "\n"


def _slowdown_beside_busy(alone: dict[str, Any], busy: dict[str, Any], path: str) -> str:
    """How much one busy process beside the run slows each timed case (the OpenMP wait-policy check)."""

    def medians(record: dict[str, Any]) -> dict[tuple, float]:
        return {(r["name"], r["shape"], r["provider"]): r["median_ms"] for r in record["rows"] if r["median_ms"]}

    a, b = medians(alone), medians(busy)
    ratios = sorted(b[k] / a[k] for k in a if k in b)
    mid = statistics.median(ratios)
    return (
        f"Robustness: the same command run {busy['condition']}, took {busy['seconds']['total']:.1f} s in process; "
        f"over the {len(ratios)} cases timed in both, each case's median was {mid:.2f}× its time alone (median; "
        f"range {ratios[0]:.2f}-{ratios[-1]:.2f}×); a busy third thread on two cores leaves the run's two threads "
        f"about 2/3 of the CPU, so some slowdown is the fair share, not a collapse. Record: `{path}`."
    )


def render_ci(name: str, root: Path) -> str:
    """A recorded run of `.ci/run` on a fresh clone: what it ran, counts and times."""
    r = _load(root / RESULTS / f"{name}.json")
    unit, smoke = r["unit"], r["smoke"]
    minutes, seconds = divmod(int(r["wall_s_total"]), 60)
    return (
        f"On a fresh clone at commit `{r['commit']}` on this 2-core machine ({r['machine']['cpu']}; "
        f"{r['machine']['note']}), `{r['command']}` took at most {minutes} min {seconds:02d} s in all, exit status "
        f"{r['exit_code']}:\n"
        + "".join(f"- {step};\n" for step in r["steps"][:3])
        + f"- the unit suite: **{unit['passed']} passed, {unit['skipped']} skipped** (GPU and TensorRT tests), "
        f"{unit['deselected']} deselected (`slow`), in {unit['seconds'] / 60:.1f} min;\n"
        f"- the benchmark smoke run: {smoke['passed']} passed, {smoke['skipped']} skipped, in {smoke['seconds']:.0f} s.\n"
    )


def render_vq_faiss(name: str, root: Path) -> str:
    """`benchmarks/vq_vs_faiss.py`: vq_nearest's CPU paths vs faiss-cpu under each OpenMP wait policy."""
    record = _load(root / RESULTS / f"{name}.json")
    c, results = record["config"], record["results"]
    providers = c["providers"].split(",")
    lines = [
        "| OpenMP wait policy | " + " | ".join(f"{p} median ms (p20-p80)" for p in providers) + " | blocked / faiss |",
        "|---" * (len(providers) + 2) + "|",
    ]
    for policy, by_provider in results.items():
        cells = []
        for p in providers:
            w = by_provider[p]["wall"]
            ok = "" if by_provider[p]["agrees_with_reference"] else " (differs from the reference)"
            cells.append(f"{w['median_ms']:.1f} ({w['p20_ms']:.1f}-{w['p80_ms']:.1f}){ok}")
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {by_provider['blocked_over_faiss']:.2f}× |")
    load = record.get("load_average_1min", {})
    lines += [
        "",
        f"N {c['n']} × K {c['k']} × D {c['d']} fp32, {c['threads']} threads, {c['rounds']} rounds × {c['repeats']} "
        f"repeats, each provider in its own process; 1-minute load {load.get('before', float('nan')):.2f} before, "
        f"{load.get('after', float('nan')):.2f} after. Command: `{record['command']}`.",
    ]
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[str, Path], str]] = {
    "experiment": render_experiment,
    "curve": render_curve,
    "curve-mean": render_curve_mean,
    "trivial": render_trivial,
    "gss": render_gss,
    "gss-stages": render_gss_stages,
    "gss-tokens": render_gss_tokens,
    "precise-bn": render_precise_bn,
    "weaktr-check": render_weaktr_check,
    "mask2former": render_mask2former,
    "pading": render_pading,
    "pading-experiment": render_pading_experiment,
    "loader": render_loader,
    "static": render_static,
    "bench": render_bench,
    "vq-faiss": render_vq_faiss,
    "ci": render_ci,
    "wsss": render_wsss,
}


def render_text(text: str, root: Path) -> str:
    """``text`` with every render block regenerated."""

    def replace(match: re.Match[str]) -> str:
        kind, arg = match["kind"], match["arg"].strip()
        if kind not in RENDERERS:
            raise ValueError(f"README asks for renderer {kind!r}; known: {sorted(RENDERERS)}")
        return match.group(1) + RENDERERS[kind](arg, root) + match.group(5)

    return _BLOCK.sub(replace, text)


def render_readme(root: str | Path = ".", check: bool = False) -> bool:
    """Re-render README.md under ``root``; with ``check`` only compare. Returns True when README was up to date."""
    root = Path(root)
    readme = root / "README.md"
    text = readme.read_text()
    rendered = render_text(text, root)
    if rendered == text:
        return True
    if not check:
        readme.write_text(rendered)
    return False
