"""Risks of the actor's memory settings: fp16 / bf16 precision, activation recompute, host offload.

- fp16 loss scaling is mis-wired: the loss is not multiplied by the scale before backward, or the
  gradients are not divided by it after (then the first applied step's grad norm is off by the
  scale), or the scaler is updated more or less than once per attempted step, or an overflowed
  step still moves the weights or the learning rate. With megatron's dynamic scaler from 2**32 on
  the tiny model every step overflows until the scale is low enough: weights must stay bitwise
  unchanged, the scale must follow megatron's rule (hysteresis 2: the first overflow keeps it,
  each later one halves it), these skips must not count towards max_consecutive_nonfinite, and
  the first applied step must match fp32's loss (1e-4) and grad norm (1e-3 relative: fp16
  rounding). A clean window doubles the scale; a constant scale (RLinf's 1.5B setting) stays put
  and, when it overflows, counts as non-finite (it cannot adapt); a NaN loss counts as non-finite
  even while the scale could drop. fp16 log-probs stay within 2e-3 of HF's fp32 ones.
- bf16 trains a step within 1e-2 of fp32's grad norm, without a loss scaler.
- Activation recompute (RLinf's full / block / N layers, and selective) is ignored, or changes the
  numbers: the first N layers of the stage (block) or the core attention (selective) must run their
  forward twice per trained microbatch, the others once, and training must equal no recompute bitwise.
- Offload leaves state behind or brings it back wrong: while offloaded every parameter, optimizer
  state and gradient storage must hold zero bytes and running the actor must fail clearly; training
  after offload + reload must equal training without it bitwise, for fp32 with the
  DistributedOptimizer, fp16 (separate fp32 main weights) and bf16 with megatron's plain optimizer.

All on one rank (CPU, gloo), in one process.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests.actor.tiny import ADVANTAGES, batch_tokens, max_abs_diff
from tests.dist import run_distributed

TRAIN_MODEL = "qwen2_tied"
TRAIN_ACTOR: dict[str, Any] = dict(
    lr=3e-3, clip_grad=1.0, max_tokens_per_microbatch=32, n_minibatches=1, recompute_old_logprobs=False
)
FP16_LOSS_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-3
BF16_TOLERANCE = 1e-2
MAX_OVERFLOW_STEPS = 40
WARMUP: dict[str, Any] = dict(lr_schedule="warmup", lr_warmup_steps=4, min_lr=1e-3)


# ---------------------------------------------------------------- code that runs in the rank


def _batch(old_logprobs: list[torch.Tensor], advantages: Any = ADVANTAGES) -> Any:
    from rlsys.actor.microbatch import RolloutBatch

    prompts, responses = batch_tokens()
    return RolloutBatch.build(prompts, responses, advantages=list(advantages), old_logprobs=old_logprobs)


def _actor(model_dir: str, **settings: Any) -> Any:
    from rlsys.actor.actor import MegatronActor
    from rlsys.config import ActorConfig

    return MegatronActor(ActorConfig(**{**TRAIN_ACTOR, **settings}), model_path=model_dir)


def _weights(actor: Any) -> list[torch.Tensor]:
    return [param.detach().clone() for param in actor.model.parameters()]


def _same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second))


def _precision_checks(model_dir: str, old: list[torch.Tensor]) -> dict[str, Any]:
    from rlsys.actor.actor import NonFiniteTrainingError

    batch = _batch(old)
    report: dict[str, Any] = {}

    actor = _actor(model_dir, precision="fp32")
    report["fp32"] = actor.train_step(batch)
    actor.close()

    # Dynamic scale from megatron's default 2**32: overflows until the scale is low enough. The
    # warmup makes a scheduler that advanced on a skipped step visible in the applied step's lr.
    actor = _actor(model_dir, precision="fp16", hysteresis=2, max_consecutive_nonfinite=2, **WARMUP)
    dynamic: dict[str, Any] = {"logprobs": actor.compute_logprobs(batch).logprobs}
    before = _weights(actor)
    skipped: list[dict] = []
    unchanged = True
    for _ in range(MAX_OVERFLOW_STEPS):
        metrics = actor.train_step(batch)
        if metrics["optimizer_steps"]:
            break
        skipped.append(metrics)
        unchanged = unchanged and _same(before, _weights(actor))
    dynamic.update(
        skipped=skipped,
        unchanged_while_skipping=unchanged,
        applied=metrics,
        moved_by_applied=not _same(before, _weights(actor)),
        consecutive_nonfinite=actor.consecutive_nonfinite,
    )
    dynamic["nan_loss"] = actor.train_step(_batch(old, advantages=[math.nan] * len(ADVANTAGES)))
    actor.close()
    report["fp16_dynamic"] = dynamic

    # A scale that never overflows here and doubles after every 2 good steps.
    actor = _actor(model_dir, precision="fp16", initial_loss_scale=2.0**10, loss_scale_window=2)
    report["fp16_growth"] = [actor.train_step(batch) for _ in range(4)]
    actor.close()

    # Constant scales: RLinf's 65536, and one that always overflows (it cannot adapt).
    actor = _actor(model_dir, precision="fp16", loss_scale=65536.0)
    report["fp16_constant"] = [actor.train_step(batch) for _ in range(2)]
    actor.close()
    actor = _actor(model_dir, precision="fp16", loss_scale=2.0**32, max_consecutive_nonfinite=2)
    first = actor.train_step(batch)
    try:
        actor.train_step(batch)
        error = None
    except NonFiniteTrainingError as raised:
        error = str(raised)
    actor.close()
    report["fp16_constant_overflow"] = {"first": first, "error": error}

    actor = _actor(model_dir, precision="bf16")
    before = _weights(actor)
    report["bf16"] = {"metrics": actor.train_step(batch), "moved": not _same(before, _weights(actor))}
    actor.close()
    return report


def _count_forwards(modules: list[torch.nn.Module]) -> list[int]:
    counts = [0] * len(modules)
    for index, module in enumerate(modules):

        def count(*_: Any, index: int = index) -> None:
            counts[index] += 1

        module.register_forward_hook(count)
    return counts


def _recompute_checks(model_dir: str, old: list[torch.Tensor]) -> dict[str, Any]:
    batch = _batch(old)
    settings = {
        "none": {},
        "block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
        "selective": dict(recompute_granularity="selective"),
    }
    report: dict[str, Any] = {}
    for name, recompute in settings.items():
        actor = _actor(model_dir, precision="fp32", **recompute)
        layers = list(actor.model.decoder.layers)
        layer_calls = _count_forwards(layers)
        attention_calls = _count_forwards([layer.self_attention.core_attention for layer in layers])
        metrics = [actor.train_step(batch), actor.train_step(batch)]
        report[name] = {
            "metrics": metrics,
            "layer_calls": list(layer_calls),
            "attention_calls": list(attention_calls),
            "logprobs": actor.compute_logprobs(batch).logprobs,
            "config": (
                actor.model.config.recompute_granularity,
                actor.model.config.recompute_method,
                actor.model.config.recompute_num_layers,
            ),
        }
        actor.close()
    return report


def _storage_bytes(actor: Any) -> dict[str, int]:
    members = [member.optimizer for member in actor.optimizer.chained_optimizers]
    optimizer_tensors = [param for inner in members for group in inner.param_groups for param in group["params"]]
    optimizer_tensors += [
        value
        for inner in members
        for state in inner.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]
    return {
        "parameters": sum(p.untyped_storage().nbytes() for p in actor.model.parameters()),
        "optimizer": sum(t.untyped_storage().nbytes() for t in optimizer_tensors),
        "gradients": sum(b.grad_data.untyped_storage().nbytes() for b in actor.wrapped.buffers),
    }


def _offload_checks(model_dir: str, old: list[torch.Tensor]) -> dict[str, Any]:
    batch = _batch(old)
    settings = {
        "fp32-distributed": dict(precision="fp32"),
        "fp16-distributed": dict(precision="fp16", initial_loss_scale=2.0**10),
        "bf16-plain": dict(precision="bf16", use_distributed_optimizer=False),
    }
    report: dict[str, Any] = {}
    for name, precision in settings.items():
        runs: dict[str, Any] = {}
        for offload in (False, True):
            actor = _actor(model_dir, **precision)
            metrics = [actor.train_step(batch)]
            if offload:
                runs["bytes_on_device"] = _storage_bytes(actor)
                actor.offload_to_host()
                actor.offload_to_host()
                runs["bytes_offloaded"] = _storage_bytes(actor)
                try:
                    actor.compute_logprobs(batch)
                    runs["error_while_offloaded"] = None
                except RuntimeError as raised:
                    runs["error_while_offloaded"] = str(raised)
                actor.reload_to_device()
                actor.reload_to_device()
            metrics.append(actor.train_step(batch))
            result = actor.compute_logprobs(batch, with_entropy=True)
            runs["offload" if offload else "straight"] = {
                "metrics": metrics,
                "logprobs": result.logprobs,
                "entropy": result.entropy,
                "weights": _weights(actor),
            }
            actor.close()
        report[name] = runs
    return report


def _worker(rank: int, world_size: int, model_dir: str, old: list[torch.Tensor]) -> dict[str, Any]:
    return {
        "precision": _precision_checks(model_dir, old),
        "recompute": _recompute_checks(model_dir, old),
        "offload": _offload_checks(model_dir, old),
    }


# ---------------------------------------------------------------- launch and tests


@pytest.fixture(scope="module")
def report(tiny_checkpoints: dict[str, dict[str, Any]]) -> dict[str, Any]:
    checkpoint = tiny_checkpoints[TRAIN_MODEL]
    (result,) = run_distributed(_worker, 1, args=(checkpoint["dir"], checkpoint["logprobs"]), timeout_s=600)
    return result


def _relative(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


def test_fp16_overflow_steps_are_skipped_and_lower_the_scale_as_megatron(report: dict[str, Any]) -> None:
    dynamic = report["precision"]["fp16_dynamic"]
    skipped = dynamic["skipped"]
    assert len(skipped) >= 3, "the scale never overflowed: the loss is not being scaled"
    assert all(m["skipped_overflow"] == 1 and m["skipped_nonfinite"] == 0 for m in skipped)
    assert all(m["optimizer_steps"] == 0 for m in skipped)
    # hysteresis 2: the first overflow keeps megatron's initial 2**32, every later one halves it.
    expected = [2.0**32] + [2.0 ** (32 - k) for k in range(1, len(skipped))]
    assert [m["loss_scale"] for m in skipped] == expected
    assert dynamic["unchanged_while_skipping"], "an overflowed step moved the weights"
    assert dynamic["applied"]["lr"] == WARMUP["min_lr"], "the scheduler advanced on an overflowed step"
    # More skips than max_consecutive_nonfinite=2, and no error: the scale's search is not a failure.
    assert dynamic["consecutive_nonfinite"] == 0


def test_fp16_first_applied_step_matches_fp32(report: dict[str, Any]) -> None:
    fp32 = report["precision"]["fp32"]
    applied = report["precision"]["fp16_dynamic"]["applied"]
    assert applied["optimizer_steps"] == 1 and applied["skipped_overflow"] == 0
    assert applied["loss_scale"] == report["precision"]["fp16_dynamic"]["skipped"][-1]["loss_scale"]
    assert report["precision"]["fp16_dynamic"]["moved_by_applied"]
    print(f"fp16 vs fp32: loss {applied['policy_loss']} / {fp32['policy_loss']}, "
          f"grad norm {applied['grad_norm']} / {fp32['grad_norm']}")
    assert abs(applied["policy_loss"] - fp32["policy_loss"]) <= FP16_LOSS_TOLERANCE
    assert _relative(applied["grad_norm"], fp32["grad_norm"]) <= FP16_TOLERANCE


def test_fp16_logprobs_are_close_to_hf(tiny_checkpoints: dict, report: dict[str, Any]) -> None:
    diff = max_abs_diff(report["precision"]["fp16_dynamic"]["logprobs"], tiny_checkpoints[TRAIN_MODEL]["logprobs"])
    print(f"fp16 log-probs vs HF fp32: max |diff| {diff:.2e}")
    assert diff <= 2e-3


def test_fp16_scale_grows_after_a_clean_window_and_a_constant_scale_stays(report: dict[str, Any]) -> None:
    growth = report["precision"]["fp16_growth"]
    assert all(m["optimizer_steps"] == 1 for m in growth)
    assert [m["loss_scale"] for m in growth] == [2.0**10, 2.0**11, 2.0**11, 2.0**12]
    constant = report["precision"]["fp16_constant"]
    assert all(m["optimizer_steps"] == 1 and m["loss_scale"] == 65536.0 for m in constant)
    assert _relative(constant[0]["grad_norm"], report["precision"]["fp32"]["grad_norm"]) <= FP16_TOLERANCE


def test_fp16_failures_the_scale_cannot_fix_count_as_nonfinite(report: dict[str, Any]) -> None:
    overflow = report["precision"]["fp16_constant_overflow"]
    assert overflow["first"]["skipped_nonfinite"] == 1 and overflow["first"]["skipped_overflow"] == 0
    assert overflow["error"] is not None and "2 optimizer steps in a row" in overflow["error"]
    nan_loss = report["precision"]["fp16_dynamic"]["nan_loss"]
    assert nan_loss["skipped_nonfinite"] == 1 and nan_loss["skipped_overflow"] == 0


def test_bf16_trains_a_step_close_to_fp32(report: dict[str, Any]) -> None:
    bf16 = report["precision"]["bf16"]
    metrics = bf16["metrics"]
    assert metrics["optimizer_steps"] == 1 and metrics["loss_scale"] == 1.0 and bf16["moved"]
    assert _relative(metrics["grad_norm"], report["precision"]["fp32"]["grad_norm"]) <= BF16_TOLERANCE


def test_recompute_runs_where_configured_and_changes_no_number(report: dict[str, Any]) -> None:
    runs = report["recompute"]
    assert runs["block"]["config"] == ("full", "block", 2)
    assert runs["selective"]["config"] == ("selective", None, None)
    once = runs["none"]["layer_calls"]
    assert len(set(once)) == 1 and once[0] > 0
    assert runs["block"]["layer_calls"] == [2 * once[0], 2 * once[0], once[0], once[0]]
    assert runs["selective"]["layer_calls"] == once
    assert runs["selective"]["attention_calls"] == [2 * c for c in runs["none"]["attention_calls"]]
    for name in ("block", "selective"):
        assert runs[name]["metrics"] == runs["none"]["metrics"], name
        assert all(torch.equal(a, b) for a, b in zip(runs[name]["logprobs"], runs["none"]["logprobs"])), name


@pytest.mark.parametrize("setting", ["fp32-distributed", "fp16-distributed", "bf16-plain"])
def test_offload_frees_the_device_and_reload_changes_nothing(report: dict[str, Any], setting: str) -> None:
    runs = report["offload"][setting]
    assert all(size > 0 for size in runs["bytes_on_device"].values()), runs["bytes_on_device"]
    assert runs["bytes_offloaded"] == {"parameters": 0, "optimizer": 0, "gradients": 0}
    assert runs["error_while_offloaded"] is not None and "reload_to_device" in runs["error_while_offloaded"]
    straight, offloaded = runs["straight"], runs["offload"]
    assert offloaded["metrics"] == straight["metrics"]
    assert _same(offloaded["weights"], straight["weights"])
    assert _same(offloaded["logprobs"], straight["logprobs"]) and _same(offloaded["entropy"], straight["entropy"])
