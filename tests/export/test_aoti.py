"""AOTInductor packages on CPU.

Every registered model exports through ``torch.export`` (the ONNX tests prove it), which is all AOTInductor needs,
so every model is parametrised; but compiling the generated C++ takes ~3 minutes for fpn_resnet18 on this 2-core
machine (g++ -O3 per kernel group), so only the smallest graph, fpn_resnet18, runs in the default tier and the
others are `slow`. fp16 packages are not exported here (CPU fp16 kernels; see `export(half=True, format="aoti")`).
"""

from __future__ import annotations

import pytest
import torch

from fastseg.export import export, load_aoti, read_sidecar, verify
from fastseg.export.api import build_model

from .conftest import STATIC_SIZE, model_params

pytestmark = pytest.mark.export


@pytest.fixture(scope="module", params=model_params("aoti"))
def aoti_export(request, export_dir):
    name = request.param
    return name, export(name, format="aoti", imgsz=STATIC_SIZE, out=export_dir / f"{name}.pt2")


def test_aoti_package_loads_and_matches(aoti_export):
    name, path = aoti_export
    assert path.suffix == ".pt2" and path.stat().st_size > 0
    runner = torch._inductor.aoti_load_package(str(path))  # the plain torch loader, no fastseg code needed
    x = torch.randn(1, 3, *STATIC_SIZE)
    with torch.no_grad():
        ref = build_model(name)(x)
    out = runner(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    torch.testing.assert_close(load_aoti(path)(x), out)


def test_aoti_sidecar_and_verify(aoti_export):
    name, path = aoti_export
    data = read_sidecar(path)
    assert data["format"] == "aoti" and data["model"] == name and data["export"]["opset"] is None
    report = verify(path, num_images=2, num_random=1)
    assert report.passed, report.format()
    assert report.backend.startswith("aoti")
