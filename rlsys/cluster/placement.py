"""Ray start-up and placement: which device each actor rank and each rollout engine gets.

Choices, and what must stay true:
- One placement-group bundle per device: ``{"GPU": 1, "CPU": 1}`` on GPU, ``{"CPU": 1}`` on CPU
  (a CPU "device" is one worker process). ``STRICT_PACK`` on one node, ``PACK`` across several.
- Ray does NOT number a ``PACK`` group's bundles node by node (measured on a simulated 4 x 8
  cluster: N0 | N1 x8 | N0 x7 | N2 | N3 x8 | N2 x7). So after placement every bundle is asked for
  its node and GPU, and the bundles are sorted by (node, GPU) into *devices*: device ``d`` is the
  ``d``-th GPU in node-major order. Everything else is placed on devices, never on bundle indices.
- ``colocated``: actor rank ``r`` on device ``r``; engine ``e`` on devices ``e*tp .. e*tp+tp-1``;
  each takes half of its bundle's GPU and half of its CPU (a worker that names a GPU share but no
  CPU share still takes a whole CPU, and the second worker of the bundle would never schedule).
  ``disaggregated``: the actor's devices come first, then ``rollout_devices`` for the engines,
  each resource whole.
- Checked after placement, each failure naming the fields to change: every node holds
  ``cluster.devices_per_node`` devices of the run, on ``cluster.num_nodes`` nodes; every actor TP
  group lies inside one node; every engine's GPUs lie on one node and are consecutive (SGLang
  gives TP rank ``i`` the GPU ``base_gpu_id + i``).
- A run asks Ray for exactly what the config says. A cluster that cannot hold it fails before any
  worker starts, with what was asked and what the cluster has; every start-up wait is bounded by
  ``cluster.start_timeout_s`` and names what did not come up.
- ``cluster.ray_address=local`` starts a private Ray for this run, sized to the config (on CPU
  the logical CPU count is the device count, whatever the machine has: a CPU device is a
  process, not a core), even when another Ray runs on the machine; ``auto`` joins that one. An
  already-initialised Ray in this process is used as it is.
- On GPU every worker sees all GPUs of its node (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``)
  and is told the node-local index of its device's GPU, so that the actor rank and the engine
  sharing a GPU name it by the same index (the CUDA IPC handles of colocated sync carry it).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlsys.config import RunConfig

COLOCATED_SHARE = 0.5
"""Fraction of a bundle (GPU and CPU) each of the actor rank and the engine takes when they share it."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot hold the run as configured."""


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Layout:
    """Where everything goes, in device indices (pure arithmetic on the config; see the top)."""

    device: str
    placement: str
    num_nodes: int
    devices_per_node: int
    actor_ranks: int
    actor_tp: int
    actor_pp: int
    engine_tp: int
    num_engines: int
    engine_first_device: int
    total_devices: int

    @classmethod
    def of(cls, run: RunConfig) -> Layout:
        cluster, tp = run.cluster, run.rollout.tp
        return cls(
            device=resolve_device(cluster.device),
            placement=cluster.placement,
            num_nodes=cluster.num_nodes,
            devices_per_node=cluster.devices_per_node,
            actor_ranks=cluster.actor_devices,
            actor_tp=run.actor.tp,
            actor_pp=run.actor.pp,
            engine_tp=tp,
            num_engines=cluster.engine_devices // tp,
            engine_first_device=0 if cluster.placement == "colocated" else cluster.actor_devices,
            total_devices=cluster.total_devices,
        )

    @property
    def actor_devices(self) -> tuple[int, ...]:
        return tuple(range(self.actor_ranks))

    def engine_devices(self, engine: int) -> tuple[int, ...]:
        first = self.engine_first_device + engine * self.engine_tp
        return tuple(range(first, first + self.engine_tp))

    @property
    def bundle(self) -> dict[str, float]:
        return {"GPU": 1.0, "CPU": 1.0} if self.device == "cuda" else {"CPU": 1.0}

    @property
    def share(self) -> float:
        return COLOCATED_SHARE if self.placement == "colocated" else 1.0

    def worker_resources(self) -> dict[str, float]:
        """Ray resources of one actor rank or engine (a share of every resource of its bundle)."""
        resources = {"num_cpus": self.share}
        if self.device == "cuda":
            resources["num_gpus"] = self.share
        return resources


@dataclass(frozen=True)
class Device:
    """One placed bundle: its node and its node-local GPU index (CPU: its position on the node)."""

    index: int
    bundle: int
    node_id: str
    node_ip: str
    node_rank: int
    gpu: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def start_ray(run: RunConfig, layout: Layout) -> None:
    """Join or start Ray (see the top) and check it can hold ``layout``."""
    if not ray.is_initialized():
        address = run.cluster.ray_address
        # Workers write to their own files (rlsys.cluster.logs); Ray forwards nothing to the console.
        common: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False,
                                  "runtime_env": {"env_vars": _worker_env()}}
        if address == "local":
            # On GPU Ray counts the GPUs itself; a CPU device is a logical CPU (one spare for tasks).
            resources = {"num_cpus": layout.total_devices + 1} if layout.device == "cpu" else {}
            # address="local" always starts a new instance: without it ray.init joins a Ray that
            # `ray start` left on this machine (or a stale ray_current_cluster file points to).
            ray.init(address="local", include_dashboard=False, **resources, **common)
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
        wanted = per_bundle * layout.total_devices
        have = available.get(resource, 0.0)
        if have < wanted:
            raise ClusterError(
                f"cluster: the run needs {wanted:g} {resource} ({layout.total_devices} devices: "
                f"cluster.num_nodes * cluster.devices_per_node, {layout.device}) but the Ray cluster has "
                f"{have:g}; start more nodes (ray_utils/start_ray.sh, then ray_utils/check_ray.sh) or "
                f"lower cluster.num_nodes / cluster.devices_per_node"
            )


def create_placement_group(layout: Layout, timeout_s: float) -> PlacementGroup:
    strategy = "STRICT_PACK" if layout.num_nodes == 1 else "PACK"
    group = placement_group([dict(layout.bundle) for _ in range(layout.total_devices)], strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ClusterError(
            f"cluster: Ray could not place {layout.total_devices} x {layout.bundle} ({strategy}) within "
            f"{timeout_s:.0f}s (cluster.start_timeout_s); `ray status` shows what the nodes offer"
        )
    return group


def in_bundle(group: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=True)


@ray.remote(num_cpus=0)
def _where_is_bundle() -> tuple[str, str, int | None]:
    gpus = ray.get_gpu_ids()
    context = ray.get_runtime_context()
    return context.get_node_id(), ray.util.get_node_ip_address(), int(gpus[0]) if gpus else None


def place_devices(group: PlacementGroup, layout: Layout, timeout_s: float) -> list[Device]:
    """Every bundle's node and GPU, sorted node-major into devices (see the top), then checked."""
    gpu_share = {"num_gpus": 0.01} if layout.device == "cuda" else {}
    probes = [_where_is_bundle.options(**gpu_share, scheduling_strategy=in_bundle(group, b)).remote()
              for b in range(layout.total_devices)]
    ready, pending = ray.wait(probes, num_returns=len(probes), timeout=timeout_s)
    if pending:
        missing = sorted(probes.index(ref) for ref in pending)
        raise ClusterError(f"cluster: bundles {missing} of the placement group did not answer within "
                           f"{timeout_s:.0f}s (cluster.start_timeout_s)")
    return order_devices(ray.get(probes, timeout=timeout_s), layout)


def order_devices(where: list[tuple[str, str, int | None]], layout: Layout) -> list[Device]:
    """Bundles ``(node_id, node_ip, gpu)`` in bundle order -> devices in (node, GPU) order, checked."""
    nodes = sorted({(ip, node) for node, ip, _ in where})
    node_rank = {node: rank for rank, (_, node) in enumerate(nodes)}
    per_node: dict[str, list[int]] = {}
    for bundle, (node, _, _) in enumerate(where):
        per_node.setdefault(node, []).append(bundle)
    keyed = []
    for bundle, (node, ip, gpu) in enumerate(where):
        # A CPU bundle has no GPU id: its position among the node's bundles stands for it.
        local = gpu if gpu is not None else per_node[node].index(bundle)
        keyed.append((node_rank[node], local, bundle, node, ip))
    keyed.sort()
    devices = [Device(index=i, bundle=bundle, node_id=node, node_ip=ip, node_rank=rank, gpu=local)
               for i, (rank, local, bundle, node, ip) in enumerate(keyed)]
    check_devices(devices, layout)
    return devices


def check_devices(devices: list[Device], layout: Layout) -> None:
    """The placed devices match the config (see the top); a mismatch names the fields."""
    counts: dict[int, int] = {}
    for device in devices:
        counts[device.node_rank] = counts.get(device.node_rank, 0) + 1
    if len(counts) != layout.num_nodes or set(counts.values()) != {layout.devices_per_node}:
        shape = ", ".join(f"node {rank}: {count}" for rank, count in sorted(counts.items()))
        raise ClusterError(
            f"cluster: the config asks for cluster.num_nodes={layout.num_nodes} x "
            f"cluster.devices_per_node={layout.devices_per_node} {layout.device} devices, but Ray placed the "
            f"run's bundles as {shape}; set cluster.num_nodes and cluster.devices_per_node to the nodes' shape")
    tp = layout.actor_tp
    for first in range(0, layout.actor_ranks, tp):
        group = devices[first:first + tp]
        if len({d.node_rank for d in group}) > 1 and tp <= layout.devices_per_node:
            raise ClusterError(
                f"actor.tp: the TP group of actor ranks {first}..{first + tp - 1} would span nodes "
                f"{sorted({d.node_rank for d in group})}; actor.tp={tp} must divide "
                f"cluster.devices_per_node={layout.devices_per_node}")
    for engine in range(layout.num_engines):
        group = [devices[i] for i in layout.engine_devices(engine)]
        gpus = [d.gpu for d in group]
        if len({d.node_rank for d in group}) > 1 or gpus != list(range(gpus[0], gpus[0] + len(gpus))):
            where = ", ".join(f"node {d.node_rank} GPU {d.gpu}" for d in group)
            raise ClusterError(
                f"rollout.tp: engine {engine} would run on {where}; an engine needs rollout.tp={layout.engine_tp} "
                f"consecutive GPUs of one node (rollout.tp must divide cluster.devices_per_node="
                f"{layout.devices_per_node}, and in disaggregated placement cluster.rollout_devices must "
                f"start on a node boundary)")
