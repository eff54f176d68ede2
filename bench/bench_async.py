"""Asynchronous GRPO against the synchronous loop, on the CPU default, disaggregated.

    .venv/bin/python bench/bench_async.py [--steps 4] [--etas 0,1,2] [--json]

Each setting runs ``rlsys train smollm2-135m-grpo-cpu`` in a subprocess of its own, one after the
other, with the actor on one core and the SGLang engine on the other
(``cluster.placement=disaggregated cluster.devices_per_node=2 cluster.rollout_devices=1``), the same
steps, seed and data. ``rollout.max_staleness = 0`` is the baseline; the others add partial
rollout (``rollout.partial_rollout_tokens``) and token-level TIS. From each run's event files:

- wall s per step: the mean of ``time/step`` over the steps after the first (the first waits for a
  whole batch in every mode);
- idle shares over those steps: the actor is idle when it neither trains nor syncs
  (``1 - (time/train + time/sync) / time/step``); the engine when it does not generate
  (``1 - time/generation / time/step``, the generation time of the batches those steps took);
- validation accuracy (greedy, the 64 shipped problems) after the same number of steps, and at
  equal wall time: each run's latest validation done by the time the fastest run finished,
  wall time being the sum of ``time/step`` (validation itself excluded).
Ratios are setting / synchronous.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--etas", default="0,1,2", help="max_staleness values; 0 (the baseline) is always run")
    parser.add_argument("--partial-tokens", type=int, default=8, help="rollout.partial_rollout_tokens when eta > 0")
    parser.add_argument("--val-interval", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs" / "bench" / "async")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    return parser.parse_args(argv)


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of a run's event files (``rlsys plot``'s reader)."""
    from rlsys.plot import read_scalars as read_run

    return {tag: dict(points) for tag, points in read_run(run_dir).items()}


def run_setting(eta: int, args: argparse.Namespace) -> dict[str, Any]:
    output = args.output_dir / f"eta{eta}"
    overrides = [
        "cluster.placement=disaggregated", "cluster.devices_per_node=2", "cluster.rollout_devices=1",
        f"rollout.max_staleness={eta}", f"runner.total_steps={args.steps}", f"runner.val_interval={args.val_interval}",
        "runner.save_interval=0", "runner.resume=false", "runner.progress_bar=false", f"runner.output_dir={output}",
    ]
    if eta > 0:
        overrides += [f"rollout.partial_rollout_tokens={args.partial_tokens}", "algorithm.off_policy_correction=tis"]
    overrides += args.overrides
    log = args.output_dir / f"eta{eta}.log"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as handle:
        code = subprocess.run([sys.executable, "-m", "rlsys", "train", "smollm2-135m-grpo-cpu", *overrides],
                              cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, timeout=7200).returncode
    if code != 0:
        raise RuntimeError(f"eta={eta}: rlsys train exited {code}; see {log}")
    return summarize_run(eta, read_scalars(output), time.monotonic() - started)


def summarize_run(eta: int, scalars: dict[str, dict[int, float]], process_s: float) -> dict[str, Any]:
    steps = sorted(scalars["time/step"])
    later = steps[1:] or steps

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    step_s = [scalars["time/step"][s] for s in later]
    busy = [scalars["time/train"][s] + scalars.get("time/sync", {}).get(s, 0.0) for s in later]
    generating = [scalars["time/generation"][s] for s in later]
    wall, elapsed = {0: 0.0}, 0.0
    for s in steps:
        elapsed += scalars["time/step"][s]
        wall[s] = elapsed
    validations = [{"step": s, "wall_s": wall[s], "accuracy": value}
                   for s, value in sorted(scalars.get("val/accuracy", {}).items())]
    return {
        "eta": eta,
        "steps": len(steps),
        "step_s": mean(step_s),
        "actor_idle": 1 - sum(busy) / sum(step_s),
        "engine_idle": max(0.0, 1 - sum(generating) / sum(step_s)),
        "staleness_max": max(scalars["rollout/staleness_max"].values()),
        "partial_fraction": mean(list(scalars["rollout/partial_fraction"].values())),
        "dropped_stale": sum(scalars["rollout/dropped_stale"].values()),
        "validations": validations,
        "training_wall_s": elapsed,
        "process_s": process_s,
    }


def accuracy_by(run: dict[str, Any], wall_s: float) -> float | None:
    done = [v for v in run["validations"] if v["wall_s"] <= wall_s + 1e-9]
    return done[-1]["accuracy"] if done else None


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = next(r for r in runs if r["eta"] == 0)
    equal_wall = min(r["training_wall_s"] for r in runs)
    rows = []
    for run in runs:
        final = run["validations"][-1]["accuracy"] if run["validations"] else None
        base_final = base["validations"][-1]["accuracy"] if base["validations"] else None
        at_wall, base_at_wall = accuracy_by(run, equal_wall), accuracy_by(base, equal_wall)
        rows.append({
            "eta": run["eta"], "step_s": run["step_s"], "step_ratio": run["step_s"] / base["step_s"],
            "actor_idle": run["actor_idle"], "engine_idle": run["engine_idle"],
            "staleness_max": run["staleness_max"], "partial_fraction": run["partial_fraction"],
            "val_after_steps": final, "val_ratio": final / base_final if final is not None and base_final else None,
            "equal_wall_s": equal_wall, "val_at_equal_wall": at_wall,
            "val_at_equal_wall_ratio": at_wall / base_at_wall if at_wall is not None and base_at_wall else None,
        })
    return rows


def markdown(rows: list[dict[str, Any]], steps: int) -> str:
    def cell(value: Any, digits: int = 2) -> str:
        return "n/a" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    lines = [f"| max_staleness | wall s per step | ratio | actor idle | engine idle | staleness max | "
             f"partial responses | val after {steps} steps | val at {cell(rows[0]['equal_wall_s'], 0)} s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['eta']} | {cell(r['step_s'], 1)} | {cell(r['step_ratio'])} | {cell(r['actor_idle'])} | "
                     f"{cell(r['engine_idle'])} | {cell(r['staleness_max'], 0)} | {cell(r['partial_fraction'])} | "
                     f"{cell(r['val_after_steps'], 3)} | {cell(r['val_at_equal_wall'], 3)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    etas = sorted({0, *(int(e) for e in args.etas.split(","))})
    runs = []
    for eta in etas:
        print(f"[bench_async] max_staleness={eta} ...", file=sys.stderr, flush=True)
        runs.append(run_setting(eta, args))
    rows = table(runs)
    result = {"steps": args.steps, "partial_tokens": args.partial_tokens, "runs": runs, "table": rows,
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    (args.output_dir / "bench_async.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1) if args.json else markdown(rows, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
