"""The Ray actors of a run: one ``ActorWorker`` per Megatron rank, one ``EngineWorker`` per rollout engine.

Choices, and what must stay true:
- ``ActorWorker`` is SPMD: the driver calls the same method on every rank with the same
  arguments (``ActorGroup``) and every rank returns the same result. Each engine is fed by the
  actor ranks its route names (``rlsys.cluster.routes``): its lead holds the transport.
- The engines live in their own Ray actors. A lead reaches its engine through an ``EngineProxy``: the
  duck-typed engine the transports of ``rlsys.sync`` expect, forwarding every call to the Ray
  actor and waiting at most the call's own timeout plus a margin. Colocated updates are serialised
  on the actor's side (CUDA IPC handles on GPU, values on CPU) so that Ray moves bytes, never
  device tensors.
- A rank that leads several engines (disaggregated, more engines than actor ranks on their node)
  feeds them through ``FanOutTransport``; each disaggregated engine forms its own process group
  (``<sync.group_name>_<engine index>``) with the master address of its route.
- ``dry_run``: the workers place themselves and make every decision of a real run (node, GPU,
  parallel coordinates, process-group address, engine arguments, sync routes, which rank calls
  which engine) but import nothing CUDA, build no model and start no engine. ``rlsys plan
  --simulate`` and the placement tests run them on a Ray cluster with declared GPUs.
- Every proxied engine call carries its caller (``_sender``: actor rank and node); the engine
  keeps the senders of the current sync, so a test or the plan can see who fed whom.
- Output: each worker installs ``rlsys.platform.quiet``'s filters first, and once placed sends its
  stdout and stderr to its own file under ``<runner.output_dir>/logs/`` (``rlsys.cluster.logs``).
- Checkpoint RNG: every rank saves and restores its python / numpy / torch generator states
  next to the model, so that anything random in a later step continues the same stream.
"""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import ray

from rlsys.cluster.logs import log_dir, to_file
from rlsys.config import RunConfig
from rlsys.platform.quiet import quiet_third_party

CALL_MARGIN_S = 60.0
_PROXIED = frozenset({
    "begin_weight_update", "end_weight_update", "flush_cache", "init_weights_update_group",
    "destroy_weights_update_group", "update_weights_from_distributed", "load_state_dict",
    "parameter_names", "release_memory", "resume_memory", "update_weights_from_serialized",
})
_DRY_ANSWERS = {"parameter_names": []}
"""What a dry-run engine answers to proxied calls that return something (everything else: None)."""


def use_cpu_threads(devices_per_node: int) -> None:
    """On CPU, give this worker its share of the node's cores (Ray pins a worker with a fractional
    CPU to one thread); subprocesses, e.g. the SGLang scheduler, inherit it through the environment."""
    threads = max(1, (os.cpu_count() or 1) // devices_per_node)
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    import torch

    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


class EngineProxy:
    """An engine in another Ray actor, as the sync transports see it (see the top)."""

    def __init__(self, handle: Any, name: str, engine_args: dict[str, Any], timeout_s: float,
                 sender: dict[str, Any]) -> None:
        self.handle = handle
        self.name = name
        self.engine_args = engine_args
        self.timeout_s = timeout_s
        self.sender = sender

    def _wait(self, ref: Any, timeout_s: float | None) -> Any:
        return ray.get(ref, timeout=(timeout_s or self.timeout_s) + CALL_MARGIN_S)

    def update_weights_from_tensor(self, named_tensors: Any, **kwargs: Any) -> None:
        if self.engine_args.get("kind") == "sglang":
            from rlsys.rollout.sglang_engine import serialize_named_tensors

            self.update_weights_from_serialized([serialize_named_tensors(named_tensors)], **kwargs)
            return
        self.load_state_dict(dict(named_tensors))

    def __getattr__(self, method: str) -> Any:
        if method not in _PROXIED:
            raise AttributeError(method)

        def call(*args: Any, **kwargs: Any) -> Any:
            ref = self.handle.call.remote(method, *args, _sender=self.sender, **kwargs)
            return self._wait(ref, kwargs.get("timeout_s"))

        return call


def sglang_engine_args(run: RunConfig, device: str, gpu_index: int) -> dict[str, Any]:
    """The ``SGLangEngine`` keyword arguments of an engine whose first GPU is ``gpu_index``."""
    rollout = run.rollout
    extra: dict[str, Any] = {"max_running_requests": rollout.max_running_requests}
    if device == "cuda":
        # SGLang gives TP rank i the GPU base_gpu_id + i (placement checked they are this engine's).
        extra["base_gpu_id"] = gpu_index
        if rollout.attention_backend is not None:
            extra["attention_backend"] = rollout.attention_backend
        if rollout.cuda_graph_max_bs is not None:
            # No graph is useful for more requests than run at once (RLinf takes the smaller too).
            extra["cuda_graph_max_bs"] = min(rollout.cuda_graph_max_bs, rollout.max_running_requests)
    return {
        "tp_size": rollout.tp, "device": device, "dtype": None if rollout.dtype == "auto" else rollout.dtype,
        "mem_fraction_static": rollout.mem_fraction_static, "max_total_tokens": rollout.max_total_tokens,
        "seed": run.runner.seed,
        # Colocated on GPU the engine hands its memory back while the actor trains.
        "enable_memory_saver": run.cluster.placement == "colocated" and device == "cuda",
        "timeout_s": rollout.timeout_s, "startup_timeout_s": run.cluster.start_timeout_s,
        "health_check_s": rollout.health_check_s,
        "extra_engine_args": extra,
    }


def _check_ray_gpu(gpu: int, what: str) -> None:
    """Ray's own GPU assignment agrees with the placed device (it is what CUDA would use)."""
    given = [int(g) for g in ray.get_gpu_ids()]
    if gpu not in given:
        raise RuntimeError(f"{what}: placed on GPU {gpu} but Ray gave this worker GPUs {given}")


class EngineWorker:
    """One rollout engine (SGLang or HF) in a Ray actor, on ``devices`` (dicts of ``placement.Device``)."""

    def __init__(self, run: RunConfig, model_path: str, device: str, devices: list[dict[str, Any]],
                 dry_run: bool = False) -> None:
        quiet_third_party()
        started = time.monotonic()
        rollout = run.rollout
        self.kind, self.dry_run, self.devices = rollout.engine, dry_run, devices
        self.weights_from: list[dict[str, Any]] = []
        gpu_index = devices[0]["gpu"]
        if not dry_run:
            from rlsys.cluster.placement import Layout

            layout = Layout.of(run)
            engine = (devices[0]["index"] - layout.engine_first_device) // layout.engine_tp
            logs = log_dir(run.runner.output_dir)
            to_file(logs / f"engine_{engine}.log")
        if device == "cuda":
            _check_ray_gpu(gpu_index, f"engine on node {devices[0]['node_rank']}")
        if device == "cpu" and not dry_run:
            use_cpu_threads(run.cluster.devices_per_node)
        if self.kind == "hf":
            self.engine_args: dict[str, Any] = {"tp_size": 1, "device": device if device == "cpu" else f"cuda:{gpu_index}"}
            if not dry_run:
                import torch

                from rlsys.rollout.hf_engine import HFEngine

                dtype = torch.float32 if device == "cpu" or rollout.dtype in ("auto", "float32") else getattr(
                    torch, rollout.dtype)
                self.engine: Any = HFEngine(model_path, dtype=dtype, device=self.engine_args["device"])
        else:
            arguments = sglang_engine_args(run, device, gpu_index)
            if dry_run:
                self.engine_args = {key: value for key, value in arguments.items() if key != "extra_engine_args"}
                self.engine_args |= arguments["extra_engine_args"]
            else:
                from rlsys.rollout.sglang_engine import SGLangEngine

                self.engine = SGLangEngine(model_path, **arguments, log_path=logs / f"engine_{engine}.sglang.log",
                                           name=f"sglang engine {engine}")
                self.engine_args = dict(self.engine.engine_args)
        self.engine_args["kind"] = self.kind
        self.startup_s = time.monotonic() - started

    def describe(self) -> tuple[str, dict[str, Any]]:
        name = f"{self.kind} engine (dry run)" if self.dry_run else getattr(self.engine, "name", self.kind)
        return name, self.engine_args

    def startup_seconds(self) -> float:
        """How long this worker took to start its engine (this worker's own clock)."""
        return self.startup_s

    def status(self) -> dict[str, Any]:
        """Where the engine is and who fed it in the last sync (see the top)."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "ray_gpus": [int(g) for g in ray.get_gpu_ids()],
                "devices": self.devices, "engine_args": self.engine_args, "weights_from": self.weights_from}

    def generate(self, prompt_ids: list[list[int]], params: Any) -> list[Any]:
        return self.engine.generate(prompt_ids, params)

    def call(self, method: str, *args: Any, _sender: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if method not in _PROXIED:
            raise AttributeError(f"engine worker: {method} is not forwarded")
        if method == "begin_weight_update":
            self.weights_from = []
        if _sender is not None and _sender not in self.weights_from and method not in ("release_memory", "resume_memory"):
            self.weights_from.append(_sender)
        if self.dry_run:
            return _DRY_ANSWERS.get(method)
        if self.kind == "hf" and method in ("release_memory", "resume_memory"):
            return None
        return getattr(self.engine, method)(*args, **kwargs)

    def shutdown(self) -> None:
        if not self.dry_run:
            self.engine.shutdown()


class ActorWorker:
    """One Megatron rank in a Ray actor (see the top); ``device`` is its ``placement.Device`` as a dict."""

    def __init__(self, rank: int, world_size: int, device: dict[str, Any], dry_run: bool = False) -> None:
        quiet_third_party()
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.dry_run = dry_run
        self.actor: Any = None
        self.feed: Any = None
        self.dry_proxies: list[EngineProxy] = []
        self.build_s = float("nan")

    def startup_seconds(self) -> float:
        """How long building the model, loading its weights and the optimizer took (NaN before setup)."""
        return self.build_s

    def address(self) -> tuple[str, int]:
        """Where rank 0 hosts the process group's store (called on rank 0 before any setup)."""
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, run: RunConfig, model_path: str, master: tuple[str, int]) -> dict[str, Any]:
        """Join the actor's process group and build the model (dry run: only decide); returns where
        this rank is and its parallel coordinates."""
        from rlsys.cluster.placement import resolve_device
        from rlsys.cluster.routes import actor_coordinates

        self.run = run
        device = resolve_device(run.cluster.device)
        if device == "cuda":
            _check_ray_gpu(self.device["gpu"], f"actor rank {self.rank}")
        coordinates = actor_coordinates(self.rank, self.world_size, run.actor.tp, run.actor.pp)
        described = {"rank": self.rank, **self.device, "ray_node_id": ray.get_runtime_context().get_node_id(),
                     "master": f"{master[0]}:{master[1]}", "tp_rank": coordinates.tp_rank,
                     "pp_rank": coordinates.pp_rank, "dp_rank": coordinates.dp_rank}
        if self.dry_run:
            return described
        to_file(log_dir(run.runner.output_dir) / f"actor_rank_{self.rank}.log")
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.device["gpu"]))
        from megatron.core import parallel_state

        from rlsys.actor.actor import MegatronActor
        from rlsys.actor.parallel import initialize_parallel

        # The group outlives any engine call: a sync waits for the engine while the other ranks
        # wait in a collective (see rlsys.sync.weight_sync).
        backend = "nccl" if device == "cuda" else "gloo"
        if backend == "gloo":
            use_cpu_threads(run.cluster.devices_per_node)
        initialize_parallel(run.actor.tp, run.actor.pp, seed=run.runner.seed, backend=backend,
                            timeout_s=self._group_timeout_s())
        actual = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
                  parallel_state.get_data_parallel_rank())
        if actual != (coordinates.tp_rank, coordinates.pp_rank, coordinates.dp_rank):
            raise RuntimeError(f"actor rank {self.rank}: megatron placed it at (tp, pp, dp) = {actual}, the plan "
                               f"at {coordinates}; rlsys.cluster.routes must follow megatron's rank order")
        started = time.monotonic()
        self.actor = MegatronActor(run.actor, run.algorithm, model_path=model_path, seed=run.runner.seed)
        self.build_s = time.monotonic() - started
        return described

    def _group_timeout_s(self) -> float:
        return max(1800.0, 2 * self.run.sync.timeout_s, 2 * self.run.rollout.timeout_s)

    def connect_engines(self, routes: list[Any], engines: list[tuple[Any, str, dict[str, Any]]]) -> None:
        """Build this rank's part of every route (``rlsys.cluster.routes.EngineRoute``): the transports
        of the engines it leads, and the process group of a colocated engine it feeds with others
        (created on every rank, as torch requires)."""
        import dataclasses

        fed = [route for route in routes if self.rank in route.sources]
        sender = {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id()}
        proxies = {route.engine: EngineProxy(*engines[route.engine], self.run.sync.timeout_s, sender)
                   for route in fed if route.lead == self.rank}
        if self.dry_run:
            self.dry_proxies = list(proxies.values())
            return
        from datetime import timedelta

        import torch.distributed as dist

        from rlsys.sync.transports import FanOutTransport
        from rlsys.sync.weight_sync import EngineFeed, make_transport

        groups = {}
        for route in routes:
            if len(route.sources) > 1:
                # gloo: the group carries serialised payloads (bytes), never device tensors.
                groups[route.engine] = dist.new_group(list(route.sources), backend="gloo",
                                                      timeout=timedelta(seconds=self._group_timeout_s()))
        transports = []
        for route in fed:
            if route.lead != self.rank:
                continue
            proxy = proxies[route.engine]
            config = self.run.sync
            if len(routes) > 1:
                config = dataclasses.replace(config, group_name=f"{config.group_name}_{route.engine}")
            transports.append(make_transport(config, proxy, weights_device=self.actor.layout.device,
                                             transport=route.transport, master_address=route.master_address))
        if len(fed) > 1 and any(r.engine in groups for r in fed):
            raise RuntimeError(f"actor rank {self.rank} feeds engines {[r.engine for r in fed]}, one of them with other "
                               "ranks; a colocated rank feeds exactly one engine")
        if fed:
            lead = fed[0].lead
            transport = None
            if transports:
                transport = transports[0] if len(transports) == 1 else FanOutTransport(transports)
            self.feed = EngineFeed(transport, groups.get(fed[0].engine), lead)

    def offload(self) -> None:
        if not self.dry_run:
            self.actor.offload_to_host()

    def reload(self) -> None:
        if not self.dry_run:
            self.actor.reload_to_device()

    def compute_logprobs(self, batch: Any) -> list[Any]:
        return self.actor.compute_logprobs(batch).logprobs

    def train_step(self, batch: Any, rollout_logprobs: list[Any] | None = None) -> dict[str, float]:
        import torch

        metrics = self.actor.train_step(batch, rollout_logprobs)
        if torch.cuda.is_available():
            # Hand the allocator's cached blocks back before the engine takes its memory again.
            torch.cuda.empty_cache()
        return metrics

    def sync_weights(self) -> dict[str, float]:
        if self.dry_run:
            return self._dry_sync()
        from rlsys.sync.weight_sync import sync_weights

        report = sync_weights(self.actor.model, self.actor.hf_config, feed=self.feed,
                              bucket_bytes=self.run.sync.bucket_bytes)
        return report.as_metrics()

    def _dry_sync(self) -> dict[str, float]:
        """The engine calls of a sync without weights: each lead opens and closes its engines'
        sessions, so that the engines record who fed them."""
        for proxy in self.dry_proxies:
            proxy.begin_weight_update()
            proxy.end_weight_update()
        return {}

    def save(self, directory: str) -> None:
        import torch

        self.actor.save_to(Path(directory) / "actor", with_optimizer=self.run.actor.save_optimizer)
        rng = Path(directory) / "rng"
        rng.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), rng / f"rank_{self.rank:05d}.pt")

    def load(self, directory: str) -> None:
        import torch

        self.actor.load_checkpoint(Path(directory) / "actor", with_optimizer=self.run.actor.save_optimizer)
        state_file = Path(directory) / "rng" / f"rank_{self.rank:05d}.pt"
        if state_file.is_file():
            _set_rng_state(torch.load(state_file, weights_only=False))

    def shutdown(self) -> None:
        transport = getattr(self.feed, "transport", None)
        if transport is not None and hasattr(transport, "close"):
            transport.close()
        if self.actor is not None:
            self.actor.close()


def _rng_state() -> dict[str, Any]:
    import numpy
    import torch

    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy
    import torch

    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
