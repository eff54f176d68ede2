"""Benchmark of the math reward against math-verify on the labelled cases.

Runs every case of ``tests/reward/cases.jsonl`` through ``rlsys.reward.pool.RewardPool`` and
through math-verify in the same run, then prints one table: accuracy, false-positive rate
(wrongly accepted / labelled wrong), false-negative rate (wrongly rejected / labelled right),
median, p95 and max seconds per case, timeouts, and the rlsys / math-verify ratio.

Fairness choices:

* math-verify runs with its defaults: ``parse(response)`` and ``verify(gold, prediction)``, its
  own signal-based timeouts on. The gold is parsed from the reference wrapped in ``\\boxed{}``
  (unless it already has a box), the usual way of feeding a raw reference to math-verify, since
  ``parse`` of a bare ``(1,2)`` or ``\\frac13`` finds nothing. With a list of references a case is
  accepted when any of them verifies.
* Both systems run in pebble process pools with the same hard per-case timeout, the same number
  of workers and the same address-space limit, so a hostile case that hangs math-verify counts
  as wrong instead of stalling the benchmark. Both pools warm their parsers before timing.
* Times are measured inside the worker around the check alone (no queueing, no process start);
  a timed-out case counts as the timeout. An rlsys response over ``MAX_RESPONSE_CHARS`` is
  refused in the parent and counts as 0 s.

Run from the repository root: ``.venv/bin/python bench/bench_reward.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from pebble import ProcessPool

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests" / "reward"))

from labelled_cases import LabelledCase, load_cases  # noqa: E402

from rlsys.config import RewardConfig  # noqa: E402
from rlsys.reward.pool import RewardPool, process_context  # noqa: E402


def _initialize_math_verify_worker(memory_limit_mb: int) -> None:
    """Same sandbox as the rlsys workers: plain SIGTERM, RLIMIT_AS, parser warmed up; quiet logs."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit_mb * 1024 * 1024, hard))
    # math-verify logs every internal timeout with the whole input, megabytes for hostile cases.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    _math_verify_case("\\boxed{\\frac{1}{2}}", "0.5")


def _math_verify_case(response: str, reference: str | list[str]) -> tuple[bool, float]:
    from math_verify import parse, verify

    started = time.perf_counter()
    references = [reference] if isinstance(reference, str) else reference
    prediction = parse(response)
    accepted = False
    for ref in references:
        gold = parse(ref if "\\boxed" in ref else "\\boxed{" + ref + "}")
        if verify(gold, prediction):
            accepted = True
            break
    return accepted, time.perf_counter() - started


def run_math_verify(cases: list[LabelledCase], timeout_s: float, workers: int, memory_limit_mb: int):
    verdicts, seconds, timeouts, crashes = [], [], 0, 0
    with ProcessPool(
        max_workers=workers,
        initializer=_initialize_math_verify_worker,
        initargs=(memory_limit_mb,),
        context=process_context(),
    ) as pool:
        futures = [pool.schedule(_math_verify_case, args=(c.response, c.reference), timeout=timeout_s) for c in cases]
        for future in futures:
            error = future.exception()
            if error is None:
                accepted, elapsed = future.result()
                verdicts.append(accepted)
                seconds.append(elapsed)
            else:
                verdicts.append(False)
                seconds.append(timeout_s)
                if isinstance(error, TimeoutError):
                    timeouts += 1
                else:
                    crashes += 1
    return verdicts, seconds, timeouts, crashes


def run_rlsys(cases: list[LabelledCase], timeout_s: float, workers: int, memory_limit_mb: int):
    config = RewardConfig(timeout_s=timeout_s, num_workers=workers, memory_limit_mb=memory_limit_mb)
    with RewardPool(config) as pool:
        result = pool.score_batch([c.response for c in cases], [c.reference for c in cases])
    return result.correct, result.durations_s, result.n_timeout, result.n_crash


def summarize(name: str, cases: list[LabelledCase], verdicts: list[bool], seconds: list[float], timeouts: int, crashes: int) -> dict:
    positives = sum(case.expected for case in cases)
    negatives = len(cases) - positives
    false_positives = sum(v and not c.expected for c, v in zip(cases, verdicts))
    false_negatives = sum(c.expected and not v for c, v in zip(cases, verdicts))
    ordered = sorted(seconds)
    return {
        "name": name,
        "accuracy": sum(v == c.expected for c, v in zip(cases, verdicts)) / len(cases),
        "fp_rate": false_positives / negatives if negatives else 0.0,
        "fn_rate": false_negatives / positives if positives else 0.0,
        "false_positives": false_positives,
        "false_negatives": false_negatives,
        "median_ms": statistics.median(ordered) * 1000,
        "p95_ms": ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))] * 1000,
        "max_ms": ordered[-1] * 1000,
        "timeouts": timeouts,
        "crashes": crashes,
    }


def print_table(rows: list[dict]) -> None:
    header = f"{'system':<12} {'accuracy':>9} {'FP rate':>8} {'FN rate':>8} {'FP':>4} {'FN':>4} {'median ms':>10} {'p95 ms':>9} {'max ms':>9} {'timeouts':>9} {'crashes':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['name']:<12} {row['accuracy']:>9.2%} {row['fp_rate']:>8.2%} {row['fn_rate']:>8.2%} "
            f"{row['false_positives']:>4} {row['false_negatives']:>4} {row['median_ms']:>10.1f} {row['p95_ms']:>9.1f} "
            f"{row['max_ms']:>9.1f} {row['timeouts']:>9} {row['crashes']:>8}"
        )
    ours, theirs = rows
    ratios = {key: (ours[key] / theirs[key] if theirs[key] else float("nan")) for key in ("accuracy", "median_ms", "p95_ms", "max_ms")}
    print(
        f"{'ratio':<12} {ratios['accuracy']:>9.3f} {'':>8} {'':>8} {'':>4} {'':>4} {ratios['median_ms']:>10.2f} "
        f"{ratios['p95_ms']:>9.2f} {ratios['max_ms']:>9.2f}"
    )


def print_categories(cases: list[LabelledCase], ours: list[bool], theirs: list[bool]) -> None:
    totals = Counter(case.category for case in cases)
    our_right = Counter(c.category for c, v in zip(cases, ours) if v == c.expected)
    their_right = Counter(c.category for c, v in zip(cases, theirs) if v == c.expected)
    print(f"{'category':<22} {'cases':>5} {'rlsys':>6} {'math-verify':>12}")
    for category in sorted(totals):
        print(f"{category:<22} {totals[category]:>5} {our_right[category]:>6} {their_right[category]:>12}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-s", type=float, default=5.0, help="hard timeout per case, both systems")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes, both systems")
    parser.add_argument("--memory-limit-mb", type=int, default=2048, help="RLIMIT_AS of every worker")
    parser.add_argument("--show-disagreements", action="store_true", help="list the cases the two systems judge differently")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    args = parser.parse_args()

    interpreter = os.path.relpath(sys.executable, Path.cwd()) if sys.executable.startswith(str(Path.cwd())) else sys.executable
    print("$ " + shlex.join([interpreter, *sys.argv]))
    cases = load_cases()
    positives = sum(case.expected for case in cases)
    print(
        f"{len(cases)} labelled cases ({positives} labelled right, {len(cases) - positives} labelled wrong); "
        f"timeout {args.timeout_s}s, {args.workers} workers, RLIMIT_AS {args.memory_limit_mb} MB"
    )

    started = time.monotonic()
    ours = run_rlsys(cases, args.timeout_s, args.workers, args.memory_limit_mb)
    our_wall = time.monotonic() - started
    started = time.monotonic()
    theirs = run_math_verify(cases, args.timeout_s, args.workers, args.memory_limit_mb)
    their_wall = time.monotonic() - started

    rows = [summarize("rlsys", cases, *ours), summarize("math-verify", cases, *theirs)]
    print()
    print_table(rows)
    print(f"\nwall time: rlsys {our_wall:.1f}s, math-verify {their_wall:.1f}s")
    print()
    print_categories(cases, ours[0], theirs[0])
    if args.show_disagreements:
        print()
        for case, our_verdict, their_verdict in zip(cases, ours[0], theirs[0]):
            if our_verdict != their_verdict:
                print(f"{case.label}: expected {case.expected}, rlsys {our_verdict}, math-verify {their_verdict}")
    over_timeout = sum(seconds >= args.timeout_s for seconds in ours[1])
    print(f"\nrlsys cases at or over the timeout: {over_timeout}")
    if args.json:
        args.json.write_text(json.dumps({"bench": "reward", "cases": len(cases), "systems": rows,
                                         "wall_s": {"rlsys": our_wall, "math-verify": their_wall}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
