"""README's loader-throughput table is the rendering of the committed benchmark record (no hand-copied figures)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECORD = ROOT / "benchmarks" / "results" / "cpu-x86_64" / "loader_cityscapes_512x1024.json"


def test_readme_shows_the_recorded_loader_throughput():
    spec = importlib.util.spec_from_file_location("loader_throughput", ROOT / "benchmarks" / "loader_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    record = json.loads(RECORD.read_text())
    assert record["command"].startswith("python benchmarks/loader_throughput.py")
    assert [row["workers"] for row in record["results"]] == [0, 1, 2]
    assert module.render_markdown(record) in (ROOT / "README.md").read_text()
