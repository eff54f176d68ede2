"""bench/run_all.py: the one-table summary is assembled from what the benchmarks really wrote.

Risks: a row that does not match the benchmark's JSON (wrong field, wrong baseline, ratio
upside down); a failing benchmark that vanishes from the table or stops the others; the
equal-wall-time pick of the TRL comparison choosing a validation from after the matched time.
The reward benchmark is the only one run here (about 20 s with a 1 s per-case timeout).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH_DIR))

import bench_e2e_trl  # noqa: E402
import run_all  # noqa: E402

REWARD = next(bench for bench in run_all.BENCHES if bench.name == "reward")


@pytest.fixture(scope="module")
def reward_outcome(tmp_path_factory: pytest.TempPathFactory) -> run_all.Outcome:
    results_dir = tmp_path_factory.mktemp("run_all")
    return run_all.run_bench(REWARD, results_dir, extra_args=["--timeout-s", "1"])


def test_reward_rows_come_from_the_benchmark_json(reward_outcome: run_all.Outcome) -> None:
    assert reward_outcome.error is None, reward_outcome.log.read_text()[-2000:]
    written = json.loads((reward_outcome.log.parent / "reward.json").read_text())
    systems = {system["name"]: system for system in written["systems"]}
    rows = {row.metric.split(" (")[0]: row for row in reward_outcome.rows()}

    accuracy = rows[f"accuracy on {written['cases']} labelled cases"]
    assert accuracy.baseline == "math-verify"
    assert accuracy.rlsys == systems["rlsys"]["accuracy"]
    assert accuracy.baseline_value == systems["math-verify"]["accuracy"]
    assert accuracy.ratio == pytest.approx(systems["rlsys"]["accuracy"] / systems["math-verify"]["accuracy"])
    median = rows["median ms per case"]
    assert (median.rlsys, median.baseline_value) == (systems["rlsys"]["median_ms"], systems["math-verify"]["median_ms"])
    wall = rows[f"wall s for all {written['cases']} cases"]
    assert wall.ratio == pytest.approx(written["wall_s"]["rlsys"] / written["wall_s"]["math-verify"])

    table = run_all.format_table(reward_outcome.rows())
    header, rule, *body = table.splitlines()
    assert header.split() == ["benchmark", "metric", "baseline", "rlsys", "ratio"]
    assert len(body) == len(rows)
    assert all(line.startswith("reward") and "math-verify: " in line for line in body)
    markdown = run_all.format_table(reward_outcome.rows(), markdown=True).splitlines()
    assert markdown[0] == "| benchmark | metric | baseline | rlsys | ratio |"
    assert len(markdown) == 2 + len(rows)


def test_a_failing_benchmark_gets_a_row_naming_its_log(tmp_path: Path) -> None:
    outcome = run_all.run_bench(REWARD, tmp_path, extra_args=["--no-such-flag"])
    assert outcome.exit_code == 2
    [row] = outcome.rows()
    assert row.metric.startswith("FAILED: exit code 2") and str(outcome.log) in row.metric
    assert "unrecognized arguments: --no-such-flag" in outcome.log.read_text()
    assert "FAILED" in run_all.format_table([row])


def test_unknown_benchmark_names_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--only", "reward,nonesuch"])
    assert "nonesuch" in capsys.readouterr().err


def _record(system: str, vals: list[tuple[int, float, float]], train_s: float) -> dict:
    steps = [{"step": s, "step_s": 10.0, "rollout": 5.0, "reward": 1.0, "train": 3.0, "sync": 1.0}
             for s in range(1, 5)]
    return {"system": system, "startup_s": 30.0, "train_s": train_s, "peak_rss_bytes": 2**30,
            "peak_pss_bytes": 2**29, "peak_processes": 3, "steps": steps,
            "val": [{"step": s, "reward": r, "accuracy": (r + 5) / 10, "train_s": t} for s, r, t in vals]}


def test_equal_wall_time_takes_the_latest_validation_done_by_then() -> None:
    rlsys = _record("rlsys", [(0, -4.0, 30.0), (2, -3.0, 50.0), (4, -2.0, 70.0)], train_s=70.0)
    # TRL trained on past step 4 to reach rlsys' 70 s; its step-6 validation came after that time.
    trl = _record("trl", [(0, -4.5, 10.0), (2, -4.0, 30.0), (4, -3.5, 50.0), (5, -3.0, 69.5), (6, -2.5, 80.0)],
                  train_s=50.0)
    assert bench_e2e_trl.val_by_time(trl, 70.0)["step"] == 5
    assert bench_e2e_trl.val_by_time(trl, 5.0) is None
    rows = {row["metric"]: row for row in bench_e2e_trl.summarize(rlsys, trl, steps=4)}
    equal = rows["val reward at equal wall time 70 s (TRL step 5)"]
    assert (equal["rlsys"], equal["trl"]) == (-2.0, -3.0)
    assert rows["val reward after 4 steps"]["trl"] == -3.5
    assert rows["training wall s for 4 steps (start-up included)"]["ratio"] == pytest.approx(70.0 / 50.0)
    assert rows["sync s per step"]["trl"] is None and rows["sync s per step"]["ratio"] is None

    e2e = run_all.e2e_rows({"table": bench_e2e_trl.summarize(rlsys, trl, steps=4)})
    assert all(row.baseline == "TRL GRPOTrainer" for row in e2e)
    assert any(row.metric.startswith("val accuracy at equal wall time") and row.rlsys == 0.3 for row in e2e)


def test_async_benchmark_idle_shares_and_equal_wall_time_from_event_scalars() -> None:
    """bench_async's figures by hand: step 1 is left out of the means; wall time sums time/step."""
    import bench_async

    def scalars(step_s: list[float], train: list[float], generation: list[float], val: dict[int, float]):
        steps = range(1, len(step_s) + 1)
        return {"time/step": dict(zip(steps, step_s)), "time/train": dict(zip(steps, train)),
                "time/sync": {s: 1.0 for s in steps}, "time/generation": dict(zip(steps, generation)),
                "rollout/staleness_max": {s: 0.0 for s in steps}, "rollout/partial_fraction": {s: 0.0 for s in steps},
                "rollout/dropped_stale": {s: 0.0 for s in steps}, "val/accuracy": val}

    sync = bench_async.summarize_run(0, scalars([30, 20, 20, 20], [9, 9, 9, 9], [20, 10, 10, 10],
                                                {0: 0.3, 2: 0.4, 4: 0.5}), 100.0)
    overlapped = bench_async.summarize_run(1, scalars([30, 10, 10, 10], [9, 9, 9, 9], [20, 10, 9, 10],
                                                      {0: 0.3, 2: 0.45, 4: 0.5}), 70.0)
    assert sync["step_s"] == 20 and overlapped["step_s"] == 10
    assert sync["actor_idle"] == pytest.approx(0.5) and overlapped["actor_idle"] == pytest.approx(0.0)
    assert sync["engine_idle"] == pytest.approx(0.5) and overlapped["engine_idle"] == pytest.approx(1 / 30)
    rows = {row["eta"]: row for row in bench_async.table([sync, overlapped])}
    assert rows[1]["step_ratio"] == 0.5 and rows[1]["val_ratio"] == 1.0
    # Equal wall time is the overlapped run's 60 s: its step-4 value, against sync's step 2 (50 s).
    assert rows[1]["equal_wall_s"] == 60 and rows[1]["val_at_equal_wall"] == 0.5
    assert rows[0]["val_at_equal_wall"] == 0.4 and rows[1]["val_at_equal_wall_ratio"] == pytest.approx(1.25)
