"""Shared exports for tests/export: each artefact is built once per module and reused by every test that reads it.

Tiering (export is slow on a 2-core CPU: a static ONNX export of fpn_resnet18 takes ~30 s, a dynamic one ~60 s, an
AOTInductor compile ~3 min): every registered model is parametrised, so a new method cannot skip export, but only
the small models run in the default (non-slow) tier; the rest carry the `slow` mark (`pytest -m slow`).
"""

from __future__ import annotations

import pytest

import fastseg

# Models exported in the default tier, per case. fpn_resnet18 gets every case (smallest graph); fpn_mit_b0 (a
# transformer, ~1.7x the export time) and mask2former_resnet18 (deformable attention as GridSample, the masked
# attention op through its decomposition) the static case. Everything else is `slow`, including full-size models such
# as fpn_resnet101 and fpn_swin_tiny (a timm Swin-T alone takes ~200 s to export here).
FAST = {
    "static": {"fpn_resnet18", "fpn_mit_b0", "mask2former_resnet18"},
    "argmax": {"fpn_resnet18"},
    "dynamic": {"fpn_resnet18"},
    "aoti": {"fpn_resnet18"},
}
STATIC_SIZE = (64, 64)
NONSQUARE_SIZE = (64, 96)


def model_params(case: str) -> list:
    """Every registered model, `slow` unless it is in ``FAST[case]``."""
    return [
        pytest.param(name, id=name, marks=() if name in FAST[case] else (pytest.mark.slow,))
        for name in fastseg.list_models()
    ]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")
