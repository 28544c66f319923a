"""``--data NAME --data-root DIR`` for ``fastseg train / eval / predict``, and ``fastseg datasets``.

The shapes world stays the default (``--data shapes``); any name of ``fastseg.data.list_datasets()`` reads that
dataset from ``--data-root`` in its usual on-disk layout. ``--data-arg KEY=VALUE`` passes reader options
(``unseen=pading``, ``label_kind=trainIds``, ``split_file=splits/1_8.txt``, ...; values are parsed as JSON when they
parse). A model built for a dataset takes its class names, palette, normalisation and ignore index, so checkpoints,
tables and exports carry them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .common import model_kwargs

__all__ = [
    "add_data_args",
    "add_datasets_command",
    "adopt_dataset_cfg",
    "build_real_training",
    "dataset_fields",
    "is_real",
    "open_dataset",
]


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--data-root``, ``--data-arg`` on a sub-command's parser."""
    from ..data import list_datasets

    parser.add_argument(
        "--data",
        default="shapes",
        choices=["shapes", *list_datasets()],
        help="dataset: the built-in shapes world (default) or a real dataset read from --data-root",
    )
    parser.add_argument(
        "--data-root",
        help="the dataset's folder, or one holding it (default: $FASTSEG_DATASETS; layouts: `fastseg datasets`)",
    )
    parser.add_argument(
        "--data-arg",
        action="append",
        metavar="KEY=VALUE",
        help="reader option, e.g. unseen=pading, label_kind=trainIds, split_file=PATH (repeatable)",
    )


def is_real(args: argparse.Namespace) -> bool:
    """True when the command reads a dataset from disk rather than the shapes world."""
    return getattr(args, "data", "shapes") != "shapes"


def open_dataset(args: argparse.Namespace, split: str, **options: Any):
    """``build_dataset(args.data, args.data_root, split, **--data-arg, **options)`` with CLI-worded errors."""
    from ..data import build_dataset

    root = args.data_root or os.environ.get("FASTSEG_DATASETS")
    if not root:
        raise SystemExit(
            f"--data {args.data} needs --data-root DIR (the folder holding the dataset) or "
            "FASTSEG_DATASETS set to a folder holding every dataset"
        )
    merged = {**model_kwargs(args.data_arg, "--data-arg"), **options}
    if options.get("transform", "auto") is None:
        merged.pop("pipeline", None)  # evaluation splits are read as stored
    elif "pipeline" in options:  # --crop on top of a --data-arg pipeline={...}
        merged["pipeline"] = {
            **(model_kwargs(args.data_arg, "--data-arg").get("pipeline") or {}),
            **(options["pipeline"] or {}),
        }
    return build_dataset(args.data, root, split, **merged)


def dataset_fields(args: argparse.Namespace) -> dict[str, Any]:
    """PretrainedCfg fields of ``--data``: from the dataset on disk when ``--data-root`` is given, else from the
    reader's class tables (readers whose classes come from a JSON file need the root)."""
    from ..data.datasets import dataset_class

    if args.data_root or os.environ.get("FASTSEG_DATASETS"):
        return open_dataset(args, dataset_class(args.data).splits[1], transform=None, verify=0).pretrained_cfg_fields()
    cls = dataset_class(args.data)
    if not cls.class_names:
        raise SystemExit(f"--data {args.data} reads its classes from the annotation JSON: give --data-root DIR")
    return {
        "num_classes": len(cls.class_names),
        "class_names": list(cls.class_names),
        "palette": [list(map(int, c)) for c in cls.palette],
        "mean": list(cls.mean),
        "std": list(cls.std),
        "ignore_index": cls.ignore_index,
        "dataset": cls.name,
    }


def adopt_dataset_cfg(model: Any, fields: dict[str, Any]) -> Any:
    """Give ``model`` the dataset's class names, palette, mean / std, ignore index and input size (architecture
    fields such as the output stride stay the model's)."""
    from ..registry import PretrainedCfg

    model.pretrained_cfg = PretrainedCfg.from_dict({**model.pretrained_cfg.to_dict(), **fields})
    return model


def build_real_training(args: argparse.Namespace, model_kwargs: dict[str, Any]):
    """``(model, train_set, val_set, loss_fn)`` for ``fastseg train --data NAME``.

    ``--crop H,W`` overrides the dataset's training crop. ``--labelled-fraction f < 1`` trains UniMatch / S4MIM
    models on labelled + unlabelled pairs (their semi-supervised loss) and any other model on the labelled subset.
    """
    from ..data.semi import SemiSupervisedPairs
    from ..engine.recipes.semi import s4mim_loss
    from ..models.unimatch import DeepLabV3PlusSemi
    from ..registry import create_model

    pipeline = {"crop_size": tuple(args.crop)} if getattr(args, "crop", None) else {}
    semi = args.labelled_fraction < 1.0
    subset_options = {"labelled_fraction": args.labelled_fraction, "seed": args.seed} if semi else {}
    labelled = open_dataset(
        args, args.train_split, pipeline=pipeline, subset="labelled" if semi else None, **subset_options
    )
    model = create_model(args.model, num_classes=labelled.num_classes, **model_kwargs)
    adopt_dataset_cfg(model, labelled.pretrained_cfg_fields())
    loss_fn = None
    train_set: Any = labelled
    if semi and isinstance(model, DeepLabV3PlusSemi):
        unlabelled = open_dataset(args, args.train_split, pipeline=pipeline, subset="unlabelled", **subset_options)
        train_set, loss_fn = SemiSupervisedPairs(labelled, unlabelled, seed=args.seed), s4mim_loss
    val_set = open_dataset(args, args.val_split, transform=None) if args.val_split != "none" else None
    return model, train_set, val_set, loss_fn


# ------------------------------------------------------------------------------------------------------ datasets
def cmd_datasets(args: argparse.Namespace) -> int:
    from ..data.datasets import dataset_class, list_datasets

    if args.name is None:
        for name in list_datasets():
            cls = dataset_class(name)
            protocol = cls.eval_protocol
            test = protocol.mode + (
                f" {protocol.crop_size} stride {protocol.stride}" if protocol.mode == "slide" else ""
            )
            test += f", resize into {protocol.scale}" if protocol.scale else ""
            print(f"{name:<15} splits {','.join(cls.splits):<30} test: {test}")
            print(f"{'':<15} layout: {cls.layout}")
        return 0
    args.data = args.name
    splits = [args.split] if args.split else list(dataset_class(args.name).splits)
    status = 0
    for split in splits:
        try:
            dataset = open_dataset(args, split, transform=None, verify=-1 if args.full else 4)
        except (FileNotFoundError, ValueError, OSError) as err:
            print(f"{args.name} {split}: {err}", file=sys.stderr)
            status = 1
            continue
        checked = len(dataset) if args.full else min(4, len(dataset))
        print(
            f"{args.name} {split}: {len(dataset)} images, {dataset.num_classes} classes; {checked} label files "
            f"decoded and checked" + ("" if args.full else " (--full: all of them)")
        )
    return status


def add_datasets_command(sub: argparse._SubParsersAction) -> None:
    """``fastseg datasets [NAME --data-root DIR [--split S] [--full]]``: list readers, or check a dataset on disk."""
    from ..data import list_datasets

    p = sub.add_parser("datasets", help="list the dataset readers and their layouts, or check a dataset on disk")
    p.add_argument("name", nargs="?", choices=list_datasets(), help="check this dataset (with --data-root)")
    p.add_argument("--data-root", help="the dataset's folder")
    p.add_argument("--data-arg", action="append", metavar="KEY=VALUE", help="reader option (repeatable)")
    p.add_argument("--split", help="check only this split")
    p.add_argument("--full", action="store_true", help="decode and check every label file")
    p.set_defaults(func=cmd_datasets)
