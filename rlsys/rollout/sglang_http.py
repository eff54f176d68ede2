"""A running SGLang HTTP server (``python -m sglang.launch_server``) behind the rollout interface.

Choices:
- For servers someone else started (a serving cluster, a shared GPU box, a server launched with
  ``rlsys.platform.sglang_cpu.server_command_line``). The client does not own the server:
  ``shutdown()`` only stops using it. ``SGLangEngine`` is the choice when rlsys starts the engine.
- Standard library only (``urllib``): the trainer needs no HTTP package, and every call has its own
  timeout. A refused or reset connection, an HTTP error (with sglang's message) or a timeout raises
  ``RolloutEngineError`` naming the server and the call.
- The sglang request and output formats are converted exactly as in ``SGLangEngine`` (the helpers
  are imported from ``sglang_engine``): one ``/generate`` request carries the whole batch, each prompt
  repeated ``n`` times with its own sampling seed, with ``return_logprob``.
- Weight tensors travel as base64 text of the bytes ``serialize_named_tensors`` produces (JSON has
  no bytes type). For CPU tensors that is every weight by value, a third larger than the weights:
  fine for small CPU models; for large ones use ``update_weights_from_disk`` or the distributed path.
  CUDA tensors travel as IPC handles, so the server must run on the trainer's host and devices.
- ``health_check`` asks ``/health_generate``, which generates one token through scheduler and
  detokenizer (``/health`` answers without generating).
- Weight updates ask sglang not to flush its prefix cache and then flush with a wait for idle, as
  ``SGLangEngine`` does (sglang's own flush-after-update asserts an idle scheduler; see
  ``sglang_engine._in_session``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from http.client import HTTPException
from pathlib import Path
from subprocess import Popen
from typing import Any

import torch

from rlsys.rollout.base import Sample, SamplingParams, WeightUpdateSessions
from rlsys.rollout.sglang_engine import (
    RolloutEngineError,
    repeat_prompts,
    samples_from_outputs,
    serialize_named_tensors,
    sglang_sampling_params,
)


class SGLangHTTPEngine(WeightUpdateSessions):
    def __init__(self, base_url: str, *, timeout_s: float = 600.0, api_key: str | None = None) -> None:
        """``base_url`` like ``http://127.0.0.1:30000``; ``api_key`` if the server was started with one."""
        self.base_url = base_url.rstrip("/")
        self.name = f"sglang server {self.base_url}"
        self.timeout_s = timeout_s
        self._api_key = api_key
        self._closed = False
        self._in_session = False

    def wait_until_ready(self, timeout_s: float, *, server_process: Popen[Any] | None = None,
                         poll_interval_s: float = 1.0) -> None:
        """Poll ``/health_generate`` until the server generates; fail early if ``server_process``
        (the launcher, when the caller started the server) exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            if server_process is not None and server_process.poll() is not None:
                raise RolloutEngineError(
                    f"{self.name}: start: the server process exited with code {server_process.returncode}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RolloutEngineError(f"{self.name}: start: not ready after {timeout_s:g} s")
            try:
                self.health_check(timeout_s=min(remaining, 30.0))
                return
            except RolloutEngineError:
                time.sleep(min(poll_interval_s, max(deadline - time.monotonic(), 0.0)))

    # -------------------------------------------------------------- rollout interface

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, *,
                 timeout_s: float | None = None) -> list[Sample]:
        outputs = self._request("/generate", "generate", timeout_s, {
            "input_ids": repeat_prompts(prompt_ids, params.n),
            "sampling_params": sglang_sampling_params(params, len(prompt_ids)),
            "return_logprob": True,
        })
        if not isinstance(outputs, list):
            raise RolloutEngineError(f"{self.name}: generate: unexpected answer {str(outputs)[:200]}")
        return samples_from_outputs(outputs, len(prompt_ids), params.n, self.name)

    def health_check(self, timeout_s: float = 60.0) -> None:
        """Raise ``RolloutEngineError`` unless the server generates a token within ``timeout_s``."""
        self._request("/health_generate", "health_check", timeout_s, None)

    def shutdown(self) -> None:
        """Stop using the server (which keeps running: this client does not own it)."""
        self._closed = True

    # -------------------------------------------------------------- weight updates

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                                   flush_cache: bool = True, load_format: str | None = None,
                                   timeout_s: float | None = None) -> None:
        # By value: the server may run on another host, where no shared memory of ours exists.
        payload = base64.b64encode(serialize_named_tensors(named_tensors, by_value=True)).decode("ascii")
        tp_size = self._tp_size(timeout_s)
        with self._own_session_unless_open(timeout_s):
            self._checked_request("/update_weights_from_tensor", "update_weights_from_tensor", timeout_s, {
                "serialized_named_tensors": [payload] * tp_size,
                "load_format": load_format,
                "flush_cache": False,
            })
        if flush_cache:
            self.flush_cache(timeout_s=timeout_s)

    def update_weights_from_disk(self, model_path: str | Path, *, timeout_s: float | None = None) -> None:
        self._checked_request("/update_weights_from_disk", "update_weights_from_disk", timeout_s,
                              {"model_path": str(model_path), "flush_cache": False})
        self.flush_cache(timeout_s=timeout_s)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str = "nccl", *,
                                  timeout_s: float | None = None) -> None:
        """As ``SGLangEngine.init_weights_update_group``: blocks until the group has formed."""
        self._checked_request("/init_weights_update_group", "init_weights_update_group", timeout_s, {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend,
        })

    def destroy_weights_update_group(self, group_name: str, *, timeout_s: float | None = None) -> None:
        self._checked_request("/destroy_weights_update_group", "destroy_weights_update_group", timeout_s,
                              {"group_name": group_name})

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str | torch.dtype],
                                        shapes: Sequence[Sequence[int]], group_name: str, *,
                                        flush_cache: bool = True, timeout_s: float | None = None) -> None:
        """As ``SGLangEngine.update_weights_from_distributed``: blocks until every tensor arrived."""
        with self._own_session_unless_open(timeout_s):
            self._checked_request("/update_weights_from_distributed", "update_weights_from_distributed", timeout_s, {
                "names": list(names),
                "dtypes": [str(dtype).removeprefix("torch.") for dtype in dtypes],
                "shapes": [list(shape) for shape in shapes],
                "group_name": group_name,
                "flush_cache": False,
            })
        if flush_cache:
            self.flush_cache(timeout_s=timeout_s)

    def begin_weight_update(self, *, timeout_s: float | None = None) -> None:
        self._checked_request("/begin_weight_update", "begin_weight_update", timeout_s, {})
        self._in_session = True

    def end_weight_update(self, *, timeout_s: float | None = None) -> None:
        self._in_session = False
        self._checked_request("/end_weight_update", "end_weight_update", timeout_s, {})

    def flush_cache(self, *, timeout_s: float | None = None) -> None:
        """sglang flushes only when idle; it waits for that up to the call's timeout."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self._request(f"/flush_cache?timeout={timeout:g}", "flush_cache", timeout, {})

    def release_memory(self, *, timeout_s: float | None = None) -> None:
        """GPU colocation; the server needs ``--enable-memory-saver``."""
        self._request("/release_memory_occupation", "release_memory", timeout_s, {})

    def resume_memory(self, *, timeout_s: float | None = None) -> None:
        self._request("/resume_memory_occupation", "resume_memory", timeout_s, {})

    # -------------------------------------------------------------- plumbing

    @contextlib.contextmanager
    def _own_session_unless_open(self, timeout_s: float | None) -> Iterator[None]:
        """sglang 0.5.21 accepts tensor and distributed updates only inside a weight-update session."""
        if self._in_session:
            yield
            return
        with self.weight_update_session(timeout_s=timeout_s):
            yield

    def _tp_size(self, timeout_s: float | None) -> int:
        """One payload per TP rank; the server says how many it has."""
        info = self._request("/server_info", "server_info", timeout_s, None)
        if not isinstance(info, dict) or "tp_size" not in info:
            raise RolloutEngineError(f"{self.name}: server_info does not give tp_size: {str(info)[:200]}")
        return int(info["tp_size"])

    def _checked_request(self, path: str, phase: str, timeout_s: float | None, body: dict[str, Any]) -> Any:
        answer = self._request(path, phase, timeout_s, body)
        if isinstance(answer, dict) and answer.get("success") is False:
            raise RolloutEngineError(f"{self.name}: {phase} failed: {answer.get('message')}")
        return answer

    def _request(self, path: str, phase: str, timeout_s: float | None, body: dict[str, Any] | None) -> Any:
        """GET without a body, POST with one; the decoded JSON answer, or its text when not JSON."""
        if self._closed:
            raise RolloutEngineError(f"{self.name}: {phase}: the client was shut down")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers,
                                         method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:2000]
            raise RolloutEngineError(f"{self.name}: {phase} failed with HTTP {error.code}: {detail}") from None
        except TimeoutError:
            raise RolloutEngineError(f"{self.name}: {phase} timed out after {timeout:g} s") from None
        except (urllib.error.URLError, HTTPException, OSError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError):
                raise RolloutEngineError(f"{self.name}: {phase} timed out after {timeout:g} s") from None
            raise RolloutEngineError(f"{self.name}: {phase}: cannot reach the server ({reason})") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode(errors="replace")
