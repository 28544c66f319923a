"""Benchmark plumbing: timing, roofline maths, the table, the runner with a synthetic case, and `fastseg bench`."""

import json

import pytest
import torch

from fastseg.bench import core
from fastseg.bench.core import KernelCase, ProviderUnavailable, Timing, measure
from fastseg.bench.roofline import DevicePeak, peak_for, roofline_fraction
from fastseg.bench.runner import BenchRow, format_table, run_kernels


def test_timing_quantiles():
    t = Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t.median == 3.0 and t.p20 == 2.0 and t.p80 == 4.0


def test_measure_counts_calls():
    calls = []
    timing = measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, rounds=5)
    assert len(calls) == 7 and len(timing.samples) == 5 and all(s >= 0 for s in timing.samples)


def test_measure_stays_within_its_time_budget():
    # 20 ms calls with a 0.1 s budget: warm-up stops once it took half the budget (3 calls of 5), timing after the
    # budget (about 5 rounds of 50), never fewer than 3 rounds
    import time

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.02)

    timing = measure(slow, torch.device("cpu"), warmup=5, rounds=50, max_seconds=0.1)
    warmup_calls = len(calls) - len(timing.samples)
    assert 1 <= warmup_calls <= 3 and 3 <= len(timing.samples) <= 7
    calls.clear()
    timing = measure(slow, torch.device("cpu"), warmup=0, rounds=50, max_seconds=0.0)
    assert len(calls) == len(timing.samples) == 3


def test_roofline_fraction_picks_the_binding_limit():
    peak = DevicePeak("test", hbm_gbps=100.0, bf16_tflops=10.0, fp32_tflops=1.0, source="test")
    # 1 GB at 100 GB/s takes 10 ms; 1 GFLOP fp32 at 1 TFLOP/s takes 1 ms: memory binds.
    assert roofline_fraction(0.02, 1e9, 1e9, peak) == pytest.approx(0.5)
    # In bf16 the compute bound shrinks 10x; memory still binds.
    assert roofline_fraction(0.01, 1e9, 1e9, peak, torch.bfloat16) == pytest.approx(1.0)
    # Compute-bound case: 1 TFLOP fp32 takes 1 s at peak.
    assert roofline_fraction(2.0, 1e12, 1.0, peak) == pytest.approx(0.5)
    assert roofline_fraction(1.0, 1.0, 1.0, None) is None


def test_cpu_peak_is_measured():
    peak = peak_for(torch.device("cpu"))
    assert peak.measured and peak.hbm_gbps > 0 and peak.fp32_tflops > 0


@pytest.fixture
def toy_family(monkeypatch):
    def factory(device, smoke):
        n = 64 if smoke else 4096
        unavailable = ProviderUnavailable("needs hardware that is not here")

        def missing(_inputs):
            raise unavailable

        return [
            KernelCase(
                family="toy",
                op="double",
                shape_id=f"N{n}",
                make_inputs=lambda d, dt: torch.ones(n, device=d, dtype=dt),
                providers={"torch": lambda x: lambda: x * 2, "fast": lambda x: lambda: x.add(x), "gone": missing},
                flops=n,
                min_bytes=8 * n,
            )
        ]

    monkeypatch.setitem(core._CASE_FACTORIES, "toy", factory)
    return "toy"


def test_run_kernels_table_and_skips(toy_family):
    rows = run_kernels(torch.device("cpu"), [toy_family], rounds=3, progress=False)
    by_provider = {r.provider: r for r in rows}
    assert by_provider["torch"].ok and by_provider["fast"].ok and not by_provider["gone"].ok
    assert by_provider["torch"].speedup == pytest.approx(1.0)
    assert by_provider["gone"].note == "needs hardware that is not here"
    assert all(r.seconds is not None and r.seconds >= 0 for r in rows)  # each job's wall time, skipped ones too
    assert by_provider["torch"].gbps == pytest.approx(8 * 4096 / (by_provider["torch"].median_ms / 1e3) / 1e9)
    env = {"device": "TestCPU", "device_type": "cpu", "torch": "x", "fastseg": "y"}
    table = format_table(rows, env)
    assert "TestCPU" in table and "double-fwd" in table and "not run:" in table and "double-fwd[gone]" in table


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown kernel families"):
        core.kernel_cases(torch.device("cpu"), ["no_such_family"])


def test_every_registered_case_has_reference_and_work():
    # Each family's cases name a reference provider that exists and state their work for the roofline.
    cases = core.kernel_cases(torch.device("cpu"), smoke=True)
    assert {c.family for c in cases} >= {"vq", "class_attention", "classwise"}
    for case in cases:
        assert case.reference in case.providers, case.name
        assert case.min_bytes > 0, case.name


def test_format_table_with_nothing_run():
    rows = [BenchRow("model", "m", "fused", "B1-64x64", "float32", note="needs a GPU")]
    assert "needs a GPU: m[fused]" in format_table(
        rows, {"device": "d", "device_type": "cpu", "torch": "t", "fastseg": "f"}
    )


def test_cli_bench_writes_json_and_plot(tmp_path, capsys):
    from fastseg.cli import main

    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    code = main(
        [
            "bench",
            "--kernels",
            "none",
            "--models",
            "fpn_mit_b0",
            "--providers",
            "eager,fused",
            "--size",
            "64",
            "--rounds",
            "2",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "fpn_mit_b0" in printed and "model has no fused ops" in printed
    assert "time: models" in printed and "slowest jobs: fpn_mit_b0[" in printed
    data = json.loads(out_json.read_text())
    assert data["environment"]["torch"] == torch.__version__
    # the timed region's thread count and OpenMP wait policy are part of the record, and where the time went
    assert data["environment"]["cpu_threads"] == torch.get_num_threads() and "omp_wait_policy" in data["environment"]
    assert data["seconds"]["total"] >= data["seconds"]["models"] > 0
    eager = [r for r in data["rows"] if r["provider"] == "eager"][0]
    assert eager["median_ms"] > 0 and eager["images_per_s"] > 0
    assert out_png.stat().st_size > 1000


def test_stage_breakdown_reference_and_fused():
    from fastseg.bench.runner import run_stages

    rows = run_stages(torch.device("cpu"), ["gss_ff_resnet18", "fpn_mit_b0"], size=(64, 64), rounds=2, progress=False)
    stages = [r for r in rows if r.name.startswith("gss_ff_resnet18/")]
    expected = ["backbone", "head", "token_argmax", "decoder", "palette_inverse"]
    for provider in ("reference", "fused"):
        timed = [r.name.split("/")[1] for r in stages if r.provider == provider and r.ok]
        assert timed == expected, (provider, timed)
    assert all(r.speedup is not None for r in stages)
    (fpn,) = [r for r in rows if r.name == "fpn_mit_b0"]
    assert not fpn.ok and "benchmark_stages" in fpn.note
