"""The driver's view of the workers: ``ActorGroup`` (SPMD Megatron ranks) and ``RolloutGroup`` (engines).

``Cluster.start(run, model_path)`` starts Ray (``rlsys.cluster.placement``), places the workers
and connects rank 0 to the engines; ``Cluster.shutdown()`` ends them all and removes the
placement group. A worker that dies makes the next call raise Ray's error in the driver, which
ends the run; nothing waits forever on a dead worker.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group

from rlsys.cluster.placement import Layout, create_placement_group, in_bundle, local_gpu_indices, start_ray
from rlsys.cluster.workers import ActorWorker, EngineWorker
from rlsys.config import RunConfig
from rlsys.rollout.base import Sample, SamplingParams, derive_seed


class ActorGroup:
    """Every Megatron rank runs the same call; rank 0's result is returned (all ranks agree)."""

    def __init__(self, workers: list[Any]) -> None:
        self.workers = workers

    def call(self, method: str, *args: Any) -> Any:
        refs = [ray.put(arg) if not isinstance(arg, ray.ObjectRef) else arg for arg in args]
        return ray.get([getattr(w, method).remote(*refs) for w in self.workers])[0]

    def compute_logprobs(self, batch: Any) -> list[Any]:
        return self.call("compute_logprobs", batch)

    def train_step(self, batch: Any) -> dict[str, float]:
        return self.call("train_step", batch)

    def sync_weights(self) -> dict[str, float]:
        return self.call("sync_weights")

    def save(self, directory: str) -> None:
        self.call("save", directory)

    def load(self, directory: str) -> None:
        self.call("load", directory)


class RolloutGroup:
    """The engines as one: prompts are split into contiguous chunks, one per engine."""

    def __init__(self, workers: list[Any], release_during_training: bool) -> None:
        self.workers = workers
        self.release_during_training = release_during_training

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Sample]:
        chunks = _split(len(prompt_ids), len(self.workers))
        refs = []
        for engine, (start, stop) in zip(self.workers, chunks):
            if stop > start:
                chunk_params = dataclasses.replace(params, seed=_chunk_seed(params.seed, start))
                refs.append((start, engine.generate.remote(prompt_ids[start:stop], chunk_params)))
        samples: list[Sample] = []
        for start, ref in refs:
            for sample in ray.get(ref):
                samples.append(dataclasses.replace(sample, prompt_index=sample.prompt_index + start))
        return samples

    def release_memory(self) -> None:
        if self.release_during_training:
            ray.get([w.call.remote("release_memory") for w in self.workers])

    def resume_memory(self) -> None:
        if self.release_during_training:
            ray.get([w.call.remote("resume_memory") for w in self.workers])


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    bounds = [round(i * total / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _chunk_seed(seed: int, start: int) -> int:
    """The first chunk keeps the call's seed (one engine behaves as if unsplit)."""
    if start == 0:
        return seed
    return derive_seed(seed, start)


@dataclasses.dataclass
class Cluster:
    layout: Layout
    actor: ActorGroup
    rollout: RolloutGroup
    sync_transport: str
    _group: Any
    _actors: list[Any]
    _engines: list[Any]

    @classmethod
    def start(cls, run: RunConfig, model_path: str) -> Cluster:
        layout = Layout.of(run)
        start_ray(run, layout)
        group = create_placement_group(layout, run.cluster.num_nodes)
        gpus = local_gpu_indices(group, layout)
        env = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"} if layout.device == "cuda" else {}
        resource = "num_gpus" if layout.device == "cuda" else "num_cpus"
        engine_cls = ray.remote(EngineWorker)
        actor_cls = ray.remote(ActorWorker)
        # Engines first: they take longest to start, and the actor ranks build meanwhile.
        engines = [
            engine_cls.options(**{resource: layout.share}, scheduling_strategy=in_bundle(group, bundle),
                               runtime_env={"env_vars": env}, name=None).remote(run, model_path, layout.device,
                                                                                  gpus[bundle])
            for bundle in layout.engine_bundles
        ]
        actors = [
            actor_cls.options(**{resource: layout.share}, scheduling_strategy=in_bundle(group, bundle),
                              runtime_env={"env_vars": env}).remote(rank, layout.actor_ranks, gpus[bundle])
            for rank, bundle in enumerate(layout.actor_bundles)
        ]
        master = ray.get(actors[0].address.remote())
        ray.get([a.setup.remote(run, model_path, master) for a in actors])
        described = ray.get([e.describe.remote() for e in engines])
        transport = resolve_transport(run)
        ray.get([a.connect_engines.remote([(e, name, args) for e, (name, args) in zip(engines, described)],
                                          transport) for a in actors])
        release = layout.placement == "colocated" and layout.device == "cuda"
        return cls(layout, ActorGroup(actors), RolloutGroup(engines, release), transport, group, actors, engines)

    def shutdown(self) -> None:
        for handles, method in ((self._actors, "shutdown"), (self._engines, "shutdown")):
            try:
                ray.get([getattr(h, method).remote() for h in handles], timeout=120)
            except Exception:  # a dead or hung worker is killed below either way
                pass
        for handle in self._actors + self._engines:
            ray.kill(handle)
        remove_placement_group(self._group)


def resolve_transport(run: RunConfig) -> str:
    """``sync.transport=auto``: in_process for the HF engine, else the placement's own."""
    if run.sync.transport != "auto":
        return run.sync.transport
    if run.rollout.engine == "hf":
        return "in_process"
    return run.cluster.placement
