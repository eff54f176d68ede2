"""Who is who on the placed devices: each actor rank's (tp, pp, dp) coordinates and each engine's
weight-sync route. Pure functions of the layout and the placed devices, shared by a real run and
by ``rlsys plan``.

Choices, and what must stay true:
- Rank order is megatron-core's default (``tp-cp-ep-dp-pp``, no CP/EP here): TP fastest, then DP,
  then PP, i.e. ``rank = tp_rank + tp * (dp_rank + dp * pp_rank)``. Checked against megatron's own
  ``RankGenerator`` in the tests, and by every real rank after ``initialize_model_parallel``.
- Every actor rank gathers the full HF tensors during a sync (each DP replica over its own TP and
  PP groups), so any rank can feed any engine; the route picks ranks near the engine.
- ``colocated``: engine ``e`` is fed by the actor ranks on its own GPUs, one per engine TP rank in
  GPU order; the first of them (the *lead*) calls the engine, with one payload per engine TP rank,
  each made by the rank on that TP rank's GPU (CUDA IPC handles of memory on that very GPU; by
  value on CPU). Engines are fed by different ranks, so engines on different nodes sync at once.
- ``disaggregated``: one process group per engine (the engine's TP ranks plus one source rank):
  a group spans only the nodes it must, a slow or failed engine fails only its own group, and each
  engine's broadcasts run from a different source. The source is an actor rank on the engine's
  node when there is one (none is, when the engines have nodes of their own), else actor ranks in
  turn, so that sources spread over nodes. The group's master address is the source's node IP,
  found at run time, unless ``sync.master_address`` names one.
- ``in_process`` (the HF engine, TP 1): routed like colocated or disaggregated by the placement,
  with one source per engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rlsys.cluster.placement import Device, Layout


@dataclass(frozen=True)
class Coordinates:
    tp_rank: int
    pp_rank: int
    dp_rank: int


def actor_coordinates(rank: int, world_size: int, tp: int, pp: int) -> Coordinates:
    """Megatron's default rank order (see the top)."""
    dp = world_size // (tp * pp)
    return Coordinates(tp_rank=rank % tp, dp_rank=(rank // tp) % dp, pp_rank=rank // (tp * dp))


@dataclass(frozen=True)
class EngineRoute:
    engine: int
    node_rank: int
    node_ip: str
    gpus: tuple[int, ...]
    sources: tuple[int, ...]
    """Actor ranks that feed the engine, in engine TP rank order; ``sources[0]`` calls the engine."""
    transport: str
    master_address: str | None
    """Disaggregated only: the address of the source's node that the engine's group connects to."""

    @property
    def lead(self) -> int:
        return self.sources[0]

    def as_dict(self) -> dict:
        return {**asdict(self), "sync_from": list(self.sources)}


def sync_routes(layout: Layout, devices: list[Device], transport: str,
                master_address: str = "auto") -> list[EngineRoute]:
    """Each engine's feeding ranks (see the top). ``devices`` are the placed devices in order."""
    actor_devices = [devices[rank] for rank in layout.actor_devices]
    routes = []
    for engine in range(layout.num_engines):
        own = [devices[i] for i in layout.engine_devices(engine)]
        if layout.placement == "colocated":
            sources = tuple(d.index for d in own)  # actor rank r sits on device r
            if transport != "colocated":
                sources = sources[:1]
        else:
            same_node = [r for r, d in enumerate(actor_devices) if d.node_rank == own[0].node_rank]
            sources = (same_node[engine % len(same_node)] if same_node else engine % layout.actor_ranks,)
        address = None
        if transport == "disaggregated":
            address = actor_devices[sources[0]].node_ip if master_address == "auto" else master_address
        routes.append(EngineRoute(engine=engine, node_rank=own[0].node_rank, node_ip=own[0].node_ip,
                                  gpus=tuple(d.gpu for d in own), sources=sources, transport=transport,
                                  master_address=address))
    return routes
