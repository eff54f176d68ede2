"""Benchmark of rollout throughput: SGLangEngine against HFEngine, same model, prompts and settings.

For each model, both engines generate the same batch through the rollout interface
(``generate(prompt_ids, SamplingParams)``), and the run prints response tokens per second of each
and the SGLang / HF ratio.

Fairness choices:

* Both are measured as the trainer uses them: one ``generate`` call for the whole batch, returning
  token ids, text and per-token log-probs (HF recomputes those in a forward pass after generation;
  SGLang returns them from sampling).
* Same prompts (chat-templated arithmetic questions, each model's own chat template), sampling at
  temperature 1 with ``n`` samples per prompt, same ``max_new_tokens``, fp32 on CPU. Responses end
  at EOS or at the limit, so token counts differ between the engines; tokens per second uses each
  engine's own count.
* Each engine is warmed up with one untimed call of the same batch first; SGLang's engine start-up
  is reported separately and not counted.
* Models: the tests' tiny random Qwen2 (hidden 64, 2 layers, Qwen2.5's 151,665-token vocabulary,
  which dominates its cost) and SmolLM2-135M-Instruct (``rlsys.models.offline``).
* The machine may be shared: one run's figures carry its load. ``--repeats`` times each engine
  that many times and reports the best.

Run from the repository root: ``.venv/bin/python bench/bench_rollout.py``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from rlsys.models.offline import load_tokenizer, resolve_model_path  # noqa: E402
from rlsys.rollout.base import Sample, SamplingParams  # noqa: E402
from rlsys.rollout.hf_engine import HFEngine  # noqa: E402
from rlsys.rollout.sglang_engine import SGLangEngine  # noqa: E402
from tests.rollout.tiny_models import chat_prompts, tiny_qwen2  # noqa: E402


def _tiny_qwen2_dir(directory: Path) -> Path:
    tokenizer = load_tokenizer("qwen2.5-tokenizer")
    tiny_qwen2(tokenizer, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _timed(generate, prompts: list[list[int]], params: SamplingParams, repeats: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Best tokens/s over ``repeats`` timed calls after one warm-up call, and that call's token count."""
    generate(prompts, params)
    best_rate, best_tokens = 0.0, 0
    for _ in range(repeats):
        started = time.perf_counter()
        samples: list[Sample] = generate(prompts, params)
        elapsed = time.perf_counter() - started
        tokens = sum(len(sample.response_ids) for sample in samples)
        if tokens / elapsed > best_rate:
            best_rate, best_tokens = tokens / elapsed, tokens
    return best_rate, best_tokens


def bench_model(label: str, model_dir: Path, params: SamplingParams, repeats: int) -> dict:
    prompts = chat_prompts(load_tokenizer(str(model_dir)))
    engine = SGLangEngine(model_dir, device="cpu", timeout_s=3600)
    try:
        sglang_rate, sglang_tokens = _timed(engine.generate, prompts, params, repeats)
    finally:
        engine.shutdown()
    hf = HFEngine(model_dir)
    hf_rate, hf_tokens = _timed(hf.generate, prompts, params, repeats)
    hf.shutdown()
    batch = f"{len(prompts)} prompts x n={params.n}, max_new_tokens={params.max_new_tokens}"
    print(f"{label} ({batch}; SGLang start-up {engine.startup_s:.0f} s)")
    print(f"  SGLang  {sglang_rate:8.1f} tok/s  ({sglang_tokens} tokens)")
    print(f"  HF      {hf_rate:8.1f} tok/s  ({hf_tokens} tokens)")
    print(f"  SGLang / HF = {sglang_rate / hf_rate:.2f}", flush=True)
    return {"model": label, "sglang_tok_s": sglang_rate, "sglang_tokens": sglang_tokens, "hf_tok_s": hf_rate,
            "hf_tokens": hf_tokens, "sglang_startup_s": engine.startup_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--n", type=int, default=2, help="samples per prompt (8 prompts)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["tiny-qwen2", "smollm2-135m-instruct"])
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    args = parser.parse_args()
    print("$ " + shlex.join([sys.executable, *sys.argv]), flush=True)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, n=args.n, seed=0)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as scratch:
        for model in args.models:
            model_dir = _tiny_qwen2_dir(Path(scratch)) if model == "tiny-qwen2" else resolve_model_path(model)
            results.append(bench_model(model, model_dir, params, args.repeats))
    if args.json:
        args.json.write_text(json.dumps({"bench": "rollout", "models": results, "n": args.n,
                                         "max_new_tokens": args.max_new_tokens}, indent=1))


if __name__ == "__main__":
    main()
