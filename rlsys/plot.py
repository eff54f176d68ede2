"""``rlsys plot RUN_DIR...``: PNG training curves from a run's tensorboard event files."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    plot = sub.add_parser("plot", help="PNG training curves from tensorboard event files")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.set_defaults(handler=lambda args: 1)
