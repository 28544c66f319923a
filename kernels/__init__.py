"""fastseg.kernels: fused Triton ops with plain PyTorch references (installed from the top-level `kernels/` folder).

Every op follows the contract of DESIGN.md: `<op>_ref` (the oracle, the CPU path and the export graph), Triton
kernels, checked launchers, a `torch.library.custom_op("fastseg::<op>")` registration, and a functional entry with
`impl="auto" | "triton" | "torch"`. This package imports nothing else from fastseg.
"""

from . import attention_fusion as _attention_fusion_mod
from . import cam_masked_pairs as _cam_masked_pairs_mod
from . import class_attention, classwise, vq
from ._utils import HAS_TRITON, IMPLS, interpreter_enabled
from .attention_fusion import attention_fusion, attention_fusion_ref
from .cam_masked_pairs import cam_masked_pairs, cam_masked_pairs_ref
from .class_attention import (
    masked_class_attention,
    masked_class_attention_ref,
    pixel_class_attention,
    pixel_class_attention_ref,
)
from .classwise import (
    classwise_masked_recon_loss,
    classwise_masked_recon_loss_ref,
    classwise_mean,
    classwise_patch_mask,
    classwise_reduce,
    classwise_reduce_ref,
)
from .vq import argmax_matmul, argmax_matmul_ref, vq_nearest, vq_nearest_ref

# Each family's forward ops -> their reference decompositions; fastseg.export lowers the custom ops with these so
# that ONNX files hold standard operators only. (classwise holds training ops: it exports none.)
DECOMPOSITIONS: dict = {
    **vq.DECOMPOSITIONS,
    **class_attention.DECOMPOSITIONS,
    **classwise.DECOMPOSITIONS,
    **_attention_fusion_mod.DECOMPOSITIONS,
    **_cam_masked_pairs_mod.DECOMPOSITIONS,
}

__all__ = [
    "HAS_TRITON",
    "IMPLS",
    "interpreter_enabled",
    "DECOMPOSITIONS",
    "vq_nearest",
    "vq_nearest_ref",
    "argmax_matmul",
    "argmax_matmul_ref",
    "pixel_class_attention",
    "pixel_class_attention_ref",
    "masked_class_attention",
    "masked_class_attention_ref",
    "classwise_reduce",
    "classwise_reduce_ref",
    "classwise_mean",
    "classwise_masked_recon_loss",
    "classwise_masked_recon_loss_ref",
    "classwise_patch_mask",
    "attention_fusion",
    "attention_fusion_ref",
    "cam_masked_pairs",
    "cam_masked_pairs_ref",
]
