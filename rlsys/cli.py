"""The ``rlsys`` command line: one subcommand per task, each with ``--help``.

Subcommands import their heavy dependencies lazily so ``rlsys --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each owns one subcommand: ``add_parser(subparsers)`` adds it, importing nothing heavy.
_COMMAND_MODULES = ("rlsys.runner.command", "rlsys.eval.command", "rlsys.cluster.plan", "rlsys.plot")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The experiment config name and its ``key=value`` overrides (shared by subcommands)."""
    parser.add_argument("config", nargs="?", default="smollm2-135m-grpo-cpu",
                        help="experiment config name, a YAML file under configs/ (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="Hydra-style overrides, e.g. reward.timeout_s=3 data.seed=2")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlsys",
        description="GRPO training of math-reasoning LLMs: Megatron-core actor, SGLang rollout, ±5 verifiable reward.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for module in _COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)

    conv = sub.add_parser(
        "convert", help="convert between HF checkpoints and Megatron distributed checkpoints",
        description="Convert model weights between an HF directory (safetensors + config + tokenizer) "
                    "and a Megatron distributed checkpoint. Starts the processes it needs on this host.",
    )
    directions = conv.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_mcore = directions.add_parser(
        "hf-to-mcore", help="HF directory -> Megatron distributed checkpoint at a TP/PP layout",
        description="Write an HF checkpoint as a Megatron distributed checkpoint sharded for TP x PP "
                    "(it loads at any other layout later). The output directory must be new or empty.",
    )
    to_mcore.add_argument("--hf-path", required=True, help="HF model directory (safetensors + config.json)")
    to_mcore.add_argument("--output", required=True, help="new directory for the Megatron checkpoint")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: %(default)s)")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default: %(default)s)")
    to_mcore.set_defaults(handler=_run_hf_to_mcore)
    to_hf = directions.add_parser(
        "mcore-to-hf", help="Megatron distributed checkpoint -> HF directory",
        description="Write the model of a Megatron checkpoint (converted, or saved by training) as an HF "
                    "directory that transformers loads as is. The output directory must be new or empty.",
    )
    to_hf.add_argument("--mcore-path", required=True, help="Megatron checkpoint directory")
    to_hf.add_argument("--output", required=True, help="new directory for the HF model")
    to_hf.set_defaults(handler=_run_mcore_to_hf)
    return parser


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise SystemExit(f"rlsys convert: --{name} must be >= 1, got {value}")
    return value


def _run_hf_to_mcore(args: argparse.Namespace) -> int:
    from rlsys.actor.convert import convert_hf_to_mcore

    out = convert_hf_to_mcore(args.hf_path, args.output, tp=_positive("tp", args.tp), pp=_positive("pp", args.pp))
    print(f"[rlsys convert] wrote Megatron checkpoint (tp={args.tp}, pp={args.pp}) to {out}")
    return 0


def _run_mcore_to_hf(args: argparse.Namespace) -> int:
    from rlsys.actor.convert import convert_mcore_to_hf

    out = convert_mcore_to_hf(args.mcore_path, args.output)
    print(f"[rlsys convert] wrote HF model to {out}")
    return 0


class _ConsoleHandler(logging.Handler):
    """rlsys's own warnings as ``[rlsys] warning: ...`` lines, above the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(f"[rlsys] {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _log_to_console() -> None:
    root = logging.getLogger("rlsys")
    if not any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        root.addHandler(_ConsoleHandler(logging.WARNING))  # with a handler, Python's bare last-resort one stays out


def main(argv: list[str] | None = None) -> int:
    from rlsys.config import ConfigError

    args = _build_parser().parse_args(argv)
    _log_to_console()
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"rlsys: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
