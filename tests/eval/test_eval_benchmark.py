"""Risk: ``evaluate_prompts`` (shared by ``rlsys eval`` and validation in training) loses, misorders or
miscounts samples, or its summary disagrees with its own records.

A real HF engine on a tiny random model generates; the real pool scores. The summary is
recomputed from the records with the pass@k definition, and the run is repeated to check that
the same seed gives the same samples.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlsys.data.dataset import load_prompts
from rlsys.eval.benchmark import evaluate_prompts, summarize
from rlsys.eval.metrics import pass_at_k
from rlsys.rollout.base import SamplingParams
from rlsys.rollout.hf_engine import HFEngine

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=4, n=4, seed=3)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> HFEngine:
    return HFEngine(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> list:
    path = Path(__file__).resolve().parents[2] / "examples/reasoning/data/arithmetic_val.jsonl"
    return list(load_prompts([path], smollm2_tokenizer, max_prompt_length=512))[:3]


def test_records_and_summary_agree(engine: HFEngine, prompts: list, pool, capsys) -> None:
    result = evaluate_prompts(engine, prompts, pool, PARAMS, name="arith", progress=True, batch_size=2)
    assert result.name == "arith"
    assert len(result.records) == len(prompts) * PARAMS.n
    assert [(r["prompt_id"], r["sample_index"]) for r in result.records] == [
        (p, s) for p in range(len(prompts)) for s in range(PARAMS.n)
    ]
    for record in result.records:
        prompt = prompts[record["prompt_id"]]
        assert record["location"] == prompt.location and record["prompt"] == prompt.text
        assert record["references"] == list(prompt.answers)
        assert record["finish_reason"] in ("stop", "length")
        assert 1 <= record["response_length"] <= PARAMS.max_new_tokens
        assert record["reward"] == (5.0 if record["correct"] else -5.0)
        assert record["reward_status"] == "ok"

    s = result.summary
    assert (s["num_prompts"], s["n"], s["num_samples"]) == (len(prompts), PARAMS.n, len(prompts) * PARAMS.n)
    assert s["answer_type"] == "math"
    correct = [[r["correct"] for r in result.records if r["prompt_id"] == p] for p in range(len(prompts))]
    assert s["accuracy"] == s["avg@4"] == pytest.approx(sum(map(sum, correct)) / s["num_samples"])
    for k in (1, 2, 4):
        assert s[f"pass@{k}"] == pytest.approx(sum(pass_at_k(4, sum(c), k) for c in correct) / len(prompts))
    assert "pass@3" not in s
    assert s["mean_reward"] == pytest.approx(sum(r["reward"] for r in result.records) / s["num_samples"])
    assert s["mean_response_length"] == pytest.approx(
        sum(r["response_length"] for r in result.records) / s["num_samples"])
    assert s["fraction_properly_ended"] == pytest.approx(
        sum(r["finish_reason"] == "stop" for r in result.records) / s["num_samples"])
    assert s["num_timeout"] == s["num_crash"] == 0
    # The progress bar went to stderr, counting samples.
    assert f"{len(prompts) * PARAMS.n}/{len(prompts) * PARAMS.n}" in capsys.readouterr().err

    again = evaluate_prompts(engine, prompts, pool, PARAMS, name="arith", batch_size=2)
    assert [r["response"] for r in again.records] == [r["response"] for r in result.records]
    assert again.summary["accuracy"] == s["accuracy"]


def test_explicit_ks_greedy_copies_and_bounds(engine: HFEngine, prompts: list, pool) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=2, n=2, seed=0)
    result = evaluate_prompts(engine, prompts[:2], pool, params, ks=[2])
    assert [key for key in result.summary if key.startswith("pass@")] == ["pass@2"]
    # Greedy: one response per prompt, counted n times.
    assert len(result.records) == 4
    assert result.records[0]["response"] == result.records[1]["response"]
    assert result.records[2]["response"] == result.records[3]["response"]
    with pytest.raises(ValueError, match="pass@3"):
        evaluate_prompts(engine, prompts[:2], pool, params, ks=[3])
    with pytest.raises(ValueError, match="no prompts"):
        evaluate_prompts(engine, [], pool, params)


def test_summary_by_hand() -> None:
    """Four samples of one problem, one right (pass@1 0.25, pass@2 0.5, pass@4 1), and a problem
    with none right: the benchmark averages them."""
    def record(prompt_id: int, index: int, correct: bool) -> dict:
        return {"prompt_id": prompt_id, "sample_index": index, "correct": correct, "reward": 5.0 if correct else -5.0,
                "response_length": 10, "finish_reason": "stop", "extracted_answer": "1", "reward_status": "ok"}

    records = [record(0, i, i == 2) for i in range(4)] + [record(1, i, False) for i in range(4)]
    one = summarize(records[:4], n=4, ks=[1, 2, 4], answer_type="math")
    assert (one["pass@1"], one["pass@2"], one["pass@4"]) == (0.25, 0.5, 1.0)
    both = summarize(records, n=4, ks=[1, 2, 4], answer_type="math")
    assert (both["pass@1"], both["pass@2"], both["pass@4"]) == (0.125, 0.25, 0.5)
    assert (both["num_solved_by_any"], both["num_solved_by_all"]) == (1, 0)
    with pytest.raises(ValueError, match="n=4"):
        summarize(records[:3], n=4, ks=[1], answer_type="math")
