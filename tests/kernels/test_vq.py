"""Tests of the `vq` kernel family: `vq_nearest` and `argmax_matmul`.

Triton runs through its interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA); GPU-only checks
carry the `gpu` marker. Nearest-code results are judged on the *selected distance* against an fp64 oracle, since
near-ties may legitimately resolve to either index.
"""

from __future__ import annotations

import pytest
import torch

import fastseg.kernels as K
from fastseg.kernels import vq as vq_mod
from fastseg.kernels._utils import interpreter_enabled, run_triton_on_cpu

needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (Triton on CPU)")
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _triton_impl_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------------------- oracle


def assert_nearest(z, codebook, index, sqdist, compute_eps=2.0**-23, slack=16.0):
    """The chosen code must be within the expanded form's rounding error of the true minimum (fp64 oracle)."""
    assert index.dtype == torch.int64 and sqdist.dtype == torch.float32
    assert index.shape == sqdist.shape == (z.shape[0],)
    if z.shape[0] == 0:
        return
    z64, e64 = z.double().cpu(), codebook.double().cpu()
    index, sqdist = index.cpu(), sqdist.cpu()
    assert int(index.min()) >= 0 and int(index.max()) < codebook.shape[0]
    dist = ((z64[:, None, :] - e64[None, :, :]) ** 2).sum(-1)
    best = dist.min(1).values
    chosen = dist.gather(1, index[:, None]).squeeze(1)
    centre = e64.mean(0)
    scale = ((z64 - centre) ** 2).sum(1) + ((e64 - centre) ** 2).sum(1).max()
    gap = chosen - best
    allowed = slack * compute_eps * scale + 1e-12
    assert bool((gap <= allowed).all()), f"worst selection gap {float((gap - allowed).max())} above tolerance"
    torch.testing.assert_close(sqdist.double(), chosen, rtol=1e-5, atol=1e-6)
    assert bool((sqdist >= 0).all())


def _vq_triton(z, codebook):
    return K.vq_nearest(z, codebook, impl="triton")


# ----------------------------------------------------------------------------------------------------- vq_nearest: grid

# Every value of each axis (N in {0,1,7,127,128,129,1000}, K in {1,2,17,64,150,513}, D in {3,16,64,96}) appears;
# the interpreter tiles are 32 x 32 x 64, so K = 64/150/513 and D = 96 cross tile borders.
GRID = [
    (0, 17, 16),
    (1, 1, 3),
    (1, 513, 96),
    (7, 2, 96),
    (7, 150, 16),
    (127, 64, 3),
    (127, 513, 16),
    (128, 150, 64),
    (128, 1, 96),
    (129, 513, 3),
    (129, 2, 64),
    (1000, 17, 96),
    (1000, 64, 16),
]


@needs_interpreter
@pytest.mark.parametrize("n,k,d", GRID)
def test_vq_nearest_triton_matches_reference(n, k, d):
    z, codebook = torch.randn(n, d), torch.randn(k, d)
    index, sqdist = _vq_triton(z, codebook)
    ref_index, ref_sqdist = K.vq_nearest_ref(z, codebook)
    assert_nearest(z, codebook, index, sqdist)
    assert_nearest(z, codebook, ref_index, ref_sqdist)
    torch.testing.assert_close(sqdist, ref_sqdist, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,k,d", [(0, 3, 4), (1, 1, 3), (300, 65536, 3), (129, 513, 512)])
def test_vq_nearest_reference_shapes(n, k, d):
    z, codebook = torch.randn(n, d), torch.randn(k, d)
    index, sqdist = K.vq_nearest(z, codebook, impl="torch")
    assert_nearest(z, codebook, index, sqdist)


def test_reference_is_chunked_and_chunking_does_not_change_results(monkeypatch):
    for k in (1, 150, 1024, 65536, 10**7):
        assert vq_mod._chunk_rows(k) * k <= max(vq_mod.CHUNK_ELEMENTS, k)
    z, codebook = torch.randn(333, 8), torch.randn(50, 8)
    full = K.vq_nearest_ref(z, codebook)
    seen = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(vq_mod, "CHUNK_ELEMENTS", 50 * 16)
    monkeypatch.setattr(vq_mod.torch, "addmm", spy)
    chunked = K.vq_nearest_ref(z, codebook)
    assert len(seen) == -(-333 // 16) and max(seen) <= 50 * 16
    # Chunked, full and the decomposition (export graph) are different fp32 computations of the scores: a near-tie
    # may resolve either way, so each choice is judged against the fp64 oracle and the distances with a tolerance.
    for index, sqdist in (chunked, full, vq_mod._vq_nearest_decomposition(z, codebook)):
        assert_nearest(z, codebook, index, sqdist)
        torch.testing.assert_close(sqdist, full[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- vq_nearest: edge cases


def _tied_problem(k=96, d=5):
    """Small integer codes (exact fp32 arithmetic) with duplicates in different 32-wide tiles."""
    g = torch.Generator().manual_seed(1)
    codebook = torch.randint(-4, 5, (k, d), generator=g).float()
    codebook[40] = codebook[3]
    codebook[70] = codebook[3]
    codebook[65] = codebook[33]
    z = torch.stack([codebook[3], codebook[40], codebook[70], codebook[33], codebook[65]])
    return z, codebook, torch.tensor([3, 3, 3, 33, 33])


@pytest.mark.parametrize("impl", ["torch", "auto", pytest.param("triton", marks=needs_interpreter)])
def test_vq_nearest_exact_ties_pick_lowest_index(impl):
    z, codebook, expected = _tied_problem()
    index, sqdist = K.vq_nearest(z, codebook, impl=impl)
    assert index.tolist() == expected.tolist()
    assert sqdist.tolist() == [0.0] * 5
    # equidistant between two codes in different tiles
    codebook2 = torch.zeros(64, 2)
    codebook2[:, 0] = 100.0
    codebook2[5] = torch.tensor([1.0, 0.0])
    codebook2[50] = torch.tensor([-1.0, 0.0])
    index2, _ = K.vq_nearest(torch.zeros(3, 2), codebook2, impl=impl)
    assert index2.tolist() == [5, 5, 5]
    # a stride-0 codebook: every code equal -> index 0
    index3, _ = K.vq_nearest(torch.randn(9, 4), torch.randn(1, 4).expand(70, 4), impl=impl)
    assert index3.tolist() == [0] * 9


@pytest.mark.parametrize("impl", ["torch", "auto", pytest.param("triton", marks=needs_interpreter)])
def test_vq_nearest_large_offsets(impl):
    # |z| ~ 1e5 with neighbours ~1 apart: ||z||^2 - 2 z.e + ||e||^2 in fp32 has an error of ~1e3 here.
    codebook = 1e5 + torch.randn(70, 16)
    z = 1e5 + torch.randn(100, 16)
    index, sqdist = K.vq_nearest(z, codebook, impl=impl)
    assert_nearest(z, codebook, index, sqdist, slack=64.0)
    # the test has teeth: the uncentred expanded form selects wrong codes on this input
    naive = (codebook.pow(2).sum(1)[None] - 2 * z @ codebook.t() + z.pow(2).sum(1)[:, None]).argmin(1)
    with pytest.raises(AssertionError):
        assert_nearest(z, codebook, naive, vq_mod._exact_sqdist(z, codebook, naive), slack=64.0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("impl", ["torch", "auto", pytest.param("triton", marks=needs_interpreter)])
def test_vq_nearest_nan_inf_policy(impl):
    codebook = torch.randn(40, 6)
    codebook[0] = torch.nan  # a NaN code never wins
    codebook[35, 2] = float("inf")  # nor does an inf code
    z = torch.randn(6, 6)
    z[1, 3] = torch.nan
    z[2, 0] = float("inf")
    z[3, 5] = float("-inf")
    z[4] = codebook[35]  # finite part equals the inf code; still must not pick it
    z[4, 2] = 0.0
    index, sqdist = K.vq_nearest(z, codebook, impl=impl)
    assert index[1:4].tolist() == [0, 0, 0]
    assert torch.isnan(sqdist[1:4]).all()  # distance to the NaN code 0
    ok = torch.tensor([0, 4, 5])
    assert bool((index[ok] != 0).all() & (index[ok] != 35).all())
    assert_nearest(z[ok], codebook[1:35], index[ok] - 1, sqdist[ok])
    # the decomposition (export graph) follows the same policy; on the finite rows it is a different fp32
    # computation of the scores, so its choice is judged against the oracle rather than compared bit for bit
    dec_index, dec_sqdist = vq_mod._vq_nearest_decomposition(z, codebook)
    assert dec_index[1:4].tolist() == [0, 0, 0]
    assert bool((dec_index[ok] != 0).all() & (dec_index[ok] != 35).all())
    assert_nearest(z[ok], codebook[1:35], dec_index[ok] - 1, dec_sqdist[ok])
    torch.testing.assert_close(dec_sqdist, sqdist, equal_nan=True)
    # all codes non-finite -> index 0
    index_all, _ = K.vq_nearest(torch.randn(3, 6), torch.full((33, 6), torch.nan), impl=impl)
    assert index_all.tolist() == [0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_vq_nearest_low_precision(dtype, impl):
    z, codebook = torch.randn(130, 40).to(dtype), torch.randn(70, 40).to(dtype)
    index, sqdist = K.vq_nearest(z, codebook, impl=impl)
    # the interpreter multiplies in fp32 (it cannot multiply bf16), the reference upcasts: fp32 rounding applies
    assert_nearest(z, codebook, index, sqdist)


@pytest.mark.parametrize("impl", ["torch", "auto", pytest.param("triton", marks=needs_interpreter)])
def test_vq_nearest_non_contiguous(impl):
    base = torch.randn(40, 150)
    z = base[:, 5:135:2].t()  # (65, 40), strides (2, 150), storage offset 5
    codebook = torch.randn(40, 33).t()  # (33, 40) column-major dense
    index, sqdist = K.vq_nearest(z, codebook, impl=impl)
    assert_nearest(z, codebook, index, sqdist)
    ref = K.vq_nearest_ref(z.contiguous(), codebook.contiguous())
    torch.testing.assert_close(sqdist, ref[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "auto", pytest.param("triton", marks=needs_interpreter)])
def test_vq_nearest_empty_forward_and_backward(impl):
    z = torch.randn(0, 8, requires_grad=True)
    codebook = torch.randn(5, 8, requires_grad=True)
    index, sqdist = K.vq_nearest(z, codebook, impl=impl)
    assert index.shape == sqdist.shape == (0,)
    sqdist.sum().backward()
    assert z.grad.shape == (0, 8) and torch.equal(codebook.grad, torch.zeros(5, 8))


# ------------------------------------------------------------------------------------------------- vq_nearest: gradients


@pytest.mark.parametrize("impl", ["auto", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("n,k,d", [(37, 20, 5), (70, 9, 80)])
def test_vq_nearest_gradients(impl, n, k, d, monkeypatch):
    calls = []
    real = vq_mod._vq_nearest_backward_triton

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(vq_mod, "_vq_nearest_backward_triton", spy)
    z = torch.randn(n, d, requires_grad=True)
    codebook = torch.randn(k, d, requires_grad=True)
    weight = torch.randn(n)
    with run_triton_on_cpu(impl == "triton"):  # backward runs on this thread: it sees the same switch
        index, sqdist = K.vq_nearest(z, codebook, impl=impl)
        (sqdist * weight).sum().backward()
    assert bool(calls) == (impl == "triton")  # the Triton backward really ran (or really did not)
    z_ref = z.detach().clone().requires_grad_()
    cb_ref = codebook.detach().clone().requires_grad_()
    ref_index, ref_sqdist = K.vq_nearest(z_ref, cb_ref, impl="torch")
    (ref_sqdist * weight).sum().backward()
    # Two fp32 computations of the scores: a near-tie may pick either code, so both choices are judged against the
    # fp64 oracle, the gradients are compared where the choices agree and against the analytic formula everywhere.
    assert_nearest(z.detach(), codebook.detach(), index, sqdist.detach())
    assert_nearest(z.detach(), codebook.detach(), ref_index, ref_sqdist.detach())
    same = index == ref_index
    torch.testing.assert_close(z.grad[same], z_ref.grad[same], rtol=1e-5, atol=1e-5)
    # the analytic formulas of the docstring, each path with its own choice of codes
    for grad_z, grad_cb, idx in ((z.grad, codebook.grad, index), (z_ref.grad, cb_ref.grad, ref_index)):
        residual = z.detach() - codebook.detach()[idx]
        torch.testing.assert_close(grad_z, 2 * residual * weight[:, None], rtol=1e-5, atol=1e-5)
        expected_cb = torch.zeros(k, d).index_add_(0, idx, -2 * residual * weight[:, None])
        torch.testing.assert_close(grad_cb, expected_cb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_vq_nearest_gradient_only_to_z_when_codebook_frozen(impl):
    z = torch.randn(20, 6, dtype=torch.bfloat16, requires_grad=True)
    codebook = torch.randn(7, 6, dtype=torch.bfloat16)
    with run_triton_on_cpu(impl == "triton"):
        index, sqdist = K.vq_nearest(z, codebook, impl=impl)
        sqdist.sum().backward()
    assert z.grad.dtype == torch.bfloat16
    expected = 2 * (z.detach().float() - codebook.float()[index])
    torch.testing.assert_close(z.grad.float(), expected, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    z = torch.randn(33, 20)
    codebook = torch.randn(40, 20)
    yield (z, codebook)
    yield (z.t().contiguous().t(), codebook.t().contiguous().t())  # permuted dense layouts
    yield (torch.randn(0, 20), codebook)


@pytest.mark.parametrize("triton_on_cpu", [False, pytest.param(True, marks=needs_interpreter)])
def test_opcheck(triton_on_cpu):
    with run_triton_on_cpu(triton_on_cpu):
        for z, codebook in _opcheck_cases():
            torch.library.opcheck(torch.ops.fastseg.vq_nearest.default, (z, codebook))
        z, codebook = torch.randn(33, 20), torch.randn(40, 20)
        # With requires_grad inputs opcheck's AOT check sums all outputs into one in-place accumulator starting with
        # our int64 index, which cannot take the float sqdist; the AOT-autograd gradients are checked below instead.
        torch.library.opcheck(
            torch.ops.fastseg.vq_nearest.default,
            (z.clone().requires_grad_(), codebook.clone().requires_grad_()),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )
        index, _ = torch.ops.fastseg.vq_nearest(z, codebook)
        torch.library.opcheck(torch.ops.fastseg.vq_nearest_backward.default, (torch.randn(33), z, codebook, index))
        x, weight, bias = torch.randn(33, 20), torch.randn(50, 20), torch.randn(50)
        torch.library.opcheck(torch.ops.fastseg.argmax_matmul.default, (x, weight, bias))
        torch.library.opcheck(torch.ops.fastseg.argmax_matmul.default, (x.t().contiguous().t(), weight, None))


def test_vq_nearest_gradients_under_aot_autograd():
    def loss(z, codebook):
        return K.vq_nearest(z, codebook)[1].sum()

    z, codebook = torch.randn(33, 20, requires_grad=True), torch.randn(40, 20, requires_grad=True)
    eager = torch.autograd.grad(loss(z, codebook), (z, codebook))
    compiled = torch.compile(loss, backend="aot_eager", dynamic=True, fullgraph=True)
    torch.testing.assert_close(torch.autograd.grad(compiled(z, codebook), (z, codebook)), eager)


# ---------------------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "z,codebook,match",
    [
        (torch.randn(4, 3, 1), torch.randn(5, 3), "z must have 2 dimensions"),
        (torch.randn(4, 3), torch.randn(5, 4), "same D"),
        (torch.randn(4, 3), torch.randn(0, 3), "at least one code"),
        (torch.randn(4, 3), torch.randn(5, 3, dtype=torch.float16), "share a dtype"),
        (torch.randint(0, 3, (4, 3)), torch.randn(5, 3), "z must be one of"),
        (torch.randn(4, 0), torch.randn(5, 0), "same D >= 1"),
        ([[1.0, 2.0]], torch.randn(5, 2), "must be a torch.Tensor"),
        (torch.randn(4, 3), torch.randn(5, 3, device="meta"), "one device"),
    ],
)
def test_vq_nearest_bad_inputs(z, codebook, match):
    for impl in ("auto", "torch"):
        with pytest.raises(ValueError, match=match):
            K.vq_nearest(z, codebook, impl=impl)


def test_bad_impl_and_argmax_inputs():
    with pytest.raises(ValueError, match="impl must be one of"):
        K.vq_nearest(torch.randn(2, 2), torch.randn(2, 2), impl="cuda")
    with pytest.raises(ValueError, match="bias must have K"):
        K.argmax_matmul(torch.randn(2, 3), torch.randn(5, 3), torch.randn(4))
    with pytest.raises(ValueError, match="same C"):
        K.argmax_matmul(torch.randn(2, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="share a dtype"):
        K.argmax_matmul(torch.randn(2, 3), torch.randn(5, 3, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------------------- argmax_matmul


def assert_argmax(x, weight, bias, index, value, atol=1e-4):
    logits = x.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    best = logits.max(1).values
    chosen = logits.gather(1, index[:, None]).squeeze(1)
    scale = x.double().abs() @ weight.double().abs().t()
    tol = atol + 1e-5 * scale.max(1).values
    assert bool((best - chosen <= tol).all())
    torch.testing.assert_close(value.double(), chosen, rtol=1e-5, atol=float(tol.max()))


@needs_interpreter
@pytest.mark.parametrize("n,k,c,bias", [(0, 5, 3, True), (1, 1, 3, False), (7, 70, 16, True), (129, 150, 96, True),
                                        (128, 513, 20, False), (1000, 33, 64, True)])  # fmt: skip
def test_argmax_matmul_triton_matches_reference(n, k, c, bias):
    x, weight = torch.randn(n, c), torch.randn(k, c)
    b = torch.randn(k) if bias else None
    index, value = K.argmax_matmul(x, weight, b, impl="triton")
    ref_index, ref_value = K.argmax_matmul(x, weight, b, impl="torch")
    if n:
        assert_argmax(x, weight, b, index, value)
        assert_argmax(x, weight, b, ref_index, ref_value)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", ["torch", "auto", pytest.param("triton", marks=needs_interpreter)])
def test_argmax_matmul_ties_nan_and_layouts(impl):
    weight = torch.randint(-3, 4, (100, 8)).float()
    weight[66] = weight[80] = weight[7]
    x = torch.randint(-3, 4, (20, 8)).float()
    bias = torch.full((100,), -1000.0)
    bias[[7, 66, 80]] = 0.0  # only the three duplicates can win, with exactly equal logits
    index, value = K.argmax_matmul(x, weight, bias, impl=impl)
    assert index.tolist() == [7] * 20
    assert torch.equal(value, x @ weight[7])
    # NaN logits are ignored; an all-NaN row gives index 0 and -inf. Small integers: every logit is exact in fp32
    # whatever the summation order, so the kernel and the decomposition must agree bit for bit (ties included).
    w2 = torch.randint(-3, 4, (40, 8)).float()
    w2[3] = torch.nan
    x2 = torch.randint(-3, 4, (5, 8)).float()
    x2[2] = torch.nan
    index2, value2 = K.argmax_matmul(x2, w2, None, impl=impl)
    assert index2[2] == 0 and value2[2] == float("-inf")
    keep = torch.tensor([0, 1, 3, 4])
    assert bool((index2[keep] != 3).all())
    dec = vq_mod._argmax_matmul_decomposition(x2, w2, None)
    assert torch.equal(dec[0], index2) and torch.equal(dec[1], value2)
    # non-contiguous x and weight, bf16
    xs = torch.randn(30, 64)[:, ::2].to(torch.bfloat16)
    ws = torch.randn(32, 45).t().to(torch.bfloat16)  # (45, 32) strides (1, 45)
    idx3, val3 = K.argmax_matmul(xs, ws, None, impl=impl)
    assert_argmax(xs, ws, None, idx3, val3, atol=1e-3)


def test_argmax_matmul_is_inference_only():
    x = torch.randn(4, 6)
    weight = torch.randn(9, 6, requires_grad=True)
    index, value = K.argmax_matmul(x, weight, None, impl="auto")  # forward works with trainable weights
    with pytest.raises(RuntimeError, match="inference-only"):
        value.sum().backward()


# -------------------------------------------------------------------------------------------------------------- export


class _TinyVQ(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.codebook = torch.nn.Parameter(torch.randn(24, 6))
        self.head = torch.nn.Parameter(torch.randn(30, 6))
        self.bias = torch.nn.Parameter(torch.randn(30))

    def forward(self, z):
        index, sqdist = K.vq_nearest(z, self.codebook)
        token, logit = K.argmax_matmul(z, self.head, self.bias)
        return index, sqdist, token, logit


@pytest.mark.export
def test_onnx_export_uses_standard_ops_and_matches_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _TinyVQ().eval()
    z = torch.randn(50, 6) * 2
    with torch.no_grad():
        program = torch.export.export(model, (z,)).run_decompositions(K.DECOMPOSITIONS)
        assert "fastseg" not in str(program.graph)
        path = tmp_path / "vq.onnx"
        torch.onnx.export(program, (z,), str(path), dynamo=True)
        expected = model(z)
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"ArgMin", "ArgMax"} <= op_types and all(not t.startswith("fastseg") for t in op_types)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: z.numpy()})
    assert (got[0] == expected[0].numpy()).all() and (got[2] == expected[2].numpy()).all()
    torch.testing.assert_close(torch.from_numpy(got[1]), expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(got[3]), expected[3], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,d", [(1, 1, 3), (1000, 513, 96), (4099, 1024, 256), (2048, 65536, 64), (777, 300, 512)])
def test_gpu_vq_nearest(dtype, n, k, d):
    z = torch.randn(n, d, device="cuda").to(dtype)
    codebook = torch.randn(k, d, device="cuda").to(dtype)
    index, sqdist = K.vq_nearest(z, codebook, impl="triton")
    # fp16/bf16 operands of the dot are the centred values rounded to the input dtype (relative error ~eps)
    assert_nearest(z, codebook, index, sqdist, compute_eps=EPS[dtype] if dtype != torch.float32 else 2.0**-23)
    z64 = z.double()
    e64 = codebook.double()
    torch.testing.assert_close(sqdist.double().cpu(), ((z64 - e64[index]) ** 2).sum(1).cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_vq_nearest_ties_offsets_nan_and_grad():
    z, codebook, expected = _tied_problem()
    assert K.vq_nearest(z.cuda(), codebook.cuda(), impl="triton")[0].tolist() == expected.tolist()
    codebook = 1e5 + torch.randn(300, 16, device="cuda")
    z = (1e5 + torch.randn(500, 16, device="cuda")).requires_grad_()
    index, sqdist = K.vq_nearest(z, codebook, impl="triton")
    assert_nearest(z.detach(), codebook, index, sqdist.detach(), slack=64.0)
    sqdist.sum().backward()
    torch.testing.assert_close(z.grad, 2 * (z.detach() - codebook[index]), rtol=1e-4, atol=1e-3)
    zn = torch.randn(4, 16, device="cuda")
    zn[1, 0] = torch.nan
    assert K.vq_nearest(zn, codebook, impl="triton")[0][1] == 0


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
