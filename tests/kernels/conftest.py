"""Shared set-up of the kernel tests: where the Triton implementations run on this host, and small helpers.

`triton_device` (tests/conftest.py) is the ONE answer to "can this test run the Triton kernels, and on what
tensors": the native kernels on CUDA tensors on a CUDA host, the interpreter on CPU tensors on a CPU host (where
tests/conftest.py sets ``TRITON_INTERPRET=1``), otherwise a skip with the reason.

No kernel test calls ``impl="triton"`` on CPU tensors without the interpreter, so the edge-case grids (empty inputs,
strides, NaN / inf, ties, absent classes, ignore pixels) run natively on a GPU host and through the interpreter here.
Tests parametrised over ``impl`` take the `device` fixture: the Triton device for ``impl="triton"``, the CPU for the
reference paths (``"torch"`` and ``"auto"``, whose CPU kernel is the reference).

tests/conftest.py seeds every test from ``FASTSEG_TEST_SEED`` (default 0), to run the grids under other draws.
"""

from __future__ import annotations

import pytest
import torch

from fastseg.kernels._utils import run_triton_on_cpu


@pytest.fixture
def device(request) -> torch.device:
    """The device for the test's ``impl`` parameter: the Triton device for "triton", the CPU otherwise."""
    impl = request.getfixturevalue("impl")
    return request.getfixturevalue("triton_device") if impl == "triton" else torch.device("cpu")


def triton_backward_context(device: torch.device, enabled: bool = True):
    """The switch that makes CPU custom-op kernels (forward and backward) run Triton under the interpreter; a no-op
    on CUDA tensors, whose kernels are Triton anyway."""
    return run_triton_on_cpu(enabled and device.type == "cpu")


def assert_nonzero(grad: torch.Tensor, what: str = "gradient") -> None:
    """A gradient check must not pass on an all-zero gradient (a dropped backward looks exactly like that)."""
    assert bool(grad.ne(0).any()), f"{what} is all zeros"


def qkv(b: int, h: int, n_q: int, n_kv: int, d: int, dtype=torch.float32, device="cpu"):
    """Random q (B, h, n_q, d), k and v (B, h, n_kv, d) for the attention tests."""
    q = torch.randn(b, h, n_q, d, dtype=dtype, device=device)
    k = torch.randn(b, h, n_kv, d, dtype=dtype, device=device)
    v = torch.randn(b, h, n_kv, d, dtype=dtype, device=device)
    return q, k, v


def flash_rule(fast: torch.Tensor, low: torch.Tensor, ref: torch.Tensor, factor: float) -> None:
    """max|fast - ref| <= factor * max|low - ref| + floor (reliability.md 1.1 / 1.6): flash-attention's rule."""
    floor = 2 * ((ref.to(low.dtype).float() + 0.3 - 0.3) - ref).abs().max().item()
    err, pt_err = (fast.float() - ref).abs().max().item(), (low.float() - ref).abs().max().item()
    assert err <= factor * pt_err + floor + 1e-5, f"kernel error {err:.3e} > {factor} x PyTorch's {pt_err:.3e}"


IGNORE = 255


def class_map(
    batch: int, height: int, width: int, num_classes: int, ignore_frac: float = 0.2, absent: bool = True, device="cpu"
) -> torch.Tensor:
    """Blocky random class maps (regions, like real segmentation) with ignore pixels; image 0 uses only a few
    classes so that most classes are absent from it."""
    coarse = torch.randint(0, num_classes, (batch, 1, (height + 3) // 4, (width + 3) // 4)).float()
    labels = torch.nn.functional.interpolate(coarse, size=(height, width), mode="nearest")[:, 0].long()
    noise = torch.rand(batch, height, width) < 0.1  # a few isolated pixels of other classes
    labels = torch.where(noise, torch.randint(0, num_classes, (batch, height, width)), labels)
    if absent and num_classes > 2:
        labels[0] = labels[0] % 2
    labels[torch.rand(batch, height, width) < ignore_frac] = IGNORE
    return labels.to(device)


def leaf(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Fresh leaf copies that require grad (one set per path compared)."""
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def grads(outputs, inputs, cotangents):
    return torch.autograd.grad(outputs, inputs, cotangents)


def assert_close(actual, expected, atol=2e-5, rtol=2e-5, what=""):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def export_onnx_and_run(model: torch.nn.Module, args: tuple, path) -> tuple[set[str], set[str], list]:
    """Export ``model`` through torch.export + the kernels' DECOMPOSITIONS + dynamo ONNX, run it in onnxruntime.

    Returns ``(op_types, domains, outputs)``; asserts that no fastseg custom op is left in the exported graph.
    """
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from fastseg.kernels import DECOMPOSITIONS

    with torch.no_grad():
        program = torch.export.export(model, args).run_decompositions(DECOMPOSITIONS)
        assert "fastseg" not in str(program.graph)
        torch.onnx.export(program, args, str(path), dynamo=True)
    nodes = onnx.load(str(path)).graph.node
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return {n.op_type for n in nodes}, {n.domain for n in nodes}, session.run(None, feeds)
