"""``rlsys eval``: evaluate a model on JSONL benchmarks with the training reward.

The parser is built here without importing anything heavy (``rlsys --help`` stays instant);
``rlsys.eval.run`` does the work. Bad option values are argparse errors naming the option;
bad files, keys, models and checkpoints print ``rlsys eval: <reason>`` naming the file, line,
option or field; both exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

EXAMPLES = """\
examples:
  rlsys eval                                           # the CPU default config's validation set
  rlsys eval smollm2-135m-grpo-cpu --limit 8 --n 4 --temperature 0.6
  rlsys eval --model outputs/run/checkpoints --benchmarks aime24=aime_2024.jsonl math500.jsonl \\
      --n 16 --temperature 0.6 --top-p 0.95 --max-new-tokens 4096 --engine sglang --prompt-template boxed
"""


def _integer(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _number(allowed: Callable[[float], bool], description: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or not allowed(value):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text}")
        return value

    return parse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlsys.cli import add_config_args

    ev = sub.add_parser(
        "eval", help="evaluate a model or checkpoint on JSONL benchmarks (avg@n, pass@k) with the training reward",
        description="Generate n answers per problem for one or more JSONL benchmarks and score them with the "
                    "sandboxed reward of training. Reports avg@n and pass@k per benchmark and writes per-example "
                    "JSONL, summary.json, results.md and report.md into the output directory. The experiment "
                    "config supplies the defaults: model, validation files (when no --benchmarks are given), "
                    "prompt keys, chat template, reward settings. See docs/EVALUATION.md.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(ev)

    source = ev.add_argument_group("model and data")
    source.add_argument("--model", default=None,
                        help="HF model directory, offline model name, or rlsys checkpoint: a checkpoint directory, "
                             "a step_XXXXXXXX/ directory with actor/, or a run's checkpoints/ root (the checkpoint "
                             "its 'latest' file names, else its newest complete step) (default: model.path)")
    source.add_argument("--benchmarks", nargs="+", default=None, metavar="[NAME=]FILE",
                        help="JSONL benchmark files, each optionally named (default: the config's data.val_files)")
    source.add_argument("--prompt-key", default=None,
                        help="key of the prompt (default: detected per file: the config's data.prompt_key, "
                             "prompt, problem, question)")
    source.add_argument("--answer-key", default=None,
                        help="key of the reference answer(s) (default: detected per file: the config's "
                             "data.answer_key, solutions, answer, answers, solution)")
    source.add_argument("--answer-type", nargs="+", default=["auto"], choices=("auto", "math", "choice"),
                        help="one for all benchmarks or one per benchmark: math (boxed answer), choice (a letter "
                             "A-J), auto (choice when every reference is a letter) (default: auto)")
    source.add_argument("--limit", type=_integer(1), default=None, help="evaluate only the first N problems of each file")

    prompts = ev.add_argument_group("prompts")
    prompts.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                         help="render prompts with the tokenizer's chat template (default: data.apply_chat_template)")
    prompts.add_argument("--system-prompt", default=None, help="system message for the chat template "
                                                               "(default: data.system_prompt)")
    prompts.add_argument("--prompt-template", default=None, metavar="TEMPLATE",
                         help="a text with {prompt}, a preset of rlsys/data/templates.py (boxed, r1_zero), or "
                              "none (default: data.prompt_template)")

    sampling = ev.add_argument_group("sampling")
    sampling.add_argument("--engine", choices=("hf", "sglang"), default="hf",
                          help="hf: transformers generate; sglang: the rollout engine (default: %(default)s)")
    sampling.add_argument("--n", type=_integer(1), default=1, help="samples per problem (default: %(default)s)")
    sampling.add_argument("--k", type=_integer(1), nargs="+", default=None,
                          help="k values of pass@k, each <= n (default: powers of two below n, and n)")
    sampling.add_argument("--temperature", type=_number(lambda v: v >= 0, ">= 0"), default=0.0,
                          help="0 is greedy (default: %(default)s)")
    sampling.add_argument("--top-p", type=_number(lambda v: 0 < v <= 1, "in (0, 1]"), default=1.0,
                          help="nucleus sampling mass (default: %(default)s)")
    sampling.add_argument("--max-new-tokens", type=_integer(1), default=128, help="response budget (default: %(default)s)")
    sampling.add_argument("--seed", type=int, default=None, help="sampling seed (default: runner.seed)")
    sampling.add_argument("--batch-size", type=_integer(1), default=32,
                          help="problems per generate call (default: %(default)s)")

    output = ev.add_argument_group("output")
    output.add_argument("--output", default=None, help="output directory (default: <runner.output_dir>/eval)")
    output.add_argument("--examples", type=_integer(0), default=3,
                        help="worked examples of right and of wrong answers per benchmark in report.md "
                             "(default: %(default)s)")
    output.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is shown on stderr only when stderr is a terminal)")
    ev.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from rlsys.actor.checkpoint_files import CheckpointError
    from rlsys.data.jsonl import DataError
    from rlsys.eval.run import EvalInputError, run
    from rlsys.models.offline import OfflineModelError

    try:
        return run(args)
    except (EvalInputError, DataError, CheckpointError, OfflineModelError) as exc:
        print(f"rlsys eval: {exc}", file=sys.stderr)
        return 2
