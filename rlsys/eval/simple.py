"""Score a model on an experiment config's validation prompts with the training reward.

Choices:
- Generation uses the HF transformers engine on CPU; prompts go through ``rlsys.data`` exactly
  as in training (same chat template, same overlong-prompt filter).
- Scoring goes through ``RewardPool``: the same sandboxed ±5 reward training uses.
- Accuracy is the fraction of responses whose boxed answer equals a reference; the mean reward
  additionally includes any format or extra reward terms the config turns on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rlsys.config import REPO_ROOT, load_config
from rlsys.data.dataset import load_val_prompts
from rlsys.models.offline import load_tokenizer_for, resolve_model_path
from rlsys.reward.pool import RewardPool
from rlsys.rollout.base import SamplingParams
from rlsys.rollout.hf_engine import HFEngine


@dataclass
class EvalSummary:
    num_prompts: int
    num_responses: int
    accuracy: float
    mean_reward: float
    num_timeout: int
    num_crash: int
    fraction_properly_ended: float
    results_path: Path


def evaluate_config(config_name: str, overrides: list[str], *, limit: int | None, max_new_tokens: int,
                    temperature: float, n: int, output: str | None, batch_size: int = 32) -> EvalSummary:
    run = load_config(config_name, overrides)
    run.data.check_files_exist(base=REPO_ROOT)
    started = time.monotonic()
    tokenizer = load_tokenizer_for(run.model)
    prompts = list(load_val_prompts(run.data, tokenizer, base=REPO_ROOT))[:limit]
    engine = HFEngine(resolve_model_path(run.model.path))
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, n=n, seed=run.runner.seed)
    print(f"[rlsys eval] {config_name}: {len(prompts)} prompts x {n} from {', '.join(run.data.val_files)}", flush=True)

    output_dir = Path(output) if output else Path(run.runner.output_dir) / "eval"
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "val_results.jsonl"
    scores: list[float] = []
    correct: list[bool] = []
    ended: list[bool] = []
    timeouts = crashes = 0
    with RewardPool(run.reward) as pool, results_path.open("w") as out:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            samples = engine.generate([list(p.token_ids) for p in batch], params, return_logprobs=False)
            graded = pool.score_batch([s.response_text for s in samples],
                                      [list(batch[s.prompt_index].answers) for s in samples])
            timeouts += graded.n_timeout
            crashes += graded.n_crash
            for sample, score, ok, answer, status in zip(samples, graded.scores, graded.correct,
                                                         graded.extracted, graded.statuses):
                prompt = batch[sample.prompt_index]
                out.write(json.dumps({
                    "location": prompt.location, "response": sample.response_text,
                    "extracted_answer": answer, "references": list(prompt.answers), "reward": score,
                    "correct": ok, "finish_reason": sample.finish_reason, "reward_status": status,
                }) + "\n")
                scores.append(score)
                correct.append(ok)
                ended.append(sample.finish_reason == "stop")
            done = start + len(batch)
            print(f"[rlsys eval] {done}/{len(prompts)} prompts, accuracy so far {sum(correct) / len(correct):.3f}",
                  flush=True)
    engine.shutdown()

    summary = EvalSummary(
        num_prompts=len(prompts), num_responses=len(scores),
        accuracy=sum(correct) / max(len(correct), 1), mean_reward=sum(scores) / max(len(scores), 1),
        num_timeout=timeouts, num_crash=crashes,
        fraction_properly_ended=sum(ended) / max(len(ended), 1), results_path=results_path,
    )
    print(f"[rlsys eval] accuracy {summary.accuracy:.3f}, mean reward {summary.mean_reward:+.3f}, "
          f"properly ended {summary.fraction_properly_ended:.3f}, reward timeouts {timeouts}, crashes {crashes}, "
          f"{time.monotonic() - started:.0f}s; per-example results in {results_path}", flush=True)
    return summary
