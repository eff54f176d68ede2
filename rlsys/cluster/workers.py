"""The Ray actors of a run: one ``ActorWorker`` per Megatron rank, one ``EngineWorker`` per rollout engine.

Choices, and what must stay true:
- ``ActorWorker`` is SPMD: the driver calls the same method on every rank with the same
  arguments (``ActorGroup``) and every rank returns the same result. Rank 0 is the weight-sync
  source: it alone holds the transports to the engines.
- The engines live in their own Ray actors. Rank 0 reaches each through an ``EngineProxy``: the
  duck-typed engine the transports of ``rlsys.sync`` expect, forwarding every call to the Ray
  actor and waiting at most the call's own timeout plus a margin. Colocated updates are serialised
  on the actor's side (CUDA IPC handles on GPU, values on CPU) so that Ray moves bytes, never
  device tensors.
- Several engines get the same buckets through ``FanOutTransport``; each disaggregated engine
  forms its own process group (``<sync.group_name>_<engine index>``).
- Checkpoint RNG: every rank saves and restores its python / numpy / torch generator states
  next to the model, so that anything random in a later step continues the same stream.
"""

from __future__ import annotations

import os
import random
import socket
import warnings
from pathlib import Path
from typing import Any

import ray

from rlsys.config import RunConfig

CALL_MARGIN_S = 60.0
_PROXIED = frozenset({
    "begin_weight_update", "end_weight_update", "flush_cache", "init_weights_update_group",
    "destroy_weights_update_group", "update_weights_from_distributed", "load_state_dict",
    "parameter_names", "release_memory", "resume_memory",
})


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

    def __init__(self, handle: Any, name: str, engine_args: dict[str, Any], timeout_s: float) -> None:
        self.handle = handle
        self.name = name
        self.engine_args = engine_args
        self.timeout_s = timeout_s

    def _wait(self, ref: Any, timeout_s: float | None) -> Any:
        return ray.get(ref, timeout=(timeout_s or self.timeout_s) + CALL_MARGIN_S)

    def update_weights_from_tensor(self, named_tensors: Any, **kwargs: Any) -> None:
        payload = None
        if self.engine_args.get("kind") == "sglang":
            from rlsys.rollout.sglang_engine import serialize_named_tensors

            payload = serialize_named_tensors(named_tensors)
            named_tensors = None
        self._wait(self.handle.update_weights_from_tensor.remote(named_tensors, payload, **kwargs),
                   kwargs.get("timeout_s"))

    def __getattr__(self, method: str) -> Any:
        if method not in _PROXIED:
            raise AttributeError(method)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._wait(self.handle.call.remote(method, *args, **kwargs), kwargs.get("timeout_s"))

        return call


class EngineWorker:
    """One rollout engine (SGLang or HF) in a Ray actor."""

    def __init__(self, run: RunConfig, model_path: str, device: str, gpu_index: int) -> None:
        rollout = run.rollout
        if device == "cpu":
            use_cpu_threads(run.cluster.devices_per_node)
        self.kind = rollout.engine
        if self.kind == "hf":
            import torch

            from rlsys.rollout.hf_engine import HFEngine

            dtype = torch.float32 if device == "cpu" or rollout.dtype in ("auto", "float32") else getattr(
                torch, rollout.dtype)
            self.engine: Any = HFEngine(model_path, dtype=dtype, device="cpu" if device == "cpu" else f"cuda:{gpu_index}")
            self.engine_args: dict[str, Any] = {"tp_size": 1}
        else:
            from rlsys.rollout.sglang_engine import SGLangEngine

            colocated_gpu = run.cluster.placement == "colocated" and device == "cuda"
            extra = {"base_gpu_id": gpu_index} if device == "cuda" else None
            self.engine = SGLangEngine(
                model_path, tp_size=rollout.tp, device=device,
                dtype=None if rollout.dtype == "auto" else rollout.dtype,
                mem_fraction_static=rollout.mem_fraction_static, seed=run.runner.seed,
                enable_memory_saver=colocated_gpu, timeout_s=rollout.timeout_s, extra_engine_args=extra,
            )
            self.engine_args = dict(self.engine.engine_args)
        self.engine_args["kind"] = self.kind

    def describe(self) -> tuple[str, dict[str, Any]]:
        return getattr(self.engine, "name", self.kind), self.engine_args

    def generate(self, prompt_ids: list[list[int]], params: Any) -> list[Any]:
        return self.engine.generate(prompt_ids, params)

    def update_weights_from_tensor(self, named_tensors: Any, payload: bytes | None, **kwargs: Any) -> None:
        if payload is not None:
            self.engine.update_weights_from_serialized(payload, **kwargs)
        else:
            self.engine.update_weights_from_tensor(named_tensors, **kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method not in _PROXIED:
            raise AttributeError(f"engine worker: {method} is not forwarded")
        if self.kind == "hf" and method in ("release_memory", "resume_memory"):
            return None
        return getattr(self.engine, method)(*args, **kwargs)

    def shutdown(self) -> None:
        self.engine.shutdown()


class ActorWorker:
    """One Megatron rank in a Ray actor (see the top)."""

    def __init__(self, rank: int, world_size: int, gpu_index: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.gpu_index = gpu_index
        self.actor: Any = None
        self.transport: Any = None

    def address(self) -> tuple[str, int]:
        """Where rank 0 hosts the process group's store (called on rank 0 before any setup)."""
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, run: RunConfig, model_path: str, master: tuple[str, int]) -> None:
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.gpu_index))
        # megatron-core repeats these at every import on machines without TE or apex (CPU); the
        # fallbacks they announce are the intended ones there.
        warnings.filterwarnings("ignore", message=r".*(Apex is|Apex are|Transformer Engine and Apex are) not installed")
        from rlsys.actor.actor import MegatronActor
        from rlsys.actor.parallel import initialize_parallel

        # The group outlives any engine call: a sync waits for the engine while the other ranks
        # wait in a collective (see rlsys.sync.weight_sync).
        from rlsys.cluster.placement import resolve_device

        backend = "nccl" if resolve_device(run.cluster.device) == "cuda" else "gloo"
        if backend == "gloo":
            use_cpu_threads(run.cluster.devices_per_node)
        initialize_parallel(run.actor.tp, run.actor.pp, seed=run.runner.seed, backend=backend,
                            timeout_s=max(1800.0, 2 * run.sync.timeout_s, 2 * run.rollout.timeout_s))
        self.run = run
        self.actor = MegatronActor(run.actor, run.algorithm, model_path=model_path, seed=run.runner.seed)

    def connect_engines(self, engines: list[tuple[Any, str, dict[str, Any]]], transport: str) -> None:
        """Rank 0: one transport per engine, behind one fan-out."""
        if self.rank != 0:
            return
        from rlsys.sync.transports import FanOutTransport
        from rlsys.sync.weight_sync import make_transport

        device = self.actor.layout.device
        transports = []
        for index, (handle, name, args) in enumerate(engines):
            proxy = EngineProxy(handle, name, args, self.run.sync.timeout_s)
            config = self.run.sync
            if len(engines) > 1:
                import dataclasses

                config = dataclasses.replace(config, group_name=f"{config.group_name}_{index}")
            transports.append(make_transport(config, proxy, weights_device=device, transport=transport))
        self.transport = FanOutTransport(transports)

    def compute_logprobs(self, batch: Any) -> list[Any]:
        return self.actor.compute_logprobs(batch).logprobs

    def train_step(self, batch: Any) -> dict[str, float]:
        return self.actor.train_step(batch)

    def sync_weights(self) -> dict[str, float]:
        from rlsys.sync.weight_sync import sync_weights

        report = sync_weights(self.actor.model, self.actor.hf_config, self.transport,
                              bucket_bytes=self.run.sync.bucket_bytes)
        return report.as_metrics()

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
        if self.transport is not None:
            self.transport.close()
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
