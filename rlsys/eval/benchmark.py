"""Evaluate a set of prompts: generate n samples each, score them with the training reward, and
summarise (avg@n, pass@k). ``rlsys eval`` and validation during training both call
``evaluate_prompts``.

Choices:
- The engine is anything with ``generate(prompt_ids, params) -> list[Sample]`` (n samples per
  prompt, ``Sample.prompt_index`` indexing the prompts of that call): the SGLang engine, the HF
  engine, or the training loop's own rollout engine with its current weights.
- Prompts go to the engine in consecutive batches of ``batch_size`` (bounded memory, a
  progress bar that moves). The batch that starts at prompt ``i`` samples with a seed derived
  from ``(params.seed, i)``, so a run is reproducible for a given batch size and batches do not
  repeat each other's random streams. Greedy decoding (temperature 0) is deterministic, so it
  generates and scores one response per prompt and counts it n times.
- Scoring: every response goes through ``RewardPool.score_batch``, the sandboxed reward of
  training with the same ``RewardConfig``. Answer type ``math`` takes its verdict as is;
  ``choice`` replaces its exact-answer part by the letter check of ``rlsys.eval.choice``;
  ``auto`` picks ``choice`` when every reference is a letter A-J.
- Metrics (``rlsys.eval.metrics``): accuracy = avg@n = mean correctness over all samples;
  pass@k with the unbiased estimator, averaged over problems. A response "ended properly" when
  its finish reason is ``stop`` (end-of-sequence token or stop string) rather than ``length``.
  Response length is in tokens.
- Each per-example record holds what a reader needs to judge it without the model: prompt
  text as the model saw it, response, extracted answer, references, reward and its status.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm import tqdm

from rlsys.data.dataset import Prompt
from rlsys.eval.choice import ANSWER_TYPES, choice_correct, is_choice_benchmark, reference_letter
from rlsys.eval.metrics import check_ks, default_ks, mean_pass_at_k
from rlsys.eval.report import write_results
from rlsys.reward.pool import STATUS_CRASH, STATUS_OK, STATUS_TIMEOUT, STATUS_TOO_LONG, RewardPool
from rlsys.rollout.base import Sample, SamplingParams, derive_seed

__all__ = ["BenchmarkResult", "evaluate_prompts", "resolve_answer_type", "score_samples", "summarize", "write_results"]

DEFAULT_BATCH_SIZE = 32
"""Prompts per ``generate`` call."""


class GenerationEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Sample]: ...


@dataclass
class BenchmarkResult:
    """One benchmark's per-example records and summary."""

    name: str
    records: list[dict[str, Any]]
    """One row per sample, ordered by (prompt_id, sample_index)."""
    summary: dict[str, Any]
    """Counts and metrics: accuracy (= avg@n), pass@k, mean reward, lengths, reward failures."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where the prompts came from (file, keys, problems dropped), written beside the summary."""


def resolve_answer_type(answer_type: str, prompts: Sequence[Prompt]) -> str:
    """``math`` or ``choice``; ``auto`` is ``choice`` when every reference is a letter A-J.

    Raises ValueError for an unknown type, or for ``choice`` with a reference that is not a letter
    (naming its ``path:LINE``).
    """
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer type must be one of {', '.join(ANSWER_TYPES)}, got {answer_type!r}")
    if answer_type == "auto":
        return "choice" if is_choice_benchmark(prompt.answers for prompt in prompts) else "math"
    if answer_type == "choice":
        for prompt in prompts:
            for answer in prompt.answers:
                if reference_letter(answer) is None:
                    raise ValueError(f"{prompt.location}: answer type choice needs letter references A-J, "
                                     f"got {answer!r}")
    return answer_type


def evaluate_prompts(
    engine: GenerationEngine,
    prompts: Sequence[Prompt],
    pool: RewardPool,
    params: SamplingParams,
    *,
    name: str = "val",
    ks: Sequence[int] | None = None,
    answer_type: str = "auto",
    progress: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> BenchmarkResult:
    """Generate ``params.n`` samples per prompt, score them, and summarise (see the module docstring)."""
    if not prompts:
        raise ValueError(f"{name}: no prompts to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ks = check_ks(default_ks(params.n) if ks is None else ks, params.n)
    resolved_type = resolve_answer_type(answer_type, prompts)
    # Greedy decoding is deterministic: one response per prompt stands for all n of them (and
    # transformers' generate refuses several greedy sequences per prompt).
    generated_n = 1 if params.temperature == 0 else params.n
    records: list[dict[str, Any]] = []
    generation_s = scoring_s = 0.0
    with tqdm(total=len(prompts) * params.n, desc=name, unit="sample", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start:start + batch_size])
            started = time.monotonic()
            batch_params = dataclasses.replace(params, seed=derive_seed(params.seed, start), n=generated_n)
            samples = engine.generate([list(prompt.token_ids) for prompt in batch], batch_params)
            _check_samples(samples, len(batch), generated_n, engine)
            generation_s += time.monotonic() - started
            started = time.monotonic()
            scored = score_samples(samples, batch, pool, resolved_type, first_prompt_id=start)
            if generated_n < params.n:
                scored = [{**record, "sample_index": index} for record in scored for index in range(params.n)]
            records.extend(scored)
            scoring_s += time.monotonic() - started
            bar.update(len(scored))
            bar.set_postfix(accuracy=f"{sum(r['correct'] for r in records) / len(records):.3f}")
    records.sort(key=lambda record: (record["prompt_id"], record["sample_index"]))
    summary = summarize(records, n=params.n, ks=ks, answer_type=resolved_type)
    summary.update(generation_s=round(generation_s, 3), scoring_s=round(scoring_s, 3))
    return BenchmarkResult(name, records, summary)


def _check_samples(samples: Sequence[Sample], num_prompts: int, n: int, engine: object) -> None:
    counts = Counter(sample.prompt_index for sample in samples)
    if len(samples) != num_prompts * n or set(counts) != set(range(num_prompts)) or set(counts.values()) != {n}:
        raise RuntimeError(
            f"{type(engine).__name__}.generate returned {len(samples)} samples for {num_prompts} prompts x n={n} "
            f"(per prompt index: {dict(sorted(counts.items()))})"
        )


def score_samples(
    samples: Sequence[Sample],
    prompts: Sequence[Prompt],
    pool: RewardPool,
    answer_type: str,
    *,
    first_prompt_id: int = 0,
) -> list[dict[str, Any]]:
    """One record per sample (``Sample.prompt_index`` indexes ``prompts``), scored by the pool.

    ``answer_type`` is ``math`` or ``choice`` (already resolved).
    """
    if answer_type not in ("math", "choice"):
        raise ValueError(f"answer_type must be math or choice here, got {answer_type!r}")
    graded = pool.score_batch([sample.response_text for sample in samples],
                              [list(prompts[sample.prompt_index].answers) for sample in samples])
    config = pool.config
    next_index: defaultdict[int, int] = defaultdict(int)
    records = []
    for i, sample in enumerate(samples):
        prompt = prompts[sample.prompt_index]
        reward, correct, extracted = graded.scores[i], graded.correct[i], graded.extracted[i]
        status = graded.statuses[i]
        if answer_type == "choice":
            letter_correct, extracted = choice_correct(sample.response_text, prompt.answers)
            if status == STATUS_OK:
                # Swap the exact-answer part of the training reward for the letter check's.
                exact_part = config.correct_score if correct else config.wrong_score
                reward += (config.correct_score if letter_correct else config.wrong_score) - exact_part
                correct = letter_correct
            else:
                correct = False
        records.append({
            "prompt_id": first_prompt_id + sample.prompt_index,
            "sample_index": next_index[sample.prompt_index],
            "location": prompt.location,
            "prompt": prompt.text,
            "response": sample.response_text,
            "extracted_answer": extracted,
            "references": list(prompt.answers),
            "reward": reward,
            "correct": bool(correct),
            "finish_reason": sample.finish_reason,
            "response_length": len(sample.response_ids),
            "reward_status": status,
            "reward_error": graded.errors.get(i),
        })
        next_index[sample.prompt_index] += 1
    return records


def summarize(records: Sequence[dict[str, Any]], *, n: int, ks: Sequence[int], answer_type: str) -> dict[str, Any]:
    """Counts and metrics of one benchmark's records (each problem must have ``n`` of them)."""
    if not records:
        raise ValueError("no records to summarise")
    per_problem: defaultdict[int, list[bool]] = defaultdict(list)
    for record in records:
        per_problem[record["prompt_id"]].append(record["correct"])
    uneven = {pid: len(flags) for pid, flags in per_problem.items() if len(flags) != n}
    if uneven:
        raise ValueError(f"every problem needs n={n} samples; sample counts by prompt_id: {uneven}")
    correct_counts = [sum(flags) for flags in per_problem.values()]
    total = len(records)
    accuracy = sum(record["correct"] for record in records) / total
    statuses = Counter(record["reward_status"] for record in records)
    summary: dict[str, Any] = {
        "answer_type": answer_type,
        "num_prompts": len(per_problem),
        "n": n,
        "num_samples": total,
        "accuracy": accuracy,
        f"avg@{n}": accuracy,
    }
    summary.update({f"pass@{k}": mean_pass_at_k(correct_counts, n, k) for k in ks})
    summary.update({
        "num_solved_by_any": sum(count > 0 for count in correct_counts),
        "num_solved_by_all": sum(count == n for count in correct_counts),
        "mean_reward": sum(record["reward"] for record in records) / total,
        "mean_response_length": sum(record["response_length"] for record in records) / total,
        "fraction_properly_ended": sum(record["finish_reason"] == "stop" for record in records) / total,
        "fraction_no_answer": sum(record["extracted_answer"] is None for record in records) / total,
        "num_timeout": statuses[STATUS_TIMEOUT],
        "num_crash": statuses[STATUS_CRASH],
        "num_too_long": statuses[STATUS_TOO_LONG],
    })
    return summary
