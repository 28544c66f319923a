"""Class (semantic) embeddings for zero-shot segmentation: one interface, three providers.

``class_embeddings(source, class_names) -> Tensor (K, D)``, rows in the order of ``class_names``, where ``source`` is

* ``"attributes"`` (the default): a fixed vector per shapes-world class computed from the world's own geometry and
  appearance, offline and deterministic. Things are rasterised from the renderer's own inside-tests
  (`fastseg.data.shapes._inside`) at the midpoint of their parameter ranges and measured: rotational symmetry order,
  roundness (area / area of the enclosing circle), elongation (minor / major axis of the second moments), hollowness
  (share of the filled outline that is a hole), solidity (share of segments between inside points that stay inside),
  fill of the bounding circle, plus the number of corners and whether edges are straight (read off the shape
  definitions) and the class's hue centre. Stuff textures are rendered with a fixed seed and measured: mean colour,
  dominant spatial frequency, orientation anisotropy and fine-grain energy. Each attribute is standardised over all
  known classes, weighted, and the vector L2-normalised, so that unseen classes have seen neighbours
  (ellipse ~ circle, diamond ~ square).
* ``"file:PATH"``: a ``.safetensors`` file (one 1-d tensor per class name), an ``.npz`` (one array per name, as
  ``np.savez(path, **{name: vector})`` writes it) or a structured ``.npy`` with one named field per class; pickled
  objects are refused. How a user brings word2vec, fastText or any other text model's vectors.
* ``"clip:CHECKPOINT"`` or ``"clip:ARCH@CHECKPOINT"``: the text tower of an ``open_clip`` model (``ARCH`` an open_clip
  model name, default ``ViT-B-16`` as in PADing, or a path to a JSON model config) loaded from a local weights file,
  with PADing's 8-template prompt ensemble: names are split on ``", "``, every (part, template) text is encoded and
  L2-normalised, the texts are averaged and the mean is re-normalised (spec C.3). Nothing is downloaded.
* ``"random:D"``: a placeholder, N(0, I) per class seeded by a hash of its name, L2-normalised. It carries no
  semantics (zero-shot transfer cannot work with it); it lets a PADing model be built for classes nobody has
  described yet (generic model tests, smoke runs).

Every provider checks that it covers every requested class and that all rows have one width; ``expected_dim`` makes
the width a checked contract (the checkpoint of a model built on one provider cannot silently take another's).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "PADING_TEMPLATES",
    "attribute_embeddings",
    "class_embeddings",
    "clip_text_embeddings",
    "file_embeddings",
    "random_embeddings",
]

# PADing's prompt ensemble (IMAGENET_TEMPLATES_SELECT of its third_party/imagenet_templates), spec C.3.
PADING_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "A photo of a {} in the scene",
)


def class_embeddings(source: str, class_names: Sequence[str], expected_dim: int | None = None) -> torch.Tensor:
    """(K, D) float32 embeddings of ``class_names`` from ``source`` (see the module docstring)."""
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty: there is nothing to embed")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names holds duplicates: {names}")
    if not isinstance(source, str) or not source:
        raise ValueError(
            f"class embedding source must be 'attributes', 'file:PATH' or 'clip:CHECKPOINT', got {source!r}"
        )
    if source == "attributes":
        table = attribute_embeddings(names)
    elif source.startswith("file:"):
        table = file_embeddings(source[5:], names)
    elif source.startswith("random:"):
        table = random_embeddings(source[7:], names)
    elif source.startswith("clip:"):
        spec = source[5:]
        arch, _, path = spec.rpartition("@")
        table = clip_text_embeddings(path, names, arch=arch or "ViT-B-16")
    else:
        raise ValueError(
            f"unknown class embedding source {source!r}: use 'attributes', 'file:PATH' or 'clip:CHECKPOINT'"
        )
    if table.dim() != 2 or table.shape[0] != len(names):
        raise ValueError(f"embedding source {source!r} returned shape {tuple(table.shape)} for {len(names)} classes")
    if expected_dim is not None and table.shape[1] != expected_dim:
        raise ValueError(
            f"class embeddings from {source!r} are {table.shape[1]}-dimensional, but {expected_dim} are expected "
            f"(the model's projection was built for that width)"
        )
    if not torch.isfinite(table).all():
        raise ValueError(f"class embeddings from {source!r} contain NaN or inf")
    return table.float().contiguous()


# ----------------------------------------------------------------------------------------------------- attributes
# Corners and straight edges are read off the analytical shape definitions in shapes._inside (a star has 5 outer and 5
# inner vertices, a cross 12); everything else is measured from the renderer.
_CORNERS = {"circle": 0, "ellipse": 0, "ring": 0, "square": 4, "diamond": 4, "triangle": 3, "star": 10, "cross": 12}
_GEOMETRY = ("symmetry", "roundness", "elongation", "hollowness", "solidity", "corners", "straight")
_APPEARANCE = ("hue_cos", "hue_sin", "saturation", "value", "frequency", "anisotropy", "grain")
# Geometry carries the class identity of things (colour ranges overlap on purpose, spec of the world), so it weighs
# more than appearance; `is_thing` separates the two families.
_WEIGHTS = {**{k: 1.0 for k in _GEOMETRY}, **{k: 0.5 for k in _APPEARANCE}, "is_thing": 1.5}
_ATTRIBUTES = ("is_thing", *_GEOMETRY, *_APPEARANCE)


def _midpoint_params(name: str) -> dict[str, float]:
    from ..data.shapes import _shape_params

    class _Mid:  # _shape_params draws uniforms; the midpoint of every range is the canonical shape
        @staticmethod
        def uniform(lo: float, hi: float) -> float:
            return 0.5 * (lo + hi)

    return _shape_params(name, _Mid())  # type: ignore[arg-type]


def _raster(name: str, params: dict[str, float], centre: np.ndarray, basis: np.ndarray, extent: float, n: int):
    """Inside-test of the shape on an n x n grid over [-extent, extent]^2 mapped by ``x = centre + basis @ g``."""
    from ..data.shapes import _inside

    t = np.linspace(-extent, extent, n, dtype=np.float64)
    gv, gu = np.meshgrid(t, t, indexing="ij")
    u = centre[0] + basis[0, 0] * gu + basis[0, 1] * gv
    v = centre[1] + basis[1, 0] * gu + basis[1, 1] * gv
    return (
        (lambda a: _inside(name, u * math.cos(a) - v * math.sin(a), u * math.sin(a) + v * math.cos(a), 1.0, params)),
        gu,
        gv,
        (t[1] - t[0]) ** 2,
    )


def _thing_geometry(name: str, n: int = 129) -> dict[str, float]:
    params = _midpoint_params(name)
    # Pass 1: the shape as drawn (outer radius 1): centroid, second moments -> elongation.
    inside_at, gu, gv, cell = _raster(name, params, np.zeros(2), np.eye(2), 1.05, n)
    inside = inside_at(0.0)
    cu, cv = gu[inside].mean(), gv[inside].mean()
    eig, vec = np.linalg.eigh(np.cov(np.stack([gu[inside] - cu, gv[inside] - cv])))
    elongation = math.sqrt(eig[0] / eig[1])
    # Pass 2: the shape with its elongation undone (area-preserving whitening), so that an ellipse is measured as the
    # circle it stretches and a diamond as the square: roundness, symmetry, holes and solidity describe the outline,
    # elongation describes the stretch.
    scale = np.sqrt(eig) / (eig[0] * eig[1]) ** 0.25
    basis = vec @ np.diag(scale) @ vec.T
    extent = 1.1 * (1 + math.hypot(cu, cv)) / scale.min()
    inside_at, gu, gv, cell = _raster(name, params, np.array([cu, cv]), basis, extent, n)
    inside = inside_at(0.0)
    area = inside.sum() * cell
    radius = np.sqrt(gu[inside] ** 2 + gv[inside] ** 2).max()
    # Rotational symmetry of the whitened outline: the largest order <= 12 whose rotation maps it onto itself.
    symmetry = 1
    for order in range(12, 1, -1):
        a = 2 * math.pi / order
        c, s_ = math.cos(a), math.sin(a)
        rotated, *_ = _raster(name, params, np.array([cu, cv]), basis @ np.array([[c, -s_], [s_, c]]), extent, n)
        r = rotated(0.0)
        if (inside & r).sum() / max((inside | r).sum(), 1) > 0.95:
            symmetry = order
            break
    # Holes: background pixels not connected to the border (4-connected flood fill by repeated dilation).
    outside = np.zeros_like(inside)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    outside &= ~inside
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~inside
        if (grown == outside).all():
            break
        outside = grown
    hollowness = 1.0 - inside.sum() / (~outside).sum()
    # Solidity: share of segments between seeded random inside points whose 9 interior samples stay inside.
    rng = np.random.Generator(np.random.PCG64(0))
    idx = np.argwhere(inside)
    pairs = idx[rng.integers(0, len(idx), (400, 2))]
    steps = np.linspace(0.1, 0.9, 9)[None, :, None]
    pts = np.rint(pairs[:, :1] * (1 - steps) + pairs[:, 1:] * steps).astype(np.int64)
    solidity = inside[pts[..., 0], pts[..., 1]].all(axis=1).mean()
    return {
        "symmetry": math.log(symmetry) / math.log(12),
        "roundness": float(area / (math.pi * radius**2)),
        "elongation": elongation,
        "hollowness": float(hollowness),
        "solidity": float(solidity),
        "corners": math.log1p(_CORNERS[name]) / math.log(13),
        "straight": float(_CORNERS[name] > 0),
    }


def _texture_appearance(name: str, size: int = 96) -> dict[str, float]:
    import colorsys

    from ..data.shapes import _TEXTURES, _Draws

    img = _TEXTURES[name](_Draws(np.random.Generator(np.random.PCG64(0))), size, size)
    img = np.clip(img, 0.0, 1.0)
    h, s, v = colorsys.rgb_to_hsv(*[float(c) for c in img.reshape(3, -1).mean(1)])
    gray = img.mean(0)
    gray = gray - gray.mean()
    power = np.abs(np.fft.rfft2(gray)) ** 2
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    power[0, 0] = 0.0
    frequency = float((power * radius).sum() / power.sum())
    gx, gy = np.abs(np.diff(gray, axis=1)).mean(), np.abs(np.diff(gray, axis=0)).mean()
    fine = np.abs(gray[1:, 1:] - gray[:-1, :-1]).mean()
    return {
        "hue_cos": math.cos(2 * math.pi * h),
        "hue_sin": math.sin(2 * math.pi * h),
        "saturation": s,
        "value": v,
        "frequency": frequency * 4,
        "anisotropy": float((gx - gy) / (gx + gy)),
        "grain": float(fine) * 10,
    }


def _thing_appearance(name: str) -> dict[str, float]:
    from ..data.shapes import KNOWN_THINGS

    hue = KNOWN_THINGS.index(name) / len(KNOWN_THINGS)  # the renderer's hue centre of the class
    return {
        "hue_cos": math.cos(2 * math.pi * hue),
        "hue_sin": math.sin(2 * math.pi * hue),
        "saturation": 0.725,
        "value": 0.75,
        "frequency": 0.0,
        "anisotropy": 0.0,
        "grain": 0.0,
    }


@functools.lru_cache(maxsize=1)
def _raw_attribute_table() -> dict[str, np.ndarray]:
    from ..data.shapes import KNOWN_STUFF, KNOWN_THINGS

    things = [n for n in KNOWN_THINGS if n in _CORNERS]
    rows = {n: {"is_thing": 1.0, **_thing_geometry(n), **_thing_appearance(n)} for n in things}
    rows.update({n: {"is_thing": 0.0, **{k: 0.0 for k in _GEOMETRY}, **_texture_appearance(n)} for n in KNOWN_STUFF})
    names = list(rows)
    matrix = np.asarray([[rows[n][a] for a in _ATTRIBUTES] for n in names], np.float64)
    # Standardise every attribute over the family it describes (geometry over things, texture statistics over stuff,
    # colour and is_thing over all), so that within-family differences are not drowned by the thing/stuff gap; the
    # other family gets 0 there. Then weight and L2-normalise, so cosine similarities are balanced.
    is_thing = matrix[:, 0] > 0.5
    texture = ("frequency", "anisotropy", "grain")
    for j, attr in enumerate(_ATTRIBUTES):
        family = is_thing if attr in _GEOMETRY else (~is_thing if attr in texture else np.ones_like(is_thing))
        col = matrix[family, j]
        std = col.std()
        matrix[:, j] = np.where(family, (matrix[:, j] - col.mean()) / (std if std > 1e-9 else 1.0), 0.0)
    matrix *= np.asarray([_WEIGHTS[a] for a in _ATTRIBUTES])
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return {n: matrix[i].astype(np.float32) for i, n in enumerate(names)}


def attribute_embeddings(class_names: Sequence[str]) -> torch.Tensor:
    """(K, 16) attribute vectors of shapes-world classes (see the module docstring); unknown names raise."""
    table = _raw_attribute_table()
    missing = [n for n in class_names if n not in table]
    if missing:
        raise ValueError(
            f"the 'attributes' class embeddings describe only the shapes world's classes {sorted(table)}; no "
            f"attributes for {missing}. Bring your own table with 'file:PATH' or a text model with 'clip:CHECKPOINT'."
        )
    return torch.from_numpy(np.stack([table[n] for n in class_names]))


# ---------------------------------------------------------------------------------------------------------- random
def random_embeddings(width: str | int, class_names: Sequence[str]) -> torch.Tensor:
    """``random:D`` placeholder rows: N(0, I_D) seeded by the SHA-256 of each name, L2-normalised."""
    import hashlib

    try:
        d = int(width)
    except ValueError:
        raise ValueError(f"random class embeddings need a width, e.g. 'random:64', got {width!r}") from None
    if d < 1:
        raise ValueError(f"random class embeddings need a width >= 1, got {d}")
    rows = []
    for name in class_names:
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        row = torch.randn(d, generator=torch.Generator().manual_seed(seed))
        rows.append(row / row.norm())
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------- file
def _check_table(table: dict[str, torch.Tensor], names: Sequence[str], path: Path) -> torch.Tensor:
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"class embedding table {path} has no entry for class(es) {missing}; it holds {sorted(table)}")
    rows = []
    widths = set()
    for n in names:
        row = torch.as_tensor(table[n]).float()
        if row.dim() != 1:
            raise ValueError(f"class embedding table {path}: entry {n!r} has shape {tuple(row.shape)}, expected (D,)")
        widths.add(row.numel())
        rows.append(row)
    if len(widths) != 1:
        raise ValueError(f"class embedding table {path}: entries have different widths {sorted(widths)}")
    return torch.stack(rows)


def file_embeddings(path: str | Path, class_names: Sequence[str]) -> torch.Tensor:
    """Rows of a ``.safetensors`` (one tensor per class name) or ``.npz`` / ``.npy`` (one array per name) table."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class embedding table {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            table = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"cannot read class embedding table {p}: {err}") from None
    elif suffix in (".npz", ".npy"):
        try:
            loaded = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read class embedding table {p}: {err}") from None
        if isinstance(loaded, np.ndarray):
            if loaded.dtype.names is None:
                raise ValueError(
                    f"class embedding table {p} is a plain array; class names are needed as keys: save one array per "
                    f"name with np.savez(path, **{{name: vector}}) (.npz) or a structured .npy with named fields"
                )
            table = {n: torch.from_numpy(np.asarray(loaded[n], np.float32).reshape(-1)) for n in loaded.dtype.names}
        else:
            table = {n: torch.from_numpy(np.asarray(loaded[n], np.float32)) for n in loaded.files}
    else:
        raise ValueError(f"class embedding table {p}: unsupported suffix {suffix!r} (use .safetensors, .npz or .npy)")
    return _check_table(table, class_names, p)


# ----------------------------------------------------------------------------------------------------------- clip
def _build_open_clip(arch: str):
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - open_clip is a test dependency
        raise ImportError("clip:CHECKPOINT class embeddings need open_clip (pip install open_clip_torch)") from err
    if arch.endswith(".json"):
        cfg_path = Path(arch)
        if not cfg_path.is_file():
            raise FileNotFoundError(f"open_clip model config {cfg_path} does not exist")
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("custom_text", None)
        model = open_clip.CLIP(**cfg)
        tokenizer = open_clip.SimpleTokenizer(context_length=cfg.get("text_cfg", {}).get("context_length", 77))
        return model, tokenizer
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; give an open_clip model name or a JSON config path")
    model = open_clip.create_model(arch, pretrained=None)
    return model, open_clip.get_tokenizer(arch)


@torch.no_grad()
def clip_text_embeddings(
    checkpoint: str | Path,
    class_names: Sequence[str],
    arch: str = "ViT-B-16",
    templates: Sequence[str] = PADING_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """PADing's CLIP text embeddings: per class, every (", "-split part) x template text, normalised, averaged,
    re-normalised (spec C.3). The weights come from the local ``checkpoint`` only."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} does not exist (fastseg never downloads weights)")
    model, tokenizer = _build_open_clip(arch)
    from ..checkpoint import load_state_dict

    state = load_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    text_keys = [k for k in model.state_dict() if not k.startswith(("visual.", "logit_"))]
    missing = [k for k in text_keys if k not in state]
    if missing:
        raise ValueError(f"CLIP checkpoint {path} lacks text-tower weights for {arch}: {missing[:5]}...")
    bad = [k for k in text_keys if state[k].shape != model.state_dict()[k].shape]
    if bad:
        raise ValueError(f"CLIP checkpoint {path} does not fit {arch}: shape mismatch at {bad[:5]}")
    model.load_state_dict({k: state[k] for k in text_keys}, strict=False)
    model.eval()
    rows = []
    for name in class_names:
        parts = name.split(", ")
        texts = [template.format(part) for template in templates for part in parts]
        feats = torch.cat(
            [model.encode_text(tokenizer(texts[i : i + batch_size])).float() for i in range(0, len(texts), batch_size)]
        )
        feats = feats / feats.norm(dim=-1, keepdim=True)
        mean = feats.mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)
