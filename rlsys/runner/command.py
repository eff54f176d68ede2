"""``rlsys train``: run the GRPO loop of an experiment config."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlsys.cli import add_config_args

    train = sub.add_parser("train", help="train with GRPO (rollout, reward, Megatron update, weight sync)")
    add_config_args(train)
    train.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from rlsys.cluster.placement import ClusterError
    from rlsys.data import DataError
    from rlsys.runner.checkpoints import ResumeError
    from rlsys.runner.grpo import train_from_config

    try:
        result = train_from_config(args.config, args.overrides)
    except (DataError, ClusterError, ResumeError) as exc:
        # Input and cluster problems found at start: the message names the file, field or resource.
        print(f"rlsys train: error: {exc}", file=sys.stderr)
        return 2
    print(f"[rlsys train] done: {result.output_dir} (event files in tensorboard/, checkpoints in checkpoints/)",
          file=sys.stderr)
    return 0
