"""Weights and training-state files: safetensors for weights, ``weights_only`` pickles for trainer state.

Rules (``specs/reliability.md`` section 4):

* Weights are written as safetensors: a JSON header plus raw bytes, no code path that can execute anything.
* ``.pt`` / ``.pth`` / ``.bin`` weights are read only through ``torch.load(weights_only=True)``. A file that needs
  anything beyond tensors and plain containers is refused with :class:`UnsafeCheckpointError`; there is **no**
  fallback to ``weights_only=False``, ever. On torch older than 2.10 (CVE-2025-32434, CVE-2026-24747 in the
  restricted unpickler) pickled files are refused outright: convert them to safetensors on a trusted machine.
* Training state (optimizer, scheduler, scaler, RNG, step) holds only tensors and plain Python scalars and
  containers, checked before writing, so it loads back with ``weights_only=True`` and no allowlist.
* Every write is atomic: a temporary file in the destination folder, ``fsync``, then ``os.replace``. A save that
  fails half-way leaves the previous file untouched.

This module is imported by the model registry, so it imports nothing from fastseg except ``fastseg.version``.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .version import __version__

__all__ = [
    "CheckpointError",
    "LoadResult",
    "UnsafeCheckpointError",
    "atomic_write",
    "load_state_dict",
    "load_training_state",
    "load_weights",
    "read_metadata",
    "save_training_state",
    "save_weights",
]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# The restricted unpickler had remote-code / heap-corruption bugs up to torch 2.9.1 (see module docstring).
_MIN_TORCH_FOR_PICKLE = (2, 10)
_PREVIEW = 5  # how many offending keys an error message lists


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used (corrupt, truncated, wrong keys or shapes)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint needs globals outside ``torch.load(weights_only=True)``'s allowlist; it is refused."""


class LoadResult(NamedTuple):
    """Keys that did not match when loading with ``strict=False``."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# --------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], object]) -> Path:
    """Write a file atomically: ``write(fh)`` fills a temporary file beside ``path``, which then replaces it.

    The temporary file lives in the same folder so that ``os.replace`` is a rename on one file system (atomic on
    POSIX and Windows). If ``write`` raises, the temporary file is removed and ``path`` keeps its old content.

    Args:
        path: Destination file. Its parent folder is created if needed.
        write: Callback receiving a binary file handle.

    Returns:
        The destination as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    # fsync the folder so the rename itself survives a power cut (not possible on Windows; harmless to skip).
    if hasattr(os, "O_DIRECTORY"):
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return path
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
    return path


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------


def _state_dict_of(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = dict(model_or_state_dict)
    else:
        raise TypeError(
            f"save_weights expects an nn.Module or a mapping of name -> tensor, got {type(model_or_state_dict).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[tuple[int, int]] = set()
    for name, value in state.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict keys must be strings, got {name!r} ({type(name).__name__})")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing memory (tied weights, views); give each its own copy.
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if tensor.numel() > 0 and key in seen_storages:
            tensor = tensor.clone()
        elif tensor.numel() > 0:
            seen_storages.add(key)
        out[name] = tensor
    return out


def save_weights(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save weights as a safetensors file, atomically.

    Args:
        model_or_state_dict: A module (its ``state_dict()`` is saved) or a mapping of names to tensors.
        path: Destination, conventionally ending in ``.safetensors``.
        metadata: String key/values stored in the safetensors header (``fastseg_version`` is added).

    Returns:
        The destination path.

    Raises:
        TypeError: A key is not a string, a value is not a tensor, or a metadata value is not a string.
    """
    from safetensors.torch import save as safetensors_save

    tensors = _state_dict_of(model_or_state_dict)
    header: dict[str, str] = {"format": "pt", "fastseg_version": __version__}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str -> str; got {key!r}: {type(value).__name__}")
        header[key] = value
    # Serialise fully in memory first: an error here happens before the destination is touched.
    payload = safetensors_save(tensors, metadata=header)
    return atomic_write(path, lambda fh: fh.write(payload))


def _require_existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: '{path}'")
    if path.is_dir():
        raise IsADirectoryError(f"{what} path is a folder, not a file: '{path}'")
    return path


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _safe_torch_load(path: Path, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)`` with clear errors; never retries with ``weights_only=False``."""
    if _torch_version() < _MIN_TORCH_FOR_PICKLE:
        raise UnsafeCheckpointError(
            f"refusing to unpickle '{path}': torch {torch.__version__} has known flaws in the weights_only "
            f"unpickler (CVE-2025-32434, CVE-2026-24747; fixed in torch 2.10). Upgrade torch, or convert the file "
            f"to safetensors on a machine where you trust it."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = ""
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            if names:
                blocked = f" It references globals outside the allowlist: {', '.join(names[:_PREVIEW])}."
        except Exception:  # noqa: BLE001 - legacy (non-zip) pickles cannot be inspected; the message still stands
            pass
        raise UnsafeCheckpointError(
            f"refusing to load '{path}': it is not a plain tensors-and-containers file and loading it would run "
            f"arbitrary pickled code.{blocked} fastseg never falls back to weights_only=False. If you trust the "
            f"file, convert it to safetensors yourself in a separate process."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"cannot read checkpoint '{path}': corrupt or truncated file ({exc})") from exc


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept ``{name: tensor}``, or a training checkpoint holding one under a usual key, with DDP prefixes."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state", "weights"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"'{path}' does not hold a weights dictionary (name -> tensor); found {type(obj).__name__}"
            + (f" with keys {list(obj)[:_PREVIEW]}" if isinstance(obj, Mapping) else "")
        )
    state = dict(obj)
    # Checkpoints saved from a DistributedDataParallel wrapper carry a `module.` prefix on every key.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a weights file into a ``{name: tensor}`` dict.

    Args:
        path: A ``.safetensors`` file, or a ``.pt``/``.pth``/``.bin`` file read with ``weights_only=True``.
        map_location: Device for the tensors.

    Raises:
        FileNotFoundError: The file does not exist (the message names it).
        CheckpointError: (a ``ValueError``) the file is corrupt, truncated or not a weights dictionary.
        UnsafeCheckpointError: A pickle needs code execution to load; it is refused and nothing runs.
    """
    path = _require_existing(path, "checkpoint")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES or _looks_like_safetensors(path):
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device=str(map_location))
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors file '{path}': corrupt or truncated ({exc})") from exc
        return dict(state)
    return _unwrap_state_dict(_safe_torch_load(path, map_location), path)


def _looks_like_safetensors(path: Path) -> bool:
    """Sniff the header: an 8-byte little-endian length followed by '{'. Pickles and zips never start so."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the string metadata stored in a safetensors header (empty for other formats).

    Raises:
        FileNotFoundError: The file does not exist.
        CheckpointError: The header is corrupt.
    """
    path = _require_existing(path, "checkpoint")
    if not (path.suffix.lower() in SAFETENSORS_SUFFIXES or _looks_like_safetensors(path)):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors header of '{path}': corrupt or truncated ({exc})") from exc


def _preview(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_PREVIEW])
    return shown + (f", ... ({len(keys) - _PREVIEW} more)" if len(keys) > _PREVIEW else "")


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> LoadResult:
    """Load a weights file into ``model`` with errors that say what does not fit.

    Shape mismatches are always an error (loading them would silently train a different model). Missing and
    unexpected keys are an error when ``strict`` and are returned otherwise.

    Args:
        model: The module to fill in place.
        path: ``.safetensors`` (preferred) or a ``weights_only``-loadable ``.pt``/``.pth`` file.
        strict: Require the file's keys to match the model's exactly.
        map_location: Device the file is read onto before copying into the model.

    Returns:
        ``LoadResult(missing_keys, unexpected_keys)``.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: (``ValueError``) corrupt file, wrong keys (strict) or wrong shapes; the message lists a
            few offending keys of each kind and their counts.
        UnsafeCheckpointError: A pickle that would execute code.
    """
    path = Path(path)
    state = load_state_dict(path, map_location=map_location)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s) (in the model, not in the file): {_preview(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (in the file, not in the model): {_preview(unexpected)}")
    if problems:
        hint = " Is it a checkpoint of a different architecture or num_classes?"
        raise CheckpointError(
            f"checkpoint '{path}' does not fit {type(model).__name__}: " + "; ".join(problems) + "." + hint
        )
    model.load_state_dict(state, strict=False)
    return LoadResult(missing, unexpected)


# --------------------------------------------------------------------------------------------------------------
# Training state
# --------------------------------------------------------------------------------------------------------------

_PLAIN_SCALARS = (bool, int, float, str, bytes, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Raise if ``value`` holds anything that ``torch.load(weights_only=True)`` could not read without an allowlist."""
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, nn.Parameter):
            raise TypeError(f"training state entry {where} is a tensor subclass {type(value).__name__}")
        return
    if type(value) in _PLAIN_SCALARS:
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int, float, bool, type(None)):
                raise TypeError(f"training state entry {where} has a key of type {type(key).__name__}: {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"training state entry {where} is a {type(value).__module__}.{type(value).__name__}; only tensors, "
        f"bool/int/float/str/None and dict/list/tuple of them are allowed so that the file loads with "
        f"torch.load(weights_only=True). Convert it (e.g. numpy arrays -> torch.from_numpy)."
    )


def save_training_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Save optimizer / scheduler / scaler / RNG / step state atomically with ``torch.save``.

    Args:
        path: Destination (conventionally ``*_state.pt``).
        state: Tensors and plain Python scalars / containers only (checked before anything is written).

    Returns:
        The destination path.

    Raises:
        TypeError: ``state`` holds an object ``weights_only`` loading could not read; the message names the entry.
    """
    state = dict(state)
    _check_plain(state, "state")
    buffer = io.BytesIO()
    torch.save(state, buffer)  # serialise in memory first: an error here never touches the destination
    payload = buffer.getvalue()
    return atomic_write(path, lambda fh: fh.write(payload))


def load_training_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training state written by :func:`save_training_state` with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: Corrupt or truncated, or not a dictionary.
        UnsafeCheckpointError: The file needs code execution to load; refused.
    """
    path = _require_existing(path, "training state")
    state = _safe_torch_load(path, map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"training state '{path}' holds a {type(state).__name__}, expected a dict")
    return state
