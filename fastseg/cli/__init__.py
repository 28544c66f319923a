"""The ``fastseg`` command line (console script ``fastseg``, or ``python -m fastseg.cli``)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
