"""CI gate on the static GPU report (fastseg.bench.static): every shipped kernel config, compiled for sm_80, sm_86,
sm_87 (Jetson Orin), sm_89 (L4) and sm_90 (H100 / H200) on this CPU machine.

Checks: it compiles; no register spills; every fp16 / bf16 ``tl.dot`` lowers to tensor-core instructions; shared
memory within the target's per-block limit; theoretical occupancy at least the floor of the kernel's kind
(`OCCUPANCY_FLOOR`, justified in fastseg/bench/static.py). Results come from the committed cache
(benchmarks/results/static/cache.json) keyed by kernel source + config + target + Triton version, so only a changed
kernel or config is recompiled (a few seconds each); the planning step (the real launchers on meta tensors) always
runs, so a launcher that changes its tiles is checked with the new tiles.
"""

from __future__ import annotations

import pytest

from fastseg.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="the static report compiles Triton kernels: needs triton")


@pytest.fixture(scope="module")
def report():
    from fastseg.bench.static import static_report

    return static_report(full=False, workers=2)


def _failures(report, check) -> list[str]:
    out = []
    for row in report["rows"]:
        why = check(row)
        if why:
            out.append(f"{row['case']} {row['kernel']} {row['dtype']} {row['target']}: {why}")
    return out


def test_every_shipped_config_compiles_for_every_target(report):
    from fastseg.bench.static import ARCHS

    assert {r["target"] for r in report["rows"]} == set(ARCHS)
    assert not _failures(report, lambda r: None if r.get("ok") else r.get("error", "failed"))


def test_no_register_spills(report):
    bad = _failures(
        report,
        lambda r: (
            r.get("ok")
            and (r["spill_stores"] or r["spill_loads"])
            and f"{r['spill_stores']} B spill stores, {r['regs']} registers"
        ),
    )
    assert not bad, "\n".join(bad)


def test_half_precision_dots_use_tensor_cores(report):
    def check(r):
        if not r.get("ok"):
            return None
        half = [ops for ops in r["dot_operands"] if "f16" in ops]  # f16 and bf16 operand types in the TTIR
        return half and not r["tensor_cores"] and f"dots {half} without mma / wgmma"

    rows = [r for r in report["rows"] if r.get("ok") and r["dtype"] != "float32" and r["dot_operands"]]
    assert rows, "no half-precision dot found: the report lost its dots"
    assert not _failures(report, check)


def test_shared_memory_within_each_targets_block_limit(report):
    bad = _failures(
        report, lambda r: r.get("ok") and r["shared"] > r["smem_limit"] and f"{r['shared']} B > {r['smem_limit']} B"
    )
    assert not bad, "\n".join(bad)


def test_occupancy_floor_per_kernel_kind(report):
    from fastseg.bench.static import OCCUPANCY_FLOOR

    bad = _failures(
        report,
        lambda r: (
            r.get("ok")
            and r["warps_per_sm"] < OCCUPANCY_FLOOR[r["kind"]]
            and f"{r['warps_per_sm']} warps/SM < {OCCUPANCY_FLOOR[r['kind']]} ({r['limiter']})"
        ),
    )
    assert not bad, "\n".join(bad)


def test_traffic_model_covers_every_shipped_case(report):
    """Every shipped case has a traffic row at its sm_90 tiles: a kernel never moves less than the minimum, and
    the eager reference's bytes are measured (not left out)."""
    from fastseg.bench.static import static_cases
    from fastseg.bench.traffic import op_traffic

    cases = static_cases()
    rows = op_traffic(report, cases)
    assert [r["case"] for r in rows] == [c.name for c in cases]
    for row in rows:
        assert 0 < row["min_bytes"] <= row["kernel_bytes"], row
        assert row["eager_bytes"] and row["eager_bytes"] > row["min_bytes"], row


def test_occupancy_model_matches_the_calculator():
    from fastseg.bench.static import ARCHS, occupancy

    h100, l4 = ARCHS["sm_90"], ARCHS["sm_89"]
    # 128 registers x 32 threads = 4096 per warp -> 16 warps of registers -> 4 blocks of 4 warps.
    assert occupancy(h100, 4, 128, 0)["warps_per_sm"] == 16
    # 32 registers: 64 warps fit the register file; 4-warp blocks are then limited by the 64-warp cap.
    assert occupancy(h100, 4, 32, 0)["occupancy"] == 1.0
    # 60 KB of shared memory (+1 KB reserved): 3 blocks in 228 KB on an H100, 1 in 100 KB on an L4.
    assert occupancy(h100, 4, 32, 60 * 1024)["blocks_per_sm"] == 3
    assert occupancy(l4, 4, 32, 60 * 1024)["blocks_per_sm"] == 1
    # Over the per-block limit: cannot launch at all.
    assert occupancy(l4, 4, 32, 100 * 1024)["blocks_per_sm"] == 0
