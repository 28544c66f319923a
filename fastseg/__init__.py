"""fastseg: fused-kernel semantic segmentation with export and benchmarks."""

from .version import __version__

__all__ = ["__version__"]
