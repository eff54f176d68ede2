"""The main job's evaluation path end to end: real SmolLM2, real chat template, sandboxed reward."""

import json

from rlsys.eval.simple import evaluate_config


def test_eval_writes_one_scored_line_per_response(tmp_path):
    summary = evaluate_config("smollm2-135m-grpo-cpu", ["reward.num_workers=1"], limit=3, max_new_tokens=24,
                              temperature=0.0, n=1, output=str(tmp_path))
    lines = [json.loads(line) for line in summary.results_path.read_text().splitlines()]
    assert len(lines) == summary.num_responses == 3
    for line in lines:
        assert line["reward"] in (5.0, -5.0)
        assert line["correct"] == (line["reward"] == 5.0)
        assert line["finish_reason"] in ("stop", "length")
        assert "arithmetic_val.jsonl:" in line["location"]
    assert summary.accuracy == sum(line["correct"] for line in lines) / 3
    assert summary.num_timeout == summary.num_crash == 0
