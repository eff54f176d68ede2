"""The Megatron actor: log-probs of rollouts and the GRPO update, under TP x PP x DP.

Checked against megatron-core 0.16.1.

Every rank of the actor runs the same calls on the same ``RolloutBatch`` (SPMD); each takes its
data-parallel share, and every rank gets every result back, in the batch's order. The actor owns
the default process group: its world is the actor's ranks (dist_checkpointing and the
"all ranks agree" reductions use it).

Choices, and what must stay true:
- Microbatches: token budget ``max_tokens_per_microbatch``, longest sequences first, right-padded
  (not packed: megatron's local attention refuses packed sequences; see ``rlsys.actor.microbatch``). Padding cannot change real tokens under causal
  attention, so log-probs equal the unpadded model's. Every DP rank runs the same number of
  microbatches (the largest count, by splitting or empty fillers).
- Schedule: megatron's ``get_forward_backward_func()`` for every pass (no pipelining at PP=1,
  1F1B otherwise); log-prob passes are ``forward_only``. The last stage hands its final hidden
  states to the loss, not logits: the output layer runs there on the scored positions only
  (response tokens), in chunks of ``logits_chunk_tokens``, recomputed in backward, vocab-sharded
  under TP (``rlsys.actor.vocab_parallel``); padded vocabulary columns are masked to ``-inf``.
- Entropy: with ``algorithm.entropy_coef != 0`` on every token, with gradient; otherwise only for
  the ``train/entropy_loss`` metric, on every ``entropy_metric_stride``-th token, without.
- Loss scale. Megatron's schedule divides each microbatch loss by the number of microbatches
  ``M``, and its DDP averages gradients over the ``dp`` ranks. The policy loss of a microbatch is
  normalised by the GLOBAL count of the minibatch (valid tokens for token-mean, sequences with a
  valid token for the seq-mean modes; summed over microbatches and DP ranks), so the sum of all
  microbatch losses on all ranks IS the minibatch loss. Each microbatch returns
  ``loss * M * dp`` to the schedule, which turns the accumulated, DP-averaged gradient into the
  gradient of that sum: the same gradient at any TP / PP / DP and any microbatch split.
- Importance-ratio early stop (``algorithm.early_stop_imp_ratio``):
  ``microbatch``: checked inside each microbatch's loss (before its backward), over that
  microbatch's tokens on all DP ranks together (``importance_ratio_early_stop`` with the DP
  group); a tripped microbatch's loss is multiplied by 0, so it adds no gradient while every
  collective of its backward still runs (the minibatch's normaliser, fixed before any check,
  still counts its tokens). ``minibatch``: one extra forward-only pass over the
  minibatch computes its mean ratio over all DP ranks before any backward; a tripped minibatch
  runs no backward and no optimizer step at all (Adam moments, weight decay and the scheduler
  do not move). Counted in ``early_stopped`` (microbatches or minibatches, by granularity). A
  step whose every microbatch tripped is not applied either (Adam would otherwise still move
  the weights along its old moments).
- Optimizer step, done here rather than by ``optimizer.step()`` because megatron's float32
  optimizer has no non-finite check: prepare the gradients, compute the global grad norm, and
  apply clipping and the update only if the loss, the norm and megatron's own inf check (which
  runs when fp16 has a loss scaler) are finite on EVERY rank (one MAX all-reduce). A skipped step
  changes no weight, Adam moment or learning rate. fp16: ``prepare_grads`` is where megatron
  unscales the gradients, checks them and updates its scaler, once per attempted step, so an
  overflowed step lowers the dynamic scale exactly as in Megatron-LM (after ``hysteresis``
  overflows, by half). A step skipped for overflow with a finite loss while the dynamic scale can
  still drop is that search, counted in ``skipped_overflow`` and not towards the limit below;
  every other skip (non-finite loss, non-finite gradients without a scaler, overflow at a
  constant scale or at ``min_loss_scale``) is counted in ``skipped_nonfinite``, and
  ``max_consecutive_nonfinite`` of those in a row raise ``NonFiniteTrainingError``.
- Offload (``offload_to_host`` / ``reload_to_device``, for ``actor.offload``): weights, gradient
  buffers and optimizer state leave the device while a colocated engine generates and come back
  bit for bit (``rlsys.actor.offload``); gradients come back zeroed. In between the actor runs
  nothing.
- Old log-probs: a batch that carries them is trained on them. A batch without them gets the
  actor's under ``actor.recompute_old_logprobs``: with ``old_logprobs_from_update`` and one
  minibatch, from the update's own forward pass, detached (the weights have not moved since the
  rollout, so the values are those a separate pass gives and the ratio is exactly 1; the
  minibatch-granularity early stop, which could not trip, runs no pass either); otherwise from a
  ``compute_logprobs`` pass first. Without recompute the rollout engine's log-probs
  (``rollout_logprobs``) are used, and a batch with neither is refused. Reference log-probs (for ``kl_coef > 0``) come with the
  batch, e.g. from a second actor built with ``for_training=False`` on the reference weights.
- Off-policy correction (``algorithm.off_policy_correction``): the old log-probs above are the
  proximal policy, and each token's policy term is weighted by ``rlsys.algorithms.off_policy``'s
  weights of them against the engine's (``rollout_logprobs``, required then). The update's own
  detached log-probs serve as the proximal ones too: on-policy in one minibatch they are exactly
  what a separate pass gives. ``is_weight_max`` is a max over all ranks, not a token mean. The
  ``is_weight_*`` metrics are reported whenever the engine's log-probs come with the batch, a
  correction or not (``off_policy_correction=none`` weights every token 1).
- Zero-advantage sequences (``actor.skip_zero_advantage``, on unless a KL or entropy term is):
  a sequence whose advantage is 0 on every loss token adds exactly 0 to the gradient, so it
  runs no forward or backward pass (nor an old-log-prob pass) while the loss keeps the whole
  minibatch's normaliser: the same gradient, and the same optimizer step, for less work. In
  GRPO that is every sequence of a group whose rewards are all equal. A minibatch with no other
  sequence still takes its optimizer step (on a zero gradient), as the full pass would. The
  early stop and the metrics then see the trained sequences only.
- Metrics are token-weighted over all trained microbatches of the step and equal on all ranks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.grad_scaler import DynamicGradScaler
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from rlsys.actor import checkpoint as ckpt
from rlsys.actor.build import build_model, build_optimizer, build_scheduler, forward_module, wrap_for_training
from rlsys.actor.checkpoint_files import write_latest
from rlsys.actor.microbatch import (
    Microbatch,
    RolloutBatch,
    build_microbatch,
    data_parallel_share,
    equalize_microbatch_count,
    minibatch_slices,
    plan_microbatches,
)
from rlsys.actor.offload import OffloadedStorage, offload_storages, reload_storages
from rlsys.actor.parallel import ParallelLayout, destroy_parallel, initialize_parallel, runs_on_cpu
from rlsys.actor.vocab_parallel import scored_logprobs_and_entropy
from rlsys.algorithms import (
    importance_ratio_early_stop,
    importance_weights,
    policy_loss,
    sequence_logprob_mismatch,
    zero_loss_if_skipped,
)
from rlsys.config import ActorConfig, AlgorithmConfig
from rlsys.models.architecture import architecture_of
from rlsys.models.megatron_weights import iter_hf_weights, load_hf_into_megatron

# Outcomes of one optimizer step (module doc, "Optimizer step").
_APPLIED, _OVERFLOW, _NONFINITE = "applied", "overflow", "nonfinite"

# Per-microbatch statistics carried from the loss function (last stage) to the metrics, in order.
_STATS = (
    "loss",
    "entropy_sum",
    "entropy_tokens",
    "ratio_sum",
    "clip_sum",
    "approx_kl_sum",
    "tokens",
    "contributing_tokens",
    "early_stopped",
    "nonfinite",
    "is_weight_sum",
    "is_clipped_sum",
    "is_weight_max",  # reduced by max, not summed
)
_MAX_STAT = _STATS.index("is_weight_max")


@contextmanager
def _final_hidden_states(model: torch.nn.Module) -> Iterator[None]:
    """The last stage returns its final (normed) hidden states instead of logits while inside.

    megatron's ``GPTModel`` returns them when ``post_process`` is off; the output layer then runs
    in ``rlsys.actor.vocab_parallel`` on the scored positions only, in chunks.
    """
    last_stage = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = last_stage


def _valid_counts(batch: RolloutBatch, indices: Iterable[int]) -> tuple[float, float]:
    """Loss-mask tokens of ``indices``, and how many of them have at least one."""
    counts = [batch.loss_mask[i].sum().item() if batch.loss_mask is not None else batch.response_ids[i].numel()
              for i in indices]
    return float(sum(counts)), float(sum(1 for count in counts if count > 0))


def _every_kth(mask: Tensor, k: int) -> Tensor | None:
    """Every ``k``-th True of ``mask`` in row-major order (None for k = 0: nothing)."""
    if k == 0:
        return None
    if k == 1:
        return mask
    order = torch.cumsum(mask.flatten().long(), 0).reshape(mask.shape) - 1
    return mask & (order % k == 0)


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class LogProbs:
    """Per-sequence response log-probs (and entropies), in the batch's order."""

    logprobs: list[Tensor]
    entropy: list[Tensor] | None = None


class MegatronActor:
    """One rank of the actor. Build it on every rank with the same arguments (SPMD)."""

    def __init__(
        self,
        actor: ActorConfig,
        algorithm: AlgorithmConfig | None = None,
        *,
        model_path: str | Path | None = None,
        hf_config: Any = None,
        seed: int = 1,
        for_training: bool = True,
        **model_overrides: Any,
    ) -> None:
        """``model_path``: HF directory to load (config and weights). Without it, ``hf_config``
        gives the shape and the weights are megatron's random initialisation. ``model_overrides``
        go to ``build_gpt_model`` (e.g. ``local_core_attention``, TransformerConfig fields)."""
        if model_path is None and hf_config is None:
            raise ValueError("MegatronActor needs model_path or hf_config")
        self.actor = actor
        self.algorithm = algorithm or AlgorithmConfig()
        self.layout: ParallelLayout = initialize_parallel(actor.tp, actor.pp, seed=seed)
        if hf_config is None:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(model_path)
        self.hf_config = hf_config
        self.model_path = Path(model_path) if model_path is not None else None
        self.vocab_size = architecture_of(hf_config).vocab_size
        self.model = build_model(hf_config, actor, on_cpu=runs_on_cpu(), **model_overrides)
        if self.model_path is not None:
            load_hf_into_megatron(self.model, self.model_path, hf_config)
        self.forward_module = forward_module(self.model)
        self.wrapped = wrap_for_training(self.forward_module, actor) if for_training else None
        self.optimizer = build_optimizer(self.wrapped, actor) if self.wrapped is not None else None
        self.scheduler = build_scheduler(self.optimizer, actor) if self.optimizer is not None else None
        self.train_steps = 0
        self.consecutive_nonfinite = 0
        # Sequence parallel splits the sequence over TP ranks, so lengths must divide by TP.
        self._length_multiple = actor.tp if actor.sequence_parallel else 1
        self._dp_group = parallel_state.get_data_parallel_group()
        self._pp_group = parallel_state.get_pipeline_model_parallel_group()
        self._offloaded: list[OffloadedStorage] | None = None
        # (sequence index, log-probs) of the current update's own forward pass (old_logprobs_from_update).
        self._update_logprobs: list[tuple[int, Tensor]] = []

    # ------------------------------------------------------------------ log-probs

    def compute_logprobs(self, batch: RolloutBatch, *, with_entropy: bool = False) -> LogProbs:
        """Log-probs (and entropy) of every response token under the current weights."""
        self.model.eval()
        microbatches = self._microbatches(batch, range(len(batch)))

        def collect(microbatch: Microbatch, output: Tensor, non_loss_data: bool = True) -> list[tuple]:
            scored = microbatch.response_mask
            logprobs, entropy = self._scored(microbatch, output, scored, scored if with_entropy else None)
            values = microbatch.response_values(logprobs.float().cpu())
            entropies = microbatch.response_values(entropy.cpu()) if entropy is not None else None
            return [
                (index, lp.clone(), entropies[row][1].clone() if entropies is not None else None)
                for row, (index, lp) in enumerate(values)
            ]

        with torch.no_grad():
            outputs = self._run_schedule(microbatches, collect, forward_only=True)
        local = [item for output in outputs for item in output] if self.layout.is_last_stage else []
        results = {index: (lp, ent) for index, lp, ent in self._gather_from_last_stages(local)}
        return LogProbs(
            logprobs=[results[i][0] for i in range(len(batch))],
            entropy=[results[i][1] for i in range(len(batch))] if with_entropy else None,
        )

    # ------------------------------------------------------------------ training

    @property
    def old_logprobs_from_update(self) -> bool:
        """Whether a batch without old log-probs takes them from the update's own forward pass (module doc)."""
        actor = self.actor
        return actor.recompute_old_logprobs and actor.old_logprobs_from_update and actor.n_minibatches == 1

    def train_step(self, batch: RolloutBatch, rollout_logprobs: list[Tensor] | None = None) -> dict[str, float]:
        """One rollout batch: ``n_minibatches`` optimizer steps of the GRPO policy loss.

        Old log-probs: the batch's own; else the actor's (from the update itself when
        ``old_logprobs_from_update``, else from a pass of their own) under
        ``actor.recompute_old_logprobs``; else ``rollout_logprobs``, the engine's.

        Returns, equal on every rank: ``policy_loss`` (mean over the minibatches that ran, before
        early-stop zeroing), ``entropy`` / ``ratio`` / ``clip_fraction`` / ``approx_kl`` (token
        means over them), ``grad_norm`` (mean over applied steps, before clipping), ``lr`` (of the
        last step attempted), ``early_stopped``, ``skipped_nonfinite``, ``skipped_overflow``,
        ``optimizer_steps``, ``loss_scale`` (after the last step; 1 without a scaler),
        ``valid_tokens`` (of the sequences trained), ``microbatches`` (this rank's count),
        ``skipped_zero_advantage`` (sequences left out, ``actor.skip_zero_advantage``) and, given ``rollout_logprobs``,
        ``logprob_mismatch`` between them and the old log-probs trained on.
        """
        if self.optimizer is None:
            raise RuntimeError("this actor was built with for_training=False")
        if batch.advantages is None:
            raise ValueError("train_step needs advantages")
        if self.algorithm.kl_coef > 0 and batch.ref_logprobs is None:
            raise ValueError("algorithm.kl_coef > 0 needs ref_logprobs in the batch")
        if self.algorithm.off_policy_correction != "none":
            if rollout_logprobs is None:
                raise ValueError(f"algorithm.off_policy_correction={self.algorithm.off_policy_correction} needs the "
                                 "engine's log-probs (rollout_logprobs)")
            batch = batch.with_behaviour_logprobs(rollout_logprobs)
        elif rollout_logprobs is not None and all(
                lp.numel() == r.numel() for lp, r in zip(rollout_logprobs, batch.response_ids, strict=True)):
            batch = batch.with_behaviour_logprobs(rollout_logprobs)  # for the is_weight metrics only
        weighed = batch.behaviour_logprobs is not None
        trained = self._trained_sequences(batch)
        if batch.old_logprobs is None:
            if not self.actor.recompute_old_logprobs:
                if rollout_logprobs is None:
                    raise ValueError("actor.recompute_old_logprobs is off, so the batch must carry old_logprobs")
                batch = batch.with_old_logprobs(rollout_logprobs)
            elif not self.old_logprobs_from_update:
                batch = batch.with_old_logprobs(self._old_logprobs_of(batch, trained))
        self._update_logprobs = []

        totals = torch.zeros(len(_STATS), dtype=torch.float64)
        losses, grad_norms = [], []
        early_stopped_minibatches = skipped_nonfinite = skipped_overflow = applied = microbatch_count = 0
        lr = self._current_lr()
        to_train = set(trained)
        for minibatch in minibatch_slices(len(batch), self.actor.n_minibatches):
            # The normaliser counts the whole minibatch; only sequences with a gradient run.
            num_tokens, num_seqs = _valid_counts(batch, minibatch)
            if num_tokens == 0:
                continue
            microbatches = self._microbatches(batch, [index for index in minibatch if index in to_train])
            microbatch_count += len(microbatches)
            if not microbatches:
                # Every advantage is 0: the gradient is 0, and the step still runs as it would
                # after a full pass (Adam's moments and weight decay move the weights).
                self.wrapped.zero_grad_buffer()
                self.optimizer.zero_grad()
                stats = torch.zeros(len(_STATS), dtype=torch.float64)
                stats[_STATS.index("contributing_tokens")] = num_tokens
            elif self._minibatch_early_stop(microbatches):
                early_stopped_minibatches += 1
                continue
            else:
                stats = self._forward_backward(microbatches, num_tokens, num_seqs)
            weight_max = max(totals[_MAX_STAT].item(), stats[_MAX_STAT].item())
            totals += stats
            totals[_MAX_STAT] = weight_max
            losses.append(stats[_STATS.index("loss")].item())
            if stats[_STATS.index("contributing_tokens")].item() == 0:
                continue
            lr = self._current_lr()
            outcome, grad_norm = self._optimizer_step(loss_is_finite=stats[_STATS.index("nonfinite")].item() == 0)
            if outcome == _APPLIED:
                applied += 1
                grad_norms.append(grad_norm)
                self.consecutive_nonfinite = 0
            elif outcome == _OVERFLOW:
                skipped_overflow += 1
            else:
                skipped_nonfinite += 1
                self.consecutive_nonfinite += 1
                if self.consecutive_nonfinite >= self.actor.max_consecutive_nonfinite:
                    raise NonFiniteTrainingError(
                        f"{self.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or "
                        f"gradient norm (last grad norm {grad_norm}, loss scale {self._loss_scale()}, "
                        f"actor.max_consecutive_nonfinite={self.actor.max_consecutive_nonfinite}); check the "
                        "advantages and old log-probs of the batch, and the learning rate"
                    )
        self.train_steps += 1
        old_logprobs = batch.old_logprobs
        if old_logprobs is None:
            local = self._update_logprobs if self.layout.is_last_stage else []
            from_update = dict(self._gather_from_last_stages(local))
            old_logprobs = [from_update.get(i, torch.zeros(0)) for i in range(len(batch))]
        self._update_logprobs = []

        tokens = totals[_STATS.index("tokens")].item()
        entropy_tokens = totals[_STATS.index("entropy_tokens")].item()

        def token_mean(name: str) -> float:
            return totals[_STATS.index(name)].item() / tokens if tokens else float("nan")

        # Every DP rank counts each tripped microbatch (they decide together).
        early_stopped = (
            early_stopped_minibatches
            if self.algorithm.early_stop_granularity == "minibatch"
            else round(totals[_STATS.index("early_stopped")].item() / self.layout.dp)
        )
        mismatch = {} if rollout_logprobs is None else {
            "logprob_mismatch": sequence_logprob_mismatch(rollout_logprobs, old_logprobs)}
        if weighed:
            mismatch |= {"is_weight_mean": token_mean("is_weight_sum"), "is_weight_max": totals[_MAX_STAT].item(),
                         "is_clipped_fraction": token_mean("is_clipped_sum")}
        return mismatch | {
            "policy_loss": sum(losses) / len(losses) if losses else float("nan"),
            "entropy": totals[_STATS.index("entropy_sum")].item() / entropy_tokens if entropy_tokens else float("nan"),
            "ratio": token_mean("ratio_sum"),
            "clip_fraction": token_mean("clip_sum"),
            "approx_kl": token_mean("approx_kl_sum"),
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "lr": lr,
            "early_stopped": float(early_stopped),
            "skipped_nonfinite": float(skipped_nonfinite),
            "skipped_overflow": float(skipped_overflow),
            "optimizer_steps": float(applied),
            "loss_scale": self._loss_scale(),
            "valid_tokens": tokens,
            "microbatches": float(microbatch_count),
            "skipped_zero_advantage": float(len(batch) - len(trained)),
        }

    def forward_backward(self, batch: RolloutBatch) -> dict[str, float]:
        """Gradients of the whole batch's policy loss (one minibatch) in the DDP buffers, no optimizer step.

        For benchmarks and gradient checks; ``train_step`` is the training entry point. The batch
        must carry advantages; without old log-probs it takes them from its own forward pass, as
        ``train_step`` does under ``old_logprobs_from_update``.
        """
        if self.wrapped is None or batch.advantages is None:
            raise ValueError("forward_backward needs a training actor and a batch with advantages")
        self._update_logprobs = []
        microbatches = self._microbatches(batch, range(len(batch)))
        num_tokens, num_seqs = _valid_counts(batch, range(len(batch)))
        stats = self._forward_backward(microbatches, num_tokens, num_seqs)
        return {
            "policy_loss": stats[_STATS.index("loss")].item(),
            "valid_tokens": stats[_STATS.index("tokens")].item(),
            "microbatches": float(len(microbatches)),
        }

    def _forward_backward(self, microbatches: list[Microbatch], num_tokens: float, num_seqs: float) -> Tensor:
        """Gradients of the minibatch loss accumulated in the DDP buffers; summed stats (all ranks)."""
        self.model.train()
        self.wrapped.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_func = partial(
            self._microbatch_loss, num_tokens=num_tokens, num_seqs=num_seqs, num_microbatches=len(microbatches)
        )
        outputs = self._run_schedule(microbatches, loss_func, forward_only=False)
        stats = torch.zeros(len(_STATS), dtype=torch.float64, device=self.layout.device)
        if self.layout.is_last_stage:
            weight_max = torch.zeros((), dtype=stats.dtype, device=stats.device)
            for output in outputs:
                stats += output["stats"].to(stats)
                weight_max = torch.maximum(weight_max, output["stats"][_MAX_STAT].to(stats))
            stats[_MAX_STAT] = 0.0
            dist.all_reduce(stats, group=self._dp_group)
            dist.all_reduce(weight_max, op=dist.ReduceOp.MAX, group=self._dp_group)
            stats[_MAX_STAT] = weight_max
        return self._from_last_stage(stats).cpu()

    def _microbatch_loss(
        self,
        microbatch: Microbatch,
        output: Tensor,
        *,
        num_tokens: float,
        num_seqs: float,
        num_microbatches: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        algorithm = self.algorithm
        entropy_term = algorithm.entropy_coef != 0
        entropy_mask = microbatch.loss_mask if entropy_term else _every_kth(microbatch.loss_mask,
                                                                            self.actor.entropy_metric_stride)
        # On-policy in one minibatch (``old_logprobs_from_update``): the weights have not moved
        # since sampling, so this forward's own log-probs, detached, are the old ones (of every
        # response token, masked or not, as a separate pass would give them).
        old_logprobs = microbatch.old_logprobs
        scored = microbatch.loss_mask if old_logprobs is not None else microbatch.response_mask
        logprobs, entropy = self._scored(microbatch, output, scored, entropy_mask, entropy_requires_grad=entropy_term)
        if old_logprobs is None:
            old_logprobs = logprobs.detach()
            self._update_logprobs.extend(
                (index, values.clone()) for index, values in microbatch.response_values(old_logprobs.float().cpu())
            )
        weights = weight_metrics = None
        if microbatch.behaviour_logprobs is not None:
            weights, weight_metrics = importance_weights(
                old_logprobs, microbatch.behaviour_logprobs.to(old_logprobs.device), microbatch.loss_mask,
                mode=algorithm.off_policy_correction, level=algorithm.correction_level,
                low=algorithm.correction_low, high=algorithm.correction_high,
            )
            if algorithm.off_policy_correction == "none":
                weights = None  # the metrics only
        loss, metrics = policy_loss(
            logprobs,
            old_logprobs,
            microbatch.advantages,
            microbatch.loss_mask,
            loss_type=algorithm.loss_type,
            clip_low=algorithm.clip_low,
            clip_high=algorithm.clip_high,
            dual_clip_c=algorithm.dual_clip_c,
            agg_mode=algorithm.agg_mode,
            num_tokens_normalizer=num_tokens,
            num_seqs_normalizer=num_seqs,
            ref_logprobs=microbatch.ref_logprobs,
            kl_coef=algorithm.kl_coef,
            entropy=entropy if entropy_term else None,
            entropy_coef=algorithm.entropy_coef,
            token_weights=weights,
        )
        early_stopped = False
        if (algorithm.early_stop_granularity == "microbatch" and algorithm.early_stop_imp_ratio is not None
                and microbatch.old_logprobs is not None):
            early_stopped, _ = importance_ratio_early_stop(
                logprobs, old_logprobs, microbatch.loss_mask, algorithm.early_stop_imp_ratio, self._dp_group
            )
        tokens = metrics["num_valid_tokens"]
        detached_loss = loss.detach().float()
        entropy_tokens = entropy_mask.sum().to(tokens) if entropy is not None else torch.zeros_like(tokens)
        stats = torch.stack(
            [
                detached_loss,
                (entropy.detach() * entropy_mask).sum().to(tokens) if entropy is not None else torch.zeros_like(tokens),
                entropy_tokens,
                metrics["ratio_mean"] * tokens,
                metrics["clip_frac"] * tokens,
                metrics["approx_kl"] * tokens,
                tokens,
                tokens * (0.0 if early_stopped else 1.0),
                torch.tensor(float(early_stopped), device=tokens.device),
                (~torch.isfinite(detached_loss)).float(),
                *((weight_metrics["is_weight_mean"] * tokens, weight_metrics["is_clipped_fraction"] * tokens,
                   weight_metrics["is_weight_max"]) if weight_metrics else (torch.zeros_like(tokens),) * 3),
            ]
        ).double()
        # Undo the schedule's 1/M and the DDP's 1/dp (module doc, "Loss scale"). The schedule
        # divides the returned tensor in place, so it must not be a tensor kept elsewhere.
        scaled = zero_loss_if_skipped(loss, early_stopped) * (num_microbatches * self.layout.dp)
        return scaled, {"stats": stats}

    def _minibatch_early_stop(self, microbatches: list[Microbatch]) -> bool:
        """Minibatch granularity: whether the minibatch's mean ratio trips the early stop (all ranks)."""
        threshold = self.algorithm.early_stop_imp_ratio
        if self.algorithm.early_stop_granularity != "minibatch" or threshold is None:
            return False
        if all(microbatch.old_logprobs is None for microbatch in microbatches):
            return False  # old log-probs from the update itself: the ratio is 1 by construction
        self.model.eval()

        def valid_logprobs(microbatch: Microbatch, output: Tensor, non_loss_data: bool = True) -> tuple[Tensor, Tensor]:
            mask = microbatch.loss_mask
            logprobs, _ = self._scored(microbatch, output, mask, None)
            return logprobs[mask].float(), microbatch.old_logprobs[mask].float()

        with torch.no_grad():
            outputs = self._run_schedule(microbatches, valid_logprobs, forward_only=True)
        decision = torch.zeros(1, device=self.layout.device)
        if self.layout.is_last_stage:
            logprobs = torch.cat([lp for lp, _ in outputs])
            old_logprobs = torch.cat([old for _, old in outputs])
            skip, _ = importance_ratio_early_stop(
                logprobs, old_logprobs, torch.ones_like(logprobs, dtype=torch.bool), threshold, self._dp_group
            )
            decision.fill_(float(skip))
        return bool(self._from_last_stage(decision).item())

    def _optimizer_step(self, loss_is_finite: bool) -> tuple[str, float]:
        """Apply the accumulated gradients unless anything is non-finite on any rank (module doc).

        Returns the outcome (``_APPLIED``, ``_OVERFLOW`` or ``_NONFINITE``) and the grad norm."""
        scale_can_drop = self._loss_scale_can_drop()
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        flags = torch.tensor(
            [float(not loss_is_finite), float(found_inf), float(not math.isfinite(grad_norm))],
            device=self.layout.device,
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_bad, overflowed, norm_bad = (flag > 0 for flag in flags.tolist())
        if loss_bad or overflowed or norm_bad:
            return (_OVERFLOW if overflowed and not loss_bad and scale_can_drop else _NONFINITE), grad_norm
        if self.actor.clip_grad > 0:
            for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                parameters = [] if getattr(optimizer, "is_stub_optimizer", False) else optimizer.get_parameters()
                if parameters:
                    clip_grad_by_total_norm_fp32(
                        parameters,
                        max_norm=self.actor.clip_grad,
                        total_norm=grad_norm,
                        use_decoupled_grad=optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                    )
        self.optimizer.step_with_ready_grads()
        self.scheduler.step(1)
        return _APPLIED, grad_norm

    def _grad_scaler(self) -> Any:
        """Megatron's loss scaler of this optimizer (fp16), or None."""
        members = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return getattr(members[0], "grad_scaler", None) if members else None

    def _loss_scale_can_drop(self) -> bool:
        scaler = self._grad_scaler()
        return isinstance(scaler, DynamicGradScaler) and scaler.scale.item() > scaler.min_scale.item()

    def _loss_scale(self) -> float:
        scaler = self._grad_scaler()
        return float(scaler.scale.item()) if scaler is not None else 1.0

    def _current_lr(self) -> float:
        if self.optimizer is None:
            return float("nan")
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ checkpoints and weights

    def save_checkpoint(self, root: str | Path, step: int | None = None, *, with_optimizer: bool = True) -> Path:
        """Save to ``root/step_<step>`` (default: the number of train steps) and point ``root/latest`` at it."""
        step = self.train_steps if step is None else step
        root = Path(root)
        if dist.get_rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
        directory = self.save_to(root / f"step_{step:08d}", step=step, with_optimizer=with_optimizer)
        if dist.get_rank() == 0:
            write_latest(root, directory.name)
        dist.barrier()
        return directory

    def save_to(self, directory: str | Path, *, step: int | None = None, with_optimizer: bool = True) -> Path:
        """Save a checkpoint into exactly ``directory`` (collective)."""
        self._check_on_device()
        keep_optimizer = with_optimizer and self.optimizer is not None
        return ckpt.save_checkpoint(
            Path(directory),
            self.model,
            hf_config=self.hf_config,
            hf_side_files=self.model_path,
            optimizer=self.optimizer if keep_optimizer else None,
            scheduler=self.scheduler if keep_optimizer else None,
            actor_state={"train_steps": self.train_steps, "consecutive_nonfinite": self.consecutive_nonfinite},
            extra_metadata={"step": self.train_steps if step is None else step},
        )

    def load_checkpoint(self, directory: str | Path, *, with_optimizer: bool = True) -> None:
        """Load a checkpoint (an actor's, or ``rlsys convert hf-to-mcore`` output with the model only)."""
        self._check_on_device()
        load_optimizer = with_optimizer and self.optimizer is not None
        actor_state = ckpt.load_checkpoint(
            directory,
            self.model,
            optimizer=self.optimizer if load_optimizer else None,
            scheduler=self.scheduler if load_optimizer else None,
        )
        if self.optimizer is not None and not load_optimizer:
            # Main (float32) parameter copies of a fresh optimizer still hold the old weights.
            self.optimizer.reload_model_params()
        if load_optimizer:
            self.train_steps = int(actor_state.get("train_steps", 0))
            self.consecutive_nonfinite = int(actor_state.get("consecutive_nonfinite", 0))

    def iter_hf_weights(self) -> Iterator[tuple[str, Tensor]]:
        """The whole model as HF ``(name, tensor)`` pairs on every rank (collective; see megatron_weights)."""
        self._check_on_device()
        return iter_hf_weights(self.model, self.hf_config)

    # ------------------------------------------------------------------ device memory

    def offload_to_host(self) -> None:
        """Move weights, gradient buffers and optimizer state to host memory (module doc, "Offload").

        Until ``reload_to_device`` the actor runs nothing. Calling it again is a no-op.
        """
        if self._offloaded is not None:
            return
        kept: list[Tensor] = list(self.model.parameters())
        dropped: list[Tensor] = []
        if self.optimizer is not None:
            # Main weights' .grad are views or copies of the gradient buffers; drop them rather
            # than keep device memory alive (each train step zeroes the gradients first anyway).
            self.optimizer.zero_grad()
            for member in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                if getattr(member, "is_stub_optimizer", False):
                    continue
                for group in member.optimizer.param_groups:
                    kept.extend(group["params"])
                for state in member.optimizer.state.values():
                    kept.extend(value for value in state.values() if isinstance(value, Tensor))
        if self.wrapped is not None:
            dropped.extend(buffer.grad_data for buffer in self.wrapped.buffers + self.wrapped.expert_parallel_buffers)
        self._offloaded = offload_storages(kept, dropped, self.layout.device)

    def reload_to_device(self) -> None:
        """Bring back what ``offload_to_host`` moved, bit for bit (gradients zeroed); a no-op if nothing was."""
        if self._offloaded is None:
            return
        reload_storages(self._offloaded)
        self._offloaded = None

    def _check_on_device(self) -> None:
        if self._offloaded is not None:
            raise RuntimeError("the actor's weights and optimizer state are in host memory: call reload_to_device()")

    def close(self) -> None:
        """Release megatron's parallel state (the default process group stays).

        Actors of one process share that state: close the last one only.
        """
        destroy_parallel()

    # ------------------------------------------------------------------ plumbing

    def _microbatches(self, batch: RolloutBatch, indices: range | list[int]) -> list[Microbatch]:
        share = data_parallel_share(list(indices), self.layout.dp_rank, self.layout.dp)
        groups = plan_microbatches(batch, share, self.actor.max_tokens_per_microbatch, self._length_multiple)
        count = torch.tensor([len(groups)], device=self.layout.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self._dp_group)
        groups = equalize_microbatch_count(groups, int(count.item()))
        return [build_microbatch(batch, group, self._length_multiple) for group in groups]

    def _trained_sequences(self, batch: RolloutBatch) -> list[int]:
        """The sequences the update runs: all, or with ``actor.skip_zero_advantage`` those whose
        gradient is not 0 by construction.

        A sequence whose advantage is 0 on every token of its loss mask adds exactly 0 to the
        policy term's gradient; only the KL and entropy terms, which do not depend on the
        advantage, would make it count.
        """
        indices = range(len(batch))
        if not self.actor.skip_zero_advantage or self.algorithm.kl_coef != 0 or self.algorithm.entropy_coef != 0:
            return list(indices)
        masks = batch.loss_mask
        return [
            index for index in indices
            if bool((batch.advantages[index][masks[index]] if masks is not None else batch.advantages[index]).any())
        ]

    def _old_logprobs_of(self, batch: RolloutBatch, indices: list[int]) -> list[Tensor]:
        """The actor's log-probs of ``indices`` (empty tensors elsewhere), from a pass of their own."""
        old = [torch.zeros(0) for _ in range(len(batch))]
        if indices:
            subset = RolloutBatch(*(None if values is None else [values[i] for i in indices]
                                    for values in (getattr(batch, f.name) for f in dataclasses.fields(batch))))
            for index, logprobs in zip(indices, self.compute_logprobs(subset).logprobs, strict=True):
                old[index] = logprobs
        return old

    def _run_schedule(
        self, microbatches: list[Microbatch], loss_func: Callable[..., Any], *, forward_only: bool
    ) -> list[Any]:
        self._check_on_device()
        device = self.layout.device
        tensor_fields = ("tokens", "position_ids", "labels", "loss_mask", "old_logprobs", "ref_logprobs", "advantages")
        on_device = [
            dataclasses.replace(
                mb, **{name: getattr(mb, name).to(device) for name in tensor_fields if getattr(mb, name) is not None}
            )
            for mb in microbatches
        ]

        def forward_step(data_iterator: Iterator[Microbatch], model: torch.nn.Module) -> tuple[Tensor, Callable]:
            microbatch = next(data_iterator)
            with _final_hidden_states(self.model):
                output = model(microbatch.tokens, microbatch.position_ids, None)
            return output, partial(loss_func, microbatch)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(on_device),
            model=[self.wrapped if self.wrapped is not None else self.forward_module],
            num_microbatches=len(on_device),
            seq_length=max(mb.tokens.shape[1] for mb in on_device),
            micro_batch_size=max(mb.tokens.shape[0] for mb in on_device),
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )

    def _scored(
        self, microbatch: Microbatch, hidden: Tensor, score_mask: Tensor, entropy_mask: Tensor | None,
        *, entropy_requires_grad: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probs at ``score_mask`` and entropy at ``entropy_mask`` of a microbatch's hidden states."""
        model = self.model
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
            else model.output_layer.weight
        return scored_logprobs_and_entropy(
            hidden, weight, microbatch.labels, score_mask, self.vocab_size,
            chunk_tokens=self.actor.logits_chunk_tokens, entropy_mask=entropy_mask,
            entropy_requires_grad=entropy_requires_grad, sequence_parallel=self.actor.sequence_parallel,
        )

    def _from_last_stage(self, tensor: Tensor) -> Tensor:
        """The last pipeline stage's value of ``tensor`` on every stage."""
        if self.layout.pp > 1:
            dist.broadcast(tensor, group=self._pp_group, group_src=self.layout.pp - 1)
        return tensor

    def _gather_from_last_stages(self, local: list[Any]) -> list[Any]:
        """Concatenate the last stages' ``local`` lists over DP and hand the result to every rank."""
        if self.layout.is_last_stage and self.layout.dp > 1:
            parts: list[Any] = [None] * self.layout.dp
            dist.all_gather_object(parts, local, group=self._dp_group)
            local = [item for part in parts for item in part]
        if self.layout.pp > 1:
            holder = [local if self.layout.is_last_stage else None]
            dist.broadcast_object_list(holder, group=self._pp_group, group_src=self.layout.pp - 1)
            local = holder[0]
        return local
