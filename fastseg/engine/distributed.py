"""torch.distributed helpers: set-up from ``torchrun`` variables, rank queries, barriers, rank-aware data order.

Launch: ``torchrun --nproc_per_node=N -m fastseg.cli train ...`` (or any script calling
:func:`fastseg.engine.train`). ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them, picks ``nccl`` on CUDA and ``gloo`` on CPU, and binds each
process to ``cuda:LOCAL_RANK``. Without those variables everything runs as a single process.

Data order (``specs/reliability.md`` 5): the sample order is a pure function of ``(seed, step)`` -- a per-epoch
permutation drawn from a generator seeded with ``(seed, epoch)`` -- never of a global RNG, so a resumed run sees
exactly the batches the uninterrupted run would have seen. Under DDP each global batch of
``batch_size * world_size`` positions is split into contiguous per-rank shards.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "StepBatchSampler",
    "barrier",
    "cleanup_distributed",
    "epoch_permutation",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "resolve_device",
    "shard_range",
    "step_indices",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its ``local_rank``, ``device`` and ``backend``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0: the process that logs, prints and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (a no-op when single-process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a device; ``"cuda"`` under DDP means ``cuda:LOCAL_RANK``.

    Raises:
        ValueError: CUDA was requested but is not available, or the string is not a device.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def init_distributed(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group from ``torchrun`` variables, or describe the single process.

    Safe to call more than once: an existing process group is reused.

    Args:
        device: ``"auto" | "cpu" | "cuda"``; decides the backend (``nccl`` for CUDA, ``gloo`` for CPU).
        timeout_s: Collective timeout.

    Returns:
        A :class:`DistInfo` for this process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    backend: str | None = None
    if world_size > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        if not dist.is_initialized():
            backend = "nccl" if resolved.type == "cuda" else "gloo"
            kwargs = {"device_id": resolved} if resolved.type == "cuda" else {}
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
                **kwargs,
            )
        backend = dist.get_backend()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved, backend=backend)


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# (seed, step)-derived data order
# --------------------------------------------------------------------------------------------------------------

_EPOCH_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs map to distinct generator seeds for any sane epoch


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation depending only on ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed((seed * _EPOCH_STRIDE + epoch) % (2**63 - 1))
    return torch.randperm(num_samples, generator=generator)


def shard_range(batch_size: int, rank: int, world_size: int) -> range:
    """Positions of this rank's shard inside a global batch of ``batch_size * world_size`` samples."""
    return range(rank * batch_size, (rank + 1) * batch_size)


def step_indices(
    step: int, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
) -> list[int]:
    """Dataset indices of ``rank``'s batch at ``step`` (0-based); a pure function of its arguments.

    The global stream of positions ``p = step * batch_size * world_size + j`` walks epoch after epoch;
    position ``p`` maps to ``perm(seed, p // num_samples)[p % num_samples]``.
    """
    sampler = StepBatchSampler(num_samples, batch_size, seed, step, step + 1, rank, world_size, shuffle)
    return next(iter(sampler))


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding :func:`step_indices` for steps ``start_step .. end_step - 1``.

    Use it as ``DataLoader(dataset, batch_sampler=StepBatchSampler(...))``. Because every batch is a function of
    ``(seed, step, rank)``, resuming at step ``N`` means constructing it with ``start_step=N``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < 1:
            raise ValueError("the training dataset is empty")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self._perm_cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: epoch_permutation(self.num_samples, self.seed, epoch)}
        return self._perm_cache[epoch]

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step, self.end_step):
            batch = []
            for j in shard_range(self.batch_size, self.rank, self.world_size):
                epoch, within = divmod(step * global_batch + j, self.num_samples)
                batch.append(int(self._perm(epoch)[within]) if self.shuffle else within)
            yield batch
