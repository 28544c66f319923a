"""fastseg.checkpoint: round trips, clear errors for every bad file, refusal of code-executing pickles, atomicity."""

import os
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

from fastseg import checkpoint as ckpt
from fastseg.checkpoint import CheckpointError, UnsafeCheckpointError

SEED = int(os.environ.get("FASTSEG_TEST_SEED", "0"))  # the suite's seed (tests/conftest.py)


def _net(out_channels: int = 4) -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, out_channels, 1))


def _fresh_like(model: nn.Module) -> nn.Module:
    other = _net(model[3].out_channels)
    for p in other.parameters():
        nn.init.normal_(p)
    return other


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ----------------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------------


def test_safetensors_round_trip_is_exact_and_keeps_metadata(tmp_path):
    model = _net()
    model[1].running_mean.normal_()
    path = ckpt.save_weights(model, tmp_path / "w.safetensors", {"step": "7", "architecture": "tiny"})
    other = _fresh_like(model)
    result = ckpt.load_weights(other, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_same_state(model, other)
    meta = ckpt.read_metadata(path)
    assert meta["step"] == "7" and meta["architecture"] == "tiny" and "fastseg_version" in meta
    # No temporary files are left beside the checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_tied_and_view_tensors_can_be_saved(tmp_path):
    shared = torch.randn(4, 4)
    state = {"a": shared, "b": shared, "c": shared[1]}  # safetensors itself refuses shared memory
    ckpt.save_weights(state, tmp_path / "tied.safetensors")
    loaded = ckpt.load_state_dict(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["a"], shared) and torch.equal(loaded["b"], shared) and torch.equal(loaded["c"], shared[1])


def test_pt_weights_load_through_weights_only(tmp_path):
    model = _net()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    # A training checkpoint from elsewhere: nested under "state_dict" with DDP's "module." prefix.
    nested = {"state_dict": OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items()), "epoch": 3}
    torch.save(nested, tmp_path / "nested.pth")
    for name in ("plain.pt", "nested.pth"):
        other = _fresh_like(model)
        ckpt.load_weights(other, tmp_path / name)
        _assert_same_state(model, other)


def test_training_state_round_trip_loads_with_weights_only(tmp_path):
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    state = {
        "step": 3,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": [{"torch": torch.get_rng_state(), "python": [3, list(range(5)), None]}],
        "best": float("nan"),
    }
    path = ckpt.save_training_state(tmp_path / "state.pt", state)
    # The file itself must load with the strict unpickler and no allowlist.
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 3
    loaded = ckpt.load_training_state(path)
    assert torch.equal(loaded["rng"][0]["torch"], state["rng"][0]["torch"])
    opt2 = torch.optim.AdamW(_net().parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_training_state_rejects_objects_that_need_an_allowlist(tmp_path):
    import numpy as np

    target = tmp_path / "state.pt"
    ckpt.save_training_state(target, {"step": 1})
    before = target.read_bytes()
    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        ckpt.save_training_state(target, {"step": 2, "rng": {"numpy": np.zeros(3)}})
    assert target.read_bytes() == before


# ----------------------------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["absent.safetensors", "absent.pt"])
def test_missing_file_names_the_path(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=name):
        ckpt.load_weights(_net(), tmp_path / name)
    with pytest.raises(FileNotFoundError, match=name):
        ckpt.load_training_state(tmp_path / name)


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_or_truncated_file_is_a_clear_value_error(tmp_path, how, suffix):
    model = _net()
    good = tmp_path / f"good{suffix}"
    if suffix == ".safetensors":
        ckpt.save_weights(model, good)
    else:
        torch.save(model.state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes({"garbage": os.urandom(300), "truncated": data[: len(data) // 2], "empty": b""}[how])
    with pytest.raises(ValueError, match="bad" + suffix.replace(".", r"\.")) as info:
        ckpt.load_weights(_fresh_like(model), bad)
    assert isinstance(info.value, CheckpointError)


def test_wrong_keys_are_listed_with_counts(tmp_path):
    model = _net()
    state = model.state_dict()
    state.pop("3.weight")
    state.pop("3.bias")
    state["head.extra"] = torch.zeros(1)
    ckpt.save_weights(state, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"2 missing key\(s\).*'3.weight'.*1 unexpected key\(s\).*'head.extra'"):
        ckpt.load_weights(_net(), tmp_path / "w.safetensors")
    # strict=False loads what fits and reports the rest.
    other = _fresh_like(model)
    result = ckpt.load_weights(other, tmp_path / "w.safetensors", strict=False)
    assert sorted(result.missing_keys) == ["3.bias", "3.weight"] and result.unexpected_keys == ["head.extra"]
    assert torch.equal(other[0].weight, model[0].weight)


def test_many_missing_keys_are_summarised(tmp_path):
    ckpt.save_weights({"only": torch.zeros(1)}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"9 missing key\(s\).*\.\.\. \(4 more\)"):
        ckpt.load_weights(_net(), tmp_path / "w.safetensors")


def test_shape_mismatch_is_an_error_even_when_not_strict(tmp_path):
    ckpt.save_weights(_net(out_channels=6), tmp_path / "w6.safetensors")
    model = _net(out_channels=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(
            ValueError, match=r"2 shape mismatch\(es\).*'3.weight: file \(6, 8, 1, 1\) vs model \(4, 8, 1, 1\)'"
        ):
            ckpt.load_weights(model, tmp_path / "w6.safetensors", strict=strict)
    # Nothing was half-loaded.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


# ----------------------------------------------------------------------------------------------------------------
# Malicious pickles
# ----------------------------------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"echo pwned > '{self.marker}'",))


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle", "inside_state_dict"])
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_code_executing_pickle_is_refused_and_never_runs(tmp_path, container, suffix):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / f"evil{suffix}"
    if container == "torch_zip":
        torch.save(_Evil(marker), path)
    elif container == "raw_pickle":
        path.write_bytes(pickle.dumps(_Evil(marker)))
    else:
        torch.save({"conv.weight": torch.zeros(2), "conv.bias": _Evil(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load.*never falls back to weights_only=False"):
        ckpt.load_weights(_net(), path)
    with pytest.raises(UnsafeCheckpointError):
        ckpt.load_training_state(path)
    assert not marker.exists(), "the pickle's payload ran"


def test_unsafe_error_names_the_blocked_global(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save(_Evil(tmp_path / "m"), path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        ckpt.load_state_dict(path)


def test_old_torch_refuses_pickles(tmp_path, monkeypatch):
    torch.save({"a": torch.zeros(1)}, tmp_path / "w.pt")
    monkeypatch.setattr(ckpt, "_torch_version", lambda: (2, 5))
    with pytest.raises(UnsafeCheckpointError, match="CVE-2025-32434"):
        ckpt.load_state_dict(tmp_path / "w.pt")


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------


def test_failed_write_leaves_previous_file_intact(tmp_path):
    target = tmp_path / "last.safetensors"
    ckpt.save_weights(_net(), target)
    before = target.read_bytes()

    def half_then_crash(fh):
        fh.write(b"partial bytes")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        ckpt.atomic_write(target, half_then_crash)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]  # temp file cleaned up


@pytest.mark.parametrize("kind", ["weights", "state"])
def test_save_interrupted_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch, kind):
    target = tmp_path / ("last.safetensors" if kind == "weights" else "last_state.pt")
    save = (
        (lambda: ckpt.save_weights(_net(), target))
        if kind == "weights"
        else (lambda: ckpt.save_training_state(target, {"step": 1, "x": torch.ones(100)}))
    )
    save()
    before = target.read_bytes()

    def crash(_fd):
        raise OSError("power cut during fsync (simulated)")

    monkeypatch.setattr(ckpt.os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        save()
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    if kind == "weights":
        ckpt.load_weights(_net(), target)  # still loadable


def test_save_weights_rejects_non_string_metadata(tmp_path):
    with pytest.raises(TypeError, match="metadata must map str -> str"):
        ckpt.save_weights(_net(), tmp_path / "w.safetensors", {"step": 3})
    assert not (tmp_path / "w.safetensors").exists()
