"""The driver's view of the workers: ``ActorGroup`` (SPMD Megatron ranks) and ``RolloutGroup`` (engines).

``Cluster.start(run, model_path)`` starts Ray (``rlsys.cluster.placement``), places the workers
on the placed devices, and connects every engine to the actor ranks of its route
(``rlsys.cluster.routes``); ``Cluster.shutdown()`` ends them all and removes the placement group.
``dry_run=True`` places workers that decide everything and build nothing (``rlsys plan --simulate``).
Every start-up wait is bounded by ``cluster.start_timeout_s`` and names what did not come up. A
worker that fails or dies makes the call in flight raise ``WorkerFailed`` in the driver, naming the
worker (actor rank or engine) and the cause in one line; nothing waits forever on a dead worker.

Rollout streams: each engine gets at most ``rollout.max_running_requests`` requests (samples) per
call, the next chunk as soon as it returned one, so that a batch of any size has a bounded number
of requests in flight per engine and a progress timeout (``rollout.timeout_s`` without any chunk
finishing fails the rollout, naming the engines) instead of one timeout for the whole batch.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import remove_placement_group

from rlsys.cluster.placement import (
    ClusterError,
    Device,
    Layout,
    create_placement_group,
    in_bundle,
    place_devices,
    start_ray,
)
from rlsys.cluster.routes import EngineRoute, sync_routes
from rlsys.cluster.workers import ActorWorker, EngineWorker
from rlsys.config import RunConfig
from rlsys.errors import innermost_cause, one_line
from rlsys.rollout.base import Sample, SamplingParams, derive_seed


class WorkerFailed(RuntimeError):
    """A worker's call failed or the worker died: ``part`` names it ("actor rank 1", "engine 0")."""

    def __init__(self, part: str, error: BaseException) -> None:
        self.part, self.error = part, error
        super().__init__(f"{part}: {failure_reason(error)}")


def failure_reason(error: BaseException) -> str:
    """One line for what went wrong in a worker (``rlsys.errors.one_line``); a worker's death with
    its process id and Ray's exit detail."""
    error = innermost_cause(error)
    if isinstance(error, RayActorError):
        text = str(error)
        pid = re.search(r"pid: (\d+)", text)
        detail = re.search(r"Worker exit detail: (.*?)(?: Some common causes| There are some potential root causes|$)",
                           text, re.S)
        who = re.search(r"class_name: (\w+)", text)
        return (f"its Ray worker {who.group(1) + ' ' if who else ''}(pid {pid.group(1) if pid else '?'}) died"
                f"{': ' + ' '.join(detail.group(1).split()) if detail else ''} (killed, e.g. by the OOM killer, or crashed)")
    return one_line(error)


class ActorGroup:
    """Every Megatron rank runs the same call; rank 0's result is returned (all ranks agree)."""

    def __init__(self, workers: list[Any], offload: bool = False) -> None:
        self.workers = workers
        self.offload_enabled = offload

    def call(self, method: str, *args: Any) -> Any:
        """Rank 0's result. A rank that fails or dies raises at once: the other ranks may be waiting
        for it in a collective, which would otherwise end only at the process group's timeout."""
        refs = [ray.put(arg) if not isinstance(arg, ray.ObjectRef) else arg for arg in args]
        results = [getattr(w, method).remote(*refs) for w in self.workers]
        pending = list(results)
        while pending:
            # No overall limit: a train step may take hours; a hung collective ends at the group's timeout.
            done, pending = ray.wait(pending, num_returns=1, timeout=None)
            try:
                ray.get(done[0], timeout=60)  # raises the rank's error (or its death) now
            except Exception as error:
                raise WorkerFailed(f"actor rank {results.index(done[0])} ({method})", error) from error
        return ray.get(results[0], timeout=60)

    def compute_logprobs(self, batch: Any) -> list[Any]:
        return self.call("compute_logprobs", batch)

    def train_step(self, batch: Any, rollout_logprobs: list[Any] | None = None) -> dict[str, float]:
        return self.call("train_step", batch, rollout_logprobs)

    def sync_weights(self) -> dict[str, float]:
        return self.call("sync_weights")

    def save(self, directory: str) -> None:
        self.call("save", directory)

    def offload(self) -> None:
        """``actor.offload``: parameters, gradients and optimizer state to host while the engines generate."""
        if self.offload_enabled:
            self.call("offload")

    def reload(self) -> None:
        if self.offload_enabled:
            self.call("reload")

    def load(self, directory: str) -> None:
        self.call("load", directory)


class RolloutGroup:
    """The engines as one: prompts stream to them in chunks (see the top)."""

    def __init__(self, workers: list[Any], release_during_training: bool, max_running_requests: int = 64,
                 progress_timeout_s: float = 1800.0) -> None:
        self.workers = workers
        self.release_during_training = release_during_training
        self.max_running_requests = max_running_requests
        self.progress_timeout_s = progress_timeout_s

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Sample]:
        per_chunk = max(1, self.max_running_requests // max(1, params.n))
        # A batch no larger than the engines' capacity is split evenly, as one call per engine.
        if len(prompt_ids) <= per_chunk * len(self.workers):
            chunks = [c for c in _split(len(prompt_ids), len(self.workers)) if c[1] > c[0]]
        else:
            chunks = [(start, min(start + per_chunk, len(prompt_ids))) for start in range(0, len(prompt_ids), per_chunk)]
        queue = list(reversed(chunks))
        running: dict[Any, tuple[int, int]] = {}
        finished: dict[int, list[Sample]] = {}

        def submit(engine: int) -> None:
            start, stop = queue.pop()
            chunk_params = dataclasses.replace(params, seed=_chunk_seed(params.seed, start))
            running[self.workers[engine].generate.remote(prompt_ids[start:stop], chunk_params)] = (engine, start)

        for engine in range(min(len(self.workers), len(queue))):
            submit(engine)
        while running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=self.progress_timeout_s)
            if not done:
                busy = sorted({engine for engine, _ in running.values()})
                raise TimeoutError(
                    f"rollout: no request of engines {busy} finished within {self.progress_timeout_s:g} s "
                    f"(rollout.timeout_s); {sum(map(len, finished.values()))} of {len(prompt_ids) * params.n} "
                    f"samples were done")
            engine, start = running.pop(done[0])
            try:
                outputs = ray.get(done[0], timeout=self.progress_timeout_s)
            except Exception as error:
                raise WorkerFailed(f"engine {engine} (generate)", error) from error
            finished[start] = [dataclasses.replace(s, prompt_index=s.prompt_index + start) for s in outputs]
            if queue:
                submit(engine)
        return [sample for start in sorted(finished) for sample in finished[start]]

    def release_memory(self) -> None:
        if self.release_during_training:
            ray.get([w.call.remote("release_memory") for w in self.workers], timeout=self.progress_timeout_s)

    def resume_memory(self) -> None:
        if self.release_during_training:
            ray.get([w.call.remote("resume_memory") for w in self.workers], timeout=self.progress_timeout_s)


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
    devices: list[Device]
    routes: list[EngineRoute]
    actor: ActorGroup
    rollout: RolloutGroup
    actor_ranks: list[dict[str, Any]]
    """What each actor rank reported at setup: node, GPU, (tp, pp, dp) coordinates, master address."""
    _group: Any
    _actors: list[Any]
    _engines: list[Any]
    startup_s: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds from the start of ``start``: ``ray`` (Ray up, placement group ready), ``actor`` (every
    rank built with its weights), ``engines`` (every engine serving), ``total``; and each part's own
    longest duration: ``actor_build`` (model, weights, optimizer) and ``engine_start``."""

    @classmethod
    def start(cls, run: RunConfig, model_path: str, *, dry_run: bool = False) -> Cluster:
        layout = Layout.of(run)
        timeout = run.cluster.start_timeout_s
        started = time.monotonic()
        start_ray(run, layout)
        group = create_placement_group(layout, timeout)
        startup = {"ray": time.monotonic() - started}
        actors: list[Any] = []
        engines: list[Any] = []
        try:
            devices = place_devices(group, layout, timeout)
            env = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"} if layout.device == "cuda" else {}
            options = {**layout.worker_resources(), "runtime_env": {"env_vars": env}}
            engine_cls, actor_cls = ray.remote(EngineWorker), ray.remote(ActorWorker)
            # Engines first: they take longest to start, and the actor ranks build meanwhile.
            for e in range(layout.num_engines):
                own = [devices[i] for i in layout.engine_devices(e)]
                engines.append(engine_cls.options(**options, scheduling_strategy=in_bundle(group, own[0].bundle)).remote(
                    run, model_path, layout.device, [d.as_dict() for d in own], dry_run))
            for rank in layout.actor_devices:
                actors.append(actor_cls.options(**options, scheduling_strategy=in_bundle(group, devices[rank].bundle))
                              .remote(rank, layout.actor_ranks, devices[rank].as_dict(), dry_run))
            master = _wait([actors[0].address.remote()], timeout, ["actor rank 0"])[0]
            ranks = _wait([a.setup.remote(run, model_path, master) for a in actors], timeout,
                          [f"actor rank {r}" for r in range(len(actors))])
            startup["actor"] = time.monotonic() - started
            described = _wait([e.describe.remote() for e in engines], timeout,
                              [f"engine {e}" for e in range(len(engines))])
            startup["engines"] = time.monotonic() - started
            transport = resolve_transport(run)
            routes = sync_routes(layout, devices, transport, run.sync.master_address)
            handles = [(e, name, args) for e, (name, args) in zip(engines, described)]
            _wait([a.connect_engines.remote(routes, handles) for a in actors], timeout,
                          [f"actor rank {r} connecting to its engines" for r in range(len(actors))])
        except BaseException:
            for handle in actors + engines:
                ray.kill(handle)
            remove_placement_group(group)
            raise
        release = layout.placement == "colocated" and layout.device == "cuda"
        rollout = RolloutGroup(engines, release, run.rollout.max_running_requests, run.rollout.timeout_s)
        startup["total"] = time.monotonic() - started
        startup["actor_build"] = max(ray.get([a.startup_seconds.remote() for a in actors], timeout=60))
        startup["engine_start"] = max(ray.get([e.startup_seconds.remote() for e in engines], timeout=60))
        return cls(layout, devices, routes, ActorGroup(actors, run.actor.offload), rollout, ranks,
                   group, actors, engines, startup)

    def engine_status(self) -> list[dict[str, Any]]:
        """Each engine's placement and the senders of its last sync (``EngineWorker.status``)."""
        return _wait([e.status.remote() for e in self._engines], 120.0,
                     [f"engine {e}" for e in range(len(self._engines))])

    def shutdown(self, timeout_s: float = 120.0) -> None:
        """Ask every worker to stop (its engine, its transports), waiting at most ``timeout_s``, then
        kill them all. After a failure the wait is short: a rank whose peer died may be stuck in a
        collective, and killing its Ray worker ends its engine's processes too."""
        for handles, method in ((self._actors, "shutdown"), (self._engines, "shutdown")):
            try:
                ray.get([getattr(h, method).remote() for h in handles], timeout=timeout_s)
            except Exception:  # a dead or hung worker is killed below either way
                pass
        for handle in self._actors + self._engines:
            ray.kill(handle)
        remove_placement_group(self._group)


def _wait(refs: list[Any], timeout_s: float, names: list[str]) -> list[Any]:
    """``ray.get`` of start-up calls, bounded; a timeout names the workers that did not answer."""
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = [name for name, ref in zip(names, refs) if ref in pending]
        raise ClusterError(f"cluster: {', '.join(late)} did not come up within {timeout_s:g} s "
                           f"(cluster.start_timeout_s); their logs say why (<runner.output_dir>/logs/, or Ray's "
                           f"session logs for a worker that never started)")
    return ray.get(refs, timeout=timeout_s)


def resolve_transport(run: RunConfig) -> str:
    """``sync.transport=auto``: in_process for the HF engine, else the placement's own."""
    if run.sync.transport != "auto":
        return run.sync.transport
    if run.rollout.engine == "hf":
        return "in_process"
    return run.cluster.placement
