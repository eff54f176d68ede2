"""Risk: on a multi-node cluster an engine takes its weights from a rank on another node (CUDA IPC
cannot cross nodes, and one rank feeding every engine serialises the sync), or an engine that was
fed by the wrong rank silently generates with stale weights. Runs the real loop on two simulated
Ray nodes (``ray.cluster_utils.Cluster``), each holding one real SGLang engine colocated with one
real Megatron rank (DP 2), for two steps, with ``actor.offload`` as the GPU recipes set it (the
actor's state leaves the device after each sync and comes back for training: a reload that lost a
byte would show in the step-2 log-prob mismatch)."""

from __future__ import annotations

import pytest

from rlsys.config import load_config
from tests.runner.conftest import loop_overrides


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_each_engine_is_fed_by_the_rank_on_its_own_node(two_nodes, tiny_model_dir, prompt_files, tmp_path):
    from rlsys.runner.grpo import GRPOTrainer

    run = load_config("smollm2-135m-grpo-cpu", loop_overrides(
        tiny_model_dir, prompt_files, tmp_path / "run",
        **{"cluster.num_nodes": 2, "cluster.devices_per_node": 1, "cluster.ray_address": "auto",
           "rollout.engine": "sglang", "runner.val_interval": 0, "actor.offload": True}))
    trainer = GRPOTrainer(run)
    try:
        cluster = trainer.cluster
        nodes = {r["rank"]: r["node_id"] for r in cluster.actor_ranks}
        assert len(set(nodes.values())) == 2
        history = [trainer.train_step(step) for step in (1, 2)]
        engines = cluster.engine_status()
    finally:
        trainer.close()

    assert [route.sources for route in cluster.routes] == [(0,), (1,)]
    for engine, route in zip(engines, cluster.routes):
        # The last sync's only caller is the engine's own route lead, on the engine's node.
        assert engine["weights_from"] == [{"rank": route.lead, "node_id": engine["node_id"]}]
        assert nodes[route.lead] == engine["node_id"]
    # Both engines generated step 2 (each half of the prompts) with the weights step 1 trained: the
    # engines' log-probs equal the actor's recomputed ones. Stale weights differ by the lr-1e-3 step.
    assert history[1]["train/logprob_mismatch"] < 1e-3
    assert history[0]["train/optimizer_steps"] >= 1
