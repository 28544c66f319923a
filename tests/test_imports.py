"""The direction of imports inside fastseg (DESIGN.md "Layout and the direction of imports"), checked statically.

Every module of the package (and of ``kernels/``, installed as ``fastseg.kernels``) is parsed with `ast`; every
``import`` / ``from ... import`` anywhere in it counts, including those inside functions, so a lazy import cannot
hide a cycle. Two rules:

* no import cycle between fastseg modules;
* no import that goes up the layers::

      version, registry, checkpoint          (the bottom; import nothing else from fastseg)
      kernels                                (imports nothing else from fastseg)
      layers, data, metrics
      models, fastseg (the package: create_model / list_models, and it registers the models)
      engine, export
      bench, experiments
      cli

  A module may import its own layer or any layer below it.

The checker is tested on synthetic graphs below, so that it can catch what it names.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level subpackage / module of fastseg -> its rank; a module may import ranks <= its own.
RANKS: dict[str, int] = {
    "version": 0,
    "registry": 0,
    "checkpoint": 0,
    "kernels": 1,
    "layers": 2,
    "data": 2,
    "metrics": 2,
    "models": 3,
    "": 3,  # fastseg/__init__.py: the public facade, which imports fastseg.models to register them
    "engine": 4,
    "export": 4,
    "bench": 5,
    "experiments": 5,
    "cli": 6,
}
# Groups that may import nothing of fastseg but themselves (and, for the bottom, each other).
ISOLATED = {
    "kernels": {"kernels"},
    "version": {"version"},
    "registry": {"version", "registry", "checkpoint"},
    "checkpoint": {"version", "registry", "checkpoint"},
}


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for fastseg/ and kernels/ (as fastseg.kernels), symlinks not followed."""
    modules: dict[str, Path] = {}
    for base, prefix in ((root / "fastseg", "fastseg"), (root / "kernels", "fastseg.kernels")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if prefix == "fastseg" and rel.parts[0] == "kernels":  # the git-ignored symlink to ../kernels
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def _is_package(name: str, modules: Mapping[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def imports_of(name: str, source: str, modules: Mapping[str, Path]) -> set[str]:
    """The fastseg modules that module ``name`` imports anywhere in ``source`` (relative imports resolved)."""
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        # The longest known module prefix of ``target`` (``fastseg.models.gss.GSSSegmenter`` -> fastseg.models.gss).
        while target:
            if target in modules:
                return target
            target = target.rpartition(".")[0]
        return None

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` imports mod.
            targets = [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"] or [base]
        else:
            continue
        for target in targets:
            if target == "fastseg" or target.startswith("fastseg."):
                resolved = resolve(target)
                if resolved is not None and resolved != name:
                    found.add(resolved)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imports_of(name, path.read_text(), modules) for name, path in modules.items()}


def group(module: str) -> str:
    """``fastseg.models.gss`` -> ``models``; ``fastseg`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: Mapping[str, Iterable[str]]) -> list[str]:
    problems = []
    for src, targets in sorted(graph.items()):
        src_group = group(src)
        if src_group not in RANKS:
            problems.append(f"{src}: the layer of {src_group!r} is unknown; add it to RANKS in tests/test_imports.py")
            continue
        for dst in sorted(targets):
            dst_group = group(dst)
            if src_group in ISOLATED and dst_group not in ISOLATED[src_group]:
                problems.append(f"{src} imports {dst}: {src_group} may import only {sorted(ISOLATED[src_group])}")
            elif RANKS.get(dst_group, 99) > RANKS[src_group]:
                problems.append(
                    f"{src} ({src_group or 'fastseg'}) imports {dst} ({dst_group or 'fastseg'}), a higher layer"
                )
    return problems


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a self-import), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


# ---------------------------------------------------------------------------------------------------------------------
# The checker, on synthetic graphs
# ---------------------------------------------------------------------------------------------------------------------
def _synthetic_modules(tmp_path: Path, files: Mapping[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "kernels").mkdir(exist_ok=True)
    return import_graph(tmp_path)


def test_checker_finds_a_lazy_cycle_and_resolves_relative_imports(tmp_path):
    graph = _synthetic_modules(
        tmp_path,
        {
            "fastseg/__init__.py": "",
            "fastseg/export/__init__.py": "",
            "fastseg/export/api.py": "from .onnx import export_onnx_file\n",
            # the cycle of old: hidden inside a function body
            "fastseg/export/onnx.py": "def session():\n    from .api import export\n    return export\n",
            "fastseg/export/sidecar.py": "from ..version import __version__\n",
            "fastseg/version.py": "",
        },
    )
    assert graph["fastseg.export.api"] == {"fastseg.export.onnx"}
    assert graph["fastseg.export.onnx"] == {"fastseg.export.api"}
    assert graph["fastseg.export.sidecar"] == {"fastseg.version"}
    assert find_cycles(graph) == [["fastseg.export.api", "fastseg.export.onnx"]]
    assert upward_imports(graph) == []


def test_checker_finds_the_registry_cycle_and_upward_imports(tmp_path):
    graph = _synthetic_modules(
        tmp_path,
        {
            "fastseg/__init__.py": "from .registry import create_model\n",
            "fastseg/registry.py": "def list_models():\n    import fastseg.models  # noqa\n",
            "fastseg/models/__init__.py": "from . import fpn\n",
            "fastseg/models/fpn.py": "from ..registry import register_model\nfrom fastseg.engine.trainer import train\n",
            "fastseg/engine/__init__.py": "",
            "fastseg/engine/trainer.py": "",
            "fastseg/layers/__init__.py": "",
            "fastseg/layers/blocks.py": "import fastseg.kernels.vq\n",
        },
    )
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "vq.py").write_text("from fastseg.registry import PretrainedCfg\n")
    graph = import_graph(tmp_path)
    assert graph["fastseg.layers.blocks"] == {"fastseg.kernels.vq"}
    assert find_cycles(graph) == [["fastseg.models", "fastseg.models.fpn", "fastseg.registry"]]
    problems = upward_imports(graph)
    assert len(problems) == 3, problems
    assert any("fastseg.registry imports fastseg.models" in p for p in problems)
    assert any(
        "fastseg.models.fpn (models) imports fastseg.engine.trainer (engine), a higher layer" in p for p in problems
    )
    assert any("fastseg.kernels.vq imports fastseg.registry: kernels may import only" in p for p in problems)


def test_checker_accepts_a_clean_graph():
    graph = {
        "fastseg.cli.main": {"fastseg.engine.trainer", "fastseg.registry"},
        "fastseg.engine.trainer": {"fastseg.models.fpn", "fastseg.data.shapes", "fastseg.checkpoint"},
        "fastseg.models.fpn": {"fastseg.layers.blocks", "fastseg.registry"},
        "fastseg.layers.blocks": {"fastseg.kernels"},
        "fastseg.kernels": set(),
        "fastseg.registry": {"fastseg.version"},
        "fastseg.version": set(),
        "fastseg.checkpoint": set(),
        "fastseg.data.shapes": set(),
    }
    assert find_cycles(graph) == []
    assert upward_imports(graph) == []
    graph["fastseg.version"] = {"fastseg.version"}  # a module importing itself is a cycle too
    assert find_cycles(graph) == [["fastseg.version"]]


# ---------------------------------------------------------------------------------------------------------------------
# The package
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_graph_sees_the_package(graph):
    assert "fastseg.registry" in graph and "fastseg.models" in graph and "fastseg.kernels" in graph
    assert "fastseg.models" in graph["fastseg"], "fastseg/__init__.py must import fastseg.models (registers them)"


def test_no_import_cycles(graph):
    assert find_cycles(graph) == []


def test_no_upward_imports(graph):
    assert upward_imports(graph) == []
