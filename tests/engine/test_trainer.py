"""Training and evaluation loops: exact resume, learning, logging, checkpoints, hooks and bad input."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fastseg import checkpoint as ckpt
from fastseg.engine import (
    StepBatchSampler,
    TrainConfig,
    evaluate,
    evaluate_confusion,
    poly_lr_factor,
    step_indices,
    train,
)
from fastseg.metrics import ConfusionMatrix

SEED = int(os.environ.get("FASTSEG_TEST_SEED", "0"))  # the suite's seed (tests/conftest.py)

NUM_CLASSES = 3
IGNORE = 255


class TinySeg(nn.Module):
    """A stand-in following the fastseg model contract: stride-2 logits, predict at input size, loss dict."""

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2, norm: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(8) if norm else nn.Identity()
        self.drop = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(8, num_classes, 1)
        self.pretrained_cfg = {
            "num_classes": num_classes,
            "ignore_index": IGNORE,
            "class_names": [f"c{i}" for i in range(num_classes)],
            "architecture": "tiny_seg",
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.relu(self.norm(self.stem(images)))))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        logits = self(images)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False).argmax(1)

    def loss(self, batch: dict) -> dict:
        logits = F.interpolate(
            self(batch["image"]), size=batch["mask"].shape[-2:], mode="bilinear", align_corners=False
        )
        ce = F.cross_entropy(logits, batch["mask"], ignore_index=IGNORE)
        reg = 1e-3 * logits.pow(2).mean()
        return {"loss": ce + reg, "ce": ce, "reg": reg}


class ColourWorld(Dataset):
    """Images whose pixel colour says the class (learnable by a 3x3 conv); a random flip uses the global RNG."""

    def __init__(self, length: int = 24, size: int = 12, seed: int = 0, augment: bool = True, bad_label=None):
        gen = torch.Generator().manual_seed(1000 * SEED + seed)
        self.samples = []
        palette = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
        for i in range(length):
            mask = torch.randint(0, NUM_CLASSES, (size // 4, size // 4), generator=gen)
            mask = mask.repeat_interleave(4, 0).repeat_interleave(4, 1)
            image = palette[mask].permute(2, 0, 1) + 0.3 * torch.randn(3, size, size, generator=gen)
            mask = mask.clone()
            mask[0, :] = IGNORE  # an ignore band, as real datasets have
            if bad_label is not None and i == 5:
                mask[3, 3] = bad_label
            self.samples.append({"image": image, "mask": mask, "index": torch.tensor(i)})
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.samples[i])
        if self.augment and torch.rand(()) < 0.5:  # global RNG: must be restored on resume
            sample["image"] = sample["image"].flip(-1)
            sample["mask"] = sample["mask"].flip(-1)
        return sample


def _cfg(tmp_path, name: str = "run", **kw) -> TrainConfig:
    base = dict(
        steps=8,
        batch_size=4,
        lr=5e-3,
        warmup_steps=2,
        log_every=2,
        out_dir=str(tmp_path / name),
        seed=3,
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _model(seed: int = 0, **kw) -> TinySeg:
    torch.manual_seed(1000 * SEED + seed)
    return TinySeg(**kw)


# ----------------------------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_exact_resume_is_bit_identical(tmp_path, optimizer):
    data = ColourWorld()
    straight = train(_model(), data, _cfg(tmp_path, "straight", optimizer=optimizer, grad_clip=1.0))
    assert len(straight.losses) == 8

    first = train(_model(), data, _cfg(tmp_path, "resumed", optimizer=optimizer, grad_clip=1.0), stop_at_step=4)
    assert first.end_step == 4 and (tmp_path / "resumed" / "last_state.pt").exists()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()  # not finished yet
    # Disturb every global RNG and start from a differently initialised model: the checkpoint must restore all.
    torch.manual_seed(12345)
    torch.rand(100)
    second = train(_model(seed=99), data, _cfg(tmp_path, "resumed", optimizer=optimizer, grad_clip=1.0), resume="auto")
    assert second.start_step == 4 and second.end_step == 8
    resumed_losses = first.losses + second.losses
    assert resumed_losses == straight.losses  # bit-identical floats, not approximately equal
    assert [r["lr"] for r in first.history + second.history] == [r["lr"] for r in straight.history]
    a = ckpt.load_state_dict(tmp_path / "straight" / "model.safetensors")
    b = ckpt.load_state_dict(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_restoring_rng_would_differ(tmp_path):
    """Guards the test above: dropout and the flip augmentation really do consume the global RNG."""
    data = ColourWorld()
    run_a = train(_model(), data, _cfg(tmp_path, "a", seed=3))
    run_b = train(_model(), data, _cfg(tmp_path, "b", seed=4))
    assert run_a.losses != run_b.losses


def test_resume_from_explicit_paths_and_mismatched_pair(tmp_path):
    data = ColourWorld(augment=False)
    train(_model(), data, _cfg(tmp_path, steps=6), stop_at_step=3)
    run = tmp_path / "run"
    # Resuming from the weights file finds its <stem>_state.pt sibling.
    res = train(_model(), data, _cfg(tmp_path, steps=6), resume=run / "last.safetensors", stop_at_step=4)
    assert res.start_step == 3 and res.end_step == 4
    # Weights of another step next to this state: a save interrupted between the two files.
    state = ckpt.load_training_state(run / "last_state.pt")
    state["step"] = 2
    ckpt.save_training_state(run / "last_state.pt", state)
    with pytest.raises(ckpt.CheckpointError, match="weights of step 4.*state of step 2"):
        train(_model(), data, _cfg(tmp_path, steps=6), resume=run)
    with pytest.raises(FileNotFoundError, match="nowhere_state.pt"):
        train(_model(), data, _cfg(tmp_path, steps=6), resume=tmp_path / "nowhere.safetensors")


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    res = train(_model(), ColourWorld(), _cfg(tmp_path, steps=2), resume="auto")
    assert res.start_step == 0 and res.end_step == 2


# ----------------------------------------------------------------------------------------------------------------
# Learning, logging, files
# ----------------------------------------------------------------------------------------------------------------


def test_training_learns_logs_and_writes_checkpoints(tmp_path):
    train_set, val_set = ColourWorld(length=32, seed=0), ColourWorld(length=8, seed=1, augment=False)
    model = _model(dropout=0.0)
    before = evaluate(model, val_set, batch_size=4, progress=False)
    cfg = _cfg(tmp_path, steps=40, lr=2e-2, log_every=10, eval_every=20, save_every=20)
    result = train(model, train_set, cfg, val_set=val_set)
    assert sum(result.losses[-5:]) / 5 < 0.6 * sum(result.losses[:5]) / 5
    assert result.final_metrics["mIoU"] > before["mIoU"] + 0.2 and result.final_metrics["mIoU"] > 0.7
    assert result.best_metrics["mIoU"] >= result.final_metrics["mIoU"]
    run = tmp_path / "run"
    for name in ("last.safetensors", "last_state.pt", "best.safetensors", "model.safetensors", "metrics.jsonl"):
        assert (run / name).exists(), name
    assert result.final_weights == run / "model.safetensors"
    assert ckpt.read_metadata(run / "model.safetensors")["step"] == "40"
    assert json.loads(ckpt.read_metadata(run / "model.safetensors")["class_names"]) == ["c0", "c1", "c2"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [10, 20, 30, 40]
    for r in steps:
        assert {"loss", "ce", "reg", "lr", "grad_norm", "step_time_s", "samples_per_s"} <= r.keys()
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0  # 0 would mean no gradient reached the model
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [20, 40] and all("val/mIoU" in r for r in evals)
    assert records[0]["event"] == "start" and records[-1]["event"] == "end"
    # The final weights reload into a fresh model and give the same metrics.
    fresh = _model(seed=5, dropout=0.0)
    ckpt.load_weights(fresh, run / "model.safetensors")
    again = evaluate(fresh, val_set, batch_size=cfg.batch_size, progress=False)  # the trainer's batches: same sums
    assert again["mIoU"] == result.final_metrics["mIoU"]


def test_out_dir_none_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = train(_model(), ColourWorld(), _cfg(tmp_path, steps=2, out_dir=None))
    assert res.final_weights is None and list(tmp_path.iterdir()) == []


def test_poly_schedule_with_warmup():
    cfg = TrainConfig(steps=10, warmup_steps=2, poly_power=1.0, lr=1.0)
    factors = [poly_lr_factor(s, cfg) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0 and factors[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    cfg_floor = TrainConfig(steps=10, poly_power=0.9, min_lr_ratio=0.1)
    assert poly_lr_factor(10, cfg_floor) == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------------------------
# Hooks for multi-stage methods
# ----------------------------------------------------------------------------------------------------------------


def test_custom_loss_and_param_groups_freeze_and_scale_lr(tmp_path):
    model = _model(dropout=0.0)
    model.stem.requires_grad_(False)
    frozen = model.stem.weight.detach().clone()
    seen_keys = []

    def loss_fn(m, batch):
        seen_keys.append(sorted(batch))
        out = m.loss(batch)
        return {"loss": 2.0 * out["ce"], "ce": out["ce"]}

    def groups(m, cfg):
        return [{"params": list(m.head.parameters()), "lr": cfg.lr * 0.1}, {"params": list(m.norm.parameters())}]

    records = []
    res = train(
        model,
        ColourWorld(),
        _cfg(tmp_path, steps=3, warmup_steps=0),
        loss_fn=loss_fn,
        param_groups=groups,
        on_step_end=lambda step, record: records.append((step, record["loss"])),
    )
    assert torch.equal(model.stem.weight, frozen)
    assert seen_keys[0] == ["image", "index", "mask"]
    assert res.history[0]["lr"] == pytest.approx(5e-4) and "reg" not in res.history[0]
    assert [s for s, _ in records] == [1, 2, 3]
    assert res.history[0]["loss"] == pytest.approx(2 * res.history[0]["ce"])


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_non_finite_loss_names_the_step(tmp_path):
    def loss_fn(m, batch):
        out = m.loss(batch)
        return {"loss": out["loss"] * (float("nan") if calls.append(1) or len(calls) == 3 else 1.0)}

    calls = []
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 2"):
        train(_model(), ColourWorld(), _cfg(tmp_path), loss_fn=loss_fn)


def test_out_of_range_label_in_training_data(tmp_path):
    with pytest.raises(ValueError, match=r"mask label 7 is outside 0..2 and is not the ignore index 255"):
        train(_model(), ColourWorld(bad_label=7, augment=False), _cfg(tmp_path, steps=20, shuffle=False))


def test_image_mask_size_mismatch(tmp_path):
    class Mismatch(ColourWorld):
        def __getitem__(self, i):
            sample = super().__getitem__(i)
            sample["mask"] = sample["mask"][:-1]
            return sample

    with pytest.raises(ValueError, match=r"image batch \(4, 3, 12, 12\) and mask batch \(4, 11, 12\) do not fit"):
        train(_model(), Mismatch(), _cfg(tmp_path))


def test_loss_without_total_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'loss' entry.*\\['ce'\\]"):
        train(_model(), ColourWorld(), _cfg(tmp_path), loss_fn=lambda m, b: {"ce": m.loss(b)["ce"]})


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("steps", 0, "steps must be a positive int"),
        ("optimizer", "adam", "optimizer must be 'adamw' or 'sgd'"),
        ("amp", "fp8", "amp must be"),
        ("lr", float("nan"), "lr must be a positive finite"),
        ("grad_clip", 0.0, "grad_clip must be > 0"),
        ("warmup_steps", -1, "warmup_steps must be an int >= 0"),
    ],
)
def test_bad_config_values(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        train(_model(), ColourWorld(), _cfg(tmp_path, **{field: value}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal of autocast")
def test_amp_on_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="amp='bf16' needs a CUDA device"):
        train(_model(), ColourWorld(), _cfg(tmp_path, amp="bf16"))


def test_all_parameters_frozen_is_an_error(tmp_path):
    model = _model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, ColourWorld(), _cfg(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------------------------


def test_step_indices_are_a_pure_function_and_cover_each_epoch():
    n, bs = 10, 3
    sampler = StepBatchSampler(n, bs, seed=7, start_step=0, end_step=20)
    batches = list(sampler)
    assert batches == list(StepBatchSampler(n, bs, seed=7, start_step=0, end_step=20))
    assert batches[5:] == list(StepBatchSampler(n, bs, seed=7, start_step=5, end_step=20))
    assert batches[4] == step_indices(4, n, bs, seed=7)
    flat = [i for b in batches for i in b]
    for epoch in range(6):  # every epoch is a permutation of the dataset
        assert sorted(flat[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert flat[:n] != flat[n : 2 * n]  # and epochs differ
    assert batches != list(StepBatchSampler(n, bs, seed=8, start_step=0, end_step=20))


def test_rank_shards_partition_the_global_batch():
    for step in range(5):
        whole = step_indices(step, 13, 4, seed=1, rank=0, world_size=1)
        whole_global = step_indices(step, 13, 8, seed=1)
        shards = [step_indices(step, 13, 4, seed=1, rank=r, world_size=2) for r in range(2)]
        assert shards[0] + shards[1] == whole_global
        assert len(whole) == 4


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def test_evaluate_matches_a_manual_confusion_matrix_and_restores_mode():
    model = _model()
    model.train()
    data = ColourWorld(length=7, augment=False)
    metrics = evaluate(model, data, batch_size=3, progress=False)
    assert model.training
    model.eval()
    manual = ConfusionMatrix(NUM_CLASSES)
    with torch.no_grad():  # the same batches of 3 (and the remainder of 1) as evaluate(): the same float sums
        for start in range(0, len(data.samples), 3):
            chunk = data.samples[start : start + 3]
            manual.update(
                model.predict(torch.stack([s["image"] for s in chunk])), torch.stack([s["mask"] for s in chunk])
            )
    want = manual.compute()
    for key in ("mIoU", "mAcc", "aAcc", "fwIoU", "num_pixels"):
        assert metrics[key] == want[key]
    assert "c2" in metrics["table"]
    matrix = evaluate_confusion(model, data, batch_size=7, progress=False)
    assert torch.equal(matrix.matrix, manual.matrix)


def test_evaluate_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="target label 7 is outside 0..2"):
        evaluate(model, ColourWorld(length=7, augment=False, bad_label=7), batch_size=4, progress=False)
    del model.pretrained_cfg
    with pytest.raises(ValueError, match="num_classes is not given"):
        evaluate(model, ColourWorld(length=2), progress=False)
    assert evaluate(model, ColourWorld(length=2, augment=False), num_classes=3, progress=False)["num_pixels"] > 0


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_training_with_amp(tmp_path, amp):
    data = ColourWorld(length=32)
    res = train(
        _model(dropout=0.0),
        data,
        _cfg(tmp_path, steps=30, lr=2e-2, device="cuda", amp=amp, grad_clip=5.0),
        val_set=ColourWorld(length=8, seed=1, augment=False),
    )
    assert all(math.isfinite(v) for v in res.losses)
    assert sum(res.losses[-5:]) < sum(res.losses[:5])
    assert res.final_metrics["mIoU"] > 0.5
