"""The actor's model stage, DDP wrapper, megatron optimizer and learning-rate scheduler.

Checked against megatron-core 0.16.1.

Choices:
- The model is ``rlsys.models.megatron_model.build_gpt_model`` (one HF <-> Megatron definition).
  Under PP, ``variable_seq_lengths`` is on: token-budget microbatches differ in shape, so
  pipeline stages exchange each activation's shape before the activation.
- Precision (``actor.precision``): the parameters are built in the chosen dtype. A bf16 or fp16
  model runs inside megatron's ``Float16Module``, as Megatron-LM runs it: the last pipeline stage
  hands float32 logits to the loss. The optimizer keeps float32 main weights and Adam state for
  both; fp16 adds megatron's loss scaler (``ConstantGradScaler`` for ``loss_scale``, otherwise
  ``DynamicGradScaler``), and the schedule multiplies every microbatch loss by its scale through
  ``config.grad_scale_func`` (set for every precision, as Megatron-LM does; the scale is 1 without
  a scaler). What the actor does with a step the scaler found overflowed: ``rlsys.actor.actor``.
- Activation recompute: ``recompute_granularity`` / ``recompute_method`` / ``recompute_num_layers``
  go to the ``TransformerConfig`` unchanged (megatron's meaning).
- Training wraps the model in megatron's ``DistributedDataParallel`` with gradients reduced in
  float32 and no overlap. With ``calculate_per_token_loss`` off (megatron's default) it AVERAGES
  gradients over DP ranks (each rank's gradient is scaled by ``1/dp`` before the sum); the
  actor's loss scaling relies on exactly that (see ``rlsys.actor.actor``).
- Optimizer: megatron's ``get_megatron_optimizer`` with Adam (AdamW: decoupled weight decay;
  megatron exempts biases and norm weights), float32 main parameters and gradients under bf16
  and fp16, and the DistributedOptimizer unless ``use_distributed_optimizer`` is off. Gradient
  clipping is applied by the actor's own step (it must check the norm before clipping).
- Scheduler: megatron's ``OptimizerParamScheduler`` with a constant rate; ``warmup`` rises
  linearly from ``min_lr`` to ``lr`` over ``lr_warmup_steps`` optimizer steps (megatron's
  convention: the first step runs at ``min_lr``, step ``lr_warmup_steps + 1`` at ``lr``);
  ``cosine`` warms up the same way, then step ``k + 1`` runs at
  ``min_lr + (lr - min_lr) * (1 + cos(pi * (k - warmup) / (lr_decay_steps - warmup))) / 2`` until
  step ``lr_decay_steps + 1``, and at ``min_lr`` from there. Weight decay is constant.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from rlsys.config import ActorConfig
from rlsys.models.megatron_model import build_gpt_model

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Megatron's scheduler needs a decay horizon even for a constant rate; it is never reached.
_CONSTANT_LR_HORIZON = 10**12


def precision_dtype(actor: ActorConfig, on_cpu: bool) -> torch.dtype:
    if actor.precision == "auto":
        return torch.float32 if on_cpu else torch.bfloat16
    return _DTYPES[actor.precision]


def build_model(
    hf_config: Any, actor: ActorConfig, *, on_cpu: bool, **config_overrides: Any
) -> GPTModel:
    """This rank's ``GPTModel`` stage with the actor's parallel, dtype and recompute settings."""
    overrides: dict[str, Any] = {}
    if actor.pp > 1:
        # megatron 0.16 refuses variable_seq_lengths with its default MoE token dispatcher
        # ("allgather") even for dense models; the dispatcher is unused here.
        overrides.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    overrides.update(
        recompute_granularity=actor.recompute_granularity,
        recompute_method=actor.recompute_method,
        recompute_num_layers=actor.recompute_num_layers,
    )
    overrides.update(config_overrides)
    return build_gpt_model(
        hf_config,
        transformer_impl=None if actor.transformer_impl == "auto" else actor.transformer_impl,
        params_dtype=precision_dtype(actor, on_cpu),
        sequence_parallel=actor.sequence_parallel,
        **overrides,
    )


def forward_module(model: GPTModel) -> torch.nn.Module:
    """What the schedule runs: a bf16 or fp16 ``model`` inside megatron's ``Float16Module``, fp32 as is."""
    if model.config.fp16 or model.config.bf16:
        return Float16Module(model.config, model)
    return model


def wrap_for_training(module: torch.nn.Module, actor: ActorConfig) -> DistributedDataParallel:
    """Megatron DDP around ``module``; sets the config hook that finalises gradients after backward."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=actor.use_distributed_optimizer,
    )
    wrapped = DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)
    module.config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(wrapped: DistributedDataParallel, actor: ActorConfig) -> MegatronOptimizer:
    """Megatron's optimizer for ``wrapped``; also points the schedule's loss scaling at it."""
    model_config = wrapped.module.config
    dtype = model_config.params_dtype
    fp16 = dtype == torch.float16
    loss_scaling = (
        dict(
            loss_scale=actor.loss_scale,
            initial_loss_scale=actor.initial_loss_scale,
            min_loss_scale=actor.min_loss_scale,
            loss_scale_window=actor.loss_scale_window,
            hysteresis=actor.hysteresis,
        )
        if fp16
        else {}
    )
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
        fp16=fp16,
        params_dtype=dtype,
        use_distributed_optimizer=actor.use_distributed_optimizer,
        **loss_scaling,
    )
    optimizer = get_megatron_optimizer(config, [wrapped])
    model_config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(optimizer: MegatronOptimizer, actor: ActorConfig) -> OptimizerParamScheduler:
    warmup_steps = actor.lr_warmup_steps if actor.lr_schedule in ("warmup", "cosine") else 0
    cosine = actor.lr_schedule == "cosine"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=actor.min_lr if warmup_steps else actor.lr,
        max_lr=actor.lr,
        min_lr=actor.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=actor.lr_decay_steps if cosine else _CONSTANT_LR_HORIZON,
        lr_decay_style="cosine" if cosine else "constant",
        start_wd=actor.weight_decay,
        end_wd=actor.weight_decay,
        wd_incr_steps=_CONSTANT_LR_HORIZON,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
