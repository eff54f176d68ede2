"""Risk: a user learns that a layout is wrong only after a cluster queue. ``rlsys plan`` must show
the real placement, routes and memory of a config on a CPU machine, and say when it cannot fit."""

from __future__ import annotations

import json
import subprocess
import sys

from rlsys.config import REPO_ROOT


def _plan(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "plan.json"
    done = subprocess.run([sys.executable, "-m", "rlsys", "plan", *args, "--json", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done, json.loads(out.read_text())


def _check_layout(plan: dict, ranks: int, tp: int, engines: int, engine_gpus: int) -> None:
    assert len(plan["actor_ranks"]) == ranks
    assert [r["tp_rank"] for r in plan["actor_ranks"]] == [i % tp for i in range(ranks)]
    assert {k for r in plan["actor_ranks"] for k in r} >= {"rank", "node", "gpu", "tp_rank", "pp_rank", "dp_rank"}
    assert len(plan["engines"]) == engines and all(len(e["gpus"]) == engine_gpus for e in plan["engines"])
    assert {k for e in plan["engines"] for k in e} >= {"engine", "node", "gpus", "sync_from", "transport"}
    assert set(plan["memory_per_gpu_gib"]) == {"rollout", "training"} and plan["gpu_memory_gib"] == 80
    assert plan["fits"] is True


def test_plan_of_the_7b_recipe_on_a_simulated_4x8_cluster(tmp_path):
    done, plan = _plan(tmp_path, "qwen2.5-7b-grpo-megatron", "--simulate")
    _check_layout(plan, ranks=32, tp=4, engines=16, engine_gpus=2)
    assert plan["simulated"] and all(e["called_by"] == e["sync_from"][:1] for e in plan["engines"])
    assert "placed on a simulated cluster" in done.stdout and "fits: yes" in done.stdout
    # The arithmetic plan agrees with what the simulated workers reported.
    _, arithmetic = _plan(tmp_path, "qwen2.5-7b-grpo-megatron")
    strip = lambda ranks: [{k: v for k, v in r.items() if k != "master"} for r in ranks]  # noqa: E731
    assert strip(arithmetic["actor_ranks"]) == strip(plan["actor_ranks"])
    assert [e["sync_from"] for e in arithmetic["engines"]] == [e["sync_from"] for e in plan["engines"]]


def test_plan_of_the_1_5b_recipe(tmp_path):
    _, plan = _plan(tmp_path, "qwen2.5-1.5b-grpo-megatron")
    _check_layout(plan, ranks=16, tp=2, engines=16, engine_gpus=1)


def test_a_layout_that_cannot_fit_warns_and_says_so(tmp_path):
    done, plan = _plan(tmp_path, "qwen2.5-7b-grpo-megatron", "cluster.gpu_memory_gib=24", "actor.offload=false")
    assert plan["fits"] is False and plan["warnings"]
    assert "fits: NO" in done.stdout and "warning: training: needs" in done.stdout


def test_a_bad_layout_is_a_config_error_naming_the_field(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rlsys", "plan", "qwen2.5-7b-grpo-megatron", "rollout.tp=3"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "rollout.tp" in done.stderr
