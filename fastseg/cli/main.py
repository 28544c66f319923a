"""The ``fastseg`` command: the parser and the dispatch; each command group lives in its own module
(`train`: list / train / eval / predict / shapes; `data`: the --data options and `datasets`; `export`: export /
verify; `bench`; `gss`; `semples`: clip and semples).

Every sub-command works offline on the built-in shapes world by default.
"""

from __future__ import annotations

import argparse
import sys

from .bench import add_bench_command
from .data import add_datasets_command
from .export import add_export_commands
from .gss import add_gss_commands
from .semples import add_semples_commands
from .train import add_train_commands

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastseg", description="Fused-kernel semantic segmentation: train, evaluate, predict, benchmark, export."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_commands(sub)  # list, train, eval, predict, shapes
    add_bench_command(sub)  # bench
    add_datasets_command(sub)  # datasets [NAME --data-root DIR]
    add_export_commands(sub)  # export, verify
    add_gss_commands(sub)  # gss roundtrip | fit-tokenizer | convert-dalle
    add_semples_commands(sub)  # clip train | eval; semples weaktr | match | prompts | refine | evaluate | pseudo-masks
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"fastseg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
