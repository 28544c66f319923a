"""Tests of `cam_masked_pairs` (SemPLeS soft CAM masking of positive pairs): Triton through the interpreter vs the
reference vs a per-pixel oracle; both deltas, gradients (float64 gradcheck, ties), edge sizes, bad inputs, opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastseg.kernels import cam_masked_pairs, cam_masked_pairs_ref
from fastseg.kernels._utils import interpreter_enabled, run_triton_on_cpu

from .conftest import assert_nonzero

needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (set by conftest)")


def naive_pairs(images, cams, pair_image, pair_class, delta):
    """Independent oracle in fp64: bilinear align_corners=True written out per output pixel, then min-max."""
    _, _, height, width = images.shape
    h, w = cams.shape[-2:]
    fgs, bgs = [], []
    for n, k in zip(pair_image.tolist(), pair_class.tolist()):
        cam = cams[n, k].double()
        up = torch.empty(height, width, dtype=torch.float64)
        for y in range(height):
            sy = y * (h - 1) / (height - 1) if height > 1 else 0.0
            y0 = min(int(sy), h - 1)
            y1, ly = min(y0 + 1, h - 1), sy - y0
            for x in range(width):
                sx = x * (w - 1) / (width - 1) if width > 1 else 0.0
                x0 = min(int(sx), w - 1)
                x1, lx = min(x0 + 1, w - 1), sx - x0
                up[y, x] = (1 - ly) * ((1 - lx) * cam[y0, x0] + lx * cam[y0, x1]) + ly * (
                    (1 - lx) * cam[y1, x0] + lx * cam[y1, x1]
                )
        mask = (up - up.min()) / (up.max() - up.min() + delta)
        fgs.append(mask * images[n].double())
        bgs.append((1 - mask) * images[n].double())
    if not fgs:
        empty = torch.zeros(0, *images.shape[1:], dtype=torch.float64)
        return empty, empty
    return torch.stack(fgs), torch.stack(bgs)


CASES = [  # (B, C, H, W, K, h, w, pairs)
    (3, 3, 17, 23, 4, 5, 6, [(0, 1), (0, 3), (2, 0), (1, 0)]),
    (1, 3, 32, 32, 2, 2, 2, [(0, 1)]),
    (2, 1, 1, 9, 3, 1, 4, [(1, 2), (0, 0)]),  # one output row, one source row
    (2, 4, 8, 8, 3, 8, 8, [(1, 1)]),  # same size: no interpolation
    (2, 3, 9, 7, 3, 3, 3, []),  # no positive pair
]


def make(case):
    batch, channels, height, width, k, h, w, pairs = case
    images = torch.randn(batch, channels, height, width)
    cams = torch.relu(torch.randn(batch, k, h, w))
    pair_image = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    pair_class = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    return images, cams, pair_image, pair_class


@needs_interpreter
@pytest.mark.parametrize("delta", [0.1, 1e-4])
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(case, delta):
    images, cams, pi, pc = make(case)
    expected = naive_pairs(images, cams, pi, pc, delta)
    for impl in ("torch", "triton"):
        out = cam_masked_pairs(images, cams, pi, pc, delta, impl=impl)
        for o, e in zip(out, expected):
            assert o.shape == e.shape and o.dtype == images.dtype
            torch.testing.assert_close(o.double(), e, atol=2e-5, rtol=1e-4)


@needs_interpreter
def test_mask_range_and_constant_cam():
    images = torch.ones(1, 1, 6, 6)
    cams = torch.zeros(1, 2, 3, 3)
    cams[0, 1] = torch.arange(9.0).view(3, 3)
    pi, pc = torch.tensor([0, 0]), torch.tensor([0, 1])
    fg, bg = cam_masked_pairs(images, cams, pi, pc, 0.1, impl="triton")
    assert torch.all(fg[0] == 0) and torch.all(bg[0] == 1)  # constant CAM -> mask 0, never NaN
    assert fg[1].min() == 0 and 0.98 < fg[1].max() < 1  # the delta keeps the maximum below 1
    torch.testing.assert_close(fg + bg, images.expand(2, -1, -1, -1))


@needs_interpreter
@pytest.mark.parametrize("need_image_grad", [False, True])
@pytest.mark.parametrize("case", CASES[:3])
def test_backward_matches_reference(case, need_image_grad):
    images, cams, pi, pc = make(case)
    grads = None
    results = []
    for impl in ("torch", "triton", "auto"):
        x = images.clone().requires_grad_(need_image_grad)
        c = cams.clone().requires_grad_()
        with run_triton_on_cpu(impl == "triton"):  # the backward runs on this thread: it sees the switch
            fg, bg = cam_masked_pairs(x, c, pi, pc, 0.1, impl=impl)
            if grads is None:
                grads = torch.randn_like(fg), torch.randn_like(bg)
            loss = (fg * grads[0]).sum() + (bg * grads[1]).sum()
            results.append(torch.autograd.grad(loss, [c, x] if need_image_grad else [c]))
    assert_nonzero(results[1][0], "d cams")
    for got in results[1:]:
        for g, r in zip(got, results[0]):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("delta", [0.1, 1e-4])
def test_fused_backward_splits_ties_like_the_reference(delta):
    """The fused mask Jacobian at ties: a zero plateau at the minimum (ReLU CAMs), a plateau at the maximum, a
    constant CAM (minimum = maximum); each gives the reference's d cams. Which pixels tie is decided by the rounding
    of each implementation's own interpolation, so the sizes make every interpolation weight a multiple of 1/4 and
    the plateau values dyadic: the upsampled maps are then exact in both, and so are their ties."""
    torch.manual_seed(3)
    images = torch.randn(2, 3, 17, 21)  # (17 - 1) / (5 - 1) and (21 - 1) / (6 - 1) output pixels per CAM cell
    cams = torch.rand(2, 4, 5, 6)
    cams[0, 0, :3, :3] = 0.0  # many output pixels at the minimum
    cams[0, 1, 1:3, 2:5] = 2.0  # a plateau at the maximum
    cams[1, 2] = 0.5  # constant
    pi, pc = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3])
    grads = torch.randn(4, 3, 17, 21), torch.randn(4, 3, 17, 21)
    results = []
    for triton_on in (False, True):
        c = cams.clone().requires_grad_()
        with run_triton_on_cpu(triton_on):
            fg, bg = cam_masked_pairs(images, c, pi, pc, delta, impl="triton" if triton_on else "torch")
            results.append(torch.autograd.grad((fg * grads[0]).sum() + (bg * grads[1]).sum(), c)[0])
    assert_nonzero(results[1][0, 0], "d cams of the pair with a minimum plateau")
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("delta", [0.1, 1e-4])
def test_gradcheck_float64_with_ties(delta):
    """The explicit backward (ties split like amin / amax) equals finite differences of the reference."""
    images = torch.randn(2, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    cams = torch.rand(2, 3, 3, 4, dtype=torch.float64)
    cams[1, 2, 0, :2] = cams[1, 2].max() + 0.5  # a tie at the maximum, on source grid points
    cams.requires_grad_()
    pi, pc = torch.tensor([0, 1, 1]), torch.tensor([2, 2, 0])
    assert torch.autograd.gradcheck(lambda x, c: cam_masked_pairs(x, c, pi, pc, delta, impl="auto"), (images, cams))


@needs_interpreter
def test_strided_and_low_precision_images():
    images = torch.randn(2, 9, 11, 3).permute(0, 3, 1, 2)  # channels-last layout
    cams = torch.rand(2, 4, 3, 5).transpose(2, 3).contiguous().transpose(2, 3)
    pi, pc = torch.tensor([1, 0]), torch.tensor([3, 2])
    expected = naive_pairs(images, cams, pi, pc, 0.1)
    for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2), (torch.float64, 2e-5)):
        out = cam_masked_pairs(images.to(dtype), cams, pi, pc, 0.1, impl="triton")
        assert out[0].dtype == dtype
        for o, e in zip(out, expected):
            torch.testing.assert_close(o.double(), e, atol=tol, rtol=tol)


def test_only_positive_pairs_are_written():
    images, cams, pi, pc = make(CASES[0])
    fg, bg = cam_masked_pairs(images, cams, pi, pc, 0.1)
    assert fg.shape[0] == pi.numel() == 4  # P outputs, not B x K


def test_bad_inputs():
    images, cams, pi, pc = make(CASES[0])
    with pytest.raises(ValueError, match="same batch size"):
        cam_masked_pairs(images[:2], cams, pi, pc, 0.1)
    with pytest.raises(ValueError, match="same length"):
        cam_masked_pairs(images, cams, pi, pc[:2], 0.1)
    with pytest.raises(ValueError, match="delta"):
        cam_masked_pairs(images, cams, pi, pc, 0.0)
    with pytest.raises(ValueError, match="out of range"):
        cam_masked_pairs(images, cams, pi, pc + 4, 0.1)
    with pytest.raises(ValueError, match="int64"):
        cam_masked_pairs(images, cams, pi.int(), pc, 0.1)


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_interpreter)])
def test_opcheck(use_triton):
    images, cams, pi, pc = make(CASES[0])
    images.requires_grad_()
    cams.requires_grad_()
    with run_triton_on_cpu(use_triton):
        torch.library.opcheck(torch.ops.fastseg.cam_masked_pairs.default, (images, cams, pi, pc, 0.1))
        g = torch.randn(4, 3, 17, 23)
        for need in (False, True):
            torch.library.opcheck(
                torch.ops.fastseg.cam_masked_pairs_backward.default,
                (g, g.flip(0), images.detach(), cams.detach(), pi, pc, 0.1, need),
            )


def test_reference_mask_is_plain_interpolate_minmax():
    images, cams, pi, pc = make(CASES[1])
    fg, _ = cam_masked_pairs_ref(images, cams, pi, pc, 1e-4)
    up = F.interpolate(cams[0:1, 1:2], size=(32, 32), mode="bilinear", align_corners=True)
    mask = (up - up.min()) / (up.max() - up.min() + 1e-4)
    torch.testing.assert_close(fg, mask * images[0:1])


@needs_interpreter
@pytest.mark.parametrize("family", ["cam_masked_pairs", "attention_fusion"])
def test_bench_cases_run_in_smoke_mode(family):
    """The D.5b benchmark cases exist (fwd and fwd_bwd) and their triton and torch providers agree (smoke shapes)."""
    from fastseg.bench import core

    cases = core.kernel_cases(torch.device("cpu"), [family], smoke=True)
    assert sorted(c.mode for c in cases) == ["fwd", "fwd_bwd"]
    assert all("B64" in c.shape_id and c.min_bytes > 0 for c in cases)
    for case in cases:
        inputs = case.make_inputs(torch.device("cpu"), case.dtype)
        fused, ref = case.providers["triton"](inputs)(), case.providers["torch"](inputs)()
        for f, r in zip(fused if isinstance(fused, tuple) else (fused,), ref if isinstance(ref, tuple) else (ref,)):
            torch.testing.assert_close(f, r, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_cuda_matches_reference_fwd_bwd(dtype, tol):
    images = torch.randn(8, 3, 224, 224).to(dtype).cuda()  # D.5b shapes, 12 pairs
    cams = torch.rand(8, 20, 14, 14, device="cuda", requires_grad=True)
    pi = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 7], device="cuda")
    pc = torch.tensor([1, 5, 0, 19, 2, 3, 7, 8, 9, 10, 11, 12], device="cuda")
    for delta in (0.1, 1e-4):
        fused = cam_masked_pairs(images, cams, pi, pc, delta, impl="triton")
        ref = cam_masked_pairs_ref(images.double(), cams.double(), pi, pc, delta)
        for o, e in zip(fused, ref):
            torch.testing.assert_close(o.double(), e, atol=tol * 4, rtol=tol)
        grads = torch.randn_like(fused[0]), torch.randn_like(fused[1])
        (g,) = torch.autograd.grad((fused[0] * grads[0]).sum() + (fused[1] * grads[1]).sum(), cams)
        c64 = cams.detach().double().requires_grad_()
        r = cam_masked_pairs_ref(images.double(), c64, pi, pc, delta)
        (gr,) = torch.autograd.grad((r[0] * grads[0].double()).sum() + (r[1] * grads[1].double()).sum(), c64)
        torch.testing.assert_close(g.double(), gr, atol=max(tol, 1e-4) * float(gr.abs().max()), rtol=0)
