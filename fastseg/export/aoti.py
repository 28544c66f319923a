"""AOTInductor packages: ``torch._inductor.aoti_compile_and_package`` -> a self-contained ``.pt2``.

The package holds the compiled kernels for the device it was built on (C++ for CPU here, CUDA/Triton kernels when
built on a GPU) and loads with ``torch._inductor.aoti_load_package`` from Python or C++
(``torch::inductor::AOTIModelPackageLoader``) without the model's Python code. Custom ``fastseg::`` ops are
decomposed to their references first, exactly as for ONNX, so the package needs no fastseg import at load time.

Supported: every model that ``torch.export`` accepts (the same condition as ONNX export). Compilation runs a C++
compiler per kernel group, which on a 2-core CPU takes minutes for the larger models, so the tests compile only
the smallest one and mark the others ``slow``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["compile_aoti", "load_aoti"]


def compile_aoti(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    dynamic_shapes: dict[str, dict[int, Any]] | None = None,
) -> Path:
    """Compile ``module(example)`` into an AOTInductor package at ``path`` (written whole or not at all)."""
    from ..kernels import DECOMPOSITIONS

    path = Path(path)
    with torch.no_grad():
        ep = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes, strict=False)
    ep = ep.run_decompositions(DECOMPOSITIONS)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt2", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_aoti(path: str | os.PathLike):
    """Load a ``.pt2`` package; the result is called like the module: ``runner(images) -> output``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"AOTInductor package {path} does not exist")
    runner = torch._inductor.aoti_load_package(str(path))

    def run(images: torch.Tensor) -> torch.Tensor:
        out = runner(images)
        return out[0] if isinstance(out, (list, tuple)) else out

    return run
