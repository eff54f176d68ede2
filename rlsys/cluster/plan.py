"""``rlsys plan CONFIG [key=value ...] [--simulate] [--json FILE]``: where a run's workers go, how
weights flow, and whether each phase fits a GPU, known on a laptop before a cluster queue.

- Without ``--simulate`` the placement is arithmetic: device ``d`` is GPU ``d % devices_per_node``
  of node ``d // devices_per_node``, exactly the order a real run sorts its bundles into.
- ``--simulate`` starts a Ray cluster of the config's nodes x GPUs on this machine (declared GPUs,
  ``ray.cluster_utils.Cluster``), and places dry-run workers with the real start-up code
  (``Cluster.start(dry_run=True)``): the table then shows what the workers themselves reported,
  and the routes who really called each engine in a (weightless) sync.
- The memory estimate is ``rlsys.cluster.memory``; a phase that does not fit
  ``cluster.gpu_memory_gib`` is a warning, and ``fits`` is false. The command still exits 0: the
  plan is a report; ``rlsys train`` is what refuses to start.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command's own imports wait for it to run: ``rlsys --help`` stays instant
    from rlsys.cluster.placement import Layout
    from rlsys.config import RunConfig


def arithmetic_plan(run: RunConfig) -> dict[str, Any]:
    from rlsys.cluster.groups import resolve_transport
    from rlsys.cluster.placement import Device, Layout, check_devices
    from rlsys.cluster.routes import actor_coordinates, sync_routes

    layout = Layout.of(run)
    per_node = run.cluster.devices_per_node
    devices = [Device(index=d, bundle=d, node_id=f"node{d // per_node}", node_ip=f"<node {d // per_node}>",
                      node_rank=d // per_node, gpu=d % per_node) for d in range(layout.total_devices)]
    check_devices(devices, layout)
    routes = sync_routes(layout, devices, resolve_transport(run), run.sync.master_address)
    ranks = []
    for rank in layout.actor_devices:
        c = actor_coordinates(rank, layout.actor_ranks, run.actor.tp, run.actor.pp)
        ranks.append({"rank": rank, "node": devices[rank].node_rank, "gpu": devices[rank].gpu,
                      "tp_rank": c.tp_rank, "pp_rank": c.pp_rank, "dp_rank": c.dp_rank})
    return _assemble(run, layout, ranks, routes, called_by=None)


def simulated_plan(run: RunConfig) -> dict[str, Any]:
    """The placement reported by dry-run workers on a simulated cluster (see the top)."""
    import dataclasses

    import ray
    from ray.cluster_utils import Cluster as SimulatedCluster

    from rlsys.cluster.groups import Cluster

    per_node = run.cluster.devices_per_node
    gpus = per_node if run.cluster.device == "cuda" else 0
    simulated = SimulatedCluster(initialize_head=True, head_node_args={
        "num_cpus": per_node, "num_gpus": gpus, "include_dashboard": False})
    try:
        for _ in range(run.cluster.num_nodes - 1):
            simulated.add_node(num_cpus=per_node, num_gpus=gpus)
        simulated.wait_for_nodes()
        ray.init(address=simulated.address, logging_level="ERROR", log_to_driver=False)
        run = dataclasses.replace(run, cluster=dataclasses.replace(run.cluster, ray_address="auto"))
        cluster = Cluster.start(run, str(run.model.path), dry_run=True)
        try:
            cluster.actor.sync_weights()
            engines = cluster.engine_status()
        finally:
            cluster.shutdown()
    finally:
        ray.shutdown()
        simulated.shutdown()
    ranks = [{"rank": r["rank"], "node": r["node_rank"], "gpu": r["gpu"], "tp_rank": r["tp_rank"],
              "pp_rank": r["pp_rank"], "dp_rank": r["dp_rank"], "master": r["master"]}
             for r in cluster.actor_ranks]
    called_by = [[sender["rank"] for sender in engine["weights_from"]] for engine in engines]
    return _assemble(run, cluster.layout, ranks, cluster.routes, called_by)


def _assemble(run: RunConfig, layout: Layout, ranks: list[dict[str, Any]], routes: list[Any],
              called_by: list[list[int]] | None) -> dict[str, Any]:
    from rlsys.cluster.memory import estimate_memory

    memory = estimate_memory(run)
    engines = []
    for route in routes:
        entry = {"engine": route.engine, "node": route.node_rank, "gpus": list(route.gpus),
                 "sync_from": list(route.sources), "transport": route.transport}
        if route.master_address is not None:
            entry["master_address"] = route.master_address
        if called_by is not None:
            entry["called_by"] = called_by[route.engine]
        engines.append(entry)
    return {
        "config": run.runner.experiment_name, "placement": layout.placement, "device": layout.device,
        "nodes": layout.num_nodes, "gpus_per_node": layout.devices_per_node,
        "actor": {"tp": run.actor.tp, "pp": run.actor.pp, "dp": layout.actor_ranks // (run.actor.tp * run.actor.pp)},
        "rollout_tp": layout.engine_tp, "simulated": called_by is not None,
        "actor_ranks": ranks, "engines": engines, **memory.to_json(), "warnings": memory.warnings,
    }


def render(plan: dict[str, Any]) -> str:
    actor = plan["actor"]
    lines = [f"{plan['config']}: {plan['nodes']} node(s) x {plan['gpus_per_node']} {plan['device']} device(s), "
             f"{plan['placement']}; actor TP{actor['tp']} x PP{actor['pp']} x DP{actor['dp']}, "
             f"{len(plan['engines'])} engine(s) of TP{plan['rollout_tp']}"
             + (" (placed on a simulated cluster)" if plan["simulated"] else ""), "",
             "node  gpu  actor rank (tp, pp, dp)  engine (tp rank)"]
    engine_at = {(e["node"], gpu): (e["engine"], i) for e in plan["engines"] for i, gpu in enumerate(e["gpus"])}
    rank_at = {(r["node"], r["gpu"]): r for r in plan["actor_ranks"]}
    for node, gpu in sorted(set(engine_at) | set(rank_at)):
        r = rank_at.get((node, gpu))
        actor_cell = f"{r['rank']:>4} ({r['tp_rank']}, {r['pp_rank']}, {r['dp_rank']})" if r else "-"
        e = engine_at.get((node, gpu))
        lines.append(f"{node:>4}  {gpu:>3}  {actor_cell:<23}  {f'{e[0]} ({e[1]})' if e else '-'}")
    lines += ["", "weight sync: engine <- actor ranks (transport)"]
    for e in plan["engines"]:
        extra = f", master {e['master_address']}" if "master_address" in e else ""
        called = f"; called by rank {e['called_by']}" if "called_by" in e else ""
        lines.append(f"  engine {e['engine']:>2} on node {e['node']} GPUs {e['gpus']} <- {e['sync_from']} "
                     f"({e['transport']}{extra}){called}")
    lines += ["", f"memory per GPU (GiB, of {plan['gpu_memory_gib']:g}):"]
    for phase, components in plan["memory_per_gpu_gib"].items():
        parts = ", ".join(f"{name} {gib:.1f}" for name, gib in components.items() if gib)
        lines.append(f"  {phase:<9} {sum(components.values()):6.1f}  ({parts})")
    lines.append("fits: yes" if plan["fits"] else "fits: NO")
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rlsys.cli import add_config_args

    plan = sub.add_parser(
        "plan", help="placement table, weight-sync routes and per-GPU memory of a config, without a GPU",
        description="Show where every actor rank and rollout engine of CONFIG goes (node, GPU, TP/PP/DP "
                    "coordinates), which actor ranks feed which engine, and a per-GPU memory estimate of the "
                    "rollout and training phases against cluster.gpu_memory_gib.",
    )
    add_config_args(plan)
    plan.add_argument("--simulate", action="store_true",
                      help="place dry-run workers with the real start-up code on a Ray cluster of the config's "
                           "nodes x GPUs simulated on this machine (declared GPUs; a 4 x 8 plan takes about a minute)")
    plan.add_argument("--json", metavar="FILE", default=None, help="also write the plan as JSON to FILE")
    plan.set_defaults(handler=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from rlsys.cluster.placement import ClusterError
    from rlsys.config import load_config

    run = load_config(args.config, args.overrides)
    try:
        plan = simulated_plan(run) if args.simulate else arithmetic_plan(run)
    except ClusterError as error:
        print(f"rlsys plan: {error}", file=sys.stderr)
        return 2
    print(render(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=2) + "\n")
    return 0
