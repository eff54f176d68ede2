"""Risks of the Megatron actor under tensor, pipeline and data parallelism.

- Log-probs or entropies differ from HF transformers' (full-vocabulary logits, fp32, eager):
  checked within 1e-5 for three tiny configs at TP1, TP2, TP2 with sequence parallel (Qwen2
  tied only), PP2, DP2 and TP2xPP2, through token-budget microbatches with padding, uneven DP
  shares and an empty response; every rank must return the same, complete results.
- The loss scale is wrong under TP / DP / PP (megatron's schedule divides by the number of
  microbatches, its DDP averages over DP): per-step losses and grad norms of 3 train steps
  (2 minibatches each, several microbatches, warmup schedule, clipping) at TP2, DP2 and TP2xPP2
  must equal TP1's (losses within 1e-5, grad norms within 1e-4 relative), and the loss must fall.
- Checkpoints: a TP2 checkpoint (model + DistributedOptimizer + scheduler) loaded at TP1 must
  give the same log-probs (1e-5) and the same next train step (loss 1e-5, log-probs 1e-4);
  training 2 steps, saving, and training 1 more in FRESH processes must equal 3 steps straight,
  bitwise (loss, learning rate, log-probs after).
- Early stop: data whose mean importance ratio exceeds the threshold must add no gradient
  (weights bitwise unchanged) and be counted, at microbatch granularity and at minibatch
  granularity (where the remaining minibatch must give bitwise the weights that training on it
  alone gives).
- Non-finite: NaN advantages (a real input) must skip the optimizer step (weights unchanged),
  be counted, and after ``max_consecutive_nonfinite`` skips in a row raise a clear error; a good
  step in between resets the count.
- Off-policy correction: weights applied in the actor's loss must scale it as computed by hand
  (engine log-probs ln 2 below the actor's double the loss and gradients under tis; a mis band
  that excludes the ratio zeroes them), at TP1 and TP2.
- Real weights: SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV heads) gives HF's log-probs
  and runs a train step that changes its weights.

Process groups (starting a process and importing megatron dominate the time, so checks are
grouped): world 2 (TP2, TP2+SP, PP2, DP2), world 4 (TP2xPP2), world 1 (TP1, checkpoint
resharding, early stop, non-finite), and a fresh world 1 (resume, SmolLM2).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.actor.tiny import ADVANTAGES, batch_tokens, max_abs_diff
from tests.dist import run_distributed

LOGPROB_TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-5
GRAD_NORM_RELATIVE_TOLERANCE = 1e-4
TRAIN_STEPS = 3
TRAIN_MODEL = "qwen2_tied"

TRAIN_ACTOR: dict[str, Any] = dict(
    lr=3e-3,
    lr_schedule="warmup",
    lr_warmup_steps=4,
    min_lr=1e-3,
    weight_decay=0.01,
    clip_grad=1.0,
    max_tokens_per_microbatch=32,
    n_minibatches=2,
    recompute_old_logprobs=False,
)
LOGPROB_ACTOR: dict[str, Any] = dict(max_tokens_per_microbatch=32)


# ---------------------------------------------------------------- code that runs in the ranks


def _batch(old_logprobs: list[torch.Tensor] | None = None, advantages: Any = ADVANTAGES, indices: Any = None) -> Any:
    """The test batch; sequence 3 has the last 3 response tokens masked out of the loss (truncation)."""
    from rlsys.actor.microbatch import RolloutBatch

    prompts, responses = batch_tokens()
    masks = [[True] * len(r) for r in responses]
    masks[3][-3:] = [False] * 3
    indices = list(range(len(prompts))) if indices is None else list(indices)

    def pick(values: Any) -> Any:
        return None if values is None else [values[i] for i in indices]

    return RolloutBatch.build(
        pick(prompts),
        pick(responses),
        advantages=pick(list(advantages)),
        old_logprobs=pick(old_logprobs),
        loss_mask=pick(masks),
    )


def _actor(model_dir: str, for_training: bool = True, algorithm: dict[str, Any] | None = None, **settings: Any) -> Any:
    from rlsys.actor.actor import MegatronActor
    from rlsys.config import ActorConfig, AlgorithmConfig

    return MegatronActor(
        ActorConfig(**settings), AlgorithmConfig(**(algorithm or {})), model_path=model_dir, for_training=for_training
    )


def _logprobs_of_configs(settings: dict[str, Any], model_dirs: dict[str, str]) -> dict[str, dict[str, list]]:
    report = {}
    for name, model_dir in model_dirs.items():
        actor = _actor(model_dir, for_training=False, **LOGPROB_ACTOR, **settings)
        result = actor.compute_logprobs(_batch(), with_entropy=True)
        report[name] = {"logprobs": result.logprobs, "entropy": result.entropy}
        actor.close()
    return report


def _train(
    settings: dict[str, Any],
    model_dir: str,
    old_logprobs: list[torch.Tensor],
    steps: int,
    save_after: int | None = None,
    checkpoint_root: str | None = None,
) -> dict[str, Any]:
    actor = _actor(model_dir, **TRAIN_ACTOR, **settings)
    batch = _batch(old_logprobs)
    report: dict[str, Any] = {"metrics": []}
    for step in range(1, steps + 1):
        report["metrics"].append(actor.train_step(batch))
        if step == save_after:
            actor.save_checkpoint(checkpoint_root)
            saved = actor.compute_logprobs(batch, with_entropy=True)
            report["at_save"] = {"logprobs": saved.logprobs, "entropy": saved.entropy}
    probe = actor.compute_logprobs(batch, with_entropy=True)
    actor.close()
    return {**report, "logprobs": probe.logprobs, "entropy": probe.entropy}


def _update_logprobs_check(settings: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """Old log-probs from the update's own forward pass against a pass of their own (same weights)."""
    on_policy = dict(TRAIN_ACTOR, n_minibatches=1, recompute_old_logprobs=True, **settings)
    batch = _batch()  # no old log-probs: the actor provides them

    def gradients(actor: Any) -> list[torch.Tensor]:
        return [buffer.grad_data.clone() for buffer in actor.wrapped.buffers]

    actor = _actor(model_dir, **on_policy)
    recomputed = batch.with_old_logprobs(actor.compute_logprobs(batch).logprobs)
    separate = actor.forward_backward(recomputed)
    separate_grads = gradients(actor)
    fused = actor.forward_backward(batch)
    fused_grads = gradients(actor)
    # Off-policy correction through the real actor: engine log-probs ln 2 below the actor's make
    # every token's weight 2 (under tis' truncation at 3), so the loss and gradients double; a mis
    # band that excludes 2 masks every token out.
    uncorrected = actor.algorithm
    behind = batch.with_behaviour_logprobs([lp - math.log(2.0) for lp in recomputed.old_logprobs])
    actor.algorithm = dataclasses.replace(uncorrected, off_policy_correction="tis", correction_high=3.0)
    tis = actor.forward_backward(behind)
    tis_grads = gradients(actor)
    actor.algorithm = dataclasses.replace(uncorrected, off_policy_correction="mis", correction_low=0.5,
                                          correction_high=1.5)
    mis = actor.forward_backward(behind)
    mis_grads = gradients(actor)
    actor.algorithm = uncorrected
    fused_step = actor.train_step(batch, rollout_logprobs=recomputed.old_logprobs)
    fused_after = actor.compute_logprobs(batch).logprobs
    actor.close()
    actor = _actor(model_dir, old_logprobs_from_update=False, **on_policy)
    separate_step = actor.train_step(batch, rollout_logprobs=recomputed.old_logprobs)
    separate_after = actor.compute_logprobs(batch).logprobs
    actor.close()
    return {
        "loss": (separate["policy_loss"], fused["policy_loss"]),
        "grad_difference": max((a - b).abs().max().item() for a, b in zip(separate_grads, fused_grads)),
        "grad_scale": max(a.abs().max().item() for a in separate_grads),
        "steps": (separate_step, fused_step),
        "after_difference": max_abs_diff(separate_after, fused_after),
        "tis": (fused["policy_loss"], tis["policy_loss"],
                max((2.0 * a - b).abs().max().item() for a, b in zip(fused_grads, tis_grads))),
        "mis": (mis["policy_loss"], max(g.abs().max().item() for g in mis_grads)),
    }


ZERO_ADVANTAGES = (0.0, 0.0, 0.0, -0.5, 0.0, 0.8)  # the first minibatch of two is all zero


def _zero_advantage_check(settings: dict[str, Any], model_dir: str, start: list[torch.Tensor]) -> dict[str, Any]:
    """Two steps with and without ``skip_zero_advantage`` from the same weights, in the two ways the
    old log-probs come: a pass of their own over two minibatches (the first all zero, so it takes
    its step on a zero gradient), and the update's own pass in one minibatch. ``start``: the
    log-probs of the initial weights, to show the steps moved them."""
    report: dict[str, Any] = {}
    for name, minibatches in {"two_minibatches": 2, "one_minibatch": 1}.items():
        runs = {}
        for skip in (False, True):
            config = dict(TRAIN_ACTOR, recompute_old_logprobs=True, skip_zero_advantage=skip,
                          n_minibatches=minibatches, **settings)
            actor = _actor(model_dir, **config)
            batch = _batch(advantages=ZERO_ADVANTAGES)
            steps = [actor.train_step(batch) for _ in range(2)]
            runs[skip] = {"steps": steps, "after": actor.compute_logprobs(batch).logprobs}
            actor.close()
        report[name] = {
            "minibatches": minibatches,
            "steps": (runs[False]["steps"], runs[True]["steps"]),
            "after_difference": max_abs_diff(runs[False]["after"], runs[True]["after"]),
            "moved": max_abs_diff(runs[False]["after"], start),
        }
    return report


COSINE: dict[str, Any] = dict(lr_schedule="cosine", lr=1e-3, min_lr=1e-4, lr_warmup_steps=1, lr_decay_steps=4)


def _cosine_lrs(model_dir: str, old: list[torch.Tensor]) -> list[float]:
    """The learning rate of each of 6 steps under the cosine schedule."""
    batch = _batch(old)
    actor = _actor(model_dir, **dict(TRAIN_ACTOR, n_minibatches=1, **COSINE))
    lrs = [actor.train_step(batch)["lr"] for _ in range(6)]
    actor.close()
    return lrs


def _two_rank_worker(rank: int, world_size: int, model_dirs: dict[str, str], old: list, work_dir: str) -> dict:
    report: dict[str, Any] = {"logprobs": {}, "train": {}}
    report["update_logprobs"] = _update_logprobs_check(dict(tp=2), model_dirs[TRAIN_MODEL])
    report["zero_advantage"] = _zero_advantage_check(dict(tp=2), model_dirs[TRAIN_MODEL], old)
    report["logprobs"]["tp2"] = _logprobs_of_configs(dict(tp=2), model_dirs)
    report["logprobs"]["tp2-sp"] = _logprobs_of_configs(
        dict(tp=2, sequence_parallel=True), {TRAIN_MODEL: model_dirs[TRAIN_MODEL]}
    )
    report["logprobs"]["pp2"] = _logprobs_of_configs(dict(pp=2), model_dirs)
    report["logprobs"]["dp2"] = _logprobs_of_configs({}, model_dirs)
    # TP2 trains one step past its checkpoint, for the TP1 run that resumes from it.
    report["train"]["tp2"] = _train(
        dict(tp=2), model_dirs[TRAIN_MODEL], old, TRAIN_STEPS + 1, TRAIN_STEPS, f"{work_dir}/tp2"
    )
    report["train"]["dp2"] = _train({}, model_dirs[TRAIN_MODEL], old, TRAIN_STEPS)
    return report


def _four_rank_worker(rank: int, world_size: int, model_dirs: dict[str, str], old: list) -> dict:
    return {
        "logprobs": {"tp2pp2": _logprobs_of_configs(dict(tp=2, pp=2), model_dirs)},
        "train": {"tp2pp2": _train(dict(tp=2, pp=2), model_dirs[TRAIN_MODEL], old, TRAIN_STEPS)},
    }


def _weights_probe(actor: Any, batch: Any) -> list[torch.Tensor]:
    return actor.compute_logprobs(batch).logprobs


def _early_stop_and_nonfinite_checks(model_dir: str, old: list[torch.Tensor]) -> dict[str, Any]:
    from rlsys.actor.actor import NonFiniteTrainingError

    tripped_old = [lp - 3.0 for lp in old]  # mean ratio e^3 ~ 20 > 5: trips the early stop
    one_per_microbatch = dict(TRAIN_ACTOR, max_tokens_per_microbatch=14, n_minibatches=1)
    report: dict[str, Any] = {}

    # Microbatch granularity. Sequence 0 tripped alone, then tripped next to an on-policy sequence 1.
    actor = _actor(model_dir, **one_per_microbatch)
    before = _weights_probe(actor, _batch(old))
    tripped_alone = actor.train_step(_batch([tripped_old[0], old[1]], indices=[0]))
    after_tripped = _weights_probe(actor, _batch(old))
    mixed = actor.train_step(_batch([tripped_old[0], old[1]], indices=[0, 1]))
    after_mixed = _weights_probe(actor, _batch(old))
    actor.close()
    report["microbatch"] = {
        "tripped_alone": tripped_alone,
        "unchanged_by_tripped": all(torch.equal(a, b) for a, b in zip(before, after_tripped)),
        "mixed": mixed,
        "changed_by_mixed": not all(torch.equal(a, b) for a, b in zip(before, after_mixed)),
    }

    # Minibatch granularity: minibatch 1 (sequence 0) tripped, minibatch 2 (sequence 1) on policy.
    minibatch_settings = dict(one_per_microbatch, n_minibatches=2)
    actor = _actor(model_dir, algorithm=dict(early_stop_granularity="minibatch"), **minibatch_settings)
    metrics = actor.train_step(_batch([tripped_old[0], old[1]], indices=[0, 1]))
    with_stop = _weights_probe(actor, _batch(old))
    actor.close()
    actor = _actor(model_dir, algorithm=dict(early_stop_granularity="minibatch"), **one_per_microbatch)
    actor.train_step(_batch(old, indices=[1]))
    second_alone = _weights_probe(actor, _batch(old))
    actor.close()
    report["minibatch"] = {
        "metrics": metrics,
        "equals_second_minibatch_alone": all(torch.equal(a, b) for a, b in zip(with_stop, second_alone)),
    }

    # Non-finite: NaN advantages skip the step; max_consecutive_nonfinite=2 skips in a row raise.
    actor = _actor(model_dir, max_consecutive_nonfinite=2, **one_per_microbatch)
    nan_batch = _batch(old, advantages=[math.nan] * 6, indices=[1])
    good_batch = _batch(old, indices=[1])
    before = _weights_probe(actor, _batch(old))
    first_nan = actor.train_step(nan_batch)
    after_nan = _weights_probe(actor, _batch(old))
    good = actor.train_step(good_batch)
    second_nan = actor.train_step(nan_batch)
    try:
        actor.train_step(nan_batch)
        error = None
    except NonFiniteTrainingError as raised:
        error = str(raised)
    actor.close()
    report["nonfinite"] = {
        "first_nan": first_nan,
        "unchanged_by_nan": all(torch.equal(a, b) for a, b in zip(before, after_nan)),
        "good": good,
        "second_nan": second_nan,
        "error": error,
    }
    return report


def _one_rank_worker(
    rank: int, world_size: int, model_dirs: dict[str, str], old: list, work_dir: str, tp2_checkpoint: str
) -> dict:
    report: dict[str, Any] = {"logprobs": {"tp1": _logprobs_of_configs({}, model_dirs)}, "train": {}}
    report["update_logprobs"] = _update_logprobs_check({}, model_dirs[TRAIN_MODEL])
    report["zero_advantage"] = _zero_advantage_check({}, model_dirs[TRAIN_MODEL], old)
    report["cosine_lrs"] = _cosine_lrs(model_dirs[TRAIN_MODEL], old)
    report["train"]["tp1"] = _train({}, model_dirs[TRAIN_MODEL], old, TRAIN_STEPS, 2, f"{work_dir}/tp1")

    actor = _actor(model_dirs[TRAIN_MODEL], **TRAIN_ACTOR)
    actor.load_checkpoint(tp2_checkpoint)
    batch = _batch(old)
    loaded = actor.compute_logprobs(batch, with_entropy=True)
    next_step = actor.train_step(batch)
    after = actor.compute_logprobs(batch)
    report["tp2_at_tp1"] = {
        "logprobs": loaded.logprobs,
        "entropy": loaded.entropy,
        "train_steps": next_step,
        "after_logprobs": after.logprobs,
    }
    actor.close()
    report["checks"] = _early_stop_and_nonfinite_checks(model_dirs[TRAIN_MODEL], old)
    return report


def _smollm2_step() -> dict[str, Any]:
    from transformers import AutoTokenizer

    from rlsys.actor.microbatch import RolloutBatch
    from rlsys.models.offline import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    questions = ["What is 7 + 6?", "What is 9 - 4?", "What is 3 * 5?", "What is 8 + 8?"]
    answers = [" 13", " 5", " 15", " 17"]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    responses = [
        tokenizer(f"The answer is \\boxed{{{answer.strip()}}}", add_special_tokens=False)["input_ids"]
        for answer in answers
    ]
    actor = _actor(str(path), lr=1e-5, max_tokens_per_microbatch=128)
    batch = RolloutBatch.build(prompts, responses, advantages=torch.tensor([1.0, 1.0, 1.0, -1.0]))
    before = actor.compute_logprobs(batch)
    metrics = actor.train_step(batch)
    after = actor.compute_logprobs(batch)
    actor.close()
    return {
        "dir": str(path),
        "prompts": prompts,
        "responses": responses,
        "before": before.logprobs,
        "after": after.logprobs,
        "metrics": metrics,
    }


def _fresh_rank_worker(rank: int, world_size: int, model_dirs: dict[str, str], old: list, resume_from: str) -> dict:
    actor = _actor(model_dirs[TRAIN_MODEL], **TRAIN_ACTOR)
    actor.load_checkpoint(resume_from)
    batch = _batch(old)
    metrics = actor.train_step(batch)
    after = actor.compute_logprobs(batch, with_entropy=True)
    train_steps = actor.train_steps
    actor.close()
    return {
        "resumed": {
            "metrics": metrics,
            "logprobs": after.logprobs,
            "entropy": after.entropy,
            "train_steps": train_steps,
        },
        "smollm2": _smollm2_step(),
    }


# ---------------------------------------------------------------- launches (module-scoped)


def _model_dirs(tiny_checkpoints: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: checkpoint["dir"] for name, checkpoint in tiny_checkpoints.items()}


def _old_logprobs(tiny_checkpoints: dict[str, dict[str, Any]]) -> list[torch.Tensor]:
    """HF's log-probs of the initial weights: the same old log-probs for every run and layout."""
    return tiny_checkpoints[TRAIN_MODEL]["logprobs"]


@pytest.fixture(scope="module")
def two_ranks(tiny_checkpoints: dict, work_dir: Path) -> list[dict]:
    args = (_model_dirs(tiny_checkpoints), _old_logprobs(tiny_checkpoints), str(work_dir))
    return run_distributed(_two_rank_worker, 2, args=args, timeout_s=600)


@pytest.fixture(scope="module")
def four_ranks(tiny_checkpoints: dict) -> list[dict]:
    args = (_model_dirs(tiny_checkpoints), _old_logprobs(tiny_checkpoints))
    return run_distributed(_four_rank_worker, 4, args=args, timeout_s=600)


@pytest.fixture(scope="module")
def one_rank(tiny_checkpoints: dict, work_dir: Path, two_ranks: list[dict]) -> dict:
    from rlsys.actor.checkpoint_files import latest_checkpoint

    tp2_checkpoint = latest_checkpoint(work_dir / "tp2")
    assert tp2_checkpoint is not None and tp2_checkpoint.name == f"step_{TRAIN_STEPS:08d}"
    args = (_model_dirs(tiny_checkpoints), _old_logprobs(tiny_checkpoints), str(work_dir), str(tp2_checkpoint))
    (report,) = run_distributed(_one_rank_worker, 1, args=args, timeout_s=600)
    return report


@pytest.fixture(scope="module")
def fresh_rank(tiny_checkpoints: dict, work_dir: Path, one_rank: dict) -> dict:
    from rlsys.actor.checkpoint_files import latest_checkpoint

    resume_from = latest_checkpoint(work_dir / "tp1")
    assert resume_from is not None and resume_from.name == "step_00000002"
    args = (_model_dirs(tiny_checkpoints), _old_logprobs(tiny_checkpoints), str(resume_from))
    (report,) = run_distributed(_fresh_rank_worker, 1, args=args, timeout_s=600)
    return report


# ---------------------------------------------------------------- tests


def _all_logprob_reports(two_ranks: list[dict], four_ranks: list[dict], one_rank: dict) -> dict[str, list[dict]]:
    """layout -> per-rank report {config: {logprobs, entropy}}."""
    layouts: dict[str, list[dict]] = {"tp1": [one_rank["logprobs"]["tp1"]]}
    for reports in (two_ranks, four_ranks):
        for layout in reports[0]["logprobs"]:
            layouts[layout] = [report["logprobs"][layout] for report in reports]
    return layouts


def test_logprobs_and_entropy_equal_hf_at_every_layout(
    tiny_checkpoints: dict, two_ranks: list[dict], four_ranks: list[dict], one_rank: dict
) -> None:
    layouts = _all_logprob_reports(two_ranks, four_ranks, one_rank)
    assert sorted(layouts) == ["dp2", "pp2", "tp1", "tp2", "tp2-sp", "tp2pp2"]
    for layout, rank_reports in layouts.items():
        for name, result in rank_reports[0].items():
            reference = tiny_checkpoints[name]
            assert [lp.shape for lp in result["logprobs"]] == [lp.shape for lp in reference["logprobs"]]
            logprob_diff = max_abs_diff(result["logprobs"], reference["logprobs"])
            entropy_diff = max_abs_diff(result["entropy"], reference["entropy"])
            print(f"{layout} {name}: max |logprob - hf| {logprob_diff:.2e}, max |entropy - hf| {entropy_diff:.2e}")
            assert logprob_diff <= LOGPROB_TOLERANCE, (layout, name)
            assert entropy_diff <= LOGPROB_TOLERANCE, (layout, name)
            for other in rank_reports[1:]:
                assert all(torch.equal(a, b) for a, b in zip(result["logprobs"], other[name]["logprobs"])), (
                    f"{layout} {name}: ranks returned different log-probs"
                )


def test_train_steps_agree_across_layouts_and_lower_the_loss(
    two_ranks: list[dict], four_ranks: list[dict], one_rank: dict
) -> None:
    reference = [m for m in one_rank["train"]["tp1"]["metrics"]]
    losses = [m["policy_loss"] for m in reference]
    print(f"tp1 losses {losses}, grad norms {[m['grad_norm'] for m in reference]}")
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(m["optimizer_steps"] == 2 and m["skipped_nonfinite"] == 0 for m in reference)
    assert all(m["grad_norm"] > TRAIN_ACTOR["clip_grad"] for m in reference[:1]), "clipping never active"
    runs = {
        "tp2": two_ranks[0]["train"]["tp2"]["metrics"][:TRAIN_STEPS],
        "dp2": two_ranks[0]["train"]["dp2"]["metrics"],
        "tp2pp2": four_ranks[0]["train"]["tp2pp2"]["metrics"],
    }
    for layout, metrics in runs.items():
        assert len(metrics) == TRAIN_STEPS
        for step, (ours, tp1) in enumerate(zip(metrics, reference), start=1):
            loss_diff = abs(ours["policy_loss"] - tp1["policy_loss"])
            norm_diff = abs(ours["grad_norm"] - tp1["grad_norm"]) / tp1["grad_norm"]
            print(f"{layout} step {step}: |loss - tp1| {loss_diff:.2e}, grad norm rel diff {norm_diff:.2e}")
            assert loss_diff <= LOSS_TOLERANCE, (layout, step)
            assert norm_diff <= GRAD_NORM_RELATIVE_TOLERANCE, (layout, step)
            assert ours["lr"] == tp1["lr"] and ours["valid_tokens"] == tp1["valid_tokens"], (layout, step)
    # Every rank reports the same metrics.
    for reports in (two_ranks, four_ranks):
        for layout in reports[0]["train"]:
            assert all(r["train"][layout]["metrics"] == reports[0]["train"][layout]["metrics"] for r in reports)


def test_tp2_checkpoint_with_optimizer_loads_at_tp1(two_ranks: list[dict], one_rank: dict) -> None:
    tp2 = two_ranks[0]["train"]["tp2"]
    loaded = one_rank["tp2_at_tp1"]
    # TP2 reported its probe after step TRAIN_STEPS + 1; the checkpoint is from step TRAIN_STEPS.
    # So compare the TP1 model after its own next step with TP2's after the same step.
    step_diff = abs(loaded["train_steps"]["policy_loss"] - tp2["metrics"][TRAIN_STEPS]["policy_loss"])
    after_diff = max_abs_diff(loaded["after_logprobs"], tp2["logprobs"])
    print(f"TP2 checkpoint at TP1: next-step |loss diff| {step_diff:.2e}, log-probs after it {after_diff:.2e}")
    assert step_diff <= LOSS_TOLERANCE
    assert after_diff <= 1e-4
    assert loaded["train_steps"]["lr"] == tp2["metrics"][TRAIN_STEPS]["lr"], "scheduler state not restored"


def test_tp2_checkpoint_gives_the_same_logprobs_at_tp1(
    tiny_checkpoints: dict, two_ranks: list[dict], one_rank: dict
) -> None:
    loaded = one_rank["tp2_at_tp1"]
    at_save = two_ranks[0]["train"]["tp2"]["at_save"]
    logprob_diff = max_abs_diff(loaded["logprobs"], at_save["logprobs"])
    entropy_diff = max_abs_diff(loaded["entropy"], at_save["entropy"])
    untrained_diff = max_abs_diff(loaded["logprobs"], tiny_checkpoints[TRAIN_MODEL]["logprobs"])
    print(f"TP2 checkpoint at TP1 vs TP2 at save: log-probs {logprob_diff:.2e}, entropy {entropy_diff:.2e}")
    assert logprob_diff <= LOGPROB_TOLERANCE and entropy_diff <= LOGPROB_TOLERANCE
    assert untrained_diff > 1e-3, "the checkpoint holds the untrained weights"


def test_resume_in_fresh_processes_equals_training_straight(one_rank: dict, fresh_rank: dict) -> None:
    straight = one_rank["train"]["tp1"]
    resumed = fresh_rank["resumed"]
    assert resumed["train_steps"] == TRAIN_STEPS
    assert resumed["metrics"] == straight["metrics"][TRAIN_STEPS - 1]
    assert all(torch.equal(a, b) for a, b in zip(resumed["logprobs"], straight["logprobs"]))
    assert all(torch.equal(a, b) for a, b in zip(resumed["entropy"], straight["entropy"]))


def test_microbatch_early_stop_adds_no_gradient_and_is_counted(one_rank: dict) -> None:
    checks = one_rank["checks"]["microbatch"]
    assert checks["tripped_alone"]["early_stopped"] == 1
    assert checks["tripped_alone"]["optimizer_steps"] == 0
    assert checks["unchanged_by_tripped"]
    assert checks["mixed"]["early_stopped"] == 1 and checks["mixed"]["optimizer_steps"] == 1
    assert checks["changed_by_mixed"]


def test_minibatch_early_stop_drops_the_whole_minibatch(one_rank: dict) -> None:
    checks = one_rank["checks"]["minibatch"]
    assert checks["metrics"]["early_stopped"] == 1
    assert checks["metrics"]["optimizer_steps"] == 1
    assert checks["equals_second_minibatch_alone"]


def test_nonfinite_loss_skips_the_step_and_too_many_raise(one_rank: dict) -> None:
    checks = one_rank["checks"]["nonfinite"]
    assert checks["first_nan"]["skipped_nonfinite"] == 1 and checks["first_nan"]["optimizer_steps"] == 0
    assert math.isnan(checks["first_nan"]["policy_loss"])
    assert checks["unchanged_by_nan"]
    assert checks["good"]["optimizer_steps"] == 1 and checks["good"]["skipped_nonfinite"] == 0
    assert checks["second_nan"]["skipped_nonfinite"] == 1, "a good step did not reset the count"
    assert checks["error"] is not None and "2 optimizer steps in a row" in checks["error"]
    assert "max_consecutive_nonfinite" in checks["error"]


def test_smollm2_real_weights_match_hf_and_train(fresh_rank: dict) -> None:
    from transformers import AutoModelForCausalLM

    from tests.actor.tiny import hf_reference

    report = fresh_rank["smollm2"]
    model = AutoModelForCausalLM.from_pretrained(report["dir"], attn_implementation="eager", dtype=torch.float32)
    model.eval()
    reference = hf_reference(model, report["prompts"], report["responses"])
    diff = max_abs_diff(report["before"], reference["logprobs"])
    moved = max_abs_diff(report["after"], report["before"])
    print(f"SmolLM2-135M: max |logprob - hf| {diff:.2e}; metrics {report['metrics']}; moved {moved:.2e}")
    assert diff <= LOGPROB_TOLERANCE
    metrics = report["metrics"]
    assert metrics["optimizer_steps"] == 1 and metrics["skipped_nonfinite"] == 0
    assert math.isfinite(metrics["policy_loss"]) and metrics["grad_norm"] > 0
    assert moved > 1e-6, "the train step did not change the weights"


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_old_logprobs_from_the_update_give_the_recomputed_loss_and_gradients(
    layout: str, one_rank: dict, two_ranks: list[dict]
) -> None:
    reports = [one_rank["update_logprobs"]] if layout == "tp1" else [r["update_logprobs"] for r in two_ranks]
    for report in reports:
        separate_loss, fused_loss = report["loss"]
        assert abs(separate_loss - fused_loss) < LOSS_TOLERANCE
        assert report["grad_scale"] > 0 and report["grad_difference"] < 1e-6 * max(1.0, report["grad_scale"])
        separate_step, fused_step = report["steps"]
        assert fused_step["optimizer_steps"] == separate_step["optimizer_steps"] == 1.0
        for key in ("policy_loss", "grad_norm", "ratio", "entropy"):
            assert math.isclose(fused_step[key], separate_step[key], rel_tol=1e-5, abs_tol=1e-6), key
        assert fused_step["ratio"] == 1.0 and fused_step["clip_fraction"] == 0.0
        # The engine's log-probs here are the recomputed ones: no mismatch either way.
        assert fused_step["logprob_mismatch"] < 1e-6 and separate_step["logprob_mismatch"] < 1e-6
        assert report["after_difference"] < LOGPROB_TOLERANCE
        fused_loss, tis_loss, tis_grad_difference = report["tis"]
        assert abs(tis_loss - 2.0 * fused_loss) < LOSS_TOLERANCE
        assert tis_grad_difference < 1e-6 * max(1.0, report["grad_scale"])
        assert report["mis"] == (0.0, 0.0)


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_zero_advantage_sequences_left_out_give_the_same_steps(
    layout: str, one_rank: dict, two_ranks: list[dict]
) -> None:
    reports = [one_rank["zero_advantage"]] if layout == "tp1" else [r["zero_advantage"] for r in two_ranks]
    zeros = sum(1 for a in ZERO_ADVANTAGES if a == 0)
    for report in reports:
        for name, result in report.items():
            full, skipped = result["steps"]
            print(f"{layout} {name}: log-probs after two steps differ by {result['after_difference']:.2e}, "
                  f"moved {result['moved']:.2e}")
            assert result["moved"] > 1e-3, name  # the steps did train
            assert result["after_difference"] < LOGPROB_TOLERANCE, name
            for full_step, skipped_step in zip(full, skipped, strict=True):
                assert full_step["skipped_zero_advantage"] == 0 and skipped_step["skipped_zero_advantage"] == zeros
                assert skipped_step["optimizer_steps"] == full_step["optimizer_steps"] == result["minibatches"]
                assert skipped_step["microbatches"] < full_step["microbatches"], name
                for key in ("policy_loss", "grad_norm", "lr"):
                    assert math.isclose(full_step[key], skipped_step[key], rel_tol=1e-5, abs_tol=1e-7), (name, key)


def test_cosine_schedule_warms_up_then_follows_the_cosine_to_min_lr(one_rank: dict) -> None:
    top, bottom, warmup, decay = COSINE["lr"], COSINE["min_lr"], COSINE["lr_warmup_steps"], COSINE["lr_decay_steps"]

    def cosine(k: int) -> float:  # the rate of optimizer step k + 1, worked out by hand
        return bottom + (top - bottom) * (1 + math.cos(math.pi * (k - warmup) / (decay - warmup))) / 2

    expected = [bottom, top, cosine(2), cosine(3), bottom, bottom]
    assert expected[2] == pytest.approx(1e-4 + 9e-4 * 0.75) and expected[3] == pytest.approx(1e-4 + 9e-4 * 0.25)
    assert one_rank["cosine_lrs"] == pytest.approx(expected, rel=1e-9)
