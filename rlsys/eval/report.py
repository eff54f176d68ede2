"""Evaluation outputs: per-example JSONL, summary JSON, markdown table and analysis report.

Files written into the output directory (see docs/EVALUATION.md):

    <benchmark>.jsonl   one record per sample (``rlsys.eval.benchmark.score_samples``)
    summary.json        model, settings, and every benchmark's source and summary
    results.md          one row per benchmark, one column per metric
    report.md           the table, then per benchmark: outcomes, and worked examples of right
                        and wrong answers (prompt, response excerpt, extracted vs reference)

Choices:
- Every file is written to a temporary name and renamed into place, so an interrupted run
  leaves the previous complete file, never a torn one. ``rlsys eval`` rewrites the set after
  each benchmark, so the finished ones are on disk while the next one runs.
- Rates are printed in percent with one decimal in the markdown files; JSON keeps fractions.
- Worked examples come from distinct problems, in file order (deterministic); wrong answers
  with an extracted answer come before responses with none. Long texts are cut to their head
  and tail (the answer is at the end) with the number of characters left out.
- Texts are put in code fences longer than any backtick run they contain, so model output
  cannot break the markdown.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlsys.eval.benchmark import BenchmarkResult

SUMMARY_FILE = "summary.json"
TABLE_FILE = "results.md"
REPORT_FILE = "report.md"

PROMPT_EXCERPT = (700, 500)
"""Characters kept from the head and the tail of a prompt in the report."""
RESPONSE_EXCERPT = (600, 900)
"""Characters kept from the head and the tail of a response in the report."""

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def write_results(
    results: Sequence[BenchmarkResult],
    output_dir: str | Path,
    *,
    model: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    examples: int = 3,
) -> dict[str, Path]:
    """Write every output file for ``results``; returns their paths by kind (and benchmark name)."""
    output_dir = Path(output_dir)
    names = [result.name for result in results]
    for name in names:
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError(f"benchmark name {name!r} is not a safe file name (letters, digits, . _ + -)")
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names must be distinct, got {names}")
    output_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for result in results:
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in result.records)
        paths[result.name] = _write(output_dir / f"{result.name}.jsonl", lines)
    summary = {
        "model": dict(model or {}),
        "settings": dict(settings or {}),
        "benchmarks": {result.name: {**result.source, **result.summary} for result in results},
    }
    paths["summary"] = _write(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    paths["table"] = _write(output_dir / TABLE_FILE, markdown_table(results))
    paths["report"] = _write(output_dir / REPORT_FILE, analysis_report(results, model=model, settings=settings,
                                                                       examples=examples))
    return paths


def _write(path: Path, text: str) -> Path:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


# -------------------------------------------------------------------------------------- table


def _pass_ks(results: Sequence[BenchmarkResult]) -> list[int]:
    ks = {int(key.removeprefix("pass@")) for result in results for key in result.summary if key.startswith("pass@")}
    return sorted(ks)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown_table(results: Sequence[BenchmarkResult]) -> str:
    """One row per benchmark: problems, n, avg@n, pass@k, reward, length, ended, reward failures."""
    ks = _pass_ks(results)
    header = ["benchmark", "type", "problems", "n", "avg@n (%)", *(f"pass@{k} (%)" for k in ks),
              "mean reward", "mean length", "ended (%)", "no answer (%)", "timeouts", "crashes"]
    rows = []
    for result in results:
        s = result.summary
        rows.append([
            result.name, s["answer_type"], str(s["num_prompts"]), str(s["n"]), _percent(s["accuracy"]),
            *(_percent(s.get(f"pass@{k}")) for k in ks),
            f"{s['mean_reward']:+.3f}", f"{s['mean_response_length']:.1f}", _percent(s["fraction_properly_ended"]),
            _percent(s["fraction_no_answer"]), str(s["num_timeout"]), str(s["num_crash"]),
        ])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- report


def analysis_report(
    results: Sequence[BenchmarkResult],
    *,
    model: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    examples: int = 3,
) -> str:
    """The markdown analysis: table, then per benchmark outcomes and worked examples."""
    out = ["# Evaluation report", ""]
    for label, values in (("Model", model), ("Settings", settings)):
        if values:
            out += [f"{label}:", ""]
            out += [f"- {key}: {_inline(_short(value))}" for key, value in values.items() if value is not None]
            out.append("")
    out += [markdown_table(results), ""]
    for result in results:
        out += _benchmark_section(result, examples)
    return "\n".join(out).rstrip() + "\n"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 200 else text[:200] + " …"


def _benchmark_section(result: BenchmarkResult, examples: int) -> list[str]:
    s, records = result.summary, result.records
    total = len(records)
    right = [r for r in records if r["correct"]]
    answered_wrong = [r for r in records if not r["correct"] and r["extracted_answer"] is not None]
    unanswered = [r for r in records if not r["correct"] and r["extracted_answer"] is None]
    out = [f"## {result.name}", ""]
    if result.source.get("file"):
        out += [f"Source: {_inline(str(result.source['file']))}", ""]
    passes = ", ".join(f"pass@{k} {_percent(s[f'pass@{k}'])} %" for k in _pass_ks([result]))
    out += [
        f"{s['num_prompts']} problems × {s['n']} sample{'s' if s['n'] != 1 else ''} ({s['answer_type']} answers): "
        f"avg@{s['n']} {_percent(s['accuracy'])} %, {passes}. "
        f"Solved by at least one sample: {s['num_solved_by_any']}; by every sample: {s['num_solved_by_all']}.",
        "",
        "| outcome | samples | share (%) | mean length | cut at max tokens |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, group in (("correct", right), ("wrong answer", answered_wrong), ("no answer found", unanswered)):
        length = f"{sum(r['response_length'] for r in group) / len(group):.1f}" if group else "–"
        truncated = sum(r["finish_reason"] != "stop" for r in group)
        out.append(f"| {label} | {len(group)} | {_percent(len(group) / total)} | {length} | {truncated} |")
    out += ["", f"Reward failures: {s['num_timeout']} timeouts, {s['num_crash']} crashes, "
                f"{s['num_too_long']} responses too long to check.", ""]
    if examples:
        out += _examples("Right answers", _pick_examples(right, examples))
        out += _examples("Wrong answers", _pick_examples(answered_wrong + unanswered, examples))
    return out


def _pick_examples(records: Sequence[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    picked, problems = [], set()
    for record in records:
        if len(picked) == count:
            break
        if record["prompt_id"] not in problems:
            problems.add(record["prompt_id"])
            picked.append(record)
    return picked


def _examples(title: str, records: Sequence[dict[str, Any]]) -> list[str]:
    out = [f"### {title}", ""]
    if not records:
        return out + ["None.", ""]
    for number, r in enumerate(records, start=1):
        extracted = "none found" if r["extracted_answer"] is None else _inline(r["extracted_answer"])
        references = " or ".join(_inline(answer) for answer in r["references"])
        out += [
            f"#### {number}. {r['location']}, sample {r['sample_index']}",
            "",
            f"Extracted: {extracted} · reference: {references} · reward {r['reward']:+.2f} · "
            f"{r['response_length']} tokens, finish reason {r['finish_reason']}"
            + ("" if r["reward_status"] == "ok" else f" · reward status {r['reward_status']}"),
            "",
            "Prompt:",
            "",
            _fenced(_excerpt(r["prompt"], *PROMPT_EXCERPT)),
            "",
            "Response:",
            "",
            _fenced(_excerpt(r["response"], *RESPONSE_EXCERPT)),
            "",
        ]
    return out


def _excerpt(text: str, head: int, tail: int) -> str:
    if len(text) <= head + tail + 100:
        return text
    return f"{text[:head]}\n[… {len(text) - head - tail} characters left out …]\n{text[-tail:]}"


def _fenced(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _inline(text: str) -> str:
    """``text`` as inline code, with a delimiter longer than any backtick run inside it."""
    text = " ".join(str(text).split())
    if not text:
        return "(empty)"
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"
