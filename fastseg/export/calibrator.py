"""INT8 entropy calibrator for TensorRT <= 10 (TensorRT 11 removed calibrators: quantise with Q/DQ instead).

Feeds float32 batches to TensorRT from CUDA memory owned by torch. The default batches are shapes-world
validation images at the profile's opt shape; pass your own (``calibration_batches``) for real data: NVIDIA and
ultralytics recommend 500+ representative images, calibrated on the deployment device, the cache kept per device.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["make_calibrator", "shapes_batches"]


def shapes_batches(opt_shape: tuple[int, ...], num_batches: int = 32, seed: int = 0) -> Iterator[Any]:
    """``num_batches`` batches of shapes-world validation images at ``opt_shape`` (B, 3, H, W)."""
    import torch

    from ..data.shapes import ShapesConfig, ShapesDataset

    b, _, h, w = opt_shape
    dataset = ShapesDataset("val", length=num_batches * b, config=ShapesConfig(image_size=(h, w)), seed=seed)
    for i in range(num_batches):
        yield torch.stack([dataset[i * b + j]["image"] for j in range(b)])


def make_calibrator(
    trt: Any, opt_shape: tuple[int, ...], batches: Iterable[Any] | None, cache: str | os.PathLike | None
) -> Any:
    """An ``IInt8EntropyCalibrator2`` over ``batches`` (default: `shapes_batches`), caching to ``cache``."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("INT8 calibration runs the network on a CUDA GPU; none is visible")
    source = iter(batches if batches is not None else shapes_batches(tuple(opt_shape)))
    cache_path = Path(cache) if cache is not None else None

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.current: torch.Tensor | None = None  # keeps the device buffer alive while TensorRT reads it

        def get_batch_size(self) -> int:
            return int(opt_shape[0])

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                batch = next(source)
            except StopIteration:
                return None
            self.current = batch.to("cuda", torch.float32).contiguous()
            return [int(self.current.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            if cache_path is not None:
                cache_path.write_bytes(bytes(data))

    return _Calibrator()
