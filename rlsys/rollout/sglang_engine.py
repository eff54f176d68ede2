"""SGLang as the rollout engine: sglang's offline ``Engine`` in a worker process of its own.

Choices:
- The sglang ``Engine`` runs in a worker process (``python -m rlsys.rollout.sglang_engine``), never
  in the trainer, because
  * when one of sglang's child processes dies, sglang kills its parent process (a watchdog thread
    sends SIGQUIT, whose handler kills the whole process tree). Here that parent is the worker: the
    trainer gets a ``RolloutEngineError`` instead of dying;
  * sglang's start-up changes process-wide state: the multiprocessing start method, the SIGQUIT
    handler, RLIMIT_NOFILE, several environment variables, and (at ``import sglang``) monkey patches
    to transformers;
  * on CPU the stand-in packages of ``rlsys.platform.sglang_cpu`` must be first on the path of every
    sglang process. They are set in the worker's environment, so they never shadow anything in the
    trainer. The trainer never imports sglang.
- The worker talks over a private socket pair (inherited file descriptor, no port, no
  authentication to get wrong). One request at a time (calls from several threads are serialised),
  each with an id: after a timeout the trainer discards the late reply of the abandoned request
  instead of taking it for the next one.
- Every call has a timeout (``timeout_s`` of the engine, or per call). A timeout, an sglang error or
  the worker's death raises ``RolloutEngineError`` naming the engine and the phase; a death also gives
  the exit code and the end of the worker's log. A timeout leaves the worker running (it may only be
  slow) and the abandoned request still runs to completion inside sglang, delaying the next call;
  ``shutdown()`` always ends the worker and every process under it.
- ``n`` samples per prompt: each prompt is repeated ``n`` times in the one ``generate`` call
  (prompt-major) instead of using sglang's ``n``, so that every sample has its own sampling seed.
  The radix cache shares the prompt's KV between the copies.
- Seeds: sample ``j`` of prompt ``i`` gets ``sampling_seed = derive_sampling_seed(seed, i, j)``.
  sglang honours ``sampling_seed`` only with deterministic inference
  (``SGLangEngine(deterministic_inference=True)``), which needs a GPU attention backend (fa3, fa4,
  flashinfer or triton). Without it (always on CPU) samples come from the scheduler's torch
  generator, seeded once from ``seed`` at start, so a call's samples depend on the calls before it.
- Log-probs are sglang's ``output_token_logprobs`` (``return_logprob=True``). In sglang 0.5.21
  (``layers/sampler.py``) these are ``log(softmax(logits / T))`` of the sampled token, computed before
  top-p/top-k filtering (which works on a sorted copy), and ``log_softmax(logits)`` when greedy:
  exactly base.py's quantity, as long as ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is unset and
  ``rl_on_policy_target`` is not used (it switches to a bf16 log-softmax). The worker removes the
  variable from its environment.
- Responses: ``output_ids`` as sglang returns them. A response ended by the end-of-sequence token
  keeps that token (as in ``HFEngine``); a stop string is kept in the text (``no_stop_trim``).
  Finish reasons map 1:1 ('stop', 'length'); an aborted request raises.
- Weight updates: tensors are serialised in the trainer (``serialize_named_tensors``) and the worker
  hands the bytes to sglang's scheduler untouched. CPU tensors are copied once into one POSIX
  shared-memory block per bucket and pickled as its name (torch's ``file_system`` sharing,
  whose rebuild sglang's safe unpickler allows): the scheduler maps the block instead of
  receiving the bytes through Ray and zmq. torch's shared-memory manager counts the references,
  so the block is unlinked once the scheduler has dropped it, and the trainer need not keep it.
  ``by_value=True`` pickles them by value instead, for a server on another host (HTTP engine).
  CUDA tensors go as CUDA IPC handles (no copy; the
  scheduler opens them on the same device index, so the worker, a child of the trainer, must see the
  same ``CUDA_VISIBLE_DEVICES``, which it inherits). sglang 0.5.21 accepts tensor and distributed
  updates only inside a weight-update session: an update outside one opened with
  ``begin_weight_update()`` runs in a session of its own. The prefix cache is flushed after an
  update by a separate flush that waits for the scheduler to be idle, never by sglang's
  flush-after-update, which asserts an idle scheduler (see ``_in_session``).
- Liveness (``health_check_s``, 0: off): a thread checks the engine every ``health_check_s``
  seconds. Idle, it asks for one token (the whole path: worker, scheduler, detokenizer) within
  ``health_check_s``. Busy, a one-token request would queue behind the call in flight, so it
  looks at the processes instead: the call is hung when one of them is stopped (SIGSTOP, a
  debugger) or a zombie, or, during a generate, when none of them used any CPU time since the
  last check (a generating scheduler always does; one waiting in a weight broadcast may not,
  so that test is left out of updates). A hung engine is killed, with everything under it: the
  call in flight, or the next one, raises ``RolloutEngineError`` saying why. Inside a weight-update
  session, and while the memory is released, the idle check is skipped (sglang may hold
  generation until the session ends; a released engine has no weights to generate with).
- ``release_memory``/``resume_memory`` (GPU colocation) need ``enable_memory_saver=True``; on CPU there
  is no device memory to hand back and they only log that.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from rlsys.platform import sglang_cpu
from rlsys.rollout.base import Sample, SamplingParams, WeightUpdateSessions

logger = logging.getLogger(__name__)

_LOG_TAIL_LINES = 25
_POLL_INTERVAL_S = 0.25
_HEALTH_PROMPT = [0]


class RolloutEngineError(RuntimeError):
    """A rollout engine call failed, timed out, or found its engine dead."""


# ---------------------------------------------------------------- the sglang request/response format
# Shared with rlsys.rollout.sglang_http: both talk to the same sglang request and output structures.


def derive_sampling_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A per-request seed in sglang's signed 64-bit range, distinct for every (prompt, sample)."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def sglang_sampling_params(params: SamplingParams, num_prompts: int) -> list[dict[str, Any]]:
    """One sglang sampling-params dict per request, prompt-major, ``params.n`` requests per prompt."""
    shared: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "stop": list(params.stop) or None,
        # base.py: the stop string is part of the response text.
        "no_stop_trim": True,
        "skip_special_tokens": True,
    }
    return [
        {**shared, "sampling_seed": derive_sampling_seed(params.seed, prompt, sample)}
        for prompt in range(num_prompts)
        for sample in range(params.n)
    ]


def repeat_prompts(prompt_ids: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    return [list(prompt) for prompt in prompt_ids for _ in range(n)]


def samples_from_outputs(outputs: Sequence[Mapping[str, Any]], num_prompts: int, n: int,
                         engine_name: str) -> list[Sample]:
    """``Sample``s from sglang's per-request outputs (requests in ``sglang_sampling_params`` order)."""
    if len(outputs) != num_prompts * n:
        raise RolloutEngineError(f"{engine_name}: generate: {len(outputs)} outputs for {num_prompts * n} requests")
    samples = []
    for index, output in enumerate(outputs):
        meta = output["meta_info"]
        finish = meta.get("finish_reason") or {}
        reason = finish.get("type")
        if reason not in ("stop", "length"):
            raise RolloutEngineError(f"{engine_name}: generate: request {index} finished with {finish!r}")
        response_ids = list(output["output_ids"])
        token_logprobs = meta["output_token_logprobs"]
        if [token for _, token, _ in token_logprobs] != response_ids:
            raise RolloutEngineError(
                f"{engine_name}: generate: request {index}: log-probs are not aligned with the output tokens"
            )
        samples.append(
            Sample(
                prompt_index=index // n,
                response_ids=response_ids,
                response_text=output["text"],
                logprobs=[float(logprob) for logprob, _, _ in token_logprobs],
                finish_reason=reason,
            )
        )
    return samples


def serialize_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], *, by_value: bool = False) -> bytes:
    """Named tensors as the bytes sglang's scheduler deserialises in ``update_weights_from_tensor``.

    CPU tensors: copied into one shared-memory block and pickled as views of it (module doc), or
    pickled by value with ``by_value``. CUDA tensors go through torch's multiprocessing pickler, i.e.
    as CUDA IPC handles: the tensors must stay alive until the update call returns. Mixed devices
    are refused.
    """
    named = [(name, tensor.detach()) for name, tensor in named_tensors]
    devices = {tensor.device.type for _, tensor in named}
    if devices <= {"cpu"} and by_value:
        return pickle.dumps([(name, _owning_copy(tensor)) for name, tensor in named], protocol=pickle.HIGHEST_PROTOCOL)
    if devices <= {"cpu"}:
        named = _in_one_shared_block(named)
    elif devices != {"cuda"}:
        raise ValueError(f"update_weights_from_tensor needs tensors on one kind of device, got {sorted(devices)}")
    from multiprocessing.reduction import ForkingPickler

    buffer = io.BytesIO()
    with _file_system_sharing():
        ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(named)
    return buffer.getvalue()


_SHARED_ALIGNMENT = 64
"""Byte alignment of each tensor inside a shared block (any dtype's view must be aligned)."""


def _in_one_shared_block(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Copies of ``named`` that are views of one new shared-memory (file_system) storage."""
    offsets, total = [], 0
    for _, tensor in named:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // _SHARED_ALIGNMENT) * _SHARED_ALIGNMENT
    with _file_system_sharing():
        storage = torch.UntypedStorage._new_shared(max(total, 1))
    block = torch.empty(0, dtype=torch.uint8).set_(storage)
    copies = []
    for (name, tensor), offset in zip(named, offsets):
        nbytes = tensor.numel() * tensor.element_size()
        view = block[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        copies.append((name, view))
    return copies


@contextlib.contextmanager
def _file_system_sharing() -> Iterator[None]:
    """torch's ``file_system`` sharing strategy while inside: shared CPU storages are named POSIX
    shared memory that any process on the host can open (the default passes file descriptors,
    which only related processes can receive)."""
    import torch.multiprocessing as torch_mp

    previous = torch_mp.get_sharing_strategy()
    torch_mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch_mp.set_sharing_strategy(previous)


def _owning_copy(tensor: torch.Tensor) -> torch.Tensor:
    """Pickling a view writes its whole storage: copy views (e.g. slices of a flat bucket) first."""
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


# ---------------------------------------------------------------- the engine (trainer side)


class SGLangEngine(WeightUpdateSessions):
    """sglang's offline engine behind the rollout interface, in a worker process (see the top)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        tp_size: int = 1,
        device: str = "cuda",
        dtype: str | torch.dtype | None = None,
        mem_fraction_static: float | None = None,
        max_total_tokens: int | None = None,
        seed: int = 0,
        deterministic_inference: bool = False,
        enable_memory_saver: bool = False,
        timeout_s: float = 600.0,
        startup_timeout_s: float = 600.0,
        log_path: str | Path | None = None,
        log_level: str = "warning",
        extra_engine_args: Mapping[str, Any] | None = None,
        name: str | None = None,
        health_check_s: float = 0.0,
    ) -> None:
        """Start the worker and its sglang engine; returns once the engine serves requests.

        ``dtype`` is sglang's name ("bfloat16", "float32", "auto") or a torch dtype. ``dtype``,
        ``mem_fraction_static`` and ``max_total_tokens`` left as ``None`` take sglang's defaults on
        GPU and ``rlsys.platform.sglang_cpu``'s on CPU. ``extra_engine_args`` are further
        sglang ``ServerArgs`` fields. The worker's output goes to ``log_path`` (default: a new file in
        the temporary directory; see ``self.log_path``). ``name`` starts every error message (default:
        "sglang engine (model <path>)"); ``health_check_s`` is the liveness period (see the top).
        """
        self.model_path = str(model_path)
        self.device = device
        self.name = name or f"sglang engine (model {self.model_path})"
        self.timeout_s = timeout_s
        self.health_check_s = health_check_s
        self._request_ids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._in_session = False
        self._released = False
        self._busy_with: str | None = None
        self.hung: str | None = None
        """Why the liveness check killed the engine (None while it has not)."""
        requested = {
            "model_path": self.model_path,
            "tp_size": tp_size,
            "dtype": str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype,
            "mem_fraction_static": mem_fraction_static,
            "max_total_tokens": max_total_tokens,
            "random_seed": seed,
            "enable_deterministic_inference": deterministic_inference or None,
            "enable_memory_saver": enable_memory_saver or None,
            "log_level": log_level,
            **(extra_engine_args or {}),
        }
        self.engine_args = sglang_cpu.engine_args_for_device(device, requested)
        self.log_path = Path(log_path) if log_path else _new_log_file()

        started = time.monotonic()
        self._conn, self._process = self._launch_worker()
        self.worker_pid = self._process.pid
        try:
            ready = self._call("start", startup_timeout_s, engine_args=self.engine_args)
        except BaseException:
            self._closed = True
            self._terminate_worker(graceful=False)
            raise
        self.sglang_child_pids: list[int] = ready["child_pids"]
        self.startup_s = time.monotonic() - started
        self._stop_watch = threading.Event()
        if health_check_s > 0:
            threading.Thread(target=self._watch, name="rlsys-engine-liveness", daemon=True).start()

    def _launch_worker(self) -> tuple[Connection, subprocess.Popen[bytes]]:
        env = sglang_cpu.sglang_process_env() if sglang_cpu.is_cpu_device(self.device) else dict(os.environ)
        # Switches sglang's returned log-probs to the untempered distribution (see the top).
        env.pop("SGLANG_RETURN_ORIGINAL_LOGPROB", None)
        ours, theirs = socket.socketpair()
        with ours, theirs, open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, "--fd", str(theirs.fileno())],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=[theirs.fileno()],
            )
            # Connection takes its own duplicate; the worker holds the only other end, so its death
            # reads as end-of-file here.
            conn = Connection(os.dup(ours.fileno()))
        return conn, process

    # -------------------------------------------------------------- rollout interface

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, *,
                 timeout_s: float | None = None) -> list[Sample]:
        """Sample ``params.n`` responses per prompt, all requests in one sglang call; prompt-major."""
        outputs = self._call(
            "generate",
            timeout_s,
            input_ids=repeat_prompts(prompt_ids, params.n),
            sampling_params=sglang_sampling_params(params, len(prompt_ids)),
        )
        return samples_from_outputs(outputs, len(prompt_ids), params.n, self.name)

    def health_check(self, timeout_s: float = 60.0) -> None:
        """Raise ``RolloutEngineError`` unless the engine generates one token within ``timeout_s``:
        that exercises the worker, the scheduler and the detokenizer."""
        self._call("health", timeout_s)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop sglang and the worker; idempotent. Whatever state the worker is in (busy, hung,
        dead), it and every process under it are gone when this returns."""
        if self._closed:
            return
        self._closed = True
        self._stop_watch.set()
        graceful = False
        with contextlib.suppress(RolloutEngineError):
            if self._process.poll() is None:
                self._call("shutdown", timeout_s, allow_closed=True)
                graceful = True
        self._terminate_worker(graceful)

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # -------------------------------------------------------------- weight updates

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                                   flush_cache: bool = True, load_format: str | None = None,
                                   timeout_s: float | None = None) -> None:
        """Load tensors by HF name (all TP ranks get the full tensors and shard them themselves)."""
        self.update_weights_from_serialized(serialize_named_tensors(named_tensors), flush_cache=flush_cache,
                                            load_format=load_format, timeout_s=timeout_s)

    def update_weights_from_serialized(self, payload: bytes | Sequence[bytes], *, flush_cache: bool = True,
                                       load_format: str | None = None, timeout_s: float | None = None) -> None:
        """``update_weights_from_tensor`` with tensors already serialised by ``serialize_named_tensors``
        (in the process that owns them: CUDA IPC handles must come from there). One payload goes to
        every TP rank; a list gives TP rank ``i`` its ``i``-th payload (colocated: the one made on
        that rank's own GPU)."""
        payloads = [payload] if isinstance(payload, bytes) else list(payload)
        tp_size = int(self.engine_args.get("tp_size") or 1)
        if len(payloads) not in (1, tp_size):
            raise ValueError(f"{self.name}: {len(payloads)} payloads for an engine of {tp_size} TP ranks")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self._call("update_weights_from_tensor", timeout, payloads=payloads, load_format=load_format,
                   flush_wait_s=timeout if flush_cache else None)

    def update_weights_from_disk(self, model_path: str | Path, *, timeout_s: float | None = None) -> None:
        """Reload every weight from an HF directory with the engine's architecture."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self._call("update_weights_from_disk", timeout, model_path=str(model_path), flush_wait_s=timeout)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str = "nccl", *,
                                  timeout_s: float | None = None) -> None:
        """Join the process group a trainer broadcasts weights in; TP rank r joins as
        ``rank_offset + r``. Blocks until the whole group has formed: run it in a thread while the
        trainer side joins."""
        self._call("init_weights_update_group", timeout_s, master_address=master_address,
                   master_port=master_port, rank_offset=rank_offset, world_size=world_size,
                   group_name=group_name, backend=backend)

    def destroy_weights_update_group(self, group_name: str, *, timeout_s: float | None = None) -> None:
        self._call("destroy_weights_update_group", timeout_s, group_name=group_name)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str | torch.dtype],
                                        shapes: Sequence[Sequence[int]], group_name: str, *,
                                        flush_cache: bool = True, timeout_s: float | None = None) -> None:
        """Receive tensors broadcast from rank 0 of ``group_name``, in this order. Blocks until all
        have arrived: run it in a thread while the trainer broadcasts."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self._call("update_weights_from_distributed", timeout, names=list(names),
                   dtypes=[str(dtype).removeprefix("torch.") for dtype in dtypes],
                   shapes=[list(shape) for shape in shapes], group_name=group_name,
                   flush_wait_s=timeout if flush_cache else None)

    def begin_weight_update(self, *, timeout_s: float | None = None) -> None:
        """Open a weight-update session for several updates (e.g. one per bucket); sglang finalises
        the weights once, at ``end_weight_update``."""
        self._call("begin_weight_update", timeout_s)
        self._in_session = True

    def end_weight_update(self, *, timeout_s: float | None = None) -> None:
        self._in_session = False
        self._call("end_weight_update", timeout_s)

    def flush_cache(self, *, timeout_s: float | None = None) -> None:
        """Drop the prefix (radix) cache, e.g. after weights changed without an update call. sglang
        flushes only when idle; it waits for that up to the call's timeout."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self._call("flush_cache", timeout, flush_wait_s=timeout)

    def release_memory(self, *, timeout_s: float | None = None) -> None:
        """Hand the GPU memory of weights and KV cache back (colocated training)."""
        if sglang_cpu.is_cpu_device(self.device):
            logger.info("%s: release_memory does nothing on CPU (no device memory to release)", self.name)
            return
        self._call("release_memory", timeout_s)
        self._released = True

    def resume_memory(self, *, timeout_s: float | None = None) -> None:
        """Take the memory released by ``release_memory`` back (the weights must be reloaded after)."""
        if sglang_cpu.is_cpu_device(self.device):
            logger.info("%s: resume_memory does nothing on CPU (nothing was released)", self.name)
            return
        self._call("resume_memory", timeout_s)
        self._released = False

    # -------------------------------------------------------------- plumbing

    def _call(self, method: str, timeout_s: float | None, *, allow_closed: bool = False, **kwargs: Any) -> Any:
        if self._closed and not allow_closed:
            raise RolloutEngineError(f"{self.name}: {method}: the engine was shut down")
        with self._lock:
            self._busy_with = method
            try:
                return self._call_locked(method, self.timeout_s if timeout_s is None else timeout_s, kwargs)
            finally:
                self._busy_with = None

    # -------------------------------------------------------------- liveness (see the top)

    def _watch(self) -> None:
        cpu_before: float | None = None
        while not self._stop_watch.wait(self.health_check_s):
            if self._process.poll() is not None:
                return  # dead: the next call reports it
            if self._lock.acquire(blocking=False):
                cpu_before = None
                try:
                    if self._closed or self._in_session or self._released:
                        continue
                    try:
                        self._call_locked("health", self.health_check_s, {})
                        continue
                    except RolloutEngineError as error:
                        problem = f"it did not answer a one-token request within {self.health_check_s:g} s ({error})"
                finally:
                    self._lock.release()
            else:
                problem, cpu_before = busy_engine_problem(self._process.pid, self._busy_with, cpu_before)
            if problem is not None:
                self._declare_hung(problem)
                return

    def _declare_hung(self, problem: str) -> None:
        self.hung = f"hung: {problem}; found by the liveness check (rollout.health_check_s={self.health_check_s:g})"
        logger.error("%s: %s; killing it", self.name, self.hung)
        self._kill_tree(wait_s=0.1)  # the call in flight reads end-of-file and raises with self.hung

    def _call_locked(self, method: str, timeout: float, kwargs: dict[str, Any]) -> Any:
        if self.hung is not None:
            raise self._death(method)
        request_id = next(self._request_ids)
        if method in _SESSION_UPDATES:
            kwargs["own_session"] = not self._in_session
        try:
            self._conn.send((request_id, method, kwargs))
        except OSError:
            raise self._death(method) from None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RolloutEngineError(f"{self.name}: {method} timed out after {timeout:g} s")
            if self._conn.poll(min(remaining, _POLL_INTERVAL_S)):
                try:
                    reply_id, succeeded, result = self._conn.recv()
                except (EOFError, OSError):
                    raise self._death(method) from None
                if reply_id != request_id:
                    continue  # the late reply of a request that timed out
                if succeeded:
                    return result
                raise RolloutEngineError(f"{self.name}: {method} failed: {result}")
            if self._process.poll() is not None:
                raise self._death(method)

    def _death(self, method: str) -> RolloutEngineError:
        if self.hung is not None:
            return RolloutEngineError(f"{self.name}: {method}: {self.hung}")
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        state = "closed its connection" if code is None else f"exited with code {code}"
        return RolloutEngineError(
            f"{self.name}: {method}: the engine process {state} (its log: {self.log_path})\nEnd of the log:\n"
            + self._log_tail()
        )

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(log unreadable)"
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def _terminate_worker(self, graceful: bool) -> None:
        """End the worker and everything under it. After a graceful shutdown the worker is stopping
        sglang and exits by itself; otherwise it is killed at once. sglang's children die with the
        worker (PR_SET_PDEATHSIG), but they are collected first and killed too, in case one is stuck."""
        with contextlib.suppress(OSError):
            self._conn.close()
        self._kill_tree(wait_s=60 if graceful else 0.1)

    def _kill_tree(self, wait_s: float) -> None:
        """Wait ``wait_s`` for the worker to exit, else kill it; then kill what is left under it."""
        import psutil

        try:
            descendants = psutil.Process(self._process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if self._process.poll() is None:
            try:
                self._process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for process in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(descendants, timeout=10)


def busy_engine_problem(worker_pid: int, call: str | None, cpu_before: float | None) -> tuple[str | None, float | None]:
    """(why the engine under ``worker_pid`` is hung in ``call``, or None; its CPU seconds so far).

    Hung: a process of it stopped or a zombie, or during a generate no CPU time used since
    ``cpu_before`` (the previous check's figure; None: no previous check)."""
    import psutil

    try:
        worker = psutil.Process(worker_pid)
        processes = [worker, *worker.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None, None  # dead: the call in flight reports it
    cpu = 0.0
    for process in processes:
        try:
            status = process.status()
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP, psutil.STATUS_ZOMBIE):
            role = "worker" if process.pid == worker_pid else "sglang process"
            return f"its {role} (pid {process.pid}) is {status} during {call}", None
        cpu += times.user + times.system
    if call == "generate" and cpu_before is not None and cpu <= cpu_before:
        return f"none of its processes used any CPU time during {call} since the last check", None
    return None, cpu


def _new_log_file() -> Path:
    descriptor, path = tempfile.mkstemp(prefix="rlsys-sglang-", suffix=".log")
    os.close(descriptor)
    return Path(path)


_SESSION_UPDATES = frozenset({"update_weights_from_tensor", "update_weights_from_distributed"})


# ---------------------------------------------------------------- the worker process


def _worker_main(fd: int) -> None:
    conn = Connection(fd)
    os.set_inheritable(fd, False)  # sglang's own children must not hold the trainer's socket
    _exit_with_parent()
    engine = None
    try:
        while True:
            try:
                request_id, method, kwargs = conn.recv()
            except EOFError:
                return  # the trainer is gone or dropped the engine
            try:
                if method == "start":
                    engine = _start_engine(kwargs["engine_args"])
                    result: Any = {"child_pids": list(engine.get_all_child_pids())}
                elif method == "shutdown":
                    conn.send((request_id, True, None))
                    return
                else:
                    result = _HANDLERS[method](engine, **kwargs)
            except Exception:
                conn.send((request_id, False, traceback.format_exc(limit=8)))
                continue
            conn.send((request_id, True, result))
    finally:
        if engine is not None:
            engine.shutdown()


def _exit_with_parent() -> None:
    """End this worker when the trainer dies, even in the middle of a request; sglang's scheduler
    and detokenizer then die with it (they set PR_SET_PDEATHSIG towards this process). A polling
    thread rather than PR_SET_PDEATHSIG here: that signal fires when the parent *thread* ends, and
    a trainer may well start the engine from a short-lived thread."""
    import signal
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="rlsys-parent-watch", daemon=True).start()


def _start_engine(engine_args: dict[str, Any]) -> Any:
    on_cpu = sglang_cpu.is_cpu_device(engine_args["device"])
    if on_cpu:
        sglang_cpu.assert_stand_ins_active()
    import sglang

    if on_cpu:
        sglang_cpu.warn_if_unchecked_version(sglang.__version__)
    return sglang.Engine(**engine_args)


def _generate(engine: Any, *, input_ids: list[list[int]], sampling_params: list[dict[str, Any]]) -> list[dict]:
    outputs = engine.generate(input_ids=input_ids, sampling_params=sampling_params, return_logprob=True)
    return [{"text": o["text"], "output_ids": o["output_ids"], "meta_info": {
        "finish_reason": o["meta_info"]["finish_reason"],
        "output_token_logprobs": o["meta_info"]["output_token_logprobs"],
    }} for o in outputs]


def _health(engine: Any) -> None:
    engine.generate(input_ids=_HEALTH_PROMPT, sampling_params={"max_new_tokens": 1, "temperature": 0.0})


def _checked(outcome: Any, what: str) -> None:
    """sglang answers control calls with ``(success, message, ...)`` or an object with ``success``
    and ``message`` instead of raising."""
    if isinstance(outcome, tuple) and len(outcome) >= 2:
        success, message = outcome[0], outcome[1]
    else:
        success, message = getattr(outcome, "success", True), getattr(outcome, "message", "")
    if success is False:
        raise RuntimeError(f"{what}: {message or 'refused without a reason'}")


def _in_session(engine: Any, own_session: bool, update: Callable[[], Any], what: str,
                flush_wait_s: float | None) -> None:
    """Run ``update`` inside a weight-update session (its own unless the caller opened one), then
    flush the prefix cache if asked. sglang's own flush-after-update (``flush_cache=True``) asserts
    that the scheduler is idle at that instant, which right after a batch finished it may not yet
    be, and the failed assertion would kill the scheduler; so the update runs with
    ``flush_cache=False`` and the flush is a separate one that waits for idle."""
    if own_session:
        _checked(engine.begin_weight_update(), "begin_weight_update")
    try:
        _checked(update(), what)
    finally:
        if own_session:
            _checked(engine.end_weight_update(), "end_weight_update")
    if flush_wait_s is not None:
        _flush_cache(engine, flush_wait_s=flush_wait_s)


def _update_weights_from_tensor(engine: Any, *, payloads: list[bytes], load_format: str | None, own_session: bool,
                                flush_wait_s: float | None) -> None:
    # Engine.update_weights_from_tensor minus its serialisation step: the payload is already what
    # the scheduler deserialises, one per TP rank (sglang 0.5.21 entrypoints/engine.py).
    from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput

    request = UpdateWeightsFromTensorReqInput(
        serialized_named_tensors=payloads * engine.server_args.tp_size if len(payloads) == 1 else payloads,
        load_format=load_format,
        flush_cache=False,
    )
    _in_session(engine, own_session,
                lambda: engine.loop.run_until_complete(engine.tokenizer_manager.update_weights_from_tensor(request, None)),
                "update_weights_from_tensor", flush_wait_s)


def _update_weights_from_distributed(engine: Any, *, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                     group_name: str, own_session: bool, flush_wait_s: float | None) -> None:
    _in_session(engine, own_session,
                lambda: engine.update_weights_from_distributed(names=names, dtypes=dtypes, shapes=shapes,
                                                               group_name=group_name, flush_cache=False),
                "update_weights_from_distributed", flush_wait_s)


def _update_weights_from_disk(engine: Any, *, model_path: str, flush_wait_s: float) -> None:
    # Engine.update_weights_from_disk with flush_cache=False, for the reason given in _in_session.
    from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqInput

    request = UpdateWeightFromDiskReqInput(model_path=model_path, flush_cache=False)
    _checked(engine.loop.run_until_complete(engine.tokenizer_manager.update_weights_from_disk(request, None)),
             "update_weights_from_disk")
    _flush_cache(engine, flush_wait_s=flush_wait_s)


def _flush_cache(engine: Any, *, flush_wait_s: float) -> None:
    # Engine.flush_cache() (sglang 0.5.21) flushes only if the scheduler is idle at that instant.
    # It is not yet idle in the loop iteration right after its last batch finished (``last_batch``
    # still holds that batch), so a flush sent just after a generate returned can be refused; with
    # a timeout the scheduler defers the flush until it is idle.
    _checked(engine.loop.run_until_complete(engine.tokenizer_manager.flush_cache(timeout_s=flush_wait_s)),
             "flush_cache")


def _simple(method: str) -> Callable[..., None]:
    def handle(engine: Any, **kwargs: Any) -> None:
        _checked(getattr(engine, method)(**kwargs), method)

    return handle


_HANDLERS: dict[str, Callable[..., Any]] = {
    "generate": _generate,
    "health": _health,
    "update_weights_from_tensor": _update_weights_from_tensor,
    "update_weights_from_distributed": _update_weights_from_distributed,
    "update_weights_from_disk": _update_weights_from_disk,
    "init_weights_update_group": _simple("init_weights_update_group"),
    "destroy_weights_update_group": _simple("destroy_weights_update_group"),
    "begin_weight_update": _simple("begin_weight_update"),
    "end_weight_update": _simple("end_weight_update"),
    "flush_cache": _flush_cache,
    "release_memory": _simple("release_memory_occupation"),
    "resume_memory": _simple("resume_memory_occupation"),
}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="rlsys sglang worker (started by SGLangEngine)")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the trainer")
    _worker_main(parser.parse_args().fd)
