"""Sandboxed batch scoring: every response is checked in a worker process that can be killed.

Model output is hostile to a symbolic checker (exponent towers, giant factorials, inputs that
make sympy loop), so nothing untrusted is parsed in the caller's process. Choices:

* pebble's ``ProcessPool`` runs the checks; its per-task timeout (``RewardConfig.timeout_s``)
  kills the worker and starts a fresh one. A timeout, an exception escaping the check (a
  MemoryError, a failing extra term) or a worker that dies (segfault, ``os._exit``, the kernel's
  OOM killer) scores ``wrong_score`` and is counted in ``BatchResult``; none of them raises.
* Workers come from a ``forkserver`` context (``spawn`` where forkserver is missing), so a large
  parent (torch, Ray) is never forked. The fork server preloads this module and
  ``rlsys.reward.warm_parser``, so replacing a killed worker costs a fork, not a fresh sympy
  import and a cold parser. ``set_forkserver_preload`` is process-wide; a fork server that
  someone else already started is reused as it is. As with any spawn or forkserver start, the
  main module is imported again in each worker: scripts need the ``if __name__ == "__main__"``
  guard, and what the main module imports counts against the worker's memory limit.
* The math and format checks run inside ``rlsys.reward.guard.no_side_effects``: should any
  library path ever evaluate answer text, it cannot start a process, open a socket or write a
  file. Extra terms run outside it.
* Each worker sets ``RLIMIT_AS`` to ``memory_limit_mb`` and restores the default SIGTERM action,
  so that pebble's terminate stops a worker stuck inside C code at once instead of waiting for
  its SIGKILL fallback. Workers are recycled every ``WORKER_MAX_TASKS`` tasks, which bounds the
  growth of sympy's caches.
* Responses longer than ``MAX_RESPONSE_CHARS`` score wrong in the parent without being sent to a
  worker (status ``too_long``), which keeps a 10 MB string off the pipe.
* A worker killed in the middle of a check (SIGKILL, the OOM killer) fails that item alone as
  a counted crash, and pebble starts a replacement. A worker that dies while holding no task
  makes pebble stop the whole pool; the next batch then starts a fresh pool
  (``RewardPool.pool_restarts``), and items that the broken pool dropped are scored once more.
* Besides pebble's per-task timeout, the parent stops waiting at a batch deadline (one timeout
  plus slack per round of tasks per worker), so a pool that cannot start workers still returns.
* The total of one response is ``math + format_weight * format + sum(weight * term)``; when the
  task fails, the total is ``wrong_score`` alone.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import os
import resource
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from pebble import ProcessExpired, ProcessPool

from rlsys.config import RewardConfig
from rlsys.reward.format import format_score
from rlsys.reward.guard import no_side_effects
from rlsys.reward.math import MAX_RESPONSE_CHARS, check_response
from rlsys.reward.terms import TermFunction, load_term_function, load_terms

WORKER_MAX_TASKS = 1000
"""Tasks one worker runs before it is replaced."""
WARM_PARSER_MODULE = "rlsys.reward.warm_parser"
"""Imported once in the fork server (or each spawned worker) to fill the parser's cache."""
RESTART_SLACK_S = 2.0
"""Allowance per round of tasks, on top of the timeout, for killing and replacing a worker."""

STATUS_OK = "ok"
STATUS_TIMEOUT = "timeout"
STATUS_CRASH = "crash"
STATUS_TOO_LONG = "too_long"


@dataclass
class BatchResult:
    """Scores of one batch, in input order, with what went wrong counted."""

    scores: list[float]
    """Total reward of each response."""
    correct: list[bool]
    """Whether the boxed answer equalled a reference (False after a timeout or crash)."""
    extracted: list[str | None]
    """The boxed answer that was checked, when the worker returned one."""
    durations_s: list[float]
    """Seconds the worker spent on the item; the timeout for timeouts, 0 for ``too_long``, and
    the wall time until the failure was seen (queueing included) for crashes."""
    statuses: list[str]
    """One of ``ok``, ``timeout``, ``crash``, ``too_long``."""
    n_timeout: int = 0
    n_crash: int = 0
    n_too_long: int = 0
    errors: dict[int, str] = field(default_factory=dict)
    """Index -> one-line description of the failure, for crashes and timeouts."""


@dataclass(frozen=True)
class _ScoreSettings:
    correct_score: float
    wrong_score: float
    format_weight: float


_worker_terms: list[tuple[float, TermFunction]] = []
"""(weight, function) of each extra term, loaded by ``_initialize_worker`` in every worker."""


def _initialize_worker(memory_limit_mb: int, parent_sys_path: list[str], term_specs: list[tuple[str, float]]) -> None:
    """Runs once in each worker: plain SIGTERM, memory limit, import path, extra terms, warm parser."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    limit = memory_limit_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    sys.path[:] = parent_sys_path
    _worker_terms.clear()
    for index, (path, weight) in enumerate(term_specs):
        _worker_terms.append((weight, load_term_function(path, f"reward.extra[{index}].path")))
    # A no-op after a fork server that preloaded it; with spawn it warms this worker's parser.
    importlib.import_module(WARM_PARSER_MODULE)


def _score_in_worker(response: str, reference: str | list[str], settings: _ScoreSettings) -> tuple[float, bool, str | None, float]:
    """(total, correct, extracted answer, seconds) for one response; runs inside a worker."""
    try:
        return _score_one(response, reference, settings)
    except MemoryError:
        pass
    # Raised here, after the except block let go of the failed check's frames and the memory they
    # held: pebble formats the traceback, which under the memory limit would itself run out and
    # kill the worker with a bare exit code 1.
    raise MemoryError("the check ran out of memory (reward.memory_limit_mb)")


def _score_one(response: str, reference: str | list[str], settings: _ScoreSettings) -> tuple[float, bool, str | None, float]:
    started = time.perf_counter()
    with no_side_effects():
        correct, answer = check_response(response, reference)
        format_value = format_score(response) if settings.format_weight else 0.0
    total = settings.correct_score if correct else settings.wrong_score
    total += settings.format_weight * format_value
    for weight, function in _worker_terms:
        value = float(function(response, reference))
        if not math.isfinite(value):
            raise ValueError(f"extra reward term returned {value}")
        total += weight * value
    return total, correct, answer, time.perf_counter() - started


def process_context() -> multiprocessing.context.BaseContext:
    """The start method of sandbox workers: forkserver preloading this module, else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__, WARM_PARSER_MODULE])
        return context
    return multiprocessing.get_context("spawn")


class RewardPool:
    """Scores batches of responses in sandboxed worker processes.

    Use as a context manager (``with RewardPool(config) as pool: pool.score_batch(...)``) or call
    ``start``/``close``. Extra reward terms are imported and checked in the constructor, which
    raises ``ConfigError`` naming ``reward.extra[i].path`` for a bad one.
    """

    def __init__(self, config: RewardConfig):
        self.config = config
        self.terms = load_terms(config.extra)
        self.num_workers = config.num_workers or os.cpu_count() or 1
        self._settings = _ScoreSettings(config.correct_score, config.wrong_score, config.format_weight)
        self._pool: ProcessPool | None = None
        self.pool_restarts = 0
        """Times a broken pebble pool was replaced by a fresh one."""

    def start(self) -> RewardPool:
        if self._pool is None:
            term_specs = [(term.path, term.weight) for term in self.terms]
            self._pool = ProcessPool(
                max_workers=self.num_workers,
                max_tasks=WORKER_MAX_TASKS,
                initializer=_initialize_worker,
                initargs=(self.config.memory_limit_mb, list(sys.path), term_specs),
                context=process_context(),
            )
        return self

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join(timeout=10)
            self._pool = None

    def __enter__(self) -> RewardPool:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def score_batch(self, responses: Sequence[str], references: Sequence[str | list[str]]) -> BatchResult:
        """Score ``responses[i]`` against ``references[i]``; never raises on what the texts contain."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        count = len(responses)
        wrong = self.config.wrong_score
        result = BatchResult(
            scores=[wrong] * count,
            correct=[False] * count,
            extracted=[None] * count,
            durations_s=[0.0] * count,
            statuses=[STATUS_OK] * count,
        )
        pending = []
        for index, response in enumerate(responses):
            if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
                result.statuses[index] = STATUS_TOO_LONG
                result.n_too_long += 1
            else:
                pending.append(index)
        # Items lost to a pool that broke under them are scored once more on a fresh pool.
        lost = self._score_items(pending, responses, references, result, last_try=False)
        if lost:
            self._score_items(lost, responses, references, result, last_try=True)
        return result

    def _replace_broken_pool(self) -> None:
        """pebble stops a whole pool when a worker dies while it holds no task (killed while idle,
        by hand or by the OOM killer); a fresh pool takes its place before the next checks."""
        if self._pool is not None and not self._pool.active:
            self.close()
            self.pool_restarts += 1
        self.start()

    def _score_items(self, indices: list[int], responses, references, result: BatchResult, *, last_try: bool) -> list[int]:
        """Score ``indices`` into ``result``; returns those lost to a broken pool unless ``last_try``."""
        self._replace_broken_pool()
        assert self._pool is not None
        futures, lost = {}, []
        submitted_at = time.monotonic()
        for index in indices:
            try:
                futures[index] = self._pool.schedule(
                    _score_in_worker, args=(responses[index], references[index], self._settings), timeout=self.config.timeout_s
                )
            except RuntimeError as error:  # the pool broke while this batch was being scheduled
                futures[index] = error
        rounds = math.ceil(len(futures) / self.num_workers) + 1
        deadline = submitted_at + rounds * (self.config.timeout_s + RESTART_SLACK_S)
        for index, future in futures.items():
            if isinstance(future, RuntimeError):
                error = BrokenProcessPool(str(future))
            else:
                # exception() hands back what the worker raised instead of raising it here, so
                # a SystemExit or KeyboardInterrupt from an extra term cannot stop the caller.
                try:
                    error = future.exception(timeout=max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    future.cancel()
                    error = TimeoutError("no result before the batch deadline")
                except CancelledError as cancelled:
                    error = cancelled
            if error is None:
                total, correct, answer, seconds = future.result()
                result.scores[index] = total
                result.correct[index] = correct
                result.extracted[index] = answer
                result.durations_s[index] = seconds
            elif isinstance(error, BrokenProcessPool) and not last_try:
                lost.append(index)
            elif isinstance(error, TimeoutError):
                result.statuses[index] = STATUS_TIMEOUT
                result.durations_s[index] = self.config.timeout_s
                result.errors[index] = _describe(error)
                result.n_timeout += 1
            else:
                result.statuses[index] = STATUS_CRASH
                result.durations_s[index] = time.monotonic() - submitted_at
                result.errors[index] = _describe(error)
                result.n_crash += 1
        return lost


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError) and len(error.args) == 2:
        return f"worker killed after {error.args[1]}s"
    if isinstance(error, ProcessExpired):
        return f"worker died with exit code {error.exitcode}"
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}".strip()


def score_batch(
    responses: Sequence[str],
    references: Sequence[str | list[str]],
    config: RewardConfig | None = None,
) -> BatchResult:
    """Score one batch with a temporary pool (workers start and stop inside this call)."""
    with RewardPool(config or RewardConfig()) as pool:
        return pool.score_batch(responses, references)


__all__ = ["BatchResult", "RewardPool", "score_batch"]
