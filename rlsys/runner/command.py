"""``rlsys train``: run the GRPO loop of an experiment config."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlsys.cli import add_config_args

    train = sub.add_parser("train", help="train with GRPO (rollout, reward, Megatron update, weight sync)")
    add_config_args(train)
    train.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from rlsys.runner.grpo import train_from_config

    train_from_config(args.config, args.overrides)
    return 0
