"""Benchmark files for evaluation: key detection and loading through the training data code.

Choices:
- Loading is ``rlsys.data.load_prompts``, the loader of training and validation: the same
  reader (a bad line stops with ``path:LINE: reason``), prompt template
  (``rlsys.data.templates``), chat template, tokenisation and overlong-prompt filter (the number
  dropped is kept, and goes into the summary: a score over fewer problems must say so).
- Keys: an explicit key is used as given. Otherwise the first line's object decides, trying
  the config's key first and then the usual names: prompt ``prompt``, ``problem``,
  ``question``; answer ``solutions``, ``answer``, ``answers``, ``solution`` (MATH's full
  ``solution`` comes last: the reward reads its last box). When none is there, the config's
  key is used and the reader names the line and the keys it has.
- ``limit`` keeps the first problems of the file, after the overlong filter.
- Benchmarks are read strictly: any malformed line (``rlsys.data.jsonl``) is an error, never
  dropped as in training (``data.max_malformed_fraction``), because a score over a silently
  smaller set reads as the benchmark's. Lines are read up to ``max_line_bytes`` (the reader's
  1 MiB unless the caller passes another), and an empty file is an error naming it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from rlsys.data.dataset import PromptDataset, load_prompts
from rlsys.data.jsonl import MAX_LINE_BYTES, first_object

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_KEYS = ("prompt", "problem", "question")
ANSWER_KEYS = ("solutions", "answer", "answers", "solution")


def detect_keys(
    path: Path,
    *,
    prompt_key: str | None,
    answer_key: str | None,
    default_prompt_key: str,
    default_answer_key: str,
) -> tuple[str, str]:
    """(prompt key, answer key) of a file: explicit keys win, else the first line decides."""
    first = first_object(path)  # {} when missing or malformed: the reader reports those with their lines
    return (
        prompt_key or _pick(first, (default_prompt_key, *PROMPT_KEYS), default_prompt_key),
        answer_key or _pick(first, (default_answer_key, *ANSWER_KEYS), default_answer_key),
    )


def _pick(record: dict, candidates: tuple[str, ...], default: str) -> str:
    return next((key for key in candidates if key in record), default)


def load_benchmark(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt_key: str,
    answer_key: str,
    apply_chat_template: bool,
    system_prompt: str | None,
    prompt_template: str | None,
    max_prompt_length: int,
    limit: int | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> PromptDataset:
    """The problems of one file (the first ``limit`` when given), rendered and tokenised; the
    first malformed line is an error."""
    dataset = load_prompts([path], tokenizer, prompt_key=prompt_key, answer_key=answer_key,
                           apply_chat_template=apply_chat_template, system_prompt=system_prompt,
                           prompt_template=prompt_template, max_prompt_length=max_prompt_length,
                           max_malformed_fraction=0.0, max_line_bytes=max_line_bytes)
    if limit is None:
        return dataset
    return dataclasses.replace(dataset, prompts=dataset.prompts[:limit])
