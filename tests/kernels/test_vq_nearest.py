"""Tests of `vq_nearest`: the Triton kernel (native on a CUDA host, the interpreter on CPU; see conftest.py) and
the chunked reference against an fp64 oracle, ties, large offsets, NaN / inf, layouts, gradients, opcheck, export.

Nearest-code results are judged on the *selected distance* against an fp64 oracle, since near-ties may legitimately
resolve to either index.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastseg.kernels as K

from .conftest import assert_nonzero, export_onnx_and_run, triton_backward_context

vq_mod = importlib.import_module("fastseg.kernels.vq_nearest")  # the module (the package exports the function)
utils_mod = importlib.import_module("fastseg.kernels._utils")
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


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


# ------------------------------------------------------------------------------------------------------------------ grid

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


@pytest.mark.parametrize("n,k,d", GRID)
def test_vq_nearest_triton_matches_reference(n, k, d, triton_device):
    z, codebook = torch.randn(n, d, device=triton_device), torch.randn(k, d, device=triton_device)
    index, sqdist = K.vq_nearest(z, codebook, impl="triton")
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
        assert utils_mod.ref_chunk_rows(k) * k <= max(utils_mod.REF_CHUNK_ELEMENTS, k)
    z, codebook = torch.randn(333, 8), torch.randn(50, 8)
    full = K.vq_nearest_ref(z, codebook)
    seen = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(utils_mod, "REF_CHUNK_ELEMENTS", 50 * 16)
    monkeypatch.setattr(vq_mod.torch, "addmm", spy)
    chunked = K.vq_nearest_ref(z, codebook)
    assert len(seen) == -(-333 // 16) and max(seen) <= 50 * 16
    # Chunked, full and the decomposition (export graph) are different fp32 computations of the scores: a near-tie
    # may resolve either way, so each choice is judged against the fp64 oracle and the distances with a tolerance.
    for index, sqdist in (chunked, full, vq_mod._vq_nearest_decomposition(z, codebook)):
        assert_nearest(z, codebook, index, sqdist)
        torch.testing.assert_close(sqdist, full[1], rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------------- the CPU path


def _integer_problem(n, k, d, seed, dtype=torch.float32):
    """Small integers (values in -3..3, so many ties) whose codes sum to zero (`_centred_at_zero`): every score is
    an exact integer whatever the summation order, so the CPU path and the reference compute the same numbers and
    must choose the same codes, ties included."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-3, 4, (n, d), generator=g).to(dtype)
    return z, _centred_at_zero(torch.randint(-3, 4, (k, d), generator=g)).to(dtype)


def _centred_at_zero(codebook):
    """Move the last finite code so that the finite codes sum to zero, in place. Both paths centre the codes on
    their mean (`_prepare_codes`); a mean of zero keeps the centred codes integers, so no score is rounded. (Any
    other mean, e.g. 1/31, is rounded, and a GEMM of another blocking then rounds differently: ties break apart.)"""
    finite = torch.isfinite(codebook).all(1)
    last = int(finite.nonzero()[-1])
    codebook[last] -= codebook[finite].sum(0)
    assert codebook[finite].abs().max() <= 256  # integers stay exact in bfloat16 too
    return codebook


@pytest.fixture
def small_cpu_blocks(monkeypatch):
    """Blocks of at most 640 scores and code tiles of 64 codes (two groups of 32): every test shape crosses row
    blocks, code tiles and groups, and exercises the running (best, index) across tiles."""
    monkeypatch.setattr(vq_mod, "CPU_BLOCK_ELEMENTS", 640)
    monkeypatch.setattr(vq_mod, "CPU_CODE_TILE", 64)


@pytest.mark.parametrize("n,k,d", [(1, 1, 3), (7, 31, 5), (129, 64, 8), (300, 65, 4), (1000, 200, 16), (33, 513, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_matches_reference_exactly_on_exact_scores(n, k, d, dtype, small_cpu_blocks):
    z, codebook = _integer_problem(n, k, d, seed=n + k, dtype=dtype)
    index, sqdist = K.vq_nearest(z, codebook)  # impl="auto" on CPU tensors: the blocked CPU path
    ref_index, ref_sqdist = K.vq_nearest_ref(z, codebook)
    assert torch.equal(index, ref_index)  # lowest index on every tie, across groups and tiles
    assert torch.equal(sqdist, ref_sqdist)  # the same exact recomputation from the same winners
    assert_nearest(z, codebook, index, sqdist)


@pytest.mark.parametrize("n,k,d", [(500, 150, 3), (257, 1100, 64), (64, 100, 200)])
def test_cpu_path_random_floats_against_reference_and_oracle(n, k, d, small_cpu_blocks):
    z, codebook = torch.randn(n, d), torch.randn(k, d)
    index, sqdist = vq_mod._vq_nearest_cpu(z, codebook)
    ref_index, ref_sqdist = K.vq_nearest_ref(z, codebook)
    # different fp32 summation orders: a near-tie may resolve either way, so judge both against the fp64 oracle
    assert_nearest(z, codebook, index, sqdist)
    assert float((index == ref_index).double().mean()) > 0.99
    torch.testing.assert_close(sqdist, ref_sqdist, rtol=1e-5, atol=1e-6)


def test_cpu_path_nan_rows_and_codes_in_later_tiles(small_cpu_blocks):
    z, codebook = _integer_problem(90, 200, 6, seed=3)
    codebook[130] = torch.nan  # a non-finite code in the third tile never wins
    codebook[70, 1] = float("inf")
    _centred_at_zero(codebook)  # the mean is over the finite codes
    z[5] = codebook[70].nan_to_num(posinf=0.0)  # nearest by its finite part to the inf code: must not pick it
    z[40, 2] = torch.nan  # NaN scores in every tile of this row's block: the other rows must be unaffected
    z[41, 0] = float("-inf")
    index, sqdist = K.vq_nearest(z, codebook)
    ref_index, ref_sqdist = K.vq_nearest_ref(z, codebook)
    assert torch.equal(index, ref_index)
    assert index[40].item() == index[41].item() == 0  # non-finite rows go to code 0 (finite here)
    assert torch.isnan(sqdist[40]) and sqdist[41].item() == float("inf")
    assert not bool(((index == 70) | (index == 130)).any())
    torch.testing.assert_close(sqdist, ref_sqdist, equal_nan=True)


@pytest.mark.parametrize("bad", [10, 150])  # in the first code tile (it would win the running best) and a later one
def test_cpu_path_overflow_nan_scores_never_win(bad, small_cpu_blocks):
    """A finite row and a finite code whose score overflows to inf - inf = NaN (norm and dot both past fp32): the
    NaN counts as +inf (the policy) instead of propagating through the reductions."""
    z, codebook = _integer_problem(40, 200, 6, seed=5)
    codebook[bad] = 3e19  # centred norm^2 ~ 5e39 -> inf; the dot with the row below -> inf as well
    z[7] = 3e19
    clean = z.clone()
    clean[7] = 0.0
    others = torch.arange(40) != 7
    # The huge code moves the centre far from the others, so their scores are rounded: the two paths are each compared
    # with themselves on the same problem without the overflowing row, not with each other.
    for search in (K.vq_nearest, K.vq_nearest_ref):
        index, _ = search(z, codebook)
        assert index[7].item() != bad
        assert torch.equal(index[others], search(clean, codebook)[0][others])  # row 7's NaN scores changed no other


def test_cpu_path_threads_match_reference_and_keep_thread_counts(small_cpu_blocks, monkeypatch):
    """With 2 torch threads the row blocks run on 2 worker threads (single-threaded ops); the results, the caller's
    thread count and the count a thread started afterwards gets are unchanged."""
    import threading

    z, codebook = _integer_problem(1000, 200, 6, seed=11)
    ref_index, ref_sqdist = K.vq_nearest_ref(z, codebook)
    workers = set()
    real = vq_mod._first_min_over_codes

    def spy(scores, lanes):
        workers.add((threading.current_thread().name, torch.get_num_threads()))
        return real(scores, lanes)

    monkeypatch.setattr(vq_mod, "_first_min_over_codes", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():  # the workers follow the caller's mode (writing inference tensors needs it)
            index, sqdist = K.vq_nearest(z, codebook)
        counts = []
        probe = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
        probe.start()
        probe.join()
        assert torch.get_num_threads() == 2 and counts == [2]
    finally:
        torch.set_num_threads(before)
    assert len(workers) == 2 and all(name.startswith("fastseg-cpu") and n == 1 for name, n in workers)
    assert torch.equal(index, ref_index) and torch.equal(sqdist, ref_sqdist)


def test_cpu_path_memory_is_bounded(monkeypatch):
    """No N x K score matrix: every GEMM writes at most CPU_BLOCK_ELEMENTS scores into one reused buffer."""
    z, codebook = torch.randn(3000, 8), torch.randn(5000, 8)
    monkeypatch.setattr(vq_mod, "CPU_BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(vq_mod, "CPU_CODE_TILE", 1024)
    outs = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        outs.append(kwargs["out"])
        return real_addmm(*args, **kwargs)

    monkeypatch.setattr(vq_mod.torch, "addmm", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, one buffer (other tests may have left more threads: `fastseg bench` sets 2)
    try:
        index, sqdist = vq_mod._vq_nearest_cpu(z, codebook)
    finally:
        torch.set_num_threads(before)
    assert len(outs) == 3000 // 4 * 5  # 4 rows per block, 5 tiles of at most 1024 codes (5024 padded)
    assert max(o.numel() for o in outs) <= 4096
    assert len({o.untyped_storage().data_ptr() for o in outs}) == 1  # one preallocated buffer
    assert_nearest(z, codebook, index, sqdist)


# ------------------------------------------------------------------------------------------------------------ edge cases


def _tied_problem(k=96, d=5):
    """Small integer codes (exact fp32 arithmetic) with duplicates in different 32-wide tiles."""
    g = torch.Generator().manual_seed(1)
    codebook = torch.randint(-4, 5, (k, d), generator=g).float()
    codebook[40] = codebook[3]
    codebook[70] = codebook[3]
    codebook[65] = codebook[33]
    z = torch.stack([codebook[3], codebook[40], codebook[70], codebook[33], codebook[65]])
    return z, codebook, torch.tensor([3, 3, 3, 33, 33])


@pytest.mark.parametrize("impl", ["torch", "auto", "triton"])
def test_vq_nearest_exact_ties_pick_lowest_index(impl, device):
    z, codebook, expected = _tied_problem()
    index, sqdist = K.vq_nearest(z.to(device), codebook.to(device), impl=impl)
    assert index.tolist() == expected.tolist()
    assert sqdist.tolist() == [0.0] * 5
    # equidistant between two codes in different tiles
    codebook2 = torch.zeros(64, 2)
    codebook2[:, 0] = 100.0
    codebook2[5] = torch.tensor([1.0, 0.0])
    codebook2[50] = torch.tensor([-1.0, 0.0])
    index2, _ = K.vq_nearest(torch.zeros(3, 2, device=device), codebook2.to(device), impl=impl)
    assert index2.tolist() == [5, 5, 5]
    # a stride-0 codebook: every code equal -> index 0
    index3, _ = K.vq_nearest(torch.randn(9, 4, device=device), torch.randn(1, 4, device=device).expand(70, 4),
                             impl=impl)  # fmt: skip
    assert index3.tolist() == [0] * 9


@pytest.mark.parametrize("impl", ["torch", "auto", "triton"])
def test_vq_nearest_large_offsets(impl, device):
    # |z| ~ 1e5 with neighbours ~1 apart: ||z||^2 - 2 z.e + ||e||^2 in fp32 has an error of ~1e3 here.
    codebook = 1e5 + torch.randn(70, 16, device=device)
    z = 1e5 + torch.randn(100, 16, device=device)
    index, sqdist = K.vq_nearest(z, codebook, impl=impl)
    assert_nearest(z, codebook, index, sqdist, slack=64.0)
    # the test has teeth: the uncentred expanded form selects wrong codes on this input
    naive = (codebook.pow(2).sum(1)[None] - 2 * z @ codebook.t() + z.pow(2).sum(1)[:, None]).argmin(1)
    with pytest.raises(AssertionError):
        assert_nearest(z, codebook, naive, vq_mod._exact_sqdist(z, codebook, naive), slack=64.0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("impl", ["torch", "auto", "triton"])
def test_vq_nearest_nan_inf_policy(impl, device):
    codebook = torch.randn(40, 6)
    codebook[0] = torch.nan  # a NaN code never wins
    codebook[35, 2] = float("inf")  # nor does an inf code
    z = torch.randn(6, 6)
    z[1, 3] = torch.nan
    z[2, 0] = float("inf")
    z[3, 5] = float("-inf")
    z[4] = codebook[35]  # finite part equals the inf code; still must not pick it
    z[4, 2] = 0.0
    index, sqdist = K.vq_nearest(z.to(device), codebook.to(device), impl=impl)
    index, sqdist = index.cpu(), sqdist.cpu()
    assert index[1:4].tolist() == [0, 0, 0]
    assert torch.isnan(sqdist[1:4]).all()  # distance to the NaN code 0
    ok = torch.tensor([0, 4, 5])
    assert bool((index[ok] != 0).all() & (index[ok] != 35).all())
    finite = torch.tensor([i for i in range(40) if i not in (0, 35)])  # the candidates of a finite row

    def among_finite(idx):  # position of each chosen code within `finite`
        return (idx[:, None] == finite[None, :]).int().argmax(1)

    assert_nearest(z[ok], codebook[finite], among_finite(index[ok]), sqdist[ok])
    # the decomposition (export graph) follows the same policy; on the finite rows it is a different fp32
    # computation of the scores, so its choice is judged against the oracle rather than compared bit for bit
    dec_index, dec_sqdist = vq_mod._vq_nearest_decomposition(z, codebook)
    assert dec_index[1:4].tolist() == [0, 0, 0]
    assert bool((dec_index[ok] != 0).all() & (dec_index[ok] != 35).all())
    assert_nearest(z[ok], codebook[finite], among_finite(dec_index[ok]), dec_sqdist[ok])
    torch.testing.assert_close(dec_sqdist, sqdist, equal_nan=True)
    # all codes non-finite -> index 0
    index_all, _ = K.vq_nearest(torch.randn(3, 6, device=device), torch.full((33, 6), torch.nan, device=device),
                                impl=impl)  # fmt: skip
    assert index_all.tolist() == [0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_vq_nearest_low_precision(dtype, impl, device):
    z = torch.randn(130, 40, device=device).to(dtype)
    codebook = torch.randn(70, 40, device=device).to(dtype)
    index, sqdist = K.vq_nearest(z, codebook, impl=impl)
    # The interpreter multiplies in fp32 (it cannot multiply bf16), the reference upcasts: fp32 rounding applies.
    # On a GPU the kernel multiplies the centred operands rounded to the input dtype.
    eps = EPS[dtype] if device.type == "cuda" and impl == "triton" else 2.0**-23
    assert_nearest(z, codebook, index, sqdist, compute_eps=eps)


@pytest.mark.parametrize("impl", ["torch", "auto", "triton"])
def test_vq_nearest_non_contiguous(impl, device):
    base = torch.randn(40, 150, device=device)
    z = base[:, 5:135:2].t()  # (65, 40), strides (2, 150), storage offset 5
    codebook = torch.randn(40, 33, device=device).t()  # (33, 40) column-major dense
    index, sqdist = K.vq_nearest(z, codebook, impl=impl)
    assert_nearest(z, codebook, index, sqdist)
    ref = K.vq_nearest_ref(z.contiguous(), codebook.contiguous())
    torch.testing.assert_close(sqdist, ref[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "auto", "triton"])
def test_vq_nearest_empty_forward_and_backward(impl, device):
    z = torch.randn(0, 8, device=device, requires_grad=True)
    codebook = torch.randn(5, 8, device=device, requires_grad=True)
    index, sqdist = K.vq_nearest(z, codebook, impl=impl)
    assert index.shape == sqdist.shape == (0,)
    sqdist.sum().backward()
    assert z.grad.shape == (0, 8) and torch.equal(codebook.grad, torch.zeros(5, 8, device=device))


# ------------------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("impl", ["auto", "triton"])
@pytest.mark.parametrize("n,k,d", [(37, 20, 5), (70, 9, 80)])
def test_vq_nearest_gradients(impl, n, k, d, device, monkeypatch):
    calls = []
    real = vq_mod._vq_nearest_backward_triton

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(vq_mod, "_vq_nearest_backward_triton", spy)
    z = torch.randn(n, d, device=device, requires_grad=True)
    codebook = torch.randn(k, d, device=device, requires_grad=True)
    weight = torch.randn(n, device=device)
    with triton_backward_context(device, impl == "triton"):  # backward runs on this thread: it sees the switch
        index, sqdist = K.vq_nearest(z, codebook, impl=impl)
        (sqdist * weight).sum().backward()
    assert bool(calls) == (impl == "triton")  # the Triton backward really ran (or really did not)
    z_ref = z.detach().clone().requires_grad_()
    cb_ref = codebook.detach().clone().requires_grad_()
    ref_index, ref_sqdist = K.vq_nearest(z_ref, cb_ref, impl="torch")
    (ref_sqdist * weight).sum().backward()
    assert_nonzero(z_ref.grad, "reference grad_z")
    assert_nonzero(cb_ref.grad, "reference grad_codebook")
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
        expected_cb = torch.zeros(k, d, device=device).index_add_(0, idx, -2 * residual * weight[:, None])
        torch.testing.assert_close(grad_cb, expected_cb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_vq_nearest_gradient_only_to_z_when_codebook_frozen(impl, device):
    z = torch.randn(20, 6, device=device, dtype=torch.bfloat16, requires_grad=True)
    codebook = torch.randn(7, 6, device=device, dtype=torch.bfloat16)
    with triton_backward_context(device, impl == "triton"):
        index, sqdist = K.vq_nearest(z, codebook, impl=impl)
        sqdist.sum().backward()
    assert z.grad.dtype == torch.bfloat16
    assert_nonzero(z.grad)
    expected = 2 * (z.detach().float() - codebook.float()[index])
    torch.testing.assert_close(z.grad.float(), expected, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------------------------------- opcheck


def _opcheck_cases(device):
    z = torch.randn(33, 20, device=device)
    codebook = torch.randn(40, 20, device=device)
    yield (z, codebook)
    yield (z.t().contiguous().t(), codebook.t().contiguous().t())  # permuted dense layouts
    yield (torch.randn(0, 20, device=device), codebook)


@pytest.mark.parametrize("impl", ["auto", "triton"], ids=["reference", "triton"])
def test_opcheck(impl, device):
    with triton_backward_context(device, impl == "triton"):
        for z, codebook in _opcheck_cases(device):
            torch.library.opcheck(torch.ops.fastseg.vq_nearest.default, (z, codebook))
        z, codebook = torch.randn(33, 20, device=device), torch.randn(40, 20, device=device)
        # With requires_grad inputs opcheck's AOT check sums all outputs into one in-place accumulator starting with
        # our int64 index, which cannot take the float sqdist; the AOT-autograd gradients are checked below instead.
        torch.library.opcheck(
            torch.ops.fastseg.vq_nearest.default,
            (z.clone().requires_grad_(), codebook.clone().requires_grad_()),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )
        index, _ = torch.ops.fastseg.vq_nearest(z, codebook)
        torch.library.opcheck(torch.ops.fastseg.vq_nearest_backward.default,
                              (torch.randn(33, device=device), z, codebook, index))  # fmt: skip


def test_vq_nearest_gradients_under_aot_autograd():
    def loss(z, codebook):
        return K.vq_nearest(z, codebook)[1].sum()

    z, codebook = torch.randn(33, 20, requires_grad=True), torch.randn(40, 20, requires_grad=True)
    eager = torch.autograd.grad(loss(z, codebook), (z, codebook))
    assert_nonzero(eager[0])
    assert_nonzero(eager[1])
    compiled = torch.compile(loss, backend="aot_eager", dynamic=True, fullgraph=True)
    torch.testing.assert_close(torch.autograd.grad(compiled(z, codebook), (z, codebook)), eager)


# ------------------------------------------------------------------------------------------------------------ bad inputs


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


def test_bad_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        K.vq_nearest(torch.randn(2, 2), torch.randn(2, 2), impl="cuda")


# ---------------------------------------------------------------------------------------------------------------- export


class _TinyVQ(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.codebook = torch.nn.Parameter(torch.randn(24, 6))

    def forward(self, z):
        return K.vq_nearest(z, self.codebook)


@pytest.mark.export
def test_onnx_export_uses_standard_ops_and_matches_onnxruntime(tmp_path):
    model = _TinyVQ().eval()
    z = torch.randn(50, 6) * 2
    op_types, _, got = export_onnx_and_run(model, (z,), tmp_path / "vq.onnx")
    expected = model(z)
    assert "ArgMin" in op_types and all(not t.startswith("fastseg") for t in op_types)
    assert (got[0] == expected[0].numpy()).all()
    torch.testing.assert_close(torch.from_numpy(got[1]), expected[1].detach(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------- GPU


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
