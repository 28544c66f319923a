"""fastseg/export/tensorrt.py type-checks against the TensorRT 10 API stubs, and the check catches a misspelt call.

TensorRT cannot be installed here, so without this a typo in a TensorRT call would only fail on a user's GPU.
scripts/test.sh runs `scripts/typecheck_tensorrt.py` (which installs the stubs outside sys.path) before pytest;
this test repeats the check and proves it can fail.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("typecheck_tensorrt", ROOT / "scripts" / "typecheck_tensorrt.py")
typecheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(typecheck)  # type: ignore[union-attr]

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (setup.py test extra)"),
    pytest.mark.skipif(
        not (typecheck.stubs_dir() / "tensorrt" / "__init__.pyi").is_file(),
        reason=f"tensorrt-stubs are not installed in {typecheck.stubs_dir()}: run "
        f"`python scripts/typecheck_tensorrt.py` (scripts/test.sh does)",
    ),
]


def test_stubs_stay_off_sys_path():
    # Installed into site-packages, the stubs' folder would make `import tensorrt` succeed and switch on the
    # TensorRT code paths and tests on a machine without TensorRT.
    assert not any(Path(p).resolve() == typecheck.stubs_dir().resolve() for p in sys.path if p)


def test_tensorrt_module_type_checks_and_a_misspelt_call_fails(tmp_path):
    typecheck.repair(typecheck.stubs_dir())
    clean = typecheck.run_mypy(["fastseg/export/tensorrt.py"], typecheck.stubs_dir())
    assert clean.returncode == 0, clean.stdout + clean.stderr

    source = (ROOT / "fastseg" / "export" / "tensorrt.py").read_text()
    assert "builder.create_network(flags)" in source
    bad = tmp_path / "tensorrt_typo.py"
    bad.write_text(source.replace("builder.create_network(flags)", "builder.create_netwrk(flags)"))
    broken = typecheck.run_mypy([str(bad)], typecheck.stubs_dir())
    assert broken.returncode == 1
    assert '"Builder" has no attribute "create_netwrk"' in broken.stdout, broken.stdout
