"""How one bucket of HF-named tensors reaches a rollout engine: three transports, one interface.

Only the sync source rank (see ``rlsys.sync.weight_sync``) holds a transport. A sync is
``begin()``, ``send(bucket)`` per bucket, then ``finish()``, or ``abort()`` after a failure.
Engines are duck-typed (``SGLangEngine``, ``SGLangHTTPEngine``, ``HFEngine``); this module imports
no engine package.

- ``ColocatedTransport`` (engine on the trainer's host and devices): every bucket goes through
  ``engine.update_weights_from_tensor`` (CUDA IPC handles on GPU, the tensors by value on CPU),
  all of one sync inside ONE weight-update session, and the prefix cache is flushed once, after
  the session closed.
- ``DisaggregatedTransport`` (engine anywhere on the network): the source is rank 0 of a process
  group the engine's TP ranks join as ranks 1..tp (``init_weights_update_group``; NCCL on GPU,
  gloo on CPU), created once and kept across syncs. Per bucket the engine is told the names,
  dtypes and shapes (``update_weights_from_distributed``, in a thread: it returns only after it
  received everything) while the source broadcasts the tensors in the same order. One session
  and one cache flush per sync, as above.
- ``InProcessTransport`` (``HFEngine``, the fallback engine): ``engine.load_state_dict(bucket)``;
  at ``finish`` every parameter of the engine's model must have been sent.

Failures and time (what must stay true: a sync never hangs):
- Every engine call and every wait has the transport's ``timeout_s``; a failure or timeout
  raises (the engine's own error, or ``WeightSyncError`` for a wait of this module), and
  ``sync_weights`` reports it as a ``WeightSyncError`` naming the engine, the transport and the
  phase (begin, bucket k, finish).
- In the disaggregated transport the broadcasts and the engine call are watched together: an
  engine that fails or dies while the source broadcasts is reported at once, not after the
  broadcasts time out. A broadcast that was abandoned leaves the group unusable: the transport
  then refuses further syncs (build a new one; the engine's side may also need a restart, since
  sglang creates its half of the group without a timeout of ours).
- ``abort()`` closes the engine's weight-update session, waiting at most ``ABORT_TIMEOUT_S``,
  and swallows its error, so the first error is the one reported and a hung engine costs its
  timeout plus at most ``ABORT_TIMEOUT_S``, not two timeouts.
  (For that reason the transports open and close the session themselves instead of using the
  engines' ``weight_update_session()`` context manager, whose exit waits a full timeout.)

The trainer side of the process group mirrors sglang 0.5.21's ``init_custom_process_group``
(``sglang/srt/utils/common.py``) on torch 2.13: a TCP store that the engine's ranks reach at
``master_address:master_port``, wrapped in the prefixes its rendezvous and torch's
``_new_process_group_helper`` add (``<group>``, then ``<group>/``, then ``cpu/`` for gloo or
``cuda/`` for NCCL: one backend is registered when every device maps to the same one). Checked on
CPU with gloo; the NCCL branch follows the same conventions but has not run here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import torch.distributed as dist

from rlsys.sync.buckets import NamedTensors

COLOCATED = "colocated"
DISAGGREGATED = "disaggregated"
IN_PROCESS = "in_process"
TRANSPORTS = (COLOCATED, DISAGGREGATED, IN_PROCESS)

ABORT_TIMEOUT_S = 10.0
"""Longest wait for closing the engine's session after a failure (see the top)."""
_POLL_S = 0.01

T = TypeVar("T")


class WeightSyncError(RuntimeError):
    """A weight sync failed or timed out (``sync_weights``' message names engine, transport, phase)."""


class WeightTransport(Protocol):
    name: str

    def begin(self) -> None: ...

    def send(self, bucket: NamedTensors) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


def engine_name(engine: Any) -> str:
    return str(getattr(engine, "name", type(engine).__name__))


class ColocatedTransport:
    """Buckets by ``update_weights_from_tensor`` in one session per sync (see the top)."""

    def __init__(self, engine: Any, *, timeout_s: float = 600.0) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self.name = f"{engine_name(engine)} via {COLOCATED} transport"

    def begin(self) -> None:
        self.engine.begin_weight_update(timeout_s=self.timeout_s)

    def send(self, bucket: NamedTensors) -> None:
        self.engine.update_weights_from_tensor(bucket, flush_cache=False, timeout_s=self.timeout_s)

    def send_serialized(self, payloads: Sequence[bytes]) -> None:
        """One bucket already serialised by each feeding rank, one payload per engine TP rank."""
        self.engine.update_weights_from_serialized(list(payloads), flush_cache=False, timeout_s=self.timeout_s)

    def finish(self) -> None:
        self.engine.end_weight_update(timeout_s=self.timeout_s)
        self.engine.flush_cache(timeout_s=self.timeout_s)

    def abort(self) -> None:
        _close_session_quietly(self.engine, self.timeout_s)


class InProcessTransport:
    """Buckets by ``engine.load_state_dict`` (``HFEngine``); checks every parameter arrived."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.name = f"{engine_name(engine)} via {IN_PROCESS} transport"
        self._unsent: set[str] = set()

    def begin(self) -> None:
        self._unsent = set(self.engine.parameter_names())

    def send(self, bucket: NamedTensors) -> None:
        self.engine.load_state_dict(dict(bucket))
        self._unsent.difference_update(name for name, _ in bucket)

    def finish(self) -> None:
        if self._unsent:
            raise WeightSyncError(f"parameters of the engine's model the sync did not send: {sorted(self._unsent)[:8]}")

    def abort(self) -> None:
        self._unsent = set()


class FanOutTransport:
    """The same buckets to several engines, each through its own transport, in order."""

    def __init__(self, transports: Sequence[WeightTransport]) -> None:
        if not transports:
            raise ValueError("FanOutTransport needs at least one transport")
        self.transports = list(transports)
        self.name = transports[0].name if len(transports) == 1 else (
            f"{len(transports)} engines ({'; '.join(t.name for t in transports)})")

    def begin(self) -> None:
        for transport in self.transports:
            transport.begin()

    def send(self, bucket: NamedTensors) -> None:
        for transport in self.transports:
            transport.send(bucket)

    def finish(self) -> None:
        for transport in self.transports:
            transport.finish()

    def abort(self) -> None:
        for transport in self.transports:
            transport.abort()

    def close(self) -> None:
        for transport in self.transports:
            close = getattr(transport, "close", None)
            if close is not None:
                close()


class DisaggregatedTransport:
    """Buckets broadcast over a process group the engine joins (see the top).

    ``master_address`` must be an address of the source's host that the engine's host can reach;
    ``master_port`` 0 lets the OS pick a free port. ``engine_tp_size`` defaults to the engine's
    ``engine_args["tp_size"]`` (``SGLangEngine``) or 1.
    """

    def __init__(
        self,
        engine: Any,
        *,
        backend: str,
        master_address: str = "127.0.0.1",
        master_port: int = 0,
        group_name: str = "rlsys_weight_sync",
        engine_tp_size: int | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        self.engine = engine
        self.backend = backend
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        if engine_tp_size is None:
            engine_tp_size = int((getattr(engine, "engine_args", None) or {}).get("tp_size") or 1)
        self.world_size = 1 + engine_tp_size
        self.timeout_s = timeout_s
        self.name = f"{engine_name(engine)} via {DISAGGREGATED} transport ({backend}, group {group_name!r})"
        self._store: dist.TCPStore | None = None
        self._group: Any = None
        self._broken: str | None = None
        self._buckets_sent = 0

    @property
    def connected(self) -> bool:
        return self._group is not None

    def connect(self) -> None:
        """Form the process group with the engine (once; ``begin`` calls it when needed)."""
        self._raise_if_broken()
        if self._group is not None:
            return
        timeout = timedelta(seconds=self.timeout_s)
        store = dist.TCPStore(self.master_address, self.master_port, self.world_size, is_master=True,
                              timeout=timeout, wait_for_workers=False)
        port = store.port
        joined = _in_daemon_thread(lambda: self.engine.init_weights_update_group(
            self.master_address, port, rank_offset=1, world_size=self.world_size, group_name=self.group_name,
            backend=self.backend, timeout_s=self.timeout_s))
        formed = _in_daemon_thread(lambda: _trainer_side_group(store, self.group_name, self.backend,
                                                               self.world_size, timeout))
        try:
            _wait_for({"engine joining the group": joined, "trainer side forming the group": formed},
                      self.timeout_s, "connecting")
        except WeightSyncError as error:
            self._broken = str(error)
            raise
        self._store, self._group = store, formed.result()

    def begin(self) -> None:
        self.connect()
        self._buckets_sent = 0
        self.engine.begin_weight_update(timeout_s=self.timeout_s)

    def send(self, bucket: NamedTensors) -> None:
        self._raise_if_broken()
        names = [name for name, _ in bucket]
        tensors = [tensor.contiguous() for _, tensor in bucket]
        received = _in_daemon_thread(lambda: self.engine.update_weights_from_distributed(
            names, [t.dtype for t in tensors], [tuple(t.shape) for t in tensors], self.group_name,
            flush_cache=False, timeout_s=self.timeout_s))
        options = dist.BroadcastOptions()
        options.rootRank = 0
        try:
            works = [self._group.broadcast([tensor], options) for tensor in tensors]
            broadcast = _in_daemon_thread(lambda: _wait_works(works, self.timeout_s))
            _wait_for({"broadcast from the source": broadcast, "engine receiving": received}, self.timeout_s)
        except BaseException as error:
            self._broken = f"bucket {self._buckets_sent} of a sync: {error}"
            raise
        self._buckets_sent += 1

    def finish(self) -> None:
        self.engine.end_weight_update(timeout_s=self.timeout_s)
        self.engine.flush_cache(timeout_s=self.timeout_s)

    def abort(self) -> None:
        _close_session_quietly(self.engine, self.timeout_s)

    def close(self) -> None:
        """Leave the group on both sides (best effort when it is broken)."""
        if self._group is None:
            return
        if self._broken is None:
            self.engine.destroy_weights_update_group(self.group_name, timeout_s=self.timeout_s)
        else:
            with contextlib.suppress(Exception):
                self.engine.destroy_weights_update_group(self.group_name, timeout_s=ABORT_TIMEOUT_S)
        self._group, self._store = None, None

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise WeightSyncError(
                f"the weight-update group is unusable after an earlier failure ({self._broken}); build a new transport"
            )


def _trainer_side_group(store: dist.Store, group_name: str, backend: str, world_size: int,
                        timeout: timedelta) -> Any:
    """Rank 0 of the group sglang's ``init_custom_process_group`` forms (prefixes: see the top)."""
    prefixed = dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, store))
    if backend == "gloo":
        return dist.ProcessGroupGloo(dist.PrefixStore("cpu/", prefixed), 0, world_size, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    options._timeout = timeout
    return dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", prefixed), 0, world_size, options)


def _wait_works(works: Sequence[Any], timeout_s: float) -> None:
    """Wait for async collectives by polling, so that the timeout holds whatever the backend."""
    deadline = time.monotonic() + timeout_s
    while not all(work.is_completed() for work in works):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the broadcasts did not complete within {timeout_s:g} s")
        time.sleep(_POLL_S)
    for work in works:
        work.wait()


def _in_daemon_thread(function: Callable[[], T]) -> Future[T]:
    """Run ``function`` in a daemon thread (an abandoned wait must not keep the process alive)."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(function())
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, name="rlsys-weight-sync", daemon=True).start()
    return future


def _wait_for(futures: dict[str, Future[Any]], timeout_s: float, phase: str | None = None) -> None:
    """Until all succeed: the first failure raises at once; after ``timeout_s``, a timeout names
    what was still pending."""
    prefix = f"{phase}: " if phase else ""
    deadline = time.monotonic() + timeout_s
    while True:
        for label, future in futures.items():
            if future.done() and future.exception() is not None:
                error = future.exception()
                raise WeightSyncError(f"{prefix}{label} failed: {type(error).__name__}: {error}") from error
        if all(future.done() for future in futures.values()):
            return
        if time.monotonic() > deadline:
            pending = [label for label, future in futures.items() if not future.done()]
            raise WeightSyncError(f"{prefix}timed out after {timeout_s:g} s waiting for {' and '.join(pending)}")
        time.sleep(_POLL_S)


def _close_session_quietly(engine: Any, timeout_s: float) -> None:
    with contextlib.suppress(Exception):
        engine.end_weight_update(timeout_s=min(timeout_s, ABORT_TIMEOUT_S))
