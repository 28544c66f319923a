"""fastseg.engine: the training loop, the evaluation loop and torch.distributed helpers."""

from .distributed import (
    DistInfo,
    StepBatchSampler,
    barrier,
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    step_indices,
)
from .evaluate import evaluate, evaluate_confusion, recompute_bn_statistics
from .trainer import TrainConfig, TrainResult, default_param_groups, poly_lr_factor, train

__all__ = [
    "DistInfo",
    "StepBatchSampler",
    "TrainConfig",
    "TrainResult",
    "barrier",
    "cleanup_distributed",
    "default_param_groups",
    "evaluate",
    "evaluate_confusion",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "poly_lr_factor",
    "recompute_bn_statistics",
    "step_indices",
    "train",
]
