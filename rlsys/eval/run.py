"""The work of ``rlsys eval``: options and config -> benchmarks -> model -> engine -> results.

Choices:
- Everything that can be wrong with the input is checked before the model is converted or an
  engine starts: the config, the option values, every benchmark file (read, rendered and
  tokenised in full, so a bad line anywhere stops the run at once), answer types, the model or
  checkpoint and its tokenizer.
- Benchmarks given with ``--benchmarks`` are paths relative to the working directory; the
  config's ``data.val_files`` are relative to the repository, as in training. A benchmark is
  named by its file's stem, or by ``NAME=FILE``; two benchmarks may not share a name (their
  output files would collide).
- Benchmarks run one after another with one engine and one reward pool; after each one every
  output file is rewritten, so finished benchmarks are on disk while the next one runs.
- The progress bar goes to stderr and is shown only when stderr is a terminal; console lines
  (``[rlsys eval] ...``) go to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlsys.config import REPO_ROOT, ConfigError, DataConfig, load_config
from rlsys.data.dataset import PromptDataset
from rlsys.data.templates import resolve_template
from rlsys.eval.benchmark import BenchmarkResult, evaluate_prompts, resolve_answer_type
from rlsys.eval.inputs import detect_keys, load_benchmark
from rlsys.eval.metrics import check_ks, default_ks
from rlsys.eval.model import ModelSource, ensure_hf_model, locate_model, start_engine
from rlsys.eval.report import markdown_table, write_results
from rlsys.models.offline import OfflineModelError, load_tokenizer
from rlsys.reward.pool import RewardPool
from rlsys.rollout.base import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class EvalInputError(ValueError):
    """An option, file or model given to ``rlsys eval`` is unusable; the message names it."""


@dataclass(frozen=True)
class _Benchmark:
    name: str
    path: Path
    origin: str
    """The option or config field that named the file, for error messages."""


@dataclass(frozen=True)
class _Loaded:
    benchmark: _Benchmark
    dataset: PromptDataset
    answer_type: str
    """Resolved: math or choice."""
    source: dict[str, Any]
    """File, keys and problems dropped, for the summary."""


def _log(message: str) -> None:
    print(f"[rlsys eval] {message}", flush=True)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    ks = _ks(args)
    template_name, template_text = _template(args.prompt_template, config.data.prompt_template)
    benchmarks = _benchmarks(args.benchmarks, config.data.val_files)
    answer_types = _answer_types(args.answer_type, benchmarks)
    apply_chat_template = config.data.apply_chat_template if args.chat_template is None else args.chat_template
    system_prompt = config.data.system_prompt if args.system_prompt is None else args.system_prompt
    seed = config.runner.seed if args.seed is None else args.seed
    if args.n > 1 and args.temperature == 0:
        print(f"[rlsys eval] warning: --n {args.n} with --temperature 0: greedy decoding gives one response per "
              f"problem, counted {args.n} times", file=sys.stderr, flush=True)

    model_origin = "--model" if args.model else "model.path"
    source = _locate(args.model or config.model.path, model_origin)
    if args.model is None and config.model.tokenizer_path:
        tokenizer = _tokenizer(config.model.tokenizer_path, "model.tokenizer_path")
    else:
        tokenizer = _tokenizer(str(source.tokenizer_path), model_origin)

    loaded = [_load(benchmark, answer_type, tokenizer, args, config.data, apply_chat_template=apply_chat_template,
                    system_prompt=system_prompt, prompt_template=template_text)
              for benchmark, answer_type in zip(benchmarks, answer_types)]

    output_dir = Path(args.output) if args.output else Path(config.runner.output_dir) / "eval"
    source = ensure_hf_model(source, output_dir, log=_log)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            n=args.n, seed=seed)
    model_info = {**source.describe(), "engine": args.engine}
    settings: dict[str, Any] = {
        "config": args.config, "overrides": list(args.overrides), "n": args.n, "ks": ks,
        "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": seed,
        "chat_template": apply_chat_template, "system_prompt": system_prompt,
        "prompt_template": template_name, "prompt_template_text": template_text, "limit": args.limit,
        "batch_size": args.batch_size, "max_prompt_length": config.data.max_prompt_length,
        "reward": dataclasses.asdict(config.reward),
    }
    total = sum(len(item.dataset) for item in loaded)
    _log(f"{source.hf_path} on {len(loaded)} benchmark(s), {total} problems x {args.n} samples, "
         f"{args.engine} engine; writing to {output_dir}")

    progress = not args.no_progress and sys.stderr.isatty()
    started = time.monotonic()
    results: list[BenchmarkResult] = []
    engine = start_engine(args.engine, source.hf_path, seed=seed)
    try:
        with RewardPool(config.reward) as pool:
            for item in loaded:
                name = item.benchmark.name
                result = evaluate_prompts(engine, item.dataset.prompts, pool, params, name=name, ks=ks,
                                          answer_type=item.answer_type, progress=progress, batch_size=args.batch_size)
                result.source = item.source
                results.append(result)
                paths = write_results(results, output_dir, model=model_info, settings=settings, examples=args.examples)
                s = result.summary
                passes = ", ".join(f"pass@{k} {s[f'pass@{k}']:.3f}" for k in ks)
                _log(f"{name}: {s['num_prompts']} problems x {args.n} ({item.answer_type}): avg@{args.n} "
                     f"{s['accuracy']:.3f}, {passes}, mean reward {s['mean_reward']:+.3f}, properly ended "
                     f"{s['fraction_properly_ended']:.3f}, reward timeouts {s['num_timeout']}, crashes "
                     f"{s['num_crash']}; {paths[name]}")
    finally:
        engine.shutdown()
    print(markdown_table(results), end="", flush=True)
    _log(f"done in {time.monotonic() - started:.0f}s: {paths['summary']}, {paths['table']}, {paths['report']}")
    return 0


def _load(benchmark: _Benchmark, answer_type: str, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace,
          data: DataConfig, *, apply_chat_template: bool, system_prompt: str | None,
          prompt_template: str | None) -> _Loaded:
    """Read, render and tokenise one benchmark and resolve its answer type (every error names its cause)."""
    prompt_key, answer_key = detect_keys(benchmark.path, prompt_key=args.prompt_key, answer_key=args.answer_key,
                                         default_prompt_key=data.prompt_key, default_answer_key=data.answer_key)
    dataset = load_benchmark(benchmark.path, tokenizer, prompt_key=prompt_key, answer_key=answer_key,
                             apply_chat_template=apply_chat_template, system_prompt=system_prompt,
                             prompt_template=prompt_template, max_prompt_length=data.max_prompt_length,
                             limit=args.limit, max_line_bytes=data.max_line_bytes)
    if not len(dataset):
        raise EvalInputError(f"{benchmark.path}: no problems to evaluate ({dataset.num_dropped_overlong} longer "
                             f"than data.max_prompt_length={data.max_prompt_length} tokens)")
    try:
        resolved = resolve_answer_type(answer_type, dataset.prompts)
    except ValueError as exc:
        raise EvalInputError(f"--answer-type: {exc}") from None
    if dataset.num_dropped_overlong:
        _log(f"{benchmark.name}: dropped {dataset.num_dropped_overlong} problems longer than "
             f"data.max_prompt_length={data.max_prompt_length} tokens")
    source = {"file": str(benchmark.path), "prompt_key": prompt_key, "answer_key": answer_key,
              "num_dropped_overlong": dataset.num_dropped_overlong}
    return _Loaded(benchmark, dataset, resolved, source)


def _ks(args: argparse.Namespace) -> list[int]:
    try:
        return check_ks(default_ks(args.n) if args.k is None else args.k, args.n)
    except ValueError as exc:
        raise EvalInputError(f"--k: {exc}") from None


def _template(given: str | None, configured: str | None) -> tuple[str | None, str | None]:
    """(name, text) of the prompt template: ``--prompt-template`` (``none`` for no template), else
    ``data.prompt_template``; ``(None, None)`` when there is none."""
    if given is None:
        return configured, resolve_template(configured) if configured is not None else None
    if given == "none":
        return None, None
    try:
        return given, resolve_template(given)
    except ConfigError as exc:
        raise EvalInputError(str(exc).replace("data.prompt_template", "--prompt-template", 1)) from None


def _benchmarks(given: list[str] | None, val_files: list[str]) -> list[_Benchmark]:
    if given is None:
        items = [(None, REPO_ROOT / file, f"data.val_files[{i}]") for i, file in enumerate(val_files)]
        if not items:
            raise EvalInputError("no benchmarks: pass --benchmarks FILE ... or set data.val_files")
    else:
        items = []
        for item in given:
            name, separator, path = item.partition("=")
            if separator and _NAME.fullmatch(name) and not Path(item).exists():
                items.append((name, Path(path), f"--benchmarks {item}"))
            else:
                items.append((None, Path(item), f"--benchmarks {item}"))
    benchmarks = []
    for name, path, origin in items:
        if not path.is_file():
            raise EvalInputError(f"{origin}: no such file: {path}")
        benchmarks.append(_Benchmark(name or _name_of(path), path, origin))
    names = [benchmark.name for benchmark in benchmarks]
    for name in names:
        if names.count(name) > 1:
            raise EvalInputError(f"--benchmarks: two benchmarks are named {name!r}; name them with NAME=FILE")
    return benchmarks


def _name_of(path: Path) -> str:
    """The file's stem as a safe output-file name."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", path.stem)
    return name if _NAME.fullmatch(name) else f"benchmark_{name}"


def _answer_types(given: list[str], benchmarks: list[_Benchmark]) -> list[str]:
    if len(given) == 1:
        return given * len(benchmarks)
    if len(given) != len(benchmarks):
        raise EvalInputError(f"--answer-type: give one type for all benchmarks or one per benchmark "
                             f"({len(benchmarks)}), got {len(given)}")
    return given


def _tokenizer(name_or_path: str, origin: str) -> PreTrainedTokenizerBase:
    try:
        return load_tokenizer(name_or_path)
    except (OSError, ValueError) as exc:  # transformers' errors for a directory without tokenizer files
        raise EvalInputError(f"{origin}: cannot load a tokenizer from {name_or_path}: {exc}") from None


def _locate(model: str, origin: str) -> ModelSource:
    try:
        return locate_model(model)
    except OfflineModelError as exc:
        raise EvalInputError(f"{origin}: {exc}") from None


__all__ = ["EvalInputError", "run"]
