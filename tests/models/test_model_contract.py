"""The model contract, checked for every registered model (a new method is tested by registering it).

forward / backward, odd input sizes, predict at input size, the loss dict, bad inputs, and a few optimisation steps
lowering the loss. Export parity lives in tests/export.
"""

import os

import pytest
import torch

import fastseg

# Full-size backbones take long on 2 CPU cores: their optimisation test is marked slow (run with `-m slow`); every
# other contract test runs on every registered model.
_HEAVY = ("*resnet50", "*resnet101", "*swin_*", "*mit_b[1-5]")
# GSS with the full DALL-E decoder at 2x resolution needs tens of seconds per 64x64 forward on this CPU: all of its
# contract tests are slow.
_VERY_HEAVY = ("gss_*_resnet50", "gss_*_swin_large")
VERY_HEAVY = set(fastseg.list_models(list(_VERY_HEAVY)))
MODELS = [pytest.param(n, marks=pytest.mark.slow) if n in VERY_HEAVY else n for n in fastseg.list_models()]
HEAVY = set(fastseg.list_models(list(_HEAVY)))
NUM_CLASSES = 5
SEED = int(os.environ.get("FASTSEG_TEST_SEED", "0"))  # the suite's seed (tests/conftest.py)


def _batch(h: int, w: int, b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    mask = torch.randint(0, NUM_CLASSES, (b, h, w), generator=g)
    mask[:, :2] = 255  # some ignore pixels
    return {"image": torch.randn(b, 3, h, w, generator=g), "mask": mask}


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    torch.manual_seed(SEED)
    return fastseg.create_model(request.param, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("size", [(64, 64), (61, 83)])
def test_forward_shapes_and_predict(model, size):
    model.eval()
    x = torch.randn(2, 3, *size)
    logits = model(x)
    stride = model.pretrained_cfg.output_stride
    assert logits.shape == (2, NUM_CLASSES, -(-size[0] // stride), -(-size[1] // stride))
    assert torch.isfinite(logits).all()
    pred = model.predict(x)
    assert pred.shape == (2, *size) and pred.dtype == torch.int64
    assert 0 <= int(pred.min()) and int(pred.max()) < NUM_CLASSES


def test_odd_size_equals_padded_computation(model):
    # forward() pads to the model's multiple and crops: the visible logits must not depend on that bookkeeping.
    model.eval()
    x = torch.randn(1, 3, 61, 83)
    m = model.pretrained_cfg.divisible_by
    padded = torch.nn.functional.pad(x, (0, (-83) % m, 0, (-61) % m), mode="replicate")
    ref = model(padded)
    out = model(x)
    torch.testing.assert_close(out, ref[..., : out.shape[-2], : out.shape[-1]])


def test_loss_backward_reaches_every_trainable_parameter(model):
    model.train()
    losses = model.loss(_batch(64, 64))
    assert "loss" in losses and losses["loss"].dim() == 0 and torch.isfinite(losses["loss"])
    model.zero_grad()
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_bad_inputs_are_clear_errors(model):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    batch = _batch(64, 64)
    batch["mask"][0, 10, 10] = NUM_CLASSES + 2
    with pytest.raises(ValueError, match=f"label {NUM_CLASSES + 2}"):
        model.loss(batch)
    with pytest.raises(ValueError, match="does not match"):
        model.loss({"image": torch.randn(2, 3, 64, 64), "mask": torch.zeros(2, 32, 64, dtype=torch.long)})


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in fastseg.list_models()]
)
def test_a_few_steps_lower_the_loss(name):
    from fastseg.data.shapes import ShapesConfig, ShapesDataset

    torch.manual_seed(SEED)
    world = ShapesConfig()
    model = fastseg.create_model(name, num_classes=world.num_classes).train()
    data = ShapesDataset("train", length=4, config=world)
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def loss_value() -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout / drop-path draws for the first and the last evaluation
        return model.loss(batch)["loss"]

    first = float(loss_value().detach())
    for _ in range(8):
        loss = loss_value()
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = float(loss_value().detach())
    assert last < 0.9 * first, f"loss went from {first:.4f} to {last:.4f} in 8 steps on a fixed batch"
