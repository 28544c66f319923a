"""fastseg.kernels: fused Triton ops with plain PyTorch references (installed from the top-level `kernels/` folder).

Every op follows the contract of DESIGN.md: `<op>_ref` (the oracle, the CPU path and the export graph), Triton
kernels, checked launchers, a `torch.library.custom_op("fastseg::<op>")` registration, and a functional entry with
`impl="auto" | "triton" | "torch"`. This package imports nothing else from fastseg.
"""

from ._utils import HAS_TRITON, IMPLS, interpreter_enabled

# Kernel families: each adds its public names here (one import line per family) and its ops' decompositions to
# DECOMPOSITIONS, which fastseg.export uses to lower the custom ops to standard ONNX operators.
DECOMPOSITIONS: dict = {}
# --- families ---
from . import vq as _vq
from .vq import argmax_matmul, argmax_matmul_ref, vq_nearest, vq_nearest_ref  # noqa: E402
DECOMPOSITIONS.update(_vq.DECOMPOSITIONS)
from . import class_attention as _class_attention  # noqa: E402
from .class_attention import masked_class_attention, masked_class_attention_ref, pixel_class_attention, pixel_class_attention_ref  # noqa: E402,E501
DECOMPOSITIONS.update(_class_attention.DECOMPOSITIONS)
from . import classwise as _classwise  # noqa: E402
from .classwise import classwise_masked_recon_loss, classwise_masked_recon_loss_ref, classwise_mean, classwise_patch_mask, classwise_reduce, classwise_reduce_ref  # noqa: E402,E501
DECOMPOSITIONS.update(_classwise.DECOMPOSITIONS)
# --- end families ---

__all__ = ["HAS_TRITON", "IMPLS", "interpreter_enabled", "DECOMPOSITIONS",
           "vq_nearest", "vq_nearest_ref", "argmax_matmul", "argmax_matmul_ref",
           "pixel_class_attention", "pixel_class_attention_ref", "masked_class_attention", "masked_class_attention_ref"]
__all__ += ["classwise_reduce", "classwise_reduce_ref", "classwise_mean", "classwise_masked_recon_loss",
            "classwise_masked_recon_loss_ref", "classwise_patch_mask"]
