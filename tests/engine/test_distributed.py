"""DDP on two CPU processes (gloo), set up from torchrun-style environment variables.

Checked: training runs, both ranks end with identical weights equal (to float rounding) to a single-process run on
the same global batches; only rank 0 writes files; evaluation all-reduces the confusion matrix to exactly the
single-process result, with an odd-sized validation set so the shards are uneven.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastseg.engine import TrainConfig, cleanup_distributed, evaluate, init_distributed, train

SEED = int(os.environ.get("FASTSEG_TEST_SEED", "0"))  # the suite's seed (tests/conftest.py)

WORLD_SIZE = 2
PER_RANK_BATCH = 2
STEPS = 5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(out_dir, batch_size: int) -> TrainConfig:
    return TrainConfig(
        steps=STEPS,
        batch_size=batch_size,
        lr=5e-3,
        warmup_steps=1,
        log_every=1,
        eval_every=3,
        out_dir=str(out_dir),
        seed=11,
        device="cpu",
        progress=False,
    )


def _import_engine_test_helpers():
    # The stand-in model and data live beside the engine tests. Spawned ranks re-import this file but not its
    # folder on sys.path (pytest's importlib mode), so name the folder explicitly.
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import test_trainer

    return test_trainer


def _data():
    ColourWorld = _import_engine_test_helpers().ColourWorld

    return ColourWorld(length=10, augment=False), ColourWorld(length=7, seed=1, augment=False)


def _model():
    TinySeg = _import_engine_test_helpers().TinySeg

    torch.manual_seed(SEED)
    # No dropout and no BatchNorm: per-rank batch statistics would legitimately differ from one big batch.
    return TinySeg(dropout=0.0, norm=False)


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    try:
        info = init_distributed("cpu", timeout_s=120)
        assert info.backend == "gloo" and info.world_size == WORLD_SIZE and info.rank == rank
        train_set, val_set = _data()
        model = _model()
        if rank == 1:  # DDP must broadcast rank 0's initial weights
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        result = train(model, train_set, _config(os.path.join(tmp, "ddp"), PER_RANK_BATCH), val_set=val_set)
        torch.save(model.state_dict(), os.path.join(tmp, f"rank{rank}.pt"))
        metrics = evaluate(model, val_set, batch_size=2, progress=False)
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as fh:
            json.dump(
                {
                    "eval": {k: v for k, v in metrics.items() if k != "table"},
                    "final": {k: v for k, v in result.final_metrics.items() if k != "table"},
                    "steps": len(result.history),
                },
                fh,
            )
    finally:
        cleanup_distributed()


def test_ddp_two_cpu_processes(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks diverged at {key}"

    # The same global batches on one process (batch = per-rank batch * world size) give the same weights.
    train_set, val_set = _data()
    single = _model()
    train(single, train_set, _config(tmp_path / "single", PER_RANK_BATCH * WORLD_SIZE))
    for key, value in single.state_dict().items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6)

    # Evaluation: each rank saw its shard; the all-reduced matrix equals one process over the whole set.
    reference = _model()
    reference.load_state_dict(rank0)
    want = evaluate(reference, val_set, batch_size=3, progress=False)
    for rank in range(WORLD_SIZE):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["steps"] == STEPS
        assert got["eval"]["num_pixels"] == want["num_pixels"] == 7 * 11 * 12
        # Each rank predicted its shard in batches of another size than the reference: a logit may round differently
        # and flip a near-tie pixel, which moves aAcc by 1/924 and mIoU by about 1e-3 per pixel. Allow two such
        # pixels; a shard counted twice or lost moves num_pixels (checked exactly above) and the metrics by far more.
        assert got["eval"]["mIoU"] == pytest.approx(want["mIoU"], abs=3e-3)
        assert got["eval"]["aAcc"] == pytest.approx(want["aAcc"], abs=2 / (7 * 11 * 12) + 1e-12)
        assert got["final"]["mIoU"] == pytest.approx(want["mIoU"], abs=3e-3)

    # Only rank 0 logged: one start record, one record per step, no duplicates.
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records if "event" in r] == ["start", "eval", "eval", "end"]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert records[0]["world_size"] == WORLD_SIZE
    state = torch.load(tmp_path / "ddp" / "last_state.pt", weights_only=True)
    assert len(state["rng"]) == WORLD_SIZE and state["step"] == STEPS


@pytest.mark.skipif(torch.distributed.is_initialized(), reason="needs no process group in the test process")
def test_single_process_needs_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend, info.device.type) == (0, 1, None, "cpu")
    assert not torch.distributed.is_initialized()
