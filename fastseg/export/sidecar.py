"""The sidecar JSON written beside every exported artefact (``model.onnx`` -> ``model.onnx.json``).

Metadata lives here and never inside the artefact: a TensorRT engine stays a plain plan that ``trtexec
--loadEngine`` and the C++ runtime read unchanged (ultralytics' length-prefixed JSON header is what breaks them,
see ``specs/aesthetics_ecosystem.md`` 3.6). The sidecar carries what a deployment needs to pre- and post-process:
class names, palette, mean/std, input and output specs, the versions that made the file, and for engines the
equivalent ``trtexec`` command.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["SIDECAR_SCHEMA", "collect_versions", "read_sidecar", "sidecar_path", "write_sidecar"]

# Bumped when a field changes meaning; readers refuse a newer major schema than they know.
SIDECAR_SCHEMA = "fastseg.export/1"
_REQUIRED = ("schema", "model", "format", "pretrained_cfg", "inputs", "outputs", "versions")


def sidecar_path(artefact: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (the full file name is kept, so ``x.onnx`` and ``x.engine`` never
    share a sidecar)."""
    artefact = Path(artefact)
    return artefact.with_name(artefact.name + ".json")


def collect_versions() -> dict[str, str | None]:
    """Versions of everything that shaped the artefact (None for packages that are not installed)."""
    import torch

    from ..version import __version__

    versions: dict[str, str | None] = {
        "fastseg": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    for module in ("onnx", "onnxruntime", "onnxscript", "tensorrt"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional package: record None, never fail an export
            versions[module] = None
    return versions


def write_sidecar(artefact: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write ``data`` (with the schema tag added) as the artefact's sidecar, atomically; returns its path."""
    path = sidecar_path(artefact)
    payload = {"schema": SIDECAR_SCHEMA, **data}
    missing = [key for key in _REQUIRED if key not in payload]
    if missing:
        raise ValueError(f"sidecar for {artefact} lacks required fields {missing}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def read_sidecar(artefact: str | os.PathLike) -> dict[str, Any]:
    """Read the sidecar of ``artefact`` (or a sidecar path itself).

    Raises:
        FileNotFoundError: there is no sidecar beside the artefact.
        ValueError: the file is not valid JSON, lacks required fields or has an unknown schema.
    """
    path = Path(artefact)
    if path.suffix != ".json":
        path = sidecar_path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no sidecar {path}: fastseg writes it beside every exported artefact; re-export with `fastseg export`"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"sidecar {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):  # a bad file, not a bad argument: ValueError like the other checks
        raise ValueError(  # noqa: TRY004
            f"sidecar {path} must hold a JSON object, got {type(data).__name__}"
        )
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ValueError(f"sidecar {path} lacks required fields {missing}")
    if str(data["schema"]).split("/")[0] != SIDECAR_SCHEMA.split("/")[0]:
        raise ValueError(f"sidecar {path} has schema {data['schema']!r}; this fastseg reads {SIDECAR_SCHEMA!r}")
    return data


def _jsonable(value: Any) -> Any:
    """JSON fallback for tuples of numpy scalars, Paths and similar."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot write {type(value).__name__} into a sidecar")
