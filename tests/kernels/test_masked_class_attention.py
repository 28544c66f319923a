"""Tests of `masked_class_attention`: Triton (native on a CUDA host, the interpreter on CPU; see conftest.py) against
the plain PyTorch reference, forward and gradients of every input, with forced N splits, masks of every kind, layouts.

The issue's grid (Q in {1, 19, 150, 171}, N in {1, 97, 1025}, d in {16, 64}, empty / full / random masks) is sampled
so that every value of every axis appears. GPU tests (marker ``gpu``) apply flash-attention's rule.
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

ops = importlib.import_module("fastseg.kernels.masked_class_attention")  # the module (the package exports the function)


def _make_mask(kind: str, b: int, n_q: int, n: int, device="cpu"):
    if kind == "none":
        return None
    if kind == "empty":  # every row empty -> every query attends everywhere
        return torch.zeros(b, n_q, n, dtype=torch.bool, device=device)
    if kind == "full":
        return torch.ones(b, n_q, n, dtype=torch.bool, device=device)
    mask = torch.rand(b, n_q, n, device=device) < 0.3
    mask[:, ::3] = False  # some empty rows inside a random mask
    return mask


GRID = [  # (Q, N, d, mask kind, forced splits): every value of every axis appears
    (1, 1, 16, "random", None),
    (19, 97, 64, "empty", None),
    (150, 97, 16, "full", None),
    (171, 1025, 16, "random", None),
    (19, 1025, 64, "none", None),
    (150, 1, 64, "random", None),
    (1, 1025, 64, "random", 7),
    (19, 97, 16, "random", 1),
]


@pytest.mark.parametrize("num_q, n, d, kind, splits", GRID)
def test_matches_reference(num_q, n, d, kind, splits, triton_device):
    b, h = (1, 1) if n > 100 else (2, 2)
    q, k, v = qkv(b, h, num_q, n, d, device=triton_device)
    mask = _make_mask(kind, b, num_q, n, device=triton_device)
    qr, kr, vr = leaf(q, k, v)
    ref = ops.masked_class_attention_ref(qr, kr, vr, mask)
    go = torch.randn_like(ref)
    ref_grads = grads(ref, (qr, kr, vr), go)
    for r, name in zip(ref_grads, "qkv"):
        if n > 1 or name == "v":  # with one pixel the softmax weight is 1 whatever q and k: dq = dk = 0 exactly
            assert_nonzero(r, f"reference d{name}")
    if splits is not None:  # the launchers themselves, with the N split forced in forward and backward
        with triton_backward_context(triton_device):
            out, lse = ops._masked_class_attention_fwd_triton(q, k, v, mask, d**-0.5, splits)
            _, ref_lse = ops._masked_class_attention_ref_lse(q, k, v, mask, d**-0.5)
            assert_close(lse, ref_lse, what="lse")
            assert_close(out, ref, what="out (forced splits)")
            got = ops._masked_class_attention_bwd_triton(go, None, q, k, v, mask, ref.detach(), ref_lse, d**-0.5,
                                                         splits)  # fmt: skip
        for g, r, name in zip(got, ref_grads, "qkv"):
            assert_close(g, r, atol=1e-4, rtol=1e-4, what=f"d{name} (forced splits)")
        return
    qt, kt, vt = leaf(q, k, v)
    got = ops.masked_class_attention(qt, kt, vt, mask, impl="triton")
    assert_close(got, ref, what="out")
    for g, r, name in zip(grads(got, (qt, kt, vt), go), ref_grads, "qkv"):
        assert_close(g, r, atol=1e-4, rtol=1e-4, what=f"d{name}")


def test_is_mask2former_attention():
    """Mask2Former: attn_mask = sigmoid(logits) < 0.5 (True = blocked), fully blocked rows unblocked; the op takes
    the complement and applies the fix-up itself. Checked against SDPA with the fixed-up boolean mask."""
    b, h, num_q, n, d = 2, 4, 10, 50, 16
    q, k, v = qkv(b, h, num_q, n, d)
    logits = torch.randn(b, num_q, n) - 1.0
    logits[:, 2] = -5.0  # a query whose predicted mask is empty
    attn_mask = logits.sigmoid() < 0.5
    attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False  # Mask2Former's fix-up
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~attn_mask[:, None])
    assert_close(ops.masked_class_attention(q, k, v, ~(logits.sigmoid() < 0.5)), expected)


def test_mask_rows_are_passed_16_byte_aligned():
    """Masks with N % 16 != 0 or unaligned rows reach the kernels as a padded copy: 16-aligned rows and row
    bound N_MASK, the same values in the first N columns."""
    q = torch.empty(2, 1, 5, 8)
    masks = (
        torch.rand(2, 5, 97) < 0.5,
        (torch.rand(2, 97, 5) < 0.5).transpose(1, 2),
        (torch.rand(2, 64, 5) < 0.5).transpose(1, 2),  # N = 64 but the column stride is 5
    )
    for mask in masks:
        mask_u8, _, mask_strides, n_mask = ops._mask_args(mask, q)
        assert n_mask % 16 == 0 and n_mask >= mask.shape[-1] and mask_strides[1] >= n_mask
        assert all(s % 16 == 0 for s in mask_strides[:-1]) and mask_strides[-1] == 1, mask_strides
        assert torch.equal(mask_u8.bool(), mask)
    aligned = torch.rand(2, 5, 64) < 0.5  # already aligned: passed as is, no copy
    mask_u8, _, mask_strides, n_mask = ops._mask_args(aligned, q)
    assert mask_u8.data_ptr() == aligned.data_ptr() and n_mask == 64 and mask_strides == aligned.stride()


def test_non_contiguous_and_expanded_mask(triton_device):
    b, h, num_q, n, d = 2, 2, 19, 97, 16
    dev = triton_device
    q = torch.randn(num_q, b, h * d, device=dev).view(num_q, b, h, d).permute(1, 2, 0, 3)  # seq-first layout
    k = torch.randn(b, n, h, d, device=dev).transpose(1, 2)
    v = torch.randn(b, h, n, 2 * d, device=dev)[..., ::2]  # stride 2 along d
    mask = (torch.rand(1, num_q, n, device=dev) < 0.4).expand(b, num_q, n)  # stride-0 batch
    mask_t = torch.rand(b, n, num_q, device=dev).lt(0.4).transpose(1, 2)  # transposed mask
    for m in (mask, mask_t):
        qt, kt, vt = leaf(q, k, v)
        qr, kr, vr = leaf(q, k, v)
        got = ops.masked_class_attention(qt, kt, vt, m, impl="triton")
        ref = ops.masked_class_attention_ref(qr, kr, vr, m)
        assert_close(got, ref)
        go = torch.randn_like(ref)
        for g, r in zip(grads(got, (qt, kt, vt), go), grads(ref, (qr, kr, vr), go)):
            assert_nonzero(r)
            assert_close(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d", [32, 128, 24])
def test_head_dims_scale_and_lse_grad(d, triton_device):
    q, k, v = qkv(1, 2, 20, 70, d, device=triton_device)
    mask = _make_mask("random", 1, 20, 70, device=triton_device)
    qt, kt, vt = leaf(q, k, v)
    qr, kr, vr = leaf(q, k, v)
    with triton_backward_context(triton_device):
        got = torch.ops.fastseg.masked_class_attention(qt, kt, vt, mask, 0.3)
    ref = ops._masked_class_attention_ref_lse(qr, kr, vr, mask, 0.3)
    for g, r in zip(got, ref):
        assert_close(g, r)
    cot = [torch.randn_like(r) for r in ref]  # a gradient through lse as well as through out
    for g, r in zip(grads(got, (qt, kt, vt), cot), grads(ref, (qr, kr, vr), cot)):
        assert_nonzero(r)
        assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_fp16(triton_device):
    q, k, v = qkv(1, 2, 19, 80, 16, dtype=torch.float16, device=triton_device)
    mask = _make_mask("random", 1, 19, 80, device=triton_device)
    out = ops.masked_class_attention(q, k, v, mask, impl="triton")
    assert out.dtype == torch.float16
    assert_close(out.float(), ops.masked_class_attention_ref(q.float(), k.float(), v.float(), mask), atol=5e-3,
                  rtol=5e-3)  # fmt: skip


@pytest.mark.parametrize("impl", ["triton", "torch", "auto"])
def test_empty(impl, device):
    q, k, v = qkv(2, 2, 0, 10, 16, device=device)
    assert ops.masked_class_attention(q, k, v, _make_mask("random", 2, 0, 10, device), impl=impl).shape == (2, 2, 0, 16)
    q, k, v = qkv(2, 2, 5, 0, 16, device=device)
    out = ops.masked_class_attention(q, k, v, _make_mask("random", 2, 5, 0, device), impl=impl)
    assert torch.equal(out, torch.zeros_like(q))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("where", ["q_nan", "q_inf", "k_nan_attended", "k_nan_masked_out", "v_nan"])
def test_nan_inf_propagate_like_the_reference(where, triton_device):
    """The documented policy: out[i] is NaN exactly where the reference's is; a NaN key outside query i's mask is
    ignored by both paths."""
    dev = triton_device
    q, k, v = qkv(1, 2, 6, 40, 16, device=dev)
    mask = torch.zeros(1, 6, 40, dtype=torch.bool, device=dev)
    mask[0, :3, :20] = True  # queries 0-2 attend to pixels 0-19
    mask[0, 3:5, 20:] = True  # queries 3-4 attend to pixels 20-39; query 5 (empty row) attends everywhere
    poisoned = torch.zeros(6, dtype=torch.bool)
    if where.startswith("q"):
        q[0, 1, 2, 5] = float("nan") if where == "q_nan" else float("inf")
        poisoned[2] = True
    elif where == "k_nan_attended":
        k[0, 0, 25, 1] = float("nan")  # pixel 25: attended by queries 3, 4 and 5
        poisoned[3:] = True
    elif where == "k_nan_masked_out":
        k[0, 0, 25, 1] = float("nan")
        mask[0, 3:5, 25] = False  # nobody with a mask attends to pixel 25; query 5 (attends everywhere) still does
        poisoned[5] = True
    else:
        v[0, 1, 30, 0] = float("nan")  # 0 * NaN in the weighted sum reaches every query
        poisoned[:] = True
    out = ops.masked_class_attention(q, k, v, mask, impl="triton")
    ref = ops.masked_class_attention_ref(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5, equal_nan=True)
    assert torch.equal((~torch.isfinite(out)).any(-1).any(1)[0].cpu(), poisoned)


def test_bad_inputs():
    q, k, v = qkv(2, 2, 5, 7, 16)
    with pytest.raises(ValueError, match="mask must be one of"):
        ops.masked_class_attention(q, k, v, torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, Q, N\) = \(2, 5, 7\)"):
        ops.masked_class_attention(q, k, v, torch.zeros(2, 7, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have 3 dimensions"):
        ops.masked_class_attention(q, k, v, torch.zeros(2, 2, 5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        ops.masked_class_attention(q, k, v[..., :8])


def test_triton_refuses_shapes_beyond_its_limits(triton_device):
    wide = torch.randn(1, 1, 3, 160, device=triton_device)
    with pytest.raises(ValueError, match="head dim 160 > 128"):
        ops.masked_class_attention(wide, wide, wide, impl="triton")
    # impl="auto" falls back to the reference beyond the kernel's limits
    assert_close(ops.masked_class_attention(wide, wide, wide), ops.masked_class_attention_ref(wide, wide, wide))


def _opcheck_samples(device):
    q, k, v = qkv(1, 2, 9, 5, 16, device=device)
    dense_permuted = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]
    mask = _make_mask("random", 1, 5, 9, device=device)
    for layout, tensors in (("compact", (q, k, v)), ("dense-permuted", dense_permuted)):
        a, b_, _ = (t.detach().clone().requires_grad_() for t in tensors)
        # class -> pixel: 5 queries over 9 pixels
        yield torch.ops.fastseg.masked_class_attention.default, (b_, a, a.detach().mul(2).requires_grad_(), mask, 0.25)
        if layout == "compact":
            yield torch.ops.fastseg.masked_class_attention.default, (b_, a, a.detach().mul(2).requires_grad_(), None,
                                                                      0.25)  # fmt: skip


@pytest.mark.parametrize("impl", ["auto", "triton"], ids=["reference", "triton"])
def test_opcheck(impl, device):
    with triton_backward_context(device, impl == "triton"):
        for op, args in _opcheck_samples(device):
            torch.library.opcheck(op, args)


@pytest.mark.export
def test_onnx_export_matches_onnxruntime(tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, pixels, classes, mask_logits):  # (1, 2, N, 16), (1, 2, K, 16), (1, K, N)
            return ops.masked_class_attention(classes, pixels, pixels, mask_logits.sigmoid() >= 0.5)

    args = (torch.randn(1, 2, 24, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 5, 24))
    args[2][:, 1] = -3.0  # an empty mask row
    model = Tiny().eval()
    expected = model(*args)
    _, domains, (got,) = export_onnx_and_run(model, args, tmp_path / "masked_class_attention.onnx")
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains: {domains}"
    assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_q, n, d", [(100, 4096, 32), (19, 16384, 64), (171, 1025, 128)])
def test_gpu_precision(dtype, num_q, n, d):
    q, k, v = qkv(2, 8, num_q, n, d, dtype=dtype, device="cuda")
    mask = _make_mask("random", 2, num_q, n, device="cuda")
    cot = torch.randn(2, 8, num_q, d, device="cuda")
    results = {}
    for name, tensors, fn in (
        ("fast", (q, k, v), lambda *t: ops.masked_class_attention(*t, mask, impl="triton")),
        ("low", (q, k, v), lambda *t: ops.masked_class_attention_ref(*t, mask)),
        ("ref", [t.float() for t in (q, k, v)], lambda *t: ops.masked_class_attention_ref(*t, mask)),
    ):
        leaves = leaf(*tensors)
        out = fn(*leaves)
        results[name] = (out, grads(out, leaves, cot.to(out.dtype)))
    flash_rule(results["fast"][0], results["low"][0], results["ref"][0], 2)
    for i in range(3):
        flash_rule(results["fast"][1][i], results["low"][1][i], results["ref"][1][i], 3)
