"""``rlsys eval``: score a model on a config's validation data with the training reward."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlsys.cli import add_config_args

    ev = sub.add_parser(
        "eval", help="score a model on a config's validation data with the ±5 math reward",
        description="Generate answers for the validation prompts of an experiment config with the "
                    "HF transformers engine and score them with the sandboxed ±5 boxed-answer reward. "
                    "Writes one JSONL line per example and prints accuracy and mean reward.",
    )
    add_config_args(ev)
    ev.add_argument("--limit", type=int, default=None, help="score only the first N validation prompts")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="response budget (default: %(default)s)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    ev.add_argument("--n", type=int, default=1, help="samples per prompt (default: %(default)s)")
    ev.add_argument("--output", default=None, help="output directory (default: <runner.output_dir>/eval)")
    ev.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from rlsys.eval.simple import evaluate_config

    evaluate_config(args.config, args.overrides, limit=args.limit, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, n=args.n, output=args.output)
    return 0
