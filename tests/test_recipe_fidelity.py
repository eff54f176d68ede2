"""Risk: a recipe that says it is RLinf's drifts from RLinf's numbers (a value edited, a group default
changed under it, a field renamed) without anyone deciding to depart.

The reference is RLinf/RLinf at commit a3816b596478dcd8a5c69a6ec1468c9519f77b5b (2026-08-22), files
examples/reasoning/config/math/qwen2.5-1.5b-grpo-megatron.yaml and qwen2.5-7b-grpo-megatron.yaml,
written in rlsys's field names; each comment names RLinf's key. Where RLinf's YAML leaves a value
out, RLinf takes Megatron-LM's argument default (rlinf/utils/initialize.py), and the comment says so.
Where RLinf's key means something other than rlsys's field of the same name, the reference holds
what RLinf does, with the reason beside it. Every difference rlsys makes on purpose is listed in
``DEPARTURES`` with rlsys's value and why; the test fails on any other difference, on a departure
that no longer departs, and on a departure of a field the reference does not hold.

RLinf settings with no rlsys field, and what rlsys does instead (not compared):
- runner.max_epochs 5: rlsys counts steps (runner.total_steps 1000, about 5 epochs of the ~106k
  Boba prompts at 512 per step).
- sampling_params.top_k 1000000: above the vocabulary size, so no cut; rlsys samples without top-k.
- algorithm.normalize_advantages True: after the group-normalised GRPO advantages, RLinf whitens
  them again over all response tokens of the rollout batch (rlinf/workers/megatron_worker.py,
  masked_normalization). rlsys has no such option (a known gap, not a choice).
- algorithm.shuffle_rollout (7B True): RLinf shuffles the rollout batch before splitting it into
  minibatches; rlsys splits it in order (contiguous minibatches).
- 7B algorithm.use_valid_token_scale True: RLinf divides each minibatch's token sum by the valid
  tokens of the whole rollout batch (all 4 minibatches), rlsys token-mean by the minibatch's own:
  the gradient differs by a constant factor of about n_minibatches, which Adam cancels except
  through adam_eps and the gradient clip (RLinf's clip of 1.0 acts on the smaller norm).
- algorithm.training_batch_size_per_gpu 1 (one sequence per microbatch): rlsys packs several
  shorter sequences under the same 28672-token bound (fewer, fuller microbatches). Losses are
  normalised over the minibatch, so only the early-stop unit changes: a packed microbatch instead
  of one sequence per data-parallel rank.
- actor.model fusions (apply_rope_fusion ...), overlap_grad_reduce, logprob_forward_micro_batch_size:
  speed only.
"""

from __future__ import annotations

from typing import Any

import pytest

from rlsys.config import load_config

RLINF_COMMIT = "a3816b596478dcd8a5c69a6ec1468c9519f77b5b"

_BOTH: dict[str, Any] = {
    "cluster.placement": "colocated",           # cluster.component_placement: actor,rollout,reward: all
    "cluster.num_nodes": 16,                    # cluster.num_nodes
    "runner.seed": 1234,                        # actor.seed
    "runner.prompts_per_step": 512,             # data.rollout_batch_size
    "runner.val_interval": 1,                   # runner.val_check_interval
    "runner.save_interval": 50,                 # runner.save_interval
    "data.max_prompt_length": 1024,             # data.max_prompt_length
    "data.prompt_key": "prompt",                # data.prompt_key
    "data.answer_key": "solutions",             # data.answer_key
    "data.apply_chat_template": False,          # data.apply_chat_template
    "data.shuffle": True,                       # data.shuffle
    "data.seed": 1234,                          # data.seed
    "rollout.dtype": "float16",                 # rollout.model.precision: ${actor.model.precision}
    "rollout.temperature": 1.0,                 # algorithm.sampling_params.temperature
    "rollout.top_p": 1.0,                       # algorithm.sampling_params.top_p
    "rollout.max_new_tokens": 28672 - 1024,     # sampling_params.max_new_tokens: seq_length - max_prompt_length
    "rollout.attention_backend": "triton",      # rollout.sglang.attention_backend
    "rollout.max_running_requests": 64,         # rollout.max_running_requests
    "rollout.cuda_graph_max_bs": 128,           # rollout.cuda_graph_max_bs
    "actor.pp": 1,                              # actor.model.pipeline_model_parallel_size
    "actor.sequence_parallel": True,            # actor.model.sequence_parallel
    "actor.precision": "fp16",                  # actor.model.precision, optim.fp16
    "actor.initial_loss_scale": 2.0**32,        # Megatron-LM default (--initial-loss-scale)
    "actor.min_loss_scale": 1.0,                # Megatron-LM default (--min-loss-scale)
    "actor.hysteresis": 2,                      # Megatron-LM default (--hysteresis)
    "actor.recompute_granularity": "full",      # actor.model.recompute_granularity
    "actor.recompute_method": "block",          # actor.model.recompute_method
    "actor.recompute_num_layers": 20,           # actor.model.recompute_num_layers
    "actor.offload": True,                      # actor.offload_weight / offload_grad / offload_optimizer
    "actor.max_tokens_per_microbatch": 28672,   # runner.max_tokens_per_mbs, runner.seq_length
    "actor.n_minibatches": 4,                   # algorithm.n_minibatches
    "actor.lr": 2e-5,                           # optim.lr, lr_sched.max_lr
    # lr_sched: warmup over lr_warmup_fraction 0.01 x lr_decay_iters 10 iterations from
    # lr_warmup_init 0, i.e. the first optimizer step at lr 0 and every later one at 2e-5.
    "actor.lr_schedule": "warmup",
    "actor.lr_warmup_steps": 1,
    "actor.min_lr": 0.0,                        # lr_sched.lr_warmup_init (and lr_sched.min_lr)
    "actor.weight_decay": 0.05,                 # optim.weight_decay
    "actor.adam_beta1": 0.9,                    # optim.adam_beta1
    "actor.adam_beta2": 0.95,                   # optim.adam_beta2
    "actor.adam_eps": 1e-5,                     # optim.adam_eps
    "actor.use_distributed_optimizer": True,    # optim.use_distributed_optimizer
    "algorithm.loss_type": "grpo_clip",         # algorithm.loss_type: actor, adv_type: grpo
    "algorithm.clip_low": 0.2,                  # algorithm.ratio_clip_eps (clip_ratio_low: null)
    "algorithm.clip_high": 0.2,                 # algorithm.ratio_clip_eps (clip_ratio_high: null)
    "algorithm.dual_clip_c": None,              # algorithm.clip_ratio_c
    "algorithm.kl_coef": 0.0,                   # algorithm.kl_beta
    "algorithm.entropy_coef": 0.0,              # algorithm.entropy_bonus
    "algorithm.norm_adv_by_std": True,          # grpo advantages divide by the group's std
    "algorithm.early_stop_imp_ratio": 5.0,      # algorithm.early_stop_imp_ratio
    "algorithm.early_stop_granularity": "microbatch",  # the actor abandons a microbatch's loss
    "reward.correct_score": 5.0,                # reward.reward_scale x reward_max_val 1
    "reward.wrong_score": -5.0,                 # reward.reward_scale x reward_min_val -1
}

RLINF: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b-grpo-megatron": {
        **_BOTH,
        "actor.tp": 2,                          # actor.model.tensor_model_parallel_size
        "rollout.tp": 1,                        # rollout.tensor_parallel_size
        "rollout.n_samples": 16,                # algorithm.group_size
        "rollout.mem_fraction_static": 0.55,    # rollout.gpu_memory_utilization
        "actor.recompute_old_logprobs": True,   # algorithm.recompute_logprobs
        "actor.loss_scale": 65536.0,            # optim.loss_scale (constant)
        "actor.loss_scale_window": 1000,        # Megatron-LM default (unused at a constant scale)
        "actor.clip_grad": 0.8,                 # optim.clip_grad
        # loss_agg_func token-mean over a microbatch of ONE sequence, averaged over microbatches and
        # data-parallel ranks by megatron: the mean over sequences of each one's token mean.
        "algorithm.agg_mode": "seq-mean-token-mean",
    },
    "qwen2.5-7b-grpo-megatron": {
        **_BOTH,
        "actor.tp": 4,                          # actor.model.tensor_model_parallel_size
        "rollout.tp": 2,                        # rollout.tensor_parallel_size
        "rollout.n_samples": 32,                # algorithm.group_size
        "rollout.mem_fraction_static": 0.65,    # rollout.gpu_memory_utilization
        "actor.recompute_old_logprobs": False,  # algorithm.recompute_logprobs (the rollout's log-probs)
        "actor.loss_scale": None,               # no optim.loss_scale: dynamic scaling
        "actor.loss_scale_window": 5,           # optim.loss_scale_window
        "actor.clip_grad": 1.0,                 # optim.clip_grad
        # use_valid_token_scale: token sums over valid tokens (see the module doc for the normaliser).
        "algorithm.agg_mode": "token-mean",
    },
}

_NODES = ("RLinf runs on 16 nodes; this recipe targets {} nodes x 8 GPUs. The batch per step and the "
          "update do not depend on the node count")
_VALIDATION = "RLinf validates every step on its training file; the Boba recipe ships no validation file"
_LR = ("RLinf's warmup is shorter than one step, so only the first optimizer step runs at lr 0 (in the 7B "
       "run an fp16 overflow anyway); rlsys runs 2e-5 from the first step instead of keeping that artefact")

DEPARTURES: dict[str, dict[str, tuple[Any, str]]] = {
    "qwen2.5-1.5b-grpo-megatron": {
        "cluster.num_nodes": (2, _NODES.format(2)),
        "runner.val_interval": (0, _VALIDATION),
        "actor.lr_schedule": ("constant", _LR),
        "actor.lr_warmup_steps": (0, _LR),
    },
    "qwen2.5-7b-grpo-megatron": {
        "cluster.num_nodes": (4, _NODES.format(4)),
        "runner.val_interval": (0, _VALIDATION),
        "actor.lr_schedule": ("constant", _LR),
        "actor.lr_warmup_steps": (0, _LR),
    },
}


def _value(run: Any, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(run, section), name)


@pytest.mark.parametrize("name", sorted(RLINF))
def test_recipe_has_rlinfs_values_or_departs_on_purpose(name: str) -> None:
    run = load_config(name)
    departures = DEPARTURES[name]
    wrong = []
    for field, rlinf_value in RLINF[name].items():
        expected, why = departures.get(field, (rlinf_value, "RLinf's value"))
        actual = _value(run, field)
        if actual != expected:
            wrong.append(f"{field} = {actual!r}, expected {expected!r} ({why})")
    assert not wrong, f"{name} vs RLinf {RLINF_COMMIT[:7]}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(RLINF))
def test_every_departure_departs_from_a_compared_value(name: str) -> None:
    for field, (value, why) in DEPARTURES[name].items():
        assert field in RLINF[name], f"{field}: not in the RLinf reference"
        assert why, f"{field}: a departure needs its reason"
        assert value != RLINF[name][field], f"{field}: equals RLinf's value, so it is no departure"
