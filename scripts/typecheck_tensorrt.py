"""Type-check fastseg/export/tensorrt.py with mypy against the TensorRT 10 API stubs (``tensorrt-stubs``).

TensorRT itself cannot be installed on fastseg's CI machines, so its calls would otherwise only fail on a user's GPU.
The stubs package cannot go into setup.py's extras: it requires ``tensorrt==<same version>`` (an NVIDIA-index wheel),
and installed into site-packages its ``tensorrt/__init__.pyi`` folder makes ``import tensorrt`` succeed as an empty
namespace package. So this script installs it (``pip install --no-deps --target <venv>/typestubs``) outside
``sys.path``, repairs the few signatures its generator wrote as invalid Python (a parameter named ``in``, a parameter
without a default after defaulted ones; none of them is an API fastseg calls), and runs mypy with that folder on
MYPYPATH. Exit status: mypy's (0 = no error).

    python scripts/typecheck_tensorrt.py            # install the stubs when missing, then check
    python scripts/typecheck_tensorrt.py --no-install
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

STUBS_VERSION = "10.13.0.35.1"  # TensorRT 10.13: the TensorRT 10 API (JetPack 6 ships 10.3; 11 branches are marked)
ROOT = Path(__file__).resolve().parents[1]


def stubs_dir() -> Path:
    return Path(os.environ.get("FASTSEG_TYPESTUBS", Path(sys.prefix) / "typestubs"))


def install(target: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            f"tensorrt-stubs=={STUBS_VERSION}",
        ],
        check=True,
    )


def repair(target: Path) -> int:
    """Make the generated stubs parse; returns the number of lines changed. Raises if they still do not parse."""
    changed = 0
    for path in sorted(target.glob("tensorrt*/**/*.pyi")):
        text = path.read_text()
        fixed = re.sub(r"(\(|, )in: ", r"\1in_: ", text)  # `in` is a keyword: rename the parameter
        # a parameter without a default after defaulted ones (add_scale_nd's channel_axis): give it one
        fixed = re.sub(r"(= None, )(\w+): (\w+)\)", r"\1\2: \3 = ...)", fixed)
        if fixed != text:
            changed += sum(a != b for a, b in zip(text.splitlines(), fixed.splitlines()))
            path.write_text(fixed)
        ast.parse(path.read_text(), filename=str(path))  # SyntaxError here: a new generator slip to repair
    return changed


def run_mypy(files: list[str], stubs: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MYPYPATH=str(stubs))
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *files]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing missing stubs")
    parser.add_argument("files", nargs="*", default=["fastseg/export/tensorrt.py"])
    args = parser.parse_args(argv)
    target = stubs_dir()
    if not (target / "tensorrt" / "__init__.pyi").is_file():
        if args.no_install:
            print(f"tensorrt-stubs are not installed in {target}", file=sys.stderr)
            return 2
        install(target)
    repair(target)
    result = run_mypy(args.files, target)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
