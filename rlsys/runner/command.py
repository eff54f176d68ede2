"""``rlsys train``: run the GRPO loop of an experiment config."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlsys.cli import add_config_args

    train = sub.add_parser("train", help="train with GRPO (rollout, reward, Megatron update, weight sync)")
    add_config_args(train)
    train.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from rlsys.cluster.logs import log_dir
    from rlsys.cluster.placement import ClusterError
    from rlsys.config import ConfigError, load_config
    from rlsys.data import DataError
    from rlsys.runner.checkpoints import ResumeError
    from rlsys.runner.grpo import Interrupted, RunFailed, train

    run = load_config(args.config, args.overrides)
    logs = log_dir(run.runner.output_dir)
    try:
        result = train(run)
    except (DataError, ClusterError, ResumeError) as exc:
        # Input and cluster problems found at start: the message names the file, field or resource.
        print(f"rlsys train: error: {exc}", file=sys.stderr)
        _name_worker_logs(logs)
        return 2
    except Interrupted as exc:
        # Ray and the engines are already shut down (train's finally); the shell's codes for the signal.
        print(f"rlsys train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except ConfigError:
        raise  # found at start too: rlsys.cli prints it as a config error
    except RunFailed as exc:
        if not exc.expected:  # an error in rlsys itself: its traceback is what a bug report needs
            traceback.print_exception(exc.error)
        print(f"rlsys train: error: {exc}", file=sys.stderr)
        _name_worker_logs(logs)
        return 1
    except Exception:
        # A worker's exception arrives here with the worker's traceback (Ray re-raises it).
        traceback.print_exc()
        _name_worker_logs(logs)
        return 1
    print(f"[rlsys train] done: {result.output_dir} (event files in tensorboard/, checkpoints in checkpoints/)",
          file=sys.stderr)
    return 0


def _name_worker_logs(logs: Path) -> None:
    if logs.is_dir():
        print(f"rlsys train: the workers' full logs are in {logs}/", file=sys.stderr)
