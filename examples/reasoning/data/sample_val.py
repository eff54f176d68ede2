"""Which validation problems the untrained CPU default model ever gets right when sampled.

GRPO can only reinforce answers the policy samples: a problem none of whose samples is right
gives a group of equal rewards, and no gradient. This samples every problem of a validation file
``--samples`` times with HF ``generate`` (temperature ``--temperature``, no top-k or top-p, as the
CPU default's rollout) through the model's chat template, scores each response with the project's
reward (``rlsys.reward.math.is_correct``) and prints, per tier (the record's ``task``, the sign of
its answer, and ``*`` for products): how many problems were right at least once, and the share of
right samples.

    .venv/bin/python examples/reasoning/data/sample_val.py [--samples 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from rlsys.models.offline import resolve_model_path  # noqa: E402
from rlsys.reward.math import is_correct  # noqa: E402


def tier_of(record: dict) -> str:
    question = record["prompt"].rsplit("Question:", 1)[-1]
    sign = "negative" if str(record["solutions"][0]).startswith("-") else "positive"
    product = " (products)" if "*" in question else ""
    return f"{record.get('task', '?')}{product}, {sign}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--val-file", default=str(Path(__file__).with_name("arithmetic_val.jsonl")))
    parser.add_argument("--model", default="smollm2-135m-instruct", help="HF directory or offline builtin")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(args.seed)
    records = [json.loads(line) for line in Path(args.val_file).read_text(encoding="utf-8").splitlines() if line]
    problems, solved, right = collections.Counter(), collections.Counter(), collections.Counter()
    for record in records:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": record["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        inputs = tokenizer([prompt] * args.samples, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=True,
                                    temperature=args.temperature, top_k=0, top_p=1.0)
        responses = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct = sum(is_correct(response, record["solutions"]) for response in responses)
        tier = tier_of(record)
        problems[tier] += 1
        solved[tier] += correct > 0
        right[tier] += correct
    print(f"{args.samples} samples per problem at temperature {args.temperature}, {args.val_file}")
    print(f"{'tier':50} right at least once   right samples")
    for tier in sorted(problems):
        share = right[tier] / (problems[tier] * args.samples)
        print(f"{tier:50} {solved[tier]:>3} of {problems[tier]:<3}          {share:7.1%}")
    total = sum(problems.values())
    print(f"{'all':50} {sum(solved.values()):>3} of {total:<3}          "
          f"{sum(right.values()) / (total * args.samples):7.1%}")


if __name__ == "__main__":
    main()
