"""fastseg.kernels: fused Triton ops with plain PyTorch references (installed from the top-level `kernels/` folder).

One file per op (DESIGN.md, the op contract): the module docstring with the maths and limits, ``<op>_ref`` (the
oracle, the CPU path and the export graph), the Triton kernels, the checked launchers, the
``torch.library.custom_op("fastseg::<op>")`` registration and the functional entry with
``impl="auto" | "triton" | "torch"``. ``_utils`` holds what they share (dispatch, checks, the dot-precision policy,
launch sizes, constants). This package imports nothing else from fastseg.

Each op's module has the op's own name, and this package re-exports the function under that name, so
``fastseg.kernels.vq_nearest`` is the *function*. To reach a module's private parts (tests, benchmarks) import from it
(``from fastseg.kernels.vq_nearest import vq_nearest_ref``) or take it from ``sys.modules`` /
``importlib.import_module("fastseg.kernels.vq_nearest")``; ``import fastseg.kernels.vq_nearest as m`` binds the
function, not the module.
"""

import importlib

from ._utils import HAS_TRITON, IMPLS, interpreter_enabled
from .argmax_matmul import argmax_matmul, argmax_matmul_ref
from .attention_fusion import attention_fusion, attention_fusion_ref
from .cam_masked_pairs import cam_masked_pairs, cam_masked_pairs_ref
from .classwise_recon_loss import classwise_masked_recon_loss, classwise_masked_recon_loss_ref
from .classwise_reduce import classwise_mean, classwise_reduce, classwise_reduce_ref
from .masked_class_attention import masked_class_attention, masked_class_attention_ref
from .pixel_class_attention import pixel_class_attention, pixel_class_attention_ref
from .vq_nearest import vq_nearest, vq_nearest_ref

OPS = (
    "vq_nearest",
    "argmax_matmul",
    "pixel_class_attention",
    "masked_class_attention",
    "classwise_reduce",
    "classwise_recon_loss",
    "attention_fusion",
    "cam_masked_pairs",
)  # one module each

# Every op's forward -> its reference decomposition; fastseg.export lowers the custom ops with these so that ONNX files
# hold standard operators only. (The class-wise ops are training ops: they export none.)
DECOMPOSITIONS: dict = {}
for _name in OPS:
    DECOMPOSITIONS.update(importlib.import_module(f"{__name__}.{_name}").DECOMPOSITIONS)
del _name

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
    "attention_fusion",
    "attention_fusion_ref",
    "cam_masked_pairs",
    "cam_masked_pairs_ref",
]
