"""The rollout interface every engine implements.

Choices:
- Prompts arrive as token ids (already chat-templated by ``rlsys.data``), so every engine
  samples from exactly the tokens the actor will score.
- ``generate`` takes the whole batch at once; engines schedule it as one batch, never a loop
  over prompts.
- Results are ordered prompt-major: the ``n`` samples of prompt 0, then of prompt 1, ...
  That is the group layout the advantage functions expect.
- ``logprobs`` are the log-probabilities of the sampled tokens under the model's raw
  distribution divided by the temperature (no top-p/top-k renormalisation), the quantity the
  actor recomputes; with temperature 0 they are taken at temperature 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
import hashlib
from typing import Protocol


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k."""
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    """Strings that end a response (the stop string is kept in the text)."""
    n: int = 1
    """Samples per prompt."""
    seed: int = 0
    """Seed of this call's sampling; the caller derives it from (step, ...)."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens <= 0 or self.n <= 0:
            raise ValueError("max_new_tokens and n must be positive")


@dataclass
class Sample:
    prompt_index: int
    response_ids: list[int]
    response_text: str
    logprobs: list[float]
    finish_reason: str
    """'stop' (end-of-sequence token or a stop string) or 'length'."""


def derive_seed(*parts: object) -> int:
    """A 32-bit seed hashed from ``parts`` (e.g. the run's seed and a step): the same parts give
    the same seed in every process and run."""
    text = ":".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Sample]: ...

    def shutdown(self) -> None: ...


class WeightUpdateSessions:
    """``weight_update_session()`` for engines whose weight updates must sit between their
    ``begin_weight_update`` and ``end_weight_update`` (sglang 0.5.21 refuses them otherwise).
    The subclass defines those two methods."""

    @contextlib.contextmanager
    def weight_update_session(self, *, timeout_s: float | None = None) -> Iterator[None]:
        self.begin_weight_update(timeout_s=timeout_s)
        try:
            yield
        finally:
            self.end_weight_update(timeout_s=timeout_s)
