"""Ray start-up and placement: which device each actor rank and each rollout engine gets.

Choices, and what must stay true:
- One placement-group bundle per device: ``{"GPU": 1, "CPU": 1}`` on GPU, ``{"CPU": 1}`` on CPU
  (a CPU "device" is one worker process). Bundles are packed node by node (``STRICT_PACK`` on one
  node, ``PACK`` across several), so bundle ``i`` of a node-major layout is device ``i``.
- ``colocated``: one group of ``total_devices`` bundles; actor rank ``r`` takes half of bundle
  ``r`` and engine ``e`` the other half of bundle ``e * rollout.tp`` (the engine releases its
  memory while the actor trains). ``disaggregated``: the actor's bundles come first, then
  ``rollout_devices`` bundles for the engines, each resource whole.
- A run asks Ray for exactly what the config says. A cluster that cannot hold it fails here,
  before any worker starts, with what was asked and what the cluster has; the placement group
  itself is also waited for with a timeout, never forever.
- ``cluster.ray_address=local`` starts a private Ray for this run, sized to the config (on CPU
  the logical CPU count is the device count, whatever the machine has: a CPU device is a
  process, not a core). An already-initialised Ray in this process is used as it is.
- On GPU every worker sees all GPUs of its node (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``)
  and is told the local index of its bundle's GPU, so that the actor rank and the engine sharing
  a GPU name it by the same index (CUDA IPC handles of colocated weight sync carry it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlsys.config import RunConfig

PLACEMENT_TIMEOUT_S = 300.0
COLOCATED_SHARE = 0.5
"""Fraction of a bundle each of the actor rank and the engine takes when they share it."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot hold the run as configured."""


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Layout:
    """Where everything goes (pure arithmetic on the config; see the top)."""

    device: str
    placement: str
    actor_ranks: int
    engine_tp: int
    num_engines: int
    actor_bundles: tuple[int, ...]
    engine_bundles: tuple[int, ...]
    total_bundles: int

    @classmethod
    def of(cls, run: RunConfig) -> Layout:
        cluster, tp = run.cluster, run.rollout.tp
        actor_ranks = cluster.actor_devices
        num_engines = cluster.engine_devices // tp
        first_engine_bundle = 0 if cluster.placement == "colocated" else actor_ranks
        return cls(
            device=resolve_device(cluster.device),
            placement=cluster.placement,
            actor_ranks=actor_ranks,
            engine_tp=tp,
            num_engines=num_engines,
            actor_bundles=tuple(range(actor_ranks)),
            engine_bundles=tuple(first_engine_bundle + e * tp for e in range(num_engines)),
            total_bundles=cluster.total_devices,
        )

    @property
    def bundle(self) -> dict[str, float]:
        return {"GPU": 1.0, "CPU": 1.0} if self.device == "cuda" else {"CPU": 1.0}

    @property
    def share(self) -> float:
        return COLOCATED_SHARE if self.placement == "colocated" else 1.0


def start_ray(run: RunConfig, layout: Layout) -> None:
    """Join or start Ray (see the top) and check it can hold ``layout``."""
    if not ray.is_initialized():
        address = run.cluster.ray_address
        common: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True,
                                  "runtime_env": {"env_vars": _worker_env()}}
        if address == "local":
            # On GPU Ray counts the GPUs itself; a CPU device is a logical CPU (one spare for tasks).
            resources = {"num_cpus": layout.total_bundles + 1} if layout.device == "cpu" else {}
            ray.init(include_dashboard=False, **resources, **common)
        else:
            ray.init(address=address, **common)
    check_resources(layout, ray.cluster_resources())


def _worker_env() -> dict[str, str]:
    # Workers import rlsys from the driver's checkout, whatever their working directory.
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), _repo_root()) if p)
    return {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}


def _repo_root() -> str:
    from rlsys.config import REPO_ROOT

    return str(REPO_ROOT)


def check_resources(layout: Layout, available: dict[str, float]) -> None:
    """Fail with what was asked and what the cluster has when the run cannot fit."""
    for resource, per_bundle in layout.bundle.items():
        wanted = per_bundle * layout.total_bundles
        have = available.get(resource, 0.0)
        if have < wanted:
            raise ClusterError(
                f"cluster: the run needs {wanted:g} {resource} ({layout.total_bundles} devices: "
                f"cluster.num_nodes * cluster.devices_per_node, {layout.device}) but the Ray cluster has "
                f"{have:g}; start more nodes (ray_utils/start_ray.sh, then ray_utils/check_ray.sh) or "
                f"lower cluster.num_nodes / cluster.devices_per_node"
            )


def create_placement_group(layout: Layout, num_nodes: int, timeout_s: float = PLACEMENT_TIMEOUT_S) -> PlacementGroup:
    strategy = "STRICT_PACK" if num_nodes == 1 else "PACK"
    group = placement_group([dict(layout.bundle) for _ in range(layout.total_bundles)], strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ClusterError(
            f"cluster: Ray could not place {layout.total_bundles} x {layout.bundle} ({strategy}) within "
            f"{timeout_s:.0f}s; `ray status` shows what the nodes offer"
        )
    return group


def in_bundle(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=True)


@ray.remote(num_cpus=0)
def _gpu_of_bundle() -> tuple[str, int]:
    return ray.get_runtime_context().get_node_id(), int(ray.get_gpu_ids()[0])


def local_gpu_indices(group: PlacementGroup, layout: Layout) -> list[int]:
    """The node-local GPU index of every bundle (GPU runs only; see the top)."""
    if layout.device != "cuda":
        return [0] * layout.total_bundles
    probes = [_gpu_of_bundle.options(num_gpus=0.01, scheduling_strategy=in_bundle(group, i)).remote()
              for i in range(layout.total_bundles)]
    return [gpu for _, gpu in ray.get(probes, timeout=PLACEMENT_TIMEOUT_S)]
