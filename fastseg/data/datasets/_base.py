"""What every on-disk dataset shares: file records, decoding with clear errors, splits, samples in the shapes format.

A reader subclasses :class:`FolderDataset` and implements ``_scan`` (the list of :class:`Record`, one per image, in a
deterministic order) and ``_load_targets`` (the label file -> ``"mask"`` and, for panoptic / instance data,
``"instances"``). Everything else lives here once:

* samples use the keys of :class:`fastseg.data.ShapesDataset`, so every model and the engine consume them unchanged:
  ``"image"`` (3, H, W) float32 normalised, ``"mask"`` (H, W) int64 with ``ignore_index``, ``"image_labels"`` (K,)
  multi-hot of the classes in the whole label map (weak supervision), ``"labelled"`` (0-d bool), ``"index"``; and for
  panoptic / instance data ``"instances"`` (H, W) int64 (0 = none, 1..n) with ``"instance_classes"``
  (``max_instances``,) padded with -1;
* checks that name the file and what was expected: a missing folder, an image without its label, an empty split
  (at construction), a label file that is lossy, multi-channel (a palette PNG saved as RGB), or holds an id outside
  the class range (the first ``verify`` files at construction, every file when it is read);
* labelled / unlabelled subsets by fraction (a seeded permutation) or by a split file (UniMatch's format: one
  ``image [label]`` line per labelled image), and the zero-shot ``unseen`` classes (ignore their pixels, or drop the
  images that contain them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..transforms import EvalProtocol, TrainPipeline
from ..validate import describe_bad_labels

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FolderDataset",
    "Record",
    "read_image",
    "read_label_png",
    "require_dir",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Pillow warns above 89.5 MP and errors only above twice that; a segmentation image is far below either.
DEFAULT_MAX_PIXELS = 64 * 2**20


@dataclass(frozen=True)
class Record:
    """One image of a split: its file, its label file (``None`` when the split has none) and a reader-specific
    payload (e.g. the panoptic ``segments_info``)."""

    image: Path
    label: Path | None
    key: str
    extra: Any = field(default=None, compare=False)


def require_dir(path: Path, what: str, hint: str = "") -> Path:
    """Return ``path`` if it is a folder, else raise ``FileNotFoundError`` saying what was expected there."""
    if not path.is_dir():
        raise FileNotFoundError(f"missing folder {path} ({what})" + (f"; {hint}" if hint else ""))
    return path


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB. Decodes by content (a PNG named .jpg works); truncated files and oversized images raise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > max_pixels:
                    raise ValueError(
                        f"{path}: image has {img.width * img.height} pixels ({img.height}x{img.width}), more than "
                        f"the limit of {max_pixels} (max_pixels=)"
                    )
                if img.width == 0 or img.height == 0:
                    raise ValueError(f"{path}: image has zero area")
                return np.asarray(img.convert("RGB"))
    except (OSError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def _describe_colours(rgb: np.ndarray, palette: np.ndarray | None) -> str:
    colours = np.unique(rgb.reshape(-1, rgb.shape[-1])[:, :3], axis=0)
    if palette is not None and len(palette):
        known = {tuple(int(c) for c in row) for row in palette}
        known |= {(0, 0, 0), (224, 224, 192), (255, 255, 255)}  # background / VOC's border colour / void
        if all(tuple(int(c) for c in colour) in known for colour in colours[:4096]):
            return (
                "; its colours are this dataset's palette colours, so it is a colour-coded mask (a palette PNG saved "
                "as RGB, e.g. by Image.convert('RGB'), or a '*_color.png' visualisation): use the class-id PNG, or "
                "map each colour to its index in the palette and save that single-channel image"
            )
    return f"; it holds {len(colours)} distinct colours"


def read_label_png(path: Path, palette: np.ndarray | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A single-channel label map (H, W): uint8 for mode L / P (indices, not colours), int64 for I;16 / I.

    Raises:
        ValueError: a JPEG (lossy) label, an RGB / RGBA label (the message says whether its colours are the
            dataset's palette), or a label larger than ``max_pixels``.
        OSError: an unreadable or truncated file.
    """
    if path.suffix.lower() in (".jpg", ".jpeg"):
        raise ValueError(f"{path}: label maps must be lossless PNGs; a JPEG changes class ids at every edge")
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                raise ValueError(f"{path}: this label file is a JPEG (lossy) despite its name; labels must be PNG")
            if img.width * img.height > max_pixels:
                raise ValueError(f"{path}: label has {img.width * img.height} pixels, more than {max_pixels}")
            mode = img.mode
            if mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                rgb = np.asarray(img.convert("RGB"))
                raise ValueError(
                    f"{path}: label PNG has {len(img.getbands())} channels (mode {mode}); expected a single-channel "
                    f"map of class ids (mode L, P or I;16)" + _describe_colours(rgb, palette)
                )
            array = np.asarray(img)  # mode P gives the palette *indices*, which are the class ids
    except OSError as err:
        raise OSError(f"cannot read label {path}: {err}") from err
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel label map, got an array of shape {array.shape}")
    return array if array.dtype == np.uint8 else array.astype(np.int64)


def _as_names(values: Iterable[int | str], class_names: Sequence[str], what: str) -> tuple[int, ...]:
    """Class names or ids -> sorted ids, with a ValueError naming the unknown ones."""
    ids = []
    lookup = {name: i for i, name in enumerate(class_names)}
    for value in values:
        if isinstance(value, str):
            if value not in lookup:
                raise ValueError(f"{what}: unknown class name {value!r}; the classes are {list(class_names)}")
            ids.append(lookup[value])
        else:
            if not 0 <= int(value) < len(class_names):
                raise ValueError(f"{what}: class id {value} is outside 0..{len(class_names) - 1}")
            ids.append(int(value))
    return tuple(sorted(set(ids)))


class FolderDataset(Dataset):
    """Base of the on-disk readers (see the module docstring). Subclasses set the class attributes below.

    Args:
        root: the dataset folder (each reader documents its layout and accepts a parent folder that contains it).
        split: ``"train"``, ``"val"`` (and whatever else the reader lists in ``splits``).
        transform: ``"auto"`` (the dataset's :class:`TrainPipeline` on training splits or when ``pipeline`` is
            given, nothing otherwise), ``None`` (no augmentation: images at their stored size), a
            :class:`TrainPipeline`, or any callable ``(sample, rng) -> sample`` on NumPy arrays.
        pipeline: field overrides of the default :class:`TrainPipeline` (e.g. ``{"crop_size": (256, 256)}``).
        labelled_fraction: share of the split that is labelled (semi-supervision); chosen by a permutation seeded
            with ``seed``. Mutually exclusive with ``split_file``.
        split_file: text file listing the labelled images, one per line (first token; matched by file stem or key).
        subset: ``None`` (every image, ``"labelled"`` flag set per image), ``"labelled"`` or ``"unlabelled"``.
        unseen: zero-shot unseen classes: ``None``, ``"pading"`` (the PADing protocol's list for this dataset) or a
            list of class names / ids.
        unseen_mode: ``"ignore"`` (unseen pixels become ``ignore_index``), ``"exclude"`` (images containing an unseen
            class are dropped), ``"keep"``; default: the reader's training protocol on training splits, ``"keep"``
            on the others (evaluation covers every class).
        verify: number of label files fully decoded and checked at construction (``-1``: all of them).
        max_instances: length of ``"instance_classes"`` (panoptic / instance readers); more instances is an error.
        max_pixels: largest image accepted.
        seed: seeds the labelled permutation.
        panoptic: (panoptic / instance readers) also return ``"panoptic"``, the (H, W) int64 map
            ``class * label_divisor + instance`` (stuff: instance 0; unlabelled and crowd pixels: -1), the encoding
            of ``fastseg.metrics.panoptic`` and the shapes world's ``panoptic=True``.
        eval_protocol: replaces the reader's test protocol (an :class:`EvalProtocol`), or changes some of its fields
            (a dict, e.g. ``{"mode": "slide", "crop_size": 640, "stride": 608}`` for ECENet's ADE20K setting or
            ``{"scale": None}`` to test at the stored size).
    """

    name: str = ""
    class_names: tuple[str, ...] = ()
    palette: np.ndarray = np.zeros((0, 3), np.uint8)
    ignore_index: int = 255
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    thing_classes: tuple[int, ...] = ()
    splits: tuple[str, ...] = ("train", "val")
    train_splits: tuple[str, ...] = ("train",)  # splits that get the training pipeline by default
    default_pipeline: TrainPipeline = TrainPipeline()
    eval_protocol: EvalProtocol = EvalProtocol()
    pading_unseen: tuple[str, ...] = ()
    train_unseen_mode: str = "ignore"
    has_instances: bool = False
    label_divisor: int = 1000  # panoptic id = class * label_divisor + instance
    layout: str = ""  # one-line description of the expected tree, for error messages

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transform: Any = "auto",
        pipeline: dict[str, Any] | None = None,
        labelled_fraction: float | None = None,
        split_file: str | Path | None = None,
        subset: str | None = None,
        unseen: str | Sequence[int | str] | None = None,
        unseen_mode: str | None = None,
        verify: int = 4,
        max_instances: int = 256,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        seed: int = 0,
        eval_protocol: EvalProtocol | dict[str, Any] | None = None,
        panoptic: bool = False,
    ) -> None:
        if split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {split!r}; choose one of {list(self.splits)}")
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"{self.name}: dataset root {self.root} does not exist; expected {self.layout}")
        self.split = split
        self.max_instances = int(max_instances)
        self.max_pixels = int(max_pixels)
        self.seed = int(seed)
        self.num_classes = len(self.class_names)
        self.stuff_classes = tuple(i for i in range(self.num_classes) if i not in set(self.thing_classes))
        self.palette = np.asarray(self.palette, np.uint8).reshape(-1, 3)
        if isinstance(eval_protocol, dict):
            eval_protocol = replace(self.eval_protocol, **eval_protocol)
        if eval_protocol is not None and not isinstance(eval_protocol, EvalProtocol):
            raise ValueError(f"eval_protocol must be an EvalProtocol or a dict of its fields, got {eval_protocol!r}")
        if eval_protocol is not None:
            self.eval_protocol = eval_protocol
        if panoptic and not self.has_instances:
            raise ValueError(f"{self.name}: panoptic=True needs instance annotations (coco_panoptic, coco_instances)")
        self.panoptic = bool(panoptic)

        # Transform.
        if transform == "auto":
            augment = split in self.train_splits or pipeline is not None
            transform = self.default_pipeline.with_options(**(pipeline or {})) if augment else None
        elif pipeline:
            raise ValueError("pipeline= overrides the default TrainPipeline; it cannot be combined with transform=")
        if transform is not None and not callable(transform):
            raise ValueError(f"transform must be 'auto', None or a callable, got {transform!r}")
        if isinstance(transform, TrainPipeline) and transform.ignore_index != self.ignore_index:
            transform = transform.with_options(ignore_index=self.ignore_index)
        self.transform: Callable[..., dict[str, np.ndarray]] | None = transform

        # Zero-shot classes.
        if unseen == "pading":
            if not self.pading_unseen:
                raise ValueError(f"{self.name}: the PADing protocol defines no unseen classes for this dataset")
            unseen = self.pading_unseen
        self.unseen_classes = _as_names(unseen or (), self.class_names, f"{self.name} unseen=")
        self.seen_classes = tuple(i for i in range(self.num_classes) if i not in set(self.unseen_classes))
        if unseen_mode is None:
            unseen_mode = self.train_unseen_mode if split in self.train_splits else "keep"
        if unseen_mode not in ("ignore", "exclude", "keep"):
            raise ValueError(f"unseen_mode must be 'ignore', 'exclude' or 'keep', got {unseen_mode!r}")
        self.unseen_mode = unseen_mode if self.unseen_classes else "keep"
        self._unseen_lut = np.zeros(max(self.num_classes, 1), bool)
        self._unseen_lut[list(self.unseen_classes)] = True

        # Files.
        records = list(self._scan())
        if not records:
            raise ValueError(
                f"{self.name} {split}: the split is empty: no image found under {self.root} (expected {self.layout})"
            )
        if self.unseen_mode == "exclude":
            records = [r for r in records if not self._unseen_lut[list(self._classes_of(r))].any()]
            if not records:
                raise ValueError(f"{self.name} {split}: every image contains an unseen class; nothing left to train on")
        self.records: list[Record] = records

        # Semi-supervised partition.
        if labelled_fraction is not None and split_file is not None:
            raise ValueError("give labelled_fraction or split_file, not both")
        self.labelled_fraction = labelled_fraction
        flags = np.ones(len(records), bool)
        if labelled_fraction is not None:
            if not 0.0 <= labelled_fraction <= 1.0:
                raise ValueError(f"labelled_fraction must lie in [0, 1], got {labelled_fraction}")
            frac = Fraction(labelled_fraction).limit_denominator(1_000_000)
            n_lab = len(records) * frac.numerator // frac.denominator
            order = np.random.default_rng(self.seed).permutation(len(records))
            flags[:] = False
            flags[order[:n_lab]] = True
        elif split_file is not None:
            flags = self._flags_from_split_file(Path(split_file))
        if subset not in (None, "labelled", "unlabelled"):
            raise ValueError(f"subset must be None, 'labelled' or 'unlabelled', got {subset!r}")
        self.subset = subset
        if subset is None:
            self._indices = np.arange(len(records))
        else:
            self._indices = np.flatnonzero(flags if subset == "labelled" else ~flags)
            if self._indices.size == 0:
                raise ValueError(
                    f"{self.name} {split}: the {subset} subset is empty "
                    f"(labelled_fraction={labelled_fraction}, split_file={split_file})"
                )
        self._labelled = flags

        n_verify = len(self._indices) if verify < 0 else min(int(verify), len(self._indices))
        for j in range(n_verify):
            self.load_raw(int(self._indices[j]))

    # -- reader hooks --------------------------------------------------------------------------------------------
    def _scan(self) -> Iterable[Record]:
        raise NotImplementedError

    def _load_targets(self, record: Record) -> dict[str, Any]:
        """``{"mask": (H, W) int64 class ids or ignore_index}`` (+ ``"instances"``, ``"instance_classes"``)."""
        raise NotImplementedError

    def _classes_of(self, record: Record) -> np.ndarray:
        """Class ids present in an image (used by ``unseen_mode="exclude"``); readers with a JSON index override it."""
        mask = self._load_targets(record)["mask"]
        present = np.unique(mask)
        return present[present != self.ignore_index]

    # -- shared helpers for readers ------------------------------------------------------------------------------
    def check_label_range(self, labels: np.ndarray, path: Path | str, limit: int, what: str) -> None:
        """Raise ValueError naming ``path`` if ``labels`` holds values outside ``[0, limit)`` and not ignore_index."""
        problem = describe_bad_labels(labels, limit, self.ignore_index)
        if problem:
            raise ValueError(f"{path}: {problem} is outside the class range; expected {what}")

    def _flags_from_split_file(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise FileNotFoundError(f"split file {path} does not exist")
        by_name: dict[str, int] = {}
        for i, record in enumerate(self.records):
            by_name[record.key] = i
            by_name[record.image.stem] = i
        flags = np.zeros(len(self.records), bool)
        missing = []
        for line in path.read_text().splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            stem = Path(line.split()[0]).stem
            if stem not in by_name:
                missing.append(stem)
                continue
            flags[by_name[stem]] = True
        if missing:
            raise ValueError(
                f"split file {path}: {len(missing)} listed images are not in the {self.name} {self.split} split "
                f"(first: {missing[0]!r})"
            )
        if not flags.any():
            raise ValueError(f"split file {path} lists no image")
        return flags

    # -- the Dataset protocol ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._indices.size)

    def record(self, j: int) -> Record:
        return self.records[int(self._indices[j])]

    def is_labelled(self, j: int) -> bool:
        return bool(self._labelled[self._indices[j]])

    def load_raw(self, i: int) -> dict[str, Any]:
        """Decode and check record ``i`` (an index into ``records``): image uint8 (H, W, 3) plus the targets."""
        record = self.records[i]
        image = read_image(record.image, self.max_pixels)
        targets = self._load_targets(record)
        mask = targets["mask"]
        if mask.shape != image.shape[:2]:
            source = record.label if record.label is not None else f"the annotations of {record.image.name}"
            raise ValueError(
                f"{source}: label is {mask.shape[0]}x{mask.shape[1]} (H x W) but its image {record.image} is "
                f"{image.shape[0]}x{image.shape[1]}"
            )
        if self.unseen_mode == "ignore":
            unseen = (mask != self.ignore_index) & self._unseen_lut[np.where(mask == self.ignore_index, 0, mask)]
            mask = np.where(unseen, self.ignore_index, mask)
            if "instances" in targets:
                classes = targets["instance_classes"]
                drop = np.flatnonzero(self._unseen_lut[classes]) + 1 if len(classes) else np.zeros(0, np.int64)
                targets["instances"] = np.where(np.isin(targets["instances"], drop), 0, targets["instances"])
        targets["mask"] = mask
        return {"image": image, **targets}

    def __getitem__(self, j: int) -> dict[str, Any]:
        j = int(j)
        if j < 0:
            j += len(self)
        if not 0 <= j < len(self):
            raise IndexError(f"index {j} out of range for {self.name} {self.split} of length {len(self)}")
        i = int(self._indices[j])
        raw = self.load_raw(i)
        mask = raw["mask"]
        # Labels are checked to lie in [0, K) or be ignore_index (>= K), so the first K bins are the classes.
        present = np.bincount(mask.ravel(), minlength=self.num_classes)[: self.num_classes] > 0
        sample = {"image": raw["image"], "mask": mask}
        instance_classes = raw.get("instance_classes")
        for key in ("instances", "crowd"):
            if key in raw:
                sample[key] = raw[key]
        if self.transform is not None:
            # Torch's RNG seeds the augmentation: the DataLoader seeds it per worker, the trainer per run.
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
            sample = self.transform(sample, rng)
        out = {
            "image": self._normalise(sample["image"]),
            "mask": torch.from_numpy(np.ascontiguousarray(sample["mask"], dtype=np.int64)),
        }
        if "instances" in sample:
            out["instances"], out["instance_classes"] = self._renumber(sample["instances"], instance_classes, i)
            if self.panoptic:
                out["panoptic"] = self._panoptic_map(out["mask"], out["instances"], sample.get("crowd"))
        out["image_labels"] = torch.from_numpy(present.astype(np.float32))
        out["labelled"] = torch.tensor(bool(self._labelled[i]))
        out["index"] = i
        return out

    def _panoptic_map(self, mask: torch.Tensor, instances: torch.Tensor, crowd: np.ndarray | None) -> torch.Tensor:
        """``class * label_divisor + instance``; -1 where the label is ignore_index or the region is a crowd."""
        if instances.numel() and int(instances.max()) >= self.label_divisor:
            raise ValueError(f"{self.name}: more than {self.label_divisor - 1} instances in one image")
        pan = mask * self.label_divisor + instances
        void = mask == self.ignore_index
        if crowd is not None:
            void |= torch.from_numpy(np.ascontiguousarray(crowd, dtype=bool))
        return pan.masked_fill(void, -1)

    def _normalise(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 or float [0, 255] -> (3, H, W) float32 normalised, in one pass over a writable copy."""
        x = np.array(image.transpose(2, 0, 1), dtype=np.float32)  # (3, H, W), C-contiguous
        x -= 255.0 * np.asarray(self.mean, np.float32).reshape(3, 1, 1)
        x /= 255.0 * np.asarray(self.std, np.float32).reshape(3, 1, 1)
        return torch.from_numpy(x)

    def _renumber(self, instances: np.ndarray, classes: np.ndarray, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Instance ids that survived the crop, renumbered 1..n in their original order; classes padded with -1."""
        kept = np.unique(instances)
        kept = kept[kept > 0]
        if kept.size > self.max_instances:
            raise ValueError(
                f"{self.records[i].image}: {kept.size} instances, more than max_instances={self.max_instances}; "
                f"build the dataset with a larger max_instances="
            )
        remap = np.zeros(int(instances.max(initial=0)) + 1, np.int64)
        remap[kept] = np.arange(1, kept.size + 1)
        padded = np.full(self.max_instances, -1, np.int64)
        padded[: kept.size] = np.asarray(classes, np.int64)[kept - 1]
        return torch.from_numpy(remap[instances]), torch.from_numpy(padded)

    # -- metadata -------------------------------------------------------------------------------------------------
    def pretrained_cfg_fields(self) -> dict[str, Any]:
        """What a model trained on this dataset should remember (read by the registry's PretrainedCfg)."""
        crop = self.default_pipeline.crop_size
        return {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "palette": self.palette.tolist(),
            "mean": list(self.mean),
            "std": list(self.std),
            "ignore_index": self.ignore_index,
            "input_size": (3, crop[0], crop[1]),
            "dataset": self.name,
            "stuff_classes": list(self.stuff_classes),
            "thing_classes": list(self.thing_classes),
            "seen_classes": list(self.seen_classes),
            "unseen_classes": list(self.unseen_classes),
            "label_divisor": self.label_divisor,
        }

    def verify(self, limit: int | None = None) -> int:
        """Decode and check every file of this split (or the first ``limit``); returns the number checked."""
        n = len(self) if limit is None else min(limit, len(self))
        for j in range(n):
            self.load_raw(int(self._indices[j]))
        return n

    def __repr__(self) -> str:
        extra = f", subset={self.subset!r}" if self.subset else ""
        if self.unseen_classes:
            extra += f", unseen={len(self.unseen_classes)} ({self.unseen_mode})"
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, len={len(self)}, "
            f"classes={self.num_classes}{extra})"
        )


def paired_label(image: Path, image_dir: Path, label_dir: Path, image_suffix: str, label_suffix: str) -> Path:
    """The label path that mirrors ``image`` under ``label_dir`` with its suffix swapped."""
    rel = image.relative_to(image_dir)
    name = rel.name[: -len(image_suffix)] + label_suffix
    return label_dir / rel.parent / name


def missing_label_error(name: str, image: Path, expected: Sequence[Path]) -> FileNotFoundError:
    options = " or ".join(str(p) for p in expected)
    return FileNotFoundError(f"{name}: image {image} has no label; expected {options}")
