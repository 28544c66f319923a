"""Tests of fastseg.kernels.class_attention: Triton (interpreter on CPU) against the plain PyTorch reference.

The issue's grid (K or Q in {1, 19, 150, 171}, N in {1, 97, 1025}, d in {16, 64}, negation, logits mean, empty /
full / random masks) is sampled so that every value of every axis appears, forward and gradients of every input.
GPU tests (marker ``gpu``) apply flash-attention's rule: the low-precision kernel's error against an fp32 reference
is at most twice (forward) / three times (gradients) PyTorch's own error in that dtype.
"""

from __future__ import annotations

import pytest
import torch

from fastseg.kernels import DECOMPOSITIONS, interpreter_enabled
from fastseg.kernels import class_attention as ca
from fastseg.kernels._utils import run_triton_on_cpu

needs_interpreter = pytest.mark.skipif(
    not torch.cuda.is_available() and not interpreter_enabled(),
    reason="Triton path needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU-only machines)",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _qkv(b: int, h: int, n_q: int, n_kv: int, d: int, dtype=torch.float32, device=DEVICE):
    q = torch.randn(b, h, n_q, d, dtype=dtype, device=device)
    k = torch.randn(b, h, n_kv, d, dtype=dtype, device=device)
    v = torch.randn(b, h, n_kv, d, dtype=dtype, device=device)
    return q, k, v


def _make_mask(kind: str, b: int, n_q: int, n: int, device=DEVICE):
    if kind == "none":
        return None
    if kind == "empty":  # every row empty -> every query attends everywhere
        return torch.zeros(b, n_q, n, dtype=torch.bool, device=device)
    if kind == "full":
        return torch.ones(b, n_q, n, dtype=torch.bool, device=device)
    mask = torch.rand(b, n_q, n, device=device) < 0.3
    mask[:, ::3] = False  # some empty rows inside a random mask
    return mask


def _grads(outputs, inputs, cotangents):
    return torch.autograd.grad(outputs, inputs, cotangents)


def _leaf(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _assert_close(actual, expected, atol=2e-5, rtol=2e-5, what=""):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------ pixel -> class
PCA_GRID = [  # (K, N, d, negate, logits_mean): every value of every axis appears
    (1, 1, 16, False, True),
    (19, 97, 64, True, True),
    (150, 97, 16, True, False),
    (171, 1025, 16, True, True),
    (19, 1025, 64, False, False),
    (150, 1, 64, False, True),
]


@needs_interpreter
@pytest.mark.parametrize("num_k, n, d, negate, mean", PCA_GRID)
def test_pixel_class_attention_matches_reference(num_k, n, d, negate, mean):
    b, h = (1, 2) if n > 100 else (2, 3)  # h > 1 with the mean: the kernel's head loop
    q, k, v = _qkv(b, h, n, num_k, d)
    qt, kt, vt = _leaf(q, k, v)
    qr, kr, vr = _leaf(q, k, v)
    got = ca.pixel_class_attention(qt, kt, vt, negate=negate, return_logits_mean=mean, impl="triton")
    ref = ca.pixel_class_attention_ref(qr, kr, vr, negate=negate, return_logits_mean=mean)
    got, ref = (got, ref) if mean else ((got,), (ref,))
    for g, r, name in zip(got, ref, ("out", "logits_mean")):
        _assert_close(g, r, what=name)
    cot = [torch.randn_like(r) for r in ref]
    for g, r, name in zip(_grads(got, (qt, kt, vt), cot), _grads(ref, (qr, kr, vr), cot), "qkv"):
        _assert_close(g, r, atol=1e-4, rtol=1e-4, what=f"d{name}")


def test_pixel_class_attention_is_ecenet_semantics_attention():
    """softmax(rowmax(A) - A) @ v and the head-mean of the scaled positive logits A (ECENet, spec B.3.2)."""
    q, k, v = _qkv(2, 4, 30, 19, 64, device="cpu")
    logits = q @ k.transpose(-1, -2) * 64**-0.5
    weights = (logits.max(-1, keepdim=True)[0].expand_as(logits) - logits).softmax(dim=-1)
    out, mean = ca.pixel_class_attention(q, k, v, negate=True, return_logits_mean=True)
    _assert_close(out, weights @ v, what="out")
    _assert_close(mean, logits.sum(1).transpose(1, 2) / 4, what="mask")


@needs_interpreter
@pytest.mark.parametrize("d", [32, 128, 24])
def test_pixel_class_attention_head_dims_and_scale(d):
    q, k, v = _qkv(1, 2, 40, 21, d)
    qt, kt, vt = _leaf(q, k, v)
    qr, kr, vr = _leaf(q, k, v)
    got = ca.pixel_class_attention(qt, kt, vt, scale=0.37, negate=True, return_logits_mean=True, impl="triton")
    ref = ca.pixel_class_attention_ref(qr, kr, vr, scale=0.37, negate=True, return_logits_mean=True)
    for g, r in zip(got, ref):
        _assert_close(g, r)
    cot = [torch.randn_like(r) for r in ref]
    for g, r in zip(_grads(got, (qt, kt, vt), cot), _grads(ref, (qr, kr, vr), cot)):
        _assert_close(g, r, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_pixel_class_attention_non_contiguous_inputs():
    b, h, n, num_k, d = 2, 2, 45, 19, 16
    q = torch.randn(b, n, h, d, device=DEVICE).transpose(1, 2)  # (B, h, N, d) view of a (B, N, h, d) layout
    kv = torch.randn(b, num_k, 2 * h, d, device=DEVICE).transpose(1, 2)  # packed [k | v] heads, as a fused kv Linear
    k, v = kv[:, :h], kv[:, h:]
    qt, kt, vt = _leaf(q, k, v)
    qt, kt, vt = qt.transpose(1, 2).contiguous().transpose(1, 2), kt[..., :], vt[..., :]
    got = ca.pixel_class_attention(qt, kt, vt, negate=True, return_logits_mean=True, impl="triton")
    ref = ca.pixel_class_attention_ref(q, k, v, negate=True, return_logits_mean=True)
    for g, r in zip(got, ref):
        _assert_close(g, r)
    dq = torch.autograd.grad(got[0].sum() + got[1].sum(), qt)[0]
    qr = q.detach().requires_grad_()
    ref = ca.pixel_class_attention_ref(qr, k, v, negate=True, return_logits_mean=True)
    _assert_close(dq, torch.autograd.grad(ref[0].sum() + ref[1].sum(), qr)[0], atol=1e-4)


@needs_interpreter
def test_pixel_class_attention_split_backward_is_split_invariant():
    q, k, v = _qkv(1, 2, 200, 19, 16)
    go, gm = torch.randn_like(q), torch.randn(1, 19, 200, device=DEVICE)
    ref = ca._pixel_class_attention_bwd_ref(go, gm, q, k, v, 0.25, True)
    for splits in (1, 3):
        got = ca._pixel_class_attention_bwd_triton(go, gm, q, k, v, 0.25, True, splits=splits)
        for g, r in zip(got, ref):
            _assert_close(g, r, atol=1e-4)


@needs_interpreter
def test_pixel_class_attention_fp16_interpreter():
    q, k, v = _qkv(1, 2, 50, 19, 16, dtype=torch.float16)
    out, mean = ca.pixel_class_attention(q, k, v, negate=True, return_logits_mean=True, impl="triton")
    ref_out, ref_mean = ca.pixel_class_attention_ref(q.float(), k.float(), v.float(), negate=True, return_logits_mean=True)
    assert out.dtype == mean.dtype == torch.float16
    _assert_close(out.float(), ref_out, atol=5e-3, rtol=5e-3)
    _assert_close(mean.float(), ref_mean, atol=5e-3, rtol=5e-3)


@needs_interpreter
@pytest.mark.parametrize("impl", ["triton", "torch", "auto"])
def test_pixel_class_attention_empty(impl):
    q, k, v = _qkv(2, 2, 0, 19, 16)
    out, mean = ca.pixel_class_attention(q, k, v, return_logits_mean=True, impl=impl)
    assert out.shape == (2, 2, 0, 16) and mean.shape == (2, 19, 0)
    q, k, v = _qkv(2, 2, 5, 0, 16)
    out, mean = ca.pixel_class_attention(q, k, v, return_logits_mean=True, impl=impl)
    assert out.shape == (2, 2, 5, 16) and mean.shape == (2, 0, 5)
    assert torch.equal(out, torch.zeros_like(out))


def test_pixel_class_attention_bad_inputs():
    q, k, v = _qkv(2, 2, 5, 7, 16, device="cpu")
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        ca.pixel_class_attention(q[0], k, v)
    with pytest.raises(ValueError, match="share one dtype"):
        ca.pixel_class_attention(q, k.double().float().half(), v)
    with pytest.raises(ValueError, match="same shape"):
        ca.pixel_class_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="agree on batch, heads and head dim"):
        ca.pixel_class_attention(q[:1], k, v)
    with pytest.raises(ValueError, match="must be one of"):
        ca.pixel_class_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="scale must be a finite"):
        ca.pixel_class_attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="impl must be one of"):
        ca.pixel_class_attention(q, k, v, impl="cuda")
    big_k, big_v = torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    if interpreter_enabled():
        with pytest.raises(ValueError, match="K = 300 > 256"):
            ca.pixel_class_attention(q, big_k, big_v, impl="triton")
    # impl="auto" falls back to the reference beyond the kernel's limits
    _assert_close(ca.pixel_class_attention(q, big_k, big_v), ca.pixel_class_attention_ref(q, big_k, big_v))


# ------------------------------------------------------------------------------------------- class -> pixel (mask)
MCA_GRID = [  # (Q, N, d, mask kind, forced splits): every value of every axis appears
    (1, 1, 16, "random", None),
    (19, 97, 64, "empty", None),
    (150, 97, 16, "full", None),
    (171, 1025, 16, "random", None),
    (19, 1025, 64, "none", None),
    (150, 1, 64, "random", None),
    (1, 1025, 64, "random", 7),
    (19, 97, 16, "random", 1),
]


def _mca_triton(q, k, v, mask, scale, splits):
    """The op through autograd, with the forward's N split forced (and the backward's when ``splits`` is set)."""
    if splits is None:
        return ca.masked_class_attention(q, k, v, mask, scale, impl="triton")
    with run_triton_on_cpu(DEVICE.type == "cpu"):
        out, lse = ca._masked_class_attention_fwd_triton(q.detach(), k.detach(), v.detach(), mask, scale, splits)
    ref_out, ref_lse = ca._masked_class_attention_ref_lse(q.detach(), k.detach(), v.detach(), mask, scale)
    _assert_close(lse, ref_lse, what="lse")
    return out


@needs_interpreter
@pytest.mark.parametrize("num_q, n, d, kind, splits", MCA_GRID)
def test_masked_class_attention_matches_reference(num_q, n, d, kind, splits):
    b, h = (1, 1) if n > 100 else (2, 2)
    q, k, v = _qkv(b, h, num_q, n, d)
    mask = _make_mask(kind, b, num_q, n)
    qr, kr, vr = _leaf(q, k, v)
    ref = ca.masked_class_attention_ref(qr, kr, vr, mask)
    if splits is not None:
        _assert_close(_mca_triton(q, k, v, mask, d**-0.5, splits), ref, what="out (forced splits)")
        _, lse = ca._masked_class_attention_ref_lse(q, k, v, mask, d**-0.5)
        go = torch.randn_like(ref)
        with run_triton_on_cpu(DEVICE.type == "cpu"):
            got = ca._masked_class_attention_bwd_triton(go, None, q, k, v, mask, ref.detach(), lse, d**-0.5, splits)
        for g, r in zip(got, _grads(ref, (qr, kr, vr), go)):
            _assert_close(g, r, atol=1e-4, rtol=1e-4)
        return
    qt, kt, vt = _leaf(q, k, v)
    got = ca.masked_class_attention(qt, kt, vt, mask, impl="triton")
    _assert_close(got, ref, what="out")
    go = torch.randn_like(ref)
    for g, r, name in zip(_grads(got, (qt, kt, vt), go), _grads(ref, (qr, kr, vr), go), "qkv"):
        _assert_close(g, r, atol=1e-4, rtol=1e-4, what=f"d{name}")


def test_masked_class_attention_is_mask2former_attention():
    """Mask2Former: attn_mask = sigmoid(logits) < 0.5 (True = blocked), fully blocked rows unblocked; the op takes
    the complement and applies the fix-up itself. Checked against SDPA with the fixed-up boolean mask."""
    b, h, num_q, n, d = 2, 4, 10, 50, 16
    q, k, v = _qkv(b, h, num_q, n, d, device="cpu")
    logits = torch.randn(b, num_q, n) - 1.0
    logits[:, 2] = -5.0  # a query whose predicted mask is empty
    attn_mask = logits.sigmoid() < 0.5
    attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False  # Mask2Former's fix-up
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~attn_mask[:, None])
    _assert_close(ca.masked_class_attention(q, k, v, ~(logits.sigmoid() < 0.5)), expected)


@needs_interpreter
def test_masked_class_attention_non_contiguous_and_expanded_mask():
    b, h, num_q, n, d = 2, 2, 19, 97, 16
    q = torch.randn(num_q, b, h * d, device=DEVICE).view(num_q, b, h, d).permute(1, 2, 0, 3)  # seq-first layout
    k = torch.randn(b, n, h, d, device=DEVICE).transpose(1, 2)
    v = torch.randn(b, h, n, 2 * d, device=DEVICE)[..., ::2]  # stride 2 along d
    mask = (torch.rand(1, num_q, n, device=DEVICE) < 0.4).expand(b, num_q, n)  # stride-0 batch
    mask_t = torch.rand(b, n, num_q, device=DEVICE).lt(0.4).transpose(1, 2)  # transposed mask
    for m in (mask, mask_t):
        qt, kt, vt = _leaf(q, k, v)
        qr, kr, vr = _leaf(q, k, v)
        got = ca.masked_class_attention(qt, kt, vt, m, impl="triton")
        ref = ca.masked_class_attention_ref(qr, kr, vr, m)
        _assert_close(got, ref)
        go = torch.randn_like(ref)
        for g, r in zip(_grads(got, (qt, kt, vt), go), _grads(ref, (qr, kr, vr), go)):
            _assert_close(g, r, atol=1e-4, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("d", [32, 128, 24])
def test_masked_class_attention_head_dims_scale_and_lse_grad(d):
    q, k, v = _qkv(1, 2, 20, 70, d)
    mask = _make_mask("random", 1, 20, 70)
    qt, kt, vt = _leaf(q, k, v)
    qr, kr, vr = _leaf(q, k, v)
    with run_triton_on_cpu(DEVICE.type == "cpu"):
        got = torch.ops.fastseg.masked_class_attention(qt, kt, vt, mask, 0.3)
    ref = ca._masked_class_attention_ref_lse(qr, kr, vr, mask, 0.3)
    for g, r in zip(got, ref):
        _assert_close(g, r)
    cot = [torch.randn_like(r) for r in ref]  # a gradient through lse as well as through out
    for g, r in zip(_grads(got, (qt, kt, vt), cot), _grads(ref, (qr, kr, vr), cot)):
        _assert_close(g, r, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_masked_class_attention_fp16_interpreter():
    q, k, v = _qkv(1, 2, 19, 80, 16, dtype=torch.float16)
    mask = _make_mask("random", 1, 19, 80)
    out = ca.masked_class_attention(q, k, v, mask, impl="triton")
    assert out.dtype == torch.float16
    _assert_close(out.float(), ca.masked_class_attention_ref(q.float(), k.float(), v.float(), mask), atol=5e-3, rtol=5e-3)


@needs_interpreter
@pytest.mark.parametrize("impl", ["triton", "torch", "auto"])
def test_masked_class_attention_empty(impl):
    q, k, v = _qkv(2, 2, 0, 10, 16)
    assert ca.masked_class_attention(q, k, v, _make_mask("random", 2, 0, 10), impl=impl).shape == (2, 2, 0, 16)
    q, k, v = _qkv(2, 2, 5, 0, 16)
    out = ca.masked_class_attention(q, k, v, _make_mask("random", 2, 5, 0), impl=impl)
    assert torch.equal(out, torch.zeros_like(q))


def test_masked_class_attention_bad_inputs():
    q, k, v = _qkv(2, 2, 5, 7, 16, device="cpu")
    with pytest.raises(ValueError, match="mask must be one of"):
        ca.masked_class_attention(q, k, v, torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, Q, N\) = \(2, 5, 7\)"):
        ca.masked_class_attention(q, k, v, torch.zeros(2, 7, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have 3 dimensions"):
        ca.masked_class_attention(q, k, v, torch.zeros(2, 2, 5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        ca.masked_class_attention(q, k, v[..., :8])


# ----------------------------------------------------------------------------------------- opcheck and export
def _opcheck_samples():
    q, k, v = _qkv(1, 2, 9, 5, 16, device="cpu")
    dense_permuted = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]
    mask = _make_mask("random", 1, 5, 9, device="cpu")
    for layout, tensors in (("compact", (q, k, v)), ("dense-permuted", dense_permuted)):
        a, b_, c = (t.detach().clone().requires_grad_() for t in tensors)
        yield torch.ops.fastseg.pixel_class_attention.default, (a, b_, c, 0.25, True, True)
        # class -> pixel: 5 queries over 9 pixels
        yield torch.ops.fastseg.masked_class_attention.default, (b_, a, a.detach().mul(2).requires_grad_(), mask, 0.25)
        if layout == "compact":
            yield torch.ops.fastseg.pixel_class_attention.default, (a, b_, c, 0.25, False, False)
            yield torch.ops.fastseg.masked_class_attention.default, (b_, a, a.detach().mul(2).requires_grad_(), None, 0.25)


@pytest.mark.parametrize("triton_on_cpu", [False, True], ids=["reference", "triton"])
def test_opcheck(triton_on_cpu):
    if triton_on_cpu and not interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    with run_triton_on_cpu(triton_on_cpu):
        for op, args in _opcheck_samples():
            torch.library.opcheck(op, args)


@pytest.mark.export
def test_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    class Tiny(torch.nn.Module):
        def forward(self, pixels, classes, mask_logits):  # (1, 2, N, 16), (1, 2, K, 16), (1, K, N)
            out, mean = ca.pixel_class_attention(pixels, classes, classes, negate=True, return_logits_mean=True)
            back = ca.masked_class_attention(classes, pixels, pixels, mask_logits.sigmoid() >= 0.5)
            return out, mean, back

    args = (torch.randn(1, 2, 24, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 5, 24))
    args[2][:, 1] = -3.0  # an empty mask row
    model = Tiny().eval()
    expected = model(*args)
    program = torch.export.export(model, args).run_decompositions(DECOMPOSITIONS)
    path = tmp_path / "class_attention.onnx"
    torch.onnx.export(program, args, str(path), dynamo=True)
    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains: {domains}"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    for got, want in zip(session.run(None, feeds), expected):
        _assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------------- GPU
def _flash_rule(fast, low, ref, factor):
    """max|fast - ref| <= factor * max|low - ref| + floor (reliability.md 1.1 / 1.6)."""
    floor = 2 * ((ref.to(low.dtype).float() + 0.3 - 0.3) - ref).abs().max().item()
    err, pt_err = (fast.float() - ref).abs().max().item(), (low.float() - ref).abs().max().item()
    assert err <= factor * pt_err + floor + 1e-5, f"kernel error {err:.3e} > {factor} x PyTorch's {pt_err:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_k, n, d", [(150, 4096, 64), (19, 1025, 32), (171, 16384, 128)])
def test_pixel_class_attention_gpu_precision(dtype, num_k, n, d):
    q, k, v = _qkv(2, 4, n, num_k, d, dtype=dtype, device="cuda")
    cot = [torch.randn(2, 4, n, d, device="cuda"), torch.randn(2, num_k, n, device="cuda")]
    outs = {}
    for name, tensors, fn in (
        ("fast", (q, k, v), lambda *t: ca.pixel_class_attention(*t, negate=True, return_logits_mean=True, impl="triton")),
        ("low", (q, k, v), lambda *t: ca.pixel_class_attention_ref(*t, negate=True, return_logits_mean=True)),
        ("ref", [t.float() for t in (q, k, v)], lambda *t: ca.pixel_class_attention_ref(*t, negate=True, return_logits_mean=True)),
    ):
        leaves = _leaf(*tensors)
        res = fn(*leaves)
        outs[name] = (res, _grads(res, leaves, [c.to(r.dtype) for c, r in zip(cot, res)]))
    for i in range(2):
        _flash_rule(outs["fast"][0][i], outs["low"][0][i], outs["ref"][0][i].float(), 2)
    for i in range(3):
        _flash_rule(outs["fast"][1][i], outs["low"][1][i], outs["ref"][1][i].float(), 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_q, n, d", [(100, 4096, 32), (19, 16384, 64), (171, 1025, 128)])
def test_masked_class_attention_gpu_precision(dtype, num_q, n, d):
    q, k, v = _qkv(2, 8, num_q, n, d, dtype=dtype, device="cuda")
    mask = _make_mask("random", 2, num_q, n, device="cuda")
    cot = torch.randn(2, 8, num_q, d, device="cuda")
    results = {}
    for name, tensors, fn in (
        ("fast", (q, k, v), lambda *t: ca.masked_class_attention(*t, mask, impl="triton")),
        ("low", (q, k, v), lambda *t: ca.masked_class_attention_ref(*t, mask)),
        ("ref", [t.float() for t in (q, k, v)], lambda *t: ca.masked_class_attention_ref(*t, mask)),
    ):
        leaves = _leaf(*tensors)
        out = fn(*leaves)
        results[name] = (out, _grads(out, leaves, cot.to(out.dtype)))
    _flash_rule(results["fast"][0], results["low"][0], results["ref"][0], 2)
    for i in range(3):
        _flash_rule(results["fast"][1][i], results["low"][1][i], results["ref"][1][i], 3)


@pytest.mark.gpu
def test_gpu_fp32_matches_reference_and_backward_is_deterministic():
    q, k, v = _qkv(2, 4, 3000, 150, 64, device="cuda")
    out, mean = ca.pixel_class_attention(q, k, v, negate=True, return_logits_mean=True, impl="triton")
    ref_out, ref_mean = ca.pixel_class_attention_ref(q, k, v, negate=True, return_logits_mean=True)
    _assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    _assert_close(mean, ref_mean, atol=1e-4, rtol=1e-4)
    qt, kt, vt = _leaf(q, k, v)
    first = _grads(ca.pixel_class_attention(qt, kt, vt, negate=True, impl="triton"), (qt, kt, vt), torch.ones_like(q))
    second = _grads(ca.pixel_class_attention(qt, kt, vt, negate=True, impl="triton"), (qt, kt, vt), torch.ones_like(q))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
