"""The actor's model stage, DDP wrapper, megatron optimizer and learning-rate scheduler.

Checked against megatron-core 0.16.1.

Choices:
- The model is ``rlsys.models.megatron_model.build_gpt_model`` (one HF <-> Megatron definition).
  Under PP, ``variable_seq_lengths`` is on: token-budget microbatches differ in shape, so
  pipeline stages exchange each activation's shape before the activation.
- Training wraps the model in megatron's ``DistributedDataParallel`` with gradients reduced in
  float32 and no overlap. With ``calculate_per_token_loss`` off (megatron's default) it AVERAGES
  gradients over DP ranks (each rank's gradient is scaled by ``1/dp`` before the sum); the
  actor's loss scaling relies on exactly that (see ``rlsys.actor.actor``).
- Optimizer: megatron's ``get_megatron_optimizer`` with Adam (AdamW: decoupled weight decay;
  megatron exempts biases and norm weights), float32 main parameters and gradients under bf16,
  and the DistributedOptimizer unless ``use_distributed_optimizer`` is off. Gradient clipping
  is applied by the actor's own step (it must check the norm before clipping).
- Scheduler: megatron's ``OptimizerParamScheduler`` with a constant rate; ``warmup`` rises
  linearly from ``min_lr`` to ``lr`` over ``lr_warmup_steps`` optimizer steps (megatron's
  convention: the first step runs at ``min_lr``, step ``lr_warmup_steps + 1`` at ``lr``).
  Weight decay is constant.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from rlsys.config import ActorConfig
from rlsys.models.megatron_model import build_gpt_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Megatron's scheduler needs a decay horizon even for a constant rate; it is never reached.
_CONSTANT_LR_HORIZON = 10**12


def params_dtype_of(actor: ActorConfig, on_cpu: bool) -> torch.dtype:
    if actor.params_dtype == "auto":
        return torch.float32 if on_cpu else torch.bfloat16
    return _DTYPES[actor.params_dtype]


def build_model(
    hf_config: Any, actor: ActorConfig, *, on_cpu: bool, **config_overrides: Any
) -> GPTModel:
    """This rank's ``GPTModel`` stage with the actor's parallel, dtype and recompute settings."""
    overrides: dict[str, Any] = {}
    if actor.pp > 1:
        # megatron 0.16 refuses variable_seq_lengths with its default MoE token dispatcher
        # ("allgather") even for dense models; the dispatcher is unused here.
        overrides.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    if actor.activation_recompute:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    overrides.update(config_overrides)
    return build_gpt_model(
        hf_config,
        transformer_impl=None if actor.transformer_impl == "auto" else actor.transformer_impl,
        params_dtype=params_dtype_of(actor, on_cpu),
        sequence_parallel=actor.sequence_parallel,
        **overrides,
    )


def wrap_for_training(model: GPTModel, actor: ActorConfig) -> DistributedDataParallel:
    """Megatron DDP around ``model``; sets the config hook that finalises gradients after backward."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=actor.use_distributed_optimizer,
    )
    wrapped = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(wrapped: DistributedDataParallel, actor: ActorConfig) -> MegatronOptimizer:
    dtype = wrapped.module.config.params_dtype
    config = OptimizerConfig(
        optimizer="adam",
        lr=actor.lr,
        min_lr=actor.min_lr,
        weight_decay=actor.weight_decay,
        adam_beta1=actor.adam_beta1,
        adam_beta2=actor.adam_beta2,
        adam_eps=actor.adam_eps,
        clip_grad=actor.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=actor.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, [wrapped])


def build_scheduler(optimizer: MegatronOptimizer, actor: ActorConfig) -> OptimizerParamScheduler:
    warmup_steps = actor.lr_warmup_steps if actor.lr_schedule == "warmup" else 0
    return OptimizerParamScheduler(
        optimizer,
        init_lr=actor.min_lr if warmup_steps else actor.lr,
        max_lr=actor.lr,
        min_lr=actor.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=_CONSTANT_LR_HORIZON,
        lr_decay_style="constant",
        start_wd=actor.weight_decay,
        end_wd=actor.weight_decay,
        wd_incr_steps=_CONSTANT_LR_HORIZON,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
