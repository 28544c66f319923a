"""Tests of `pixel_class_attention`: Triton (native on a CUDA host, the interpreter on CPU; see conftest.py) against
the plain PyTorch reference, forward and gradients of every input.

The issue's grid (K in {1, 19, 150, 171}, N in {1, 97, 1025}, d in {16, 64}, negation, logits mean) is sampled so
that every value of every axis appears. GPU tests (marker ``gpu``) apply flash-attention's rule: the low-precision
kernel's error against an fp32 reference is at most twice (forward) / three times (gradients) PyTorch's own error in
that dtype.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from .conftest import (
    assert_close,
    assert_nonzero,
    export_onnx_and_run,
    flash_rule,
    grads,
    leaf,
    qkv,
    triton_backward_context,
)

ops = importlib.import_module("fastseg.kernels.pixel_class_attention")  # the module (the package exports the function)


def _compare_with_reference(q, k, v, atol=1e-4, **kwargs):
    """Triton vs reference: forward outputs and the gradients of q, k, v (which must not be all zero)."""
    qt, kt, vt = leaf(q, k, v)
    qr, kr, vr = leaf(q, k, v)
    got = ops.pixel_class_attention(qt, kt, vt, impl="triton", **kwargs)
    ref = ops.pixel_class_attention_ref(qr, kr, vr, **kwargs)
    got, ref = (got, ref) if kwargs.get("return_logits_mean") else ((got,), (ref,))
    for g, r, name in zip(got, ref, ("out", "logits_mean")):
        assert_close(g, r, what=name)
    cot = [torch.randn_like(r) for r in ref]
    for g, r, name in zip(grads(got, (qt, kt, vt), cot), grads(ref, (qr, kr, vr), cot), "qkv"):
        assert_nonzero(r, f"reference d{name}")
        assert_close(g, r, atol=atol, rtol=atol, what=f"d{name}")


GRID = [  # (K, N, d, negate, logits_mean): every value of every axis appears
    (1, 1, 16, False, True),
    (19, 97, 64, True, True),
    (150, 97, 16, True, False),
    (171, 1025, 16, True, True),
    (19, 1025, 64, False, False),
    (150, 1, 64, False, True),
]


@pytest.mark.parametrize("num_k, n, d, negate, mean", GRID)
def test_matches_reference(num_k, n, d, negate, mean, triton_device):
    b, h = (1, 2) if n > 100 else (2, 3)  # h > 1 with the mean: the kernel's head loop
    q, k, v = qkv(b, h, n, num_k, d, device=triton_device)
    _compare_with_reference(q, k, v, negate=negate, return_logits_mean=mean)


def test_is_ecenet_semantics_attention():
    """softmax(rowmax(A) - A) @ v and the head-mean of the scaled positive logits A (ECENet, spec B.3.2)."""
    q, k, v = qkv(2, 4, 30, 19, 64, device="cpu")
    logits = q @ k.transpose(-1, -2) * 64**-0.5
    weights = (logits.max(-1, keepdim=True)[0].expand_as(logits) - logits).softmax(dim=-1)
    out, mean = ops.pixel_class_attention(q, k, v, negate=True, return_logits_mean=True)
    assert_close(out, weights @ v, what="out")
    assert_close(mean, logits.sum(1).transpose(1, 2) / 4, what="mask")


@pytest.mark.parametrize("d", [32, 128, 24])
def test_head_dims_and_scale(d, triton_device):
    q, k, v = qkv(1, 2, 40, 21, d, device=triton_device)
    _compare_with_reference(q, k, v, scale=0.37, negate=True, return_logits_mean=True)


def test_non_contiguous_inputs(triton_device):
    b, h, n, num_k, d = 2, 2, 45, 19, 16
    q = torch.randn(b, n, h, d, device=triton_device).transpose(1, 2)  # (B, h, N, d) view of a (B, N, h, d) layout
    kv = torch.randn(b, num_k, 2 * h, d, device=triton_device).transpose(1, 2)  # packed [k | v] heads, as a fused kv
    k, v = kv[:, :h], kv[:, h:]
    qt, kt, vt = leaf(q, k, v)
    qt, kt, vt = qt.transpose(1, 2).contiguous().transpose(1, 2), kt[..., :], vt[..., :]
    got = ops.pixel_class_attention(qt, kt, vt, negate=True, return_logits_mean=True, impl="triton")
    ref = ops.pixel_class_attention_ref(q, k, v, negate=True, return_logits_mean=True)
    for g, r in zip(got, ref):
        assert_close(g, r)
    dq = torch.autograd.grad(got[0].sum() + got[1].sum(), qt)[0]
    qr = q.detach().requires_grad_()
    ref = ops.pixel_class_attention_ref(qr, k, v, negate=True, return_logits_mean=True)
    ref_dq = torch.autograd.grad(ref[0].sum() + ref[1].sum(), qr)[0]
    assert_nonzero(ref_dq)
    assert_close(dq, ref_dq, atol=1e-4)


def test_split_backward_is_split_invariant(triton_device):
    q, k, v = qkv(1, 2, 200, 19, 16, device=triton_device)
    go, gm = torch.randn_like(q), torch.randn(1, 19, 200, device=triton_device)
    ref = ops._pixel_class_attention_bwd_ref(go, gm, q, k, v, 0.25, True)
    for splits in (1, 3):
        with triton_backward_context(triton_device):
            got = ops._pixel_class_attention_bwd_triton(go, gm, q, k, v, 0.25, True, splits=splits)
        for g, r in zip(got, ref):
            assert_nonzero(r)
            assert_close(g, r, atol=1e-4)


def test_fp16(triton_device):
    q, k, v = qkv(1, 2, 50, 19, 16, dtype=torch.float16, device=triton_device)
    out, mean = ops.pixel_class_attention(q, k, v, negate=True, return_logits_mean=True, impl="triton")
    ref_out, ref_mean = ops.pixel_class_attention_ref(q.float(), k.float(), v.float(), negate=True,
                                                      return_logits_mean=True)  # fmt: skip
    assert out.dtype == mean.dtype == torch.float16
    assert_close(out.float(), ref_out, atol=5e-3, rtol=5e-3)
    assert_close(mean.float(), ref_mean, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("impl", ["triton", "torch", "auto"])
def test_empty(impl, device):
    q, k, v = qkv(2, 2, 0, 19, 16, device=device)
    out, mean = ops.pixel_class_attention(q, k, v, return_logits_mean=True, impl=impl)
    assert out.shape == (2, 2, 0, 16) and mean.shape == (2, 19, 0)
    q, k, v = qkv(2, 2, 5, 0, 16, device=device)
    out, mean = ops.pixel_class_attention(q, k, v, return_logits_mean=True, impl=impl)
    assert out.shape == (2, 2, 5, 16) and mean.shape == (2, 0, 5)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("where", ["q_nan", "q_inf", "k_nan", "k_inf", "v_nan"])
def test_nan_inf_propagate_like_the_reference(where, triton_device):
    """The documented policy: non-finite inputs propagate as in the reference; unaffected pixels stay finite."""
    q, k, v = qkv(1, 2, 40, 19, 16, device=triton_device)
    value = float("nan") if where.endswith("nan") else float("inf")
    poisoned = torch.zeros(40, dtype=torch.bool)
    if where.startswith("q"):
        q[0, 1, 7, 3] = value  # pixel 7 of head 1
        poisoned[7] = True
    elif where == "k_nan":
        k[0, 0, 4, 2] = value  # class 4 of head 0: a NaN logit for every pixel of head 0
        poisoned[:] = True
    elif where == "k_inf":
        k[0, 0, 4, 2] = value  # -S = +inf (q < 0) poisons the pixel; -S = -inf only zeroes class 4's weight
        poisoned = (q[0, 0, :, 2] < 0).cpu()
    else:
        v[0, 1, 11, 0] = value  # class 11 of head 1: weight > 0 for every pixel
        poisoned[:] = True
    out, mean = ops.pixel_class_attention(q, k, v, negate=True, return_logits_mean=True, impl="triton")
    ref_out, ref_mean = ops.pixel_class_attention_ref(q, k, v, negate=True, return_logits_mean=True)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5, equal_nan=True)
    torch.testing.assert_close(mean, ref_mean, atol=2e-5, rtol=2e-5, equal_nan=True)
    bad_pixels = (~torch.isfinite(out)).any(-1).any(1)[0].cpu()  # (N,): any head, any channel
    assert torch.equal(bad_pixels, poisoned)


def test_bad_inputs():
    q, k, v = qkv(2, 2, 5, 7, 16, device="cpu")
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        ops.pixel_class_attention(q[0], k, v)
    with pytest.raises(ValueError, match="share one dtype"):
        ops.pixel_class_attention(q, k.double().float().half(), v)
    with pytest.raises(ValueError, match="same shape"):
        ops.pixel_class_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="agree on batch, heads and head dim"):
        ops.pixel_class_attention(q[:1], k, v)
    with pytest.raises(ValueError, match="must be one of"):
        ops.pixel_class_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="scale must be a finite"):
        ops.pixel_class_attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.pixel_class_attention(q, k, v, impl="cuda")
    # impl="auto" falls back to the reference beyond the kernel's limits
    big_k, big_v = torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    assert_close(ops.pixel_class_attention(q, big_k, big_v), ops.pixel_class_attention_ref(q, big_k, big_v))


def test_triton_refuses_shapes_beyond_its_limits(triton_device):
    q = torch.randn(2, 2, 5, 16, device=triton_device)
    big_k, big_v = torch.randn(2, 2, 300, 16, device=triton_device), torch.randn(2, 2, 300, 16, device=triton_device)
    with pytest.raises(ValueError, match="K = 300 > 256"):
        ops.pixel_class_attention(q, big_k, big_v, impl="triton")
    wide = torch.randn(1, 1, 3, 160, device=triton_device)
    with pytest.raises(ValueError, match="head dim 160 > 128"):
        ops.pixel_class_attention(wide, wide, wide, impl="triton")


def _opcheck_samples(device):
    q, k, v = qkv(1, 2, 9, 5, 16, device=device)
    dense_permuted = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]
    for layout, tensors in (("compact", (q, k, v)), ("dense-permuted", dense_permuted)):
        a, b_, c = (t.detach().clone().requires_grad_() for t in tensors)
        yield torch.ops.fastseg.pixel_class_attention.default, (a, b_, c, 0.25, True, True)
        if layout == "compact":
            yield torch.ops.fastseg.pixel_class_attention.default, (a, b_, c, 0.25, False, False)


@pytest.mark.parametrize("impl", ["auto", "triton"], ids=["reference", "triton"])
def test_opcheck(impl, device):
    with triton_backward_context(device, impl == "triton"):
        for op, args in _opcheck_samples(device):
            torch.library.opcheck(op, args)


@pytest.mark.export
def test_onnx_export_matches_onnxruntime(tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, pixels, classes):  # (1, 2, N, 16), (1, 2, K, 16)
            return ops.pixel_class_attention(pixels, classes, classes, negate=True, return_logits_mean=True)

    args = (torch.randn(1, 2, 24, 16), torch.randn(1, 2, 5, 16))
    model = Tiny().eval()
    expected = model(*args)
    _, domains, outputs = export_onnx_and_run(model, args, tmp_path / "pixel_class_attention.onnx")
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains: {domains}"
    for got, want in zip(outputs, expected):
        assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_k, n, d", [(150, 4096, 64), (19, 1025, 32), (171, 16384, 128)])
def test_gpu_precision(dtype, num_k, n, d):
    q, k, v = qkv(2, 4, n, num_k, d, dtype=dtype, device="cuda")
    cot = [torch.randn(2, 4, n, d, device="cuda"), torch.randn(2, num_k, n, device="cuda")]
    outs = {}
    for name, tensors, fn in (
        ("fast", (q, k, v), lambda *t: ops.pixel_class_attention(*t, negate=True, return_logits_mean=True,
                                                                 impl="triton")),
        ("low", (q, k, v), lambda *t: ops.pixel_class_attention_ref(*t, negate=True, return_logits_mean=True)),
        ("ref", [t.float() for t in (q, k, v)],
         lambda *t: ops.pixel_class_attention_ref(*t, negate=True, return_logits_mean=True)),
    ):  # fmt: skip
        leaves = leaf(*tensors)
        res = fn(*leaves)
        outs[name] = (res, grads(res, leaves, [c.to(r.dtype) for c, r in zip(cot, res)]))
    for i in range(2):
        flash_rule(outs["fast"][0][i], outs["low"][0][i], outs["ref"][0][i].float(), 2)
    for i in range(3):
        flash_rule(outs["fast"][1][i], outs["low"][1][i], outs["ref"][1][i].float(), 3)


@pytest.mark.gpu
def test_gpu_fp32_matches_reference_and_backward_is_deterministic():
    q, k, v = qkv(2, 4, 3000, 150, 64, device="cuda")
    out, mean = ops.pixel_class_attention(q, k, v, negate=True, return_logits_mean=True, impl="triton")
    ref_out, ref_mean = ops.pixel_class_attention_ref(q, k, v, negate=True, return_logits_mean=True)
    assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    assert_close(mean, ref_mean, atol=1e-4, rtol=1e-4)
    qt, kt, vt = leaf(q, k, v)
    first = grads(ops.pixel_class_attention(qt, kt, vt, negate=True, impl="triton"), (qt, kt, vt), torch.ones_like(q))
    second = grads(ops.pixel_class_attention(qt, kt, vt, negate=True, impl="triton"), (qt, kt, vt),
                    torch.ones_like(q))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(first, second))
