"""Tests of `attention_fusion` (AAF-weighted attention-map mean): Triton through the interpreter vs the reference vs
an independent loop over the maps; gradients to both inputs, edge sizes, strides, bad inputs, opcheck."""

from __future__ import annotations

import pytest
import torch

from fastseg.kernels import attention_fusion, attention_fusion_ref
from fastseg.kernels._utils import interpreter_enabled, run_triton_on_cpu

needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (set by conftest)")


def maps(batch: int, num_maps: int, tokens: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, num_maps, tokens, tokens).softmax(-1).to(dtype)


def naive_fusion(attn, weights, k):
    """Independent oracle in fp64: an explicit loop over the maps, then the two blocks cut out of the full mean."""
    total = torch.zeros(attn.shape[0], attn.shape[2], attn.shape[3], dtype=torch.float64)
    for m in range(attn.shape[1]):
        total += weights[:, m, None, None].double() * attn[:, m].double()
    total /= attn.shape[1]
    return total[:, :k, k:], total[:, k:, k:]


CASES = [  # (B, M, K, P)
    (2, 6, 3, 16),
    (1, 1, 1, 1),
    (3, 5, 0, 9),  # no class token: cross is empty
    (2, 4, 7, 0),  # no patch token: both outputs empty
    (1, 3, 20, 70),  # more rows / columns than one tile
]


@needs_interpreter
@pytest.mark.parametrize("batch,num_maps,k,p", CASES)
def test_forward_matches_reference(batch, num_maps, k, p):
    attn, weights = maps(batch, num_maps, k + p), torch.rand(batch, num_maps)
    ref = attention_fusion_ref(attn, weights, k)
    out = attention_fusion(attn, weights, k, impl="triton")
    expected = naive_fusion(attn, weights, k)
    for o, r, e in zip(out, ref, expected):
        assert o.shape == e.shape and o.dtype == attn.dtype
        torch.testing.assert_close(o.double(), e, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r.double(), e, atol=1e-6, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("need_attn_grad", [False, True])
@pytest.mark.parametrize("batch,num_maps,k,p", [(2, 6, 3, 16), (1, 3, 20, 70)])
def test_backward_matches_reference(batch, num_maps, k, p, need_attn_grad):
    attn, weights = maps(batch, num_maps, k + p), torch.rand(batch, num_maps)
    grads = torch.randn(batch, k, p), torch.randn(batch, p, p)
    results = []
    for impl in ("torch", "triton", "auto"):
        a = attn.clone().requires_grad_(need_attn_grad)
        w = weights.clone().requires_grad_()
        with run_triton_on_cpu(impl == "triton"):  # the backward runs on this thread: it sees the switch
            cross, patch = attention_fusion(a, w, k, impl=impl)
            loss = (cross * grads[0]).sum() + (patch * grads[1]).sum()
            results.append(torch.autograd.grad(loss, [w, a] if need_attn_grad else [w]))
    for got in results[1:]:
        for g, r in zip(got, results[0]):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    # d weights from the formula: (1/M) sum_ij attn[b, m, i, K + j] G[b, i, j]
    g = torch.cat(grads, 1).double()
    expected = torch.einsum("bmij,bij->bm", attn[..., k:].double(), g) / num_maps
    torch.testing.assert_close(results[1][0].double(), expected, atol=1e-5, rtol=1e-5)
    if need_attn_grad:  # class-token columns get exactly zero
        assert torch.all(results[1][1][..., :k] == 0)


def test_gradcheck_reference_op_float64():
    attn = maps(2, 3, 7, torch.float64).requires_grad_()
    weights = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: attention_fusion(a, w, 2, impl="auto"), (attn, weights))


@needs_interpreter
def test_strided_and_low_precision_inputs():
    # the model stacks (B, H, L, N, N) and reshapes; a permuted stack is a non-contiguous (B, M, N, N) view
    base = torch.randn(5, 2, 11, 11).softmax(-1)
    attn = base.permute(1, 0, 2, 3)
    weights = torch.rand(5, 2).t()
    out = attention_fusion(attn, weights, 4, impl="triton")
    for o, e in zip(out, naive_fusion(attn, weights, 4)):
        torch.testing.assert_close(o.double(), e, atol=1e-6, rtol=1e-5)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float64, 1e-6)):
        a = attn.to(dtype)
        out = attention_fusion(a, weights, 4, impl="triton")
        assert out[0].dtype == dtype
        for o, e in zip(out, naive_fusion(a, weights, 4)):
            torch.testing.assert_close(o.double(), e, atol=tol, rtol=tol)


def test_bad_inputs():
    attn, weights = maps(2, 3, 8), torch.rand(2, 3)
    with pytest.raises(ValueError, match="square"):
        attention_fusion(attn[..., :7], weights, 2)
    with pytest.raises(ValueError, match="weights must have shape"):
        attention_fusion(attn, weights[:, :2], 2)
    with pytest.raises(ValueError, match="num_class_tokens"):
        attention_fusion(attn, weights, 9)
    with pytest.raises(ValueError, match="4 dimensions"):
        attention_fusion(attn[0], weights, 2)
    with pytest.raises(ValueError, match="no maps"):
        attention_fusion(attn[:, :0], weights[:, :0], 2)
    with pytest.raises(ValueError, match="impl"):
        attention_fusion(attn, weights, 2, impl="cuda")


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=needs_interpreter)])
def test_opcheck(use_triton):
    attn = maps(2, 3, 9).requires_grad_()
    weights = torch.rand(2, 3, requires_grad=True)
    with run_triton_on_cpu(use_triton):
        torch.library.opcheck(torch.ops.fastseg.attention_fusion.default, (attn, weights, 4))
        for need in (False, True):
            torch.library.opcheck(
                torch.ops.fastseg.attention_fusion_backward.default,
                (torch.randn(2, 4, 5), torch.randn(2, 5, 5), attn.detach(), weights.detach(), 4, need),
            )


def test_decomposition_is_the_reference():
    from fastseg.kernels import DECOMPOSITIONS

    fn = DECOMPOSITIONS[torch.ops.fastseg.attention_fusion.default]
    attn, weights = maps(1, 2, 6), torch.rand(1, 2)
    for o, r in zip(fn(attn, weights, 2), attention_fusion_ref(attn, weights, 2)):
        torch.testing.assert_close(o, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_cuda_matches_reference_fwd_bwd(dtype, tol):
    attn = maps(4, 72, 216).to(dtype).cuda()  # D.5b: 12 x 6 maps, K = 20 + 196 patches
    weights = torch.rand(4, 72, device="cuda", requires_grad=True)
    cross, patch = attention_fusion(attn, weights, 20, impl="triton")
    expected = naive_fusion(attn.cpu(), weights.detach().cpu(), 20)
    for o, e in zip((cross, patch), expected):
        torch.testing.assert_close(o.double().cpu(), e, atol=tol, rtol=tol)
    grads = torch.randn_like(cross), torch.randn_like(patch)
    (g,) = torch.autograd.grad((cross * grads[0]).sum() + (patch * grads[1]).sum(), weights)
    gg = torch.cat(grads, 1).double().cpu()
    ref = torch.einsum("bmij,bij->bm", attn[..., 20:].double().cpu(), gg) / 72
    torch.testing.assert_close(g.double().cpu(), ref, atol=tol * 50, rtol=tol * 10)
