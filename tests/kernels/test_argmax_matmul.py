"""Tests of `argmax_matmul`: the Triton kernel (native on a CUDA host, the interpreter on CPU; see conftest.py) and
the chunked reference against an fp64 oracle, ties, NaN / inf, layouts, opcheck, export, inference-only autograd."""

from __future__ import annotations

import importlib

import pytest
import torch

import fastseg.kernels as K

from .conftest import export_onnx_and_run, triton_backward_context

argmax_mod = importlib.import_module("fastseg.kernels.argmax_matmul")  # the module (the package exports the function)


def assert_argmax(x, weight, bias, index, value, atol=1e-4):
    """The chosen logit must be within accumulation error of the true maximum (fp64 oracle)."""
    x, weight, index, value = x.cpu(), weight.cpu(), index.cpu(), value.cpu()
    logits = x.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.cpu().double()
    best = logits.max(1).values
    chosen = logits.gather(1, index[:, None]).squeeze(1)
    scale = x.double().abs() @ weight.double().abs().t()
    tol = atol + 1e-5 * scale.max(1).values
    assert bool((best - chosen <= tol).all())
    torch.testing.assert_close(value.double(), chosen, rtol=1e-5, atol=float(tol.max()))


@pytest.mark.parametrize("n,k,c,bias", [(0, 5, 3, True), (1, 1, 3, False), (7, 70, 16, True), (129, 150, 96, True),
                                        (128, 513, 20, False), (1000, 33, 64, True)])  # fmt: skip
def test_argmax_matmul_triton_matches_reference(n, k, c, bias, triton_device):
    x, weight = torch.randn(n, c, device=triton_device), torch.randn(k, c, device=triton_device)
    b = torch.randn(k, device=triton_device) if bias else None
    index, value = K.argmax_matmul(x, weight, b, impl="triton")
    ref_index, ref_value = K.argmax_matmul(x, weight, b, impl="torch")
    assert index.shape == value.shape == (n,)
    if n:
        assert_argmax(x, weight, b, index, value)
        assert_argmax(x, weight, b, ref_index, ref_value)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", ["torch", "auto", "triton"])
def test_argmax_matmul_ties_nan_and_layouts(impl, device):
    weight = torch.randint(-3, 4, (100, 8)).float()
    weight[66] = weight[80] = weight[7]
    x = torch.randint(-3, 4, (20, 8)).float()
    bias = torch.full((100,), -1000.0)
    bias[[7, 66, 80]] = 0.0  # only the three duplicates can win, with exactly equal logits
    index, value = K.argmax_matmul(x.to(device), weight.to(device), bias.to(device), impl=impl)
    assert index.tolist() == [7] * 20
    assert torch.equal(value.cpu(), x @ weight[7])
    # NaN logits are ignored; an all-NaN row gives index 0 and -inf. Small integers: every logit is exact in fp32
    # whatever the summation order, so the kernel and the decomposition must agree bit for bit (ties included).
    w2 = torch.randint(-3, 4, (40, 8)).float()
    w2[3] = torch.nan
    x2 = torch.randint(-3, 4, (5, 8)).float()
    x2[2] = torch.nan
    index2, value2 = K.argmax_matmul(x2.to(device), w2.to(device), None, impl=impl)
    index2, value2 = index2.cpu(), value2.cpu()
    assert index2[2] == 0 and value2[2] == float("-inf")
    keep = torch.tensor([0, 1, 3, 4])
    assert bool((index2[keep] != 3).all())
    dec = argmax_mod._argmax_matmul_decomposition(x2, w2, None)
    assert torch.equal(dec[0], index2) and torch.equal(dec[1], value2)
    # inf inputs: +inf logits win (lowest index among them), an inf times a zero weight is NaN and ignored
    x3 = torch.tensor([[float("inf"), 0.0], [1.0, 2.0]])
    w3 = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    index3, value3 = K.argmax_matmul(x3.to(device), w3.to(device), None, impl=impl)
    assert index3.tolist() == [1, 0] and value3.tolist() == [float("inf"), 2.0]
    dec3 = argmax_mod._argmax_matmul_decomposition(x3, w3, None)
    assert torch.equal(dec3[0], index3.cpu()) and torch.equal(dec3[1], value3.cpu())
    # non-contiguous x and weight, bf16
    xs = torch.randn(30, 64, device=device)[:, ::2].to(torch.bfloat16)
    ws = torch.randn(32, 45, device=device).t().to(torch.bfloat16)  # (45, 32) strides (1, 45)
    idx4, val4 = K.argmax_matmul(xs, ws, None, impl=impl)
    assert_argmax(xs, ws, None, idx4, val4, atol=1e-3)


def test_argmax_matmul_is_inference_only():
    x = torch.randn(4, 6)
    weight = torch.randn(9, 6, requires_grad=True)
    _, value = K.argmax_matmul(x, weight, None, impl="auto")  # forward works with trainable weights
    with pytest.raises(RuntimeError, match="inference-only"):
        value.sum().backward()


@pytest.mark.parametrize("impl", ["auto", "triton"], ids=["reference", "triton"])
def test_opcheck(impl, device):
    with triton_backward_context(device, impl == "triton"):
        x, weight, bias = (
            torch.randn(33, 20, device=device),
            torch.randn(50, 20, device=device),
            torch.randn(50, device=device),
        )
        torch.library.opcheck(torch.ops.fastseg.argmax_matmul.default, (x, weight, bias))
        torch.library.opcheck(torch.ops.fastseg.argmax_matmul.default, (x.t().contiguous().t(), weight, None))
        torch.library.opcheck(torch.ops.fastseg.argmax_matmul.default, (torch.randn(0, 20, device=device), weight,
                                                                        bias))  # fmt: skip


def test_bad_inputs():
    with pytest.raises(ValueError, match="impl must be one of"):
        K.argmax_matmul(torch.randn(2, 2), torch.randn(2, 2), impl="cuda")
    with pytest.raises(ValueError, match="bias must have K"):
        K.argmax_matmul(torch.randn(2, 3), torch.randn(5, 3), torch.randn(4))
    with pytest.raises(ValueError, match="same C"):
        K.argmax_matmul(torch.randn(2, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="share a dtype"):
        K.argmax_matmul(torch.randn(2, 3), torch.randn(5, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        K.argmax_matmul(torch.randn(2, 3, 1), torch.randn(5, 3))


class _TinyHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Parameter(torch.randn(30, 6))
        self.bias = torch.nn.Parameter(torch.randn(30))

    def forward(self, z):
        return K.argmax_matmul(z, self.head, self.bias)


@pytest.mark.export
def test_onnx_export_uses_standard_ops_and_matches_onnxruntime(tmp_path):
    model = _TinyHead().eval()
    z = torch.randn(50, 6) * 2
    op_types, _, got = export_onnx_and_run(model, (z,), tmp_path / "argmax.onnx")
    expected = model(z)
    assert "ArgMax" in op_types and all(not t.startswith("fastseg") for t in op_types)
    assert (got[0] == expected[0].numpy()).all()
    torch.testing.assert_close(torch.from_numpy(got[1]), expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_argmax_matmul(dtype):
    x = torch.randn(3001, 2048, device="cuda").to(dtype)
    weight = (torch.randn(8192, 2048, device="cuda") / 45).to(dtype)
    bias = torch.randn(8192, device="cuda").to(dtype)
    index, value = K.argmax_matmul(x, weight, bias, impl="triton")
    logits = x.double() @ weight.double().t() + bias.double()
    chosen = logits.gather(1, index[:, None]).squeeze(1)
    # fp32 accumulation of 2048 exact products: the winner must be within accumulation error of the true maximum
    assert bool((logits.max(1).values - chosen <= 1e-3 * logits.abs().max(1).values + 1e-3).all())
    torch.testing.assert_close(value.double(), chosen, rtol=1e-3, atol=1e-3)
