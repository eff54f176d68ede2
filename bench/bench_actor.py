"""Throughput of the Megatron actor's forward + backward, against HF transformers in the same run.

Default mode (CPU): SmolLM2-135M-Instruct (the offline builtin), fp32, one batch of
``--batch-size`` sequences of ``--seq-len`` random token ids (``--prompt-len`` of them prompt,
the rest response). Both systems compute the same thing: response-token log-probs, the GRPO
policy loss (``rlsys.algorithms.policy_loss``, token-mean, ratio 1) and its backward, with no
optimizer step.
- actor: ``MegatronActor.forward_backward`` (one microbatch holding the whole batch, megatron's
  schedule and DDP, vocab-parallel log-probs), with the CPU default core attention (megatron's
  upstream one, bit-exact with HF eager) and with our SDPA core attention (the GPU default);
- HF: ``model(ids)`` in train mode, fp32 log-softmax of the logits, the same loss, backward;
  measured with SDPA attention (HF's default) and with eager attention.
Same weights, same token ids, same thread count (``torch.set_num_threads``), one process.
After ``--warmup`` untimed rounds, ``--reps`` timed rounds run the four systems one after the
other, so load from other processes that drifts over minutes hits all of them alike; the table
gives each system's median seconds and the median over rounds of its time divided by the actor's
in the same round. Tokens/s counts all ``batch * seq_len`` tokens.

Shape mode (for a GPU run): ``--shape qwen2.5-1.5b|qwen2.5-7b --random-weights --dtype bf16
--seq-len 4096`` builds the actor with those exact shapes and megatron's random initialisation
(no HF baseline) and reports tokens/s and MFU:
    FLOPs per token (forward + backward) = 6 * N_matmul + 6 * layers * seq_len * q_heads * head_dim
where N_matmul counts the weights of every matrix multiply (attention, MLP, output layer; not the
embedding lookup) and the second term is causal attention (half of the seq x seq score and value
products); MFU divides achieved FLOP/s by the device's dense bf16 peak (H100 / H200 SXM: 989
TFLOP/s, or ``--peak-tflops``). With ``--dry-run`` it runs on the CPU: it builds the full
TransformerConfig of the shape and reports its FLOP count, then times the same code path on the
shape cut to 2 layers, a 16th of the hidden and MLP widths (same head counts), a 1,024-token
vocabulary and 64 tokens, so the path stays exercised without a GPU.

Run from the repository root (the command is printed first):
    .venv/bin/python bench/bench_actor.py
    .venv/bin/python bench/bench_actor.py --shape qwen2.5-7b --random-weights --dtype bf16 --seq-len 4096
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DENSE_BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool


# Qwen2.5 base model shapes (config.json of the released checkpoints).
SHAPES = {
    "qwen2.5-1.5b": Shape(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": Shape(3584, 18944, 28, 28, 4, 152064, False),
}


def qwen2_config(shape: Shape, max_positions: int) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen2",
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=max_positions,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    )


def flops_per_token(hf_config: Any, seq_len: int) -> float:
    """Forward + backward FLOPs per token (module doc)."""
    from rlsys.models.architecture import architecture_of

    arch = architecture_of(hf_config)
    q_width = arch.num_attention_heads * arch.head_dim
    kv_width = arch.num_query_groups * arch.head_dim
    per_layer = arch.hidden_size * (q_width + 2 * kv_width) + q_width * arch.hidden_size
    per_layer += 3 * arch.hidden_size * arch.ffn_hidden_size
    matmul_params = arch.num_layers * per_layer + arch.vocab_size * arch.hidden_size
    return 6.0 * matmul_params + 6.0 * arch.num_layers * seq_len * q_width


def _init_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def _random_batch(batch_size: int, seq_len: int, prompt_len: int, vocab: int, seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    advantages = torch.where(torch.rand(batch_size, generator=generator) < 0.5, -1.0, 1.0)
    return {"ids": ids, "prompt_len": prompt_len, "advantages": advantages}


def _rollout_batch(batch: dict[str, Any], old_logprobs: list[torch.Tensor] | None) -> Any:
    from rlsys.actor.microbatch import RolloutBatch

    prompt_len = batch["prompt_len"]
    return RolloutBatch.build(
        [row[:prompt_len] for row in batch["ids"]],
        [row[prompt_len:] for row in batch["ids"]],
        advantages=batch["advantages"],
        old_logprobs=old_logprobs,
    )


def _median_seconds(step: Callable[[], None], warmup: int, reps: int, synchronize: Callable[[], None]) -> float:
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
        torch.cuda.synchronize()


def _actor_step(actor: Any, batch: dict[str, Any]) -> Callable[[], None]:
    old = actor.compute_logprobs(_rollout_batch(batch, None)).logprobs
    rollout = _rollout_batch(batch, old)
    return lambda: actor.forward_backward(rollout)


def _hf_step(model_dir: Path, attention: str, batch: dict[str, Any]) -> Callable[[], None]:
    from transformers import AutoModelForCausalLM

    from rlsys.algorithms import policy_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention, dtype=torch.float32)
    model.train()
    ids, prompt_len = batch["ids"], batch["prompt_len"]
    labels = ids[:, prompt_len:]
    advantages = batch["advantages"]

    def response_logprobs() -> torch.Tensor:
        logits = model(ids).logits[:, prompt_len - 1 : -1].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None])[..., 0]

    with torch.no_grad():
        old = response_logprobs()
    mask = torch.ones_like(old, dtype=torch.bool)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss, _ = policy_loss(response_logprobs(), old, advantages, mask)
        loss.backward()

    return step


def _interleaved_seconds(steps: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, list[float]]:
    """Per system, the seconds of each timed round; systems take turns within every round."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def bench_against_hf(args: argparse.Namespace) -> dict[str, float]:
    from rlsys.actor.actor import MegatronActor
    from rlsys.config import ActorConfig
    from rlsys.models.offline import resolve_model_path

    model_dir = resolve_model_path(args.model)
    tokens = args.batch_size * args.seq_len
    actor_config = ActorConfig(max_tokens_per_microbatch=tokens, lr=1e-6)
    actor = MegatronActor(actor_config, model_path=model_dir, seed=args.seed)
    # The same actor with SDPA core attention (the GPU default) shows what the attention kernel is worth.
    sdpa_actor = MegatronActor(actor_config, model_path=model_dir, seed=args.seed, local_core_attention="sdpa")
    batch = _random_batch(args.batch_size, args.seq_len, args.prompt_len, actor.vocab_size, args.seed)
    names = {
        "actor": "rlsys actor (CPU default)",
        "actor_sdpa": "rlsys actor, sdpa attention",
        "hf_sdpa": "HF transformers, sdpa",
        "hf_eager": "HF transformers, eager",
    }
    steps = {
        "actor": _actor_step(actor, batch),
        "actor_sdpa": _actor_step(sdpa_actor, batch),
        "hf_sdpa": _hf_step(model_dir, "sdpa", batch),
        "hf_eager": _hf_step(model_dir, "eager", batch),
    }
    seconds = _interleaved_seconds(steps, args.warmup, args.reps)
    actor.close()
    print(f"model {args.model} ({model_dir}), fp32, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size} x {args.seq_len} tokens (prompt {args.prompt_len}), "
          f"{args.reps} rounds after {args.warmup} warm-up, systems interleaved within each round")
    # Last column: the median over rounds of (this system's seconds / the actor's seconds in the
    # same round), i.e. the actor's speed-up; above 1 the actor is faster. Per-round ratios cancel
    # load that drifts between rounds.
    print(f"{'system':<28}{'median s / step':>16}{'tokens/s':>12}{'actor speed-up':>16}")
    results = {}
    for key, label in names.items():
        median = statistics.median(seconds[key])
        speed_up = statistics.median(ours / actor for ours, actor in zip(seconds[key], seconds["actor"]))
        results[f"{key}_tokens_per_s"] = tokens / median
        results[f"actor_speed_up_vs_{key}"] = speed_up
        print(f"{label:<28}{median:>16.3f}{tokens / median:>12.1f}{speed_up:>16.2f}")
    return results


def bench_shape(args: argparse.Namespace) -> dict[str, float]:
    from rlsys.actor.actor import MegatronActor
    from rlsys.config import ActorConfig
    from rlsys.models.megatron_model import build_transformer_config

    shape = SHAPES[args.shape]
    full_config = qwen2_config(shape, max(args.seq_len, 4096))
    full_flops = flops_per_token(full_config, args.seq_len)
    # The full TransformerConfig must build (megatron validates it) even when only a cut runs.
    transformer_config = build_transformer_config(full_config, params_dtype=_DTYPES[args.dtype])
    print(f"shape {args.shape}: {transformer_config.num_layers} layers, hidden {transformer_config.hidden_size}, "
          f"{full_flops / 1e9:.2f} GFLOP per token at seq_len {args.seq_len}")
    if args.dry_run:
        run_shape = Shape(shape.hidden_size // 16, shape.intermediate_size // 16, 2, shape.num_attention_heads,
                          shape.num_key_value_heads, 1024, shape.tie_word_embeddings)
        run_config, seq_len, batch_size = qwen2_config(run_shape, 128), 64, 2
    else:
        run_config, seq_len, batch_size = full_config, args.seq_len, args.batch_size
    # --activation-recompute: every layer, one at a time.
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    actor = MegatronActor(
        ActorConfig(max_tokens_per_microbatch=seq_len, lr=1e-6, precision=args.dtype, tp=args.tp,
                    **(recompute if args.activation_recompute else {})),
        hf_config=run_config,
        seed=args.seed,
    )
    batch = _random_batch(batch_size, seq_len, min(args.prompt_len, seq_len // 2), actor.vocab_size, args.seed)
    seconds = _median_seconds(_actor_step(actor, batch), args.warmup, args.reps, _synchronize)
    actor.close()
    tokens_per_s = batch_size * seq_len / seconds
    achieved_tflops = tokens_per_s * flops_per_token(run_config, seq_len) / 1e12
    peak = args.peak_tflops or _device_peak_tflops()
    results = {"tokens_per_s": tokens_per_s, "achieved_tflops": achieved_tflops}
    if peak:
        results["mfu"] = achieved_tflops / (peak * torch.distributed.get_world_size())
    ran = f"dry run ({args.dtype}, CPU, cut model)" if args.dry_run else args.dtype
    mfu = f"MFU {results['mfu']:.1%}" if "mfu" in results else "MFU n/a (no peak)"
    print(f"{ran}: {batch_size} x {seq_len} tokens, {seconds:.3f} s / step, {tokens_per_s:.1f} tokens/s, "
          f"{achieved_tflops:.3f} TFLOP/s, {mfu}")
    return results


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _device_peak_tflops() -> float | None:
    if not torch.cuda.is_available() or torch.distributed.get_backend() != "nccl":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in DENSE_BF16_PEAK_TFLOPS.items() if key in name), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="HF dir or offline builtin (HF comparison)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="benchmark these shapes instead (no HF baseline)")
    parser.add_argument("--random-weights", action="store_true", help="shape mode: megatron's random init (required)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="shape mode parameter dtype")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tp", type=int, default=1, help="shape mode: tensor-parallel size (launch with torchrun)")
    parser.add_argument("--activation-recompute", action="store_true", help="shape mode: full activation recompute")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device dense peak for MFU")
    parser.add_argument("--dry-run", action="store_true", help="shape mode on CPU with a cut model (module doc)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    if args.shape and not args.random_weights:
        parser.error("--shape needs --random-weights (no checkpoint of these shapes is available offline)")
    if args.prompt_len >= args.seq_len:
        parser.error("--prompt-len must be shorter than --seq-len")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    print(" ".join(["$ .venv/bin/python bench/bench_actor.py", *([shlex.join(shown)] if shown else [])]), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    _init_process_group()
    results = bench_shape(args) if args.shape else bench_against_hf(args)
    if args.json and torch.distributed.get_rank() == 0:
        args.json.write_text(json.dumps({"bench": "actor", "mode": "shape" if args.shape else "hf", "model": args.model,
                                         "batch_size": args.batch_size, "seq_len": args.seq_len,
                                         "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
