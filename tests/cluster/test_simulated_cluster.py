"""Risk: the GPU-cluster path fails, hangs or misplaces workers on a real cluster, where nobody can
try it before a queue wait. Every shipped GPU config is placed here, by the real placement code,
on a Ray cluster of 4 simulated nodes x 8 declared GPUs (``ray.cluster_utils.Cluster``; nothing
CUDA runs), with the workers in dry-run mode: they decide everything a real run decides (node,
GPU, parallel coordinates, process-group address, engine arguments, who feeds which engine, and
the engine calls of a sync) and build nothing."""

from __future__ import annotations

import time

import pytest

from rlsys.cluster.placement import ClusterError, Layout, order_devices
from rlsys.cluster.routes import actor_coordinates, sync_routes
from rlsys.config import available_configs, load_config

NODES, GPUS = 4, 8
GPU_CONFIGS = [name for name in available_configs() if load_config(name).cluster.device == "cuda"]


@pytest.fixture(scope="module")
def simulated_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": GPUS, "num_gpus": GPUS,
                                                            "include_dashboard": False})
    for _ in range(NODES - 1):
        cluster.add_node(num_cpus=GPUS, num_gpus=GPUS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _place(name: str, *overrides: str):
    from rlsys.cluster.groups import Cluster

    run = load_config(name, ["cluster.ray_address=auto", *overrides])
    started = time.monotonic()
    cluster = Cluster.start(run, "/models/not-read-in-a-dry-run", dry_run=True)
    try:
        cluster.actor.sync_weights()
        return run, cluster, cluster.engine_status(), time.monotonic() - started
    finally:
        cluster.shutdown()


def test_the_shipped_gpu_configs_are_the_ones_the_issue_names():
    assert {"qwen2.5-1.5b-grpo-megatron", "qwen2.5-7b-grpo-megatron"} <= set(GPU_CONFIGS)


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_every_gpu_config_places_on_its_cluster_shape(simulated_cluster, name):
    run, cluster, engines, seconds = _place(name)
    assert seconds < 60, f"placing {name} took {seconds:.0f}s"
    layout, ranks = cluster.layout, cluster.actor_ranks
    tp, dp = run.actor.tp, layout.actor_ranks // (run.actor.tp * run.actor.pp)

    # Every actor rank at a distinct (node, GPU), and it is the GPU Ray gave the worker.
    assert len(ranks) == run.cluster.total_devices
    assert len({(r["node_id"], r["gpu"]) for r in ranks}) == len(ranks)
    assert all(r["ray_node_id"] == r["node_id"] for r in ranks)
    # Megatron's coordinates; every TP group inside one node; one master address for all.
    assert [(r["tp_rank"], r["dp_rank"]) for r in ranks] == [(i % tp, (i // tp) % dp) for i in range(len(ranks))]
    for first in range(0, len(ranks), tp):
        assert len({r["node_id"] for r in ranks[first:first + tp]}) == 1
    assert len({r["master"] for r in ranks}) == 1 and ranks[0]["master"].startswith(ranks[0]["node_ip"])

    assert len(engines) == layout.num_engines == run.cluster.total_devices // run.rollout.tp
    by_device = {(r["node_id"], r["gpu"]): r["rank"] for r in ranks}
    for index, (engine, route) in enumerate(zip(engines, cluster.routes)):
        gpus = [d["gpu"] for d in engine["devices"]]
        nodes = {d["node_id"] for d in engine["devices"]}
        # A TP engine's GPUs: one node, consecutive, starting at SGLang's base_gpu_id.
        assert len(nodes) == 1 and gpus == list(range(gpus[0], gpus[0] + run.rollout.tp))
        assert engine["engine_args"]["base_gpu_id"] == gpus[0] and engine["engine_args"]["tp_size"] == run.rollout.tp
        assert engine["ray_gpus"] == [gpus[0]] and engine["node_id"] in nodes
        # Colocated: the engine shares its GPUs with exactly the actor ranks that feed it.
        assert list(route.sources) == [by_device[(engine["node_id"], g)] for g in gpus]
        # The engine was called by its own route's lead, a rank on its own node.
        assert engine["weights_from"] == [{"rank": route.lead, "node_id": engine["node_id"]}], index
    assert sorted(r for route in cluster.routes for r in route.sources) == list(range(len(ranks)))
    if name == "qwen2.5-7b-grpo-megatron":
        # The 7B recipe in numbers (checked here: placing it again costs a minute on 2 cores):
        # all four nodes, a TP4 actor, 16 TP2 engines, engines on every node the actor uses.
        assert len(ranks) == 32 and {r["tp_rank"] for r in ranks} == {0, 1, 2, 3}
        assert len({r["node_id"] for r in ranks}) == NODES
        assert len(engines) == 16 and all(len(e["devices"]) == 2 for e in engines)
        assert {e["node_id"] for e in engines} == {r["node_id"] for r in ranks}


def test_colocated_workers_share_a_bundle_without_hanging(simulated_cluster):
    # Regression: an actor rank and an engine that ask for half a GPU and no CPU share in a
    # {"GPU": 1, "CPU": 1} bundle: the second never scheduled and start-up waited forever.
    _, cluster, engines, seconds = _place("qwen2.5-1.5b-grpo-megatron", "cluster.num_nodes=1",
                                          "cluster.devices_per_node=2", "actor.tp=1", "actor.sequence_parallel=false",
                                          "actor.n_minibatches=1",
                                          "cluster.start_timeout_s=60")
    assert len(engines) == 2 and len(cluster.actor_ranks) == 2 and seconds < 60


def test_a_cluster_too_small_fails_at_once_naming_the_fields(simulated_cluster):
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"needs 64 GPU .*cluster.num_nodes"):
        _place("qwen2.5-7b-grpo-megatron", "cluster.num_nodes=8")
    assert time.monotonic() - started < 10


def test_nodes_of_another_shape_fail_naming_the_fields(simulated_cluster):
    # 4 x 4 GPUs asked, Ray packs the 16 bundles onto 2 of the 8-GPU nodes.
    with pytest.raises(ClusterError, match=r"cluster.num_nodes=4 x cluster.devices_per_node=4 .* node 0: 8, node 1: 8"):
        _place("qwen2.5-7b-grpo-megatron", "cluster.devices_per_node=4", "actor.n_minibatches=1",
               "runner.prompts_per_step=8")


def test_a_placement_that_cannot_be_met_fails_within_the_start_timeout(simulated_cluster):
    started = time.monotonic()
    # 16 GPUs on one node: the cluster has 32 GPUs, but no node has 16.
    with pytest.raises(ClusterError, match=r"could not place 16 .*cluster.start_timeout_s"):
        _place("qwen2.5-1.5b-grpo-megatron", "cluster.num_nodes=1", "cluster.devices_per_node=16",
               "cluster.start_timeout_s=3")
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------- the pure parts, without Ray


def _measured_4x8_bundles():
    """The bundle -> node order Ray gave a PACK group of 32 on 4 x 8 (measured): N0 | N1 x8 | N0 x7 |
    N2 | N3 x8 | N2 x7, with GPU ids in arrival order per node."""
    nodes = ["N0"] + ["N1"] * 8 + ["N0"] * 7 + ["N2"] + ["N3"] * 8 + ["N2"] * 7
    seen: dict[str, int] = {}
    where = []
    for node in nodes:
        where.append((node, "10.0.0." + node[1], seen.get(node, 0)))
        seen[node] = seen.get(node, 0) + 1
    return where


def test_bundles_are_ordered_node_major_whatever_order_ray_gave():
    run = load_config("qwen2.5-7b-grpo-megatron")
    devices = order_devices(_measured_4x8_bundles(), Layout.of(run))
    assert [(d.node_rank, d.gpu) for d in devices] == [(n, g) for n in range(4) for g in range(8)]
    assert [d.bundle for d in devices[:9]] == [0, 9, 10, 11, 12, 13, 14, 15, 1]


def test_routes_feed_each_engine_from_its_own_gpus_and_disaggregated_from_its_node():
    run = load_config("qwen2.5-7b-grpo-megatron")
    layout = Layout.of(run)
    devices = order_devices(_measured_4x8_bundles(), layout)
    routes = sync_routes(layout, devices, "colocated")
    assert [r.sources for r in routes[:3]] == [(0, 1), (2, 3), (4, 5)]
    assert all(r.master_address is None for r in routes)

    run = load_config("qwen2.5-7b-grpo-megatron", ["cluster.placement=disaggregated", "cluster.rollout_devices=16",
                                                   "actor.n_minibatches=2"])
    layout = Layout.of(run)
    routes = sync_routes(layout, order_devices(_measured_4x8_bundles(), layout), "disaggregated")
    # Engines on nodes 2-3 have no actor rank there: sources spread over the actor's ranks, and
    # each group's master is its source's node, never 127.0.0.1.
    assert [r.node_rank for r in routes] == [2] * 4 + [3] * 4
    assert len({r.lead for r in routes}) == 8
    assert all(r.master_address == devices[r.lead].node_ip for r in routes)


def test_rank_coordinates_follow_megatrons_rank_generator():
    from megatron.core.parallel_state import RankGenerator

    for world, tp, pp in ((32, 4, 1), (16, 2, 1), (16, 2, 2), (8, 1, 4), (24, 2, 3)):
        dp = world // (tp * pp)
        generator = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
        for axis, field in (("tp", "tp_rank"), ("dp", "dp_rank"), ("pp", "pp_rank")):
            for group in generator.get_ranks(axis):
                assert [getattr(actor_coordinates(r, world, tp, pp), field) for r in group] == list(range(len(group)))
