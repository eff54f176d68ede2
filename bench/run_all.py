"""Every benchmark under bench/ in one command, summarised in one table.

Each benchmark runs as a subprocess with ``--json PATH`` (its output goes to a log file beside
the JSON under ``--results-dir``); this script reads the JSON files and prints one table with the
columns benchmark, metric, baseline (named, with its value), rlsys and ratio (rlsys / baseline;
whether higher is better is said in the metric). A benchmark that fails gets one row naming its
exit code and log file; the others still run, and the exit status is 1.

``--quick`` passes small sizes where a benchmark has them (fewer tokens, repeats and steps, the
CPU default model only); the reward benchmark always runs its full labelled set. Baselines are
measured in the same run by each benchmark itself: math-verify (reward), HF transformers
(actor forward + backward, rollout generate), ``clone()`` of the weights (sync) and TRL's
GRPOTrainer (end to end, needs ``scripts/ensure_bench_env.sh``).

Run from the repository root:
    .venv/bin/python bench/run_all.py --quick
    .venv/bin/python bench/run_all.py --only reward,actor --markdown
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


@dataclass(frozen=True)
class Row:
    benchmark: str
    metric: str
    baseline: str
    """Name of the baseline the benchmark measured in the same run."""
    baseline_value: float | None
    rlsys: float | None
    ratio: float | None = None
    """rlsys / baseline unless the benchmark computed its own (e.g. a median of per-round ratios)."""

    def __post_init__(self) -> None:
        if self.ratio is None and self.rlsys is not None and self.baseline_value:
            object.__setattr__(self, "ratio", self.rlsys / self.baseline_value)


# ---------------------------------------------------------------- reading each benchmark's JSON


def reward_rows(data: dict[str, Any]) -> list[Row]:
    systems = {system["name"]: system for system in data["systems"]}
    ours, theirs = systems["rlsys"], systems["math-verify"]
    cases = data["cases"]
    rows = [Row("reward", f"accuracy on {cases} labelled cases (higher better)", "math-verify",
                theirs["accuracy"], ours["accuracy"])]
    for key, label in (("median_ms", "median ms per case"), ("p95_ms", "p95 ms per case")):
        rows.append(Row("reward", f"{label} (lower better)", "math-verify", theirs[key], ours[key]))
    wall = data["wall_s"]
    rows.append(Row("reward", f"wall s for all {cases} cases (lower better)", "math-verify", wall["math-verify"],
                    wall["rlsys"]))
    return rows


def actor_rows(data: dict[str, Any]) -> list[Row]:
    results = data["results"]
    shape = f"{data['batch_size']}x{data['seq_len']} tokens"
    rows = []
    for key, name in (("hf_sdpa", "HF transformers, sdpa"), ("hf_eager", "HF transformers, eager")):
        # The benchmark's own speed-up: the median over rounds of (baseline s / actor s) in the same round.
        rows.append(Row("actor", f"fwd+bwd tokens/s, {shape} (higher better)", name, results[f"{key}_tokens_per_s"],
                        results["actor_tokens_per_s"], ratio=results[f"actor_speed_up_vs_{key}"]))
    return rows


def rollout_rows(data: dict[str, Any]) -> list[Row]:
    return [Row("rollout", f"{model['model']} tok/s, SGLang engine (higher better)", "HF generate",
                model["hf_tok_s"], model["sglang_tok_s"]) for model in data["models"]]


def sync_rows(data: dict[str, Any]) -> list[Row]:
    paths = {path["path"]: path for path in data["paths"]}
    clone = paths.pop("clone (baseline)")
    return [Row("sync", f"{name} MiB/s, {data['bucket_mb']:g} MiB buckets (higher better)", "clone()",
                clone["mib_per_s"], path["mib_per_s"]) for name, path in paths.items()]


def e2e_rows(data: dict[str, Any]) -> list[Row]:
    wanted = ("wall s per step", "start-up s", "training wall s", "peak RSS", "peak PSS", "val accuracy after",
              "val accuracy at equal wall time")
    rows = []
    for entry in data.get("table", []):
        if not entry["metric"].startswith(wanted):
            continue
        direction = "higher better" if entry["metric"].startswith("val") else "lower better"
        rows.append(Row("e2e vs TRL", f"{entry['metric']} ({direction})", "TRL GRPOTrainer", entry["trl"],
                        entry["rlsys"]))
    return rows


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    args: list[str] = field(default_factory=list)
    quick_args: list[str] = field(default_factory=list)
    rows: Callable[[dict[str, Any]], list[Row]] = reward_rows


BENCHES = (
    Bench("reward", "bench_reward.py", rows=reward_rows),
    Bench("actor", "bench_actor.py", quick_args=["--batch-size", "4", "--seq-len", "128", "--prompt-len", "32",
                                                 "--reps", "2"], rows=actor_rows),
    Bench("rollout", "bench_rollout.py", quick_args=["--models", "smollm2-135m-instruct", "--max-new-tokens", "32"],
          rows=rollout_rows),
    Bench("sync", "bench_sync.py", args=["--targets", "sglang,hf,megatron"],
          quick_args=["--repeats", "1", "--bucket-mb", "64"], rows=sync_rows),
    Bench("e2e_trl", "bench_e2e_trl.py",
          quick_args=["--steps", "2", "--prompts-per-step", "4", "--n-samples", "4", "--max-new-tokens", "32",
                      "--val-interval", "1", "--val-max-prompts", "16"],
          rows=e2e_rows),
)


# ---------------------------------------------------------------- running


@dataclass
class Outcome:
    bench: Bench
    command: list[str]
    log: Path
    seconds: float
    exit_code: int
    data: dict[str, Any] | None
    error: str | None = None

    def rows(self) -> list[Row]:
        if self.data is not None:
            try:
                return self.bench.rows(self.data)
            except (KeyError, TypeError, ValueError) as exc:
                self.error = f"unexpected JSON ({type(exc).__name__}: {exc}); see {self.log}"
        return [Row(self.bench.name, f"FAILED: {self.error}", "-", None, None)]


def run_bench(bench: Bench, results_dir: Path, *, quick: bool = False, python: str = sys.executable,
              extra_args: list[str] | None = None) -> Outcome:
    """Run one benchmark to completion; its output goes to ``<results_dir>/<name>.log``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path, log_path = results_dir / f"{bench.name}.json", results_dir / f"{bench.name}.log"
    json_path.unlink(missing_ok=True)
    command = [python, str(BENCH_DIR / bench.script), *bench.args, *(bench.quick_args if quick else []),
               *(extra_args or []), "--json", str(json_path)]
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        code = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - started
    if code != 0:
        return Outcome(bench, command, log_path, seconds, code, None, f"exit code {code}; log {log_path}")
    try:
        data = json.loads(json_path.read_text())
    except FileNotFoundError:
        return Outcome(bench, command, log_path, seconds, code, None, f"wrote no {json_path}; log {log_path}")
    except json.JSONDecodeError as exc:
        return Outcome(bench, command, log_path, seconds, code, None, f"{json_path}: invalid JSON ({exc})")
    return Outcome(bench, command, log_path, seconds, code, data)


# ---------------------------------------------------------------- the table


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if 0 < abs(value) < 0.001:
        return f"{value:.3g}"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def table_cells(rows: list[Row]) -> list[list[str]]:
    header = ["benchmark", "metric", "baseline", "rlsys", "ratio"]
    body = [[row.benchmark, row.metric,
             row.baseline if row.baseline_value is None else f"{row.baseline}: {_number(row.baseline_value)}",
             _number(row.rlsys), _number(row.ratio)] for row in rows]
    return [header, *body]


def format_table(rows: list[Row], markdown: bool = False) -> str:
    cells = table_cells(rows)
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells[1:]])
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    numeric = {3, 4}

    def render(line: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))

    return "\n".join([render(cells[0]), "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(render, cells[1:])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [bench.name for bench in BENCHES]
    parser.add_argument("--quick", action="store_true", help="small sizes (module doc)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(names)}")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "outputs" / "bench" / "run_all")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else names
    skipped = [name for name in args.skip.split(",") if name]
    unknown = sorted(set(chosen + skipped) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {names}")
    print("$ " + shlex.join(["bench/run_all.py", *(sys.argv[1:] if argv is None else argv)]), flush=True)

    outcomes = []
    for bench in BENCHES:
        if bench.name not in chosen or bench.name in skipped:
            continue
        print(f"[{bench.name}] running (log {args.results_dir / (bench.name + '.log')})", flush=True)
        outcome = run_bench(bench, args.results_dir, quick=args.quick)
        status = "ok" if outcome.error is None else f"FAILED: {outcome.error}"
        print(f"[{bench.name}] {outcome.seconds:.0f} s, {status}", flush=True)
        outcomes.append(outcome)

    rows = [row for outcome in outcomes for row in outcome.rows()]
    print()
    print(format_table(rows, markdown=args.markdown))
    summary = {
        "quick": args.quick,
        "benchmarks": [{"name": o.bench.name, "command": o.command, "seconds": o.seconds, "exit_code": o.exit_code,
                        "error": o.error, "log": str(o.log)} for o in outcomes],
        "rows": [row.__dict__ for row in rows],
    }
    (args.results_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
