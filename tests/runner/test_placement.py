"""Risk: a run that the cluster cannot hold hangs waiting for resources, or places the actor ranks
and engines on the wrong devices."""

from __future__ import annotations

import pytest

from rlsys.cluster.placement import ClusterError, Layout, check_resources, start_ray
from rlsys.config import load_config


def _run(*overrides: str):
    return load_config("smollm2-135m-grpo-cpu", ["cluster.device=cpu", *overrides])


def test_colocated_engines_share_the_actor_bundles():
    layout = Layout.of(_run("cluster.devices_per_node=4", "actor.tp=2", "rollout.tp=2"))
    assert (layout.actor_ranks, layout.num_engines, layout.total_devices) == (4, 2, 4)
    assert layout.actor_devices == (0, 1, 2, 3) and [layout.engine_devices(e) for e in range(2)] == [(0, 1), (2, 3)]
    assert layout.share == 0.5 and layout.worker_resources() == {"num_cpus": 0.5}


def test_disaggregated_engines_get_bundles_of_their_own():
    layout = Layout.of(_run("cluster.placement=disaggregated", "cluster.devices_per_node=8",
                            "cluster.rollout_devices=4", "actor.tp=2", "rollout.tp=2"))
    assert (layout.actor_ranks, layout.num_engines, layout.total_devices) == (4, 2, 8)
    assert layout.actor_devices == (0, 1, 2, 3) and [layout.engine_devices(e) for e in range(2)] == [(4, 5), (6, 7)]
    assert layout.share == 1.0


def test_colocated_gpu_workers_ask_for_half_of_every_resource_of_their_bundle():
    layout = Layout.of(load_config("qwen2.5-1.5b-grpo-megatron"))
    assert layout.bundle == {"GPU": 1.0, "CPU": 1.0}
    assert layout.worker_resources() == {"num_cpus": 0.5, "num_gpus": 0.5}


def test_check_resources_names_what_is_missing():
    layout = Layout.of(_run("cluster.num_nodes=2", "cluster.devices_per_node=8"))
    with pytest.raises(ClusterError, match=r"needs 16 CPU .* the Ray cluster has 9"):
        check_resources(layout, {"CPU": 9.0})
    check_resources(layout, {"CPU": 16.0})


def test_a_real_ray_cluster_too_small_fails_at_start():
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        run = _run("cluster.devices_per_node=2", "actor.tp=2", "cluster.ray_address=auto")
        with pytest.raises(ClusterError, match=r"needs 2 CPU .* has 1"):
            start_ray(run, Layout.of(run))
    finally:
        ray.shutdown()
