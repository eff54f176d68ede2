"""Risks in running megatron-core on CPU (``rlsys.platform.megatron_cpu``).

- The CUDA stand-ins are wrong: a CUDA device request is not served on CPU, ``clip_grads``'
  type check fails, enabling twice stacks the device mode twice, or the RNG tracker's fork
  disturbs the default stream or does not advance its own.
- A training step goes wrong in a way only training shows: tensor and pipeline parallel with
  sequence parallel (TP2xPP2, 4 processes), full activation recompute (forward re-run inside
  backward, where the device mode is off), megatron's DDP, optimizer with gradient clipping,
  the 1F1B schedule with backward. Checked: the loss falls, gradients are clipped, sequence-
  parallel norm weights stay equal across TP ranks while they change, the tied embedding and
  its copy on the last stage stay equal, and the trained model exported to HF gives the
  trained Megatron model's logits in HF transformers.

Everything runs in spawned processes: the patches change process-wide state.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.dist import run_distributed

VOCAB, BATCH, SEQ = 301, 2, 16
MAX_ABS_DIFF = 1e-5


def _platform_worker(rank: int, world_size: int) -> dict[str, Any]:
    from megatron.core import tensor_parallel
    from megatron.core.parallel_state import destroy_model_parallel, initialize_model_parallel
    from torch.overrides import _get_current_function_mode_stack

    from rlsys.platform.megatron_cpu import enable_cpu_megatron

    facts: dict[str, Any] = {"enabled": [enable_cpu_megatron(force=True), enable_cpu_megatron(force=True)]}
    facts["device_modes_on_stack"] = len(_get_current_function_mode_stack())
    facts["devices"] = [
        torch.empty(2, device="cuda").device.type,
        torch.zeros(2, device=torch.cuda.current_device()).device.type,
        torch.ones(2).cuda().device.type,
        torch.ones(2).to("cuda:0").device.type,
        torch.ones(2).to(device=torch.device("cuda")).device.type,
        torch.ones(2).to(torch.float64).dtype == torch.float64,
    ]
    facts["type_name"] = torch.ones(2).type()
    torch.cuda.synchronize()

    initialize_model_parallel()
    draws = {}
    for attempt in ("first", "again"):
        torch.manual_seed(11)
        tensor_parallel.model_parallel_cuda_manual_seed(11)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        outer_before = torch.rand(3)
        with tracker.fork():
            forked_first = torch.rand(3)
        with tracker.fork():
            forked_second = torch.rand(3)
        outer_after = torch.rand(3)
        draws[attempt] = (outer_before, forked_first, forked_second, outer_after)
    torch.manual_seed(11)
    unforked = (torch.rand(3), torch.rand(3))
    destroy_model_parallel()
    facts["draws"] = draws
    facts["unforked"] = unforked
    return facts


def test_cpu_stand_ins_for_cuda() -> None:
    (facts,) = run_distributed(_platform_worker, 1, timeout_s=120)
    assert facts["enabled"] == [True, True]
    assert facts["device_modes_on_stack"] == 1
    assert facts["devices"] == ["cpu", "cpu", "cpu", "cpu", "cpu", True]
    assert facts["type_name"] == "torch.cuda.FloatTensor"

    outer_before, forked_first, forked_second, outer_after = facts["draws"]["first"]
    assert not torch.equal(forked_first, forked_second), "the forked state did not advance"
    assert not torch.equal(forked_first, outer_before)
    unforked_first, unforked_second = facts["unforked"]
    assert torch.equal(outer_before, unforked_first) and torch.equal(outer_after, unforked_second), (
        "forking moved the default stream"
    )
    for first, again in zip(facts["draws"]["first"], facts["draws"]["again"]):
        assert torch.equal(first, again), "same seeds gave different draws"


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(2024)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    directory = tmp_path_factory.mktemp("qwen2_train")
    model.save_pretrained(directory)
    return {"dir": str(directory), "input_ids": torch.randint(0, VOCAB, (BATCH, SEQ))}


def _training_worker(rank: int, world_size: int, checkpoint_dir: str, input_ids: torch.Tensor) -> dict[str, Any]:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoConfig

    from rlsys.models.megatron_model import build_gpt_model
    from rlsys.models.megatron_weights import export_hf_state_dict, load_hf_into_megatron
    from rlsys.platform.megatron_cpu import enable_cpu_megatron

    enable_cpu_megatron(force=True)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    torch.manual_seed(5)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    hf_config = AutoConfig.from_pretrained(checkpoint_dir)
    # Full activation recompute re-runs each layer's forward (causal mask, RNG fork) inside backward.
    model = build_gpt_model(
        hf_config,
        transformer_impl="local",
        sequence_parallel=True,
        recompute_granularity="full",
        recompute_method="uniform",
        recompute_num_layers=1,
    )
    load_hf_into_megatron(model, checkpoint_dir)
    initial_norms = {n: p.detach().clone() for n, p in model.named_parameters() if "layernorm" in n}

    ddp_model = DistributedDataParallel(
        config=model.config, ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=False), module=model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.0, clip_grad=0.1, params_dtype=torch.float32),
        [ddp_model],
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    positions = torch.arange(SEQ).unsqueeze(0)
    micro_batches = [
        {"tokens": input_ids[i : i + 1], "labels": torch.roll(input_ids[i : i + 1], -1, dims=1)} for i in range(BATCH)
    ]

    def mean_loss(per_token_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = per_token_loss.mean()
        # A copy: the schedule divides the returned loss in place by the number of micro-batches.
        return loss, {"loss": loss.detach().clone()}

    def train_step(data_iterator: Any, stage_model: Any) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        return stage_model(batch["tokens"], positions, None, labels=batch["labels"]), mean_loss

    losses, grad_norms = [], []
    for _ in range(4):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        step_losses = get_forward_backward_func()(
            forward_step_func=train_step,
            data_iterator=iter(micro_batches),
            model=[ddp_model],
            num_microbatches=BATCH,
            seq_length=SEQ,
            micro_batch_size=1,
            forward_only=False,
        )
        succeeded, grad_norm, _ = optimizer.step()
        assert succeeded
        grad_norms.append(grad_norm)
        if step_losses:
            losses.append(sum(item["loss"].item() for item in step_losses) / len(step_losses))

    def gather_logits(output: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
        return tensor_parallel.gather_from_tensor_model_parallel_region(output)

    def logits_step(data_iterator: Any, stage_model: Any) -> tuple[torch.Tensor, Any]:
        return stage_model(next(data_iterator)["tokens"], positions, None), gather_logits

    model.eval()
    with torch.no_grad():
        logits = get_forward_backward_func()(
            forward_step_func=logits_step,
            data_iterator=iter(micro_batches),
            model=[ddp_model],
            num_microbatches=BATCH,
            seq_length=SEQ,
            micro_batch_size=1,
            forward_only=True,
            collect_non_loss_data=True,
        )
    exported = export_hf_state_dict(model, hf_config)

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    shared = model.embedding.word_embeddings.weight if pp_rank == 0 else model.output_layer.weight
    return {
        "coordinates": (pp_rank, tp_rank),
        "losses": losses,
        "grad_norms": grad_norms,
        "norms": {n: p.detach().clone() for n, p in model.named_parameters() if "layernorm" in n},
        "initial_norms": initial_norms,
        "shared_embedding": shared.detach().clone(),
        "logits": torch.cat(logits, dim=0) if logits else None,
        "exported": exported if rank == 0 else None,
    }


def test_tp2_pp2_sequence_parallel_training_step(qwen2_checkpoint: dict[str, Any]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    reports = run_distributed(
        _training_worker, 4, args=(qwen2_checkpoint["dir"], qwen2_checkpoint["input_ids"]), timeout_s=240
    )
    by_coordinates = {report["coordinates"]: report for report in reports}
    assert sorted(by_coordinates) == [(0, 0), (0, 1), (1, 0), (1, 1)]

    last_stage = by_coordinates[(1, 0)]
    losses = last_stage["losses"]
    print(f"losses {losses}, grad norms {last_stage['grad_norms']}")
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses
    assert all(norm > 0.1 for norm in last_stage["grad_norms"]), "clip_grad=0.1 was never active"

    for pp_rank in (0, 1):
        tp0, tp1 = by_coordinates[(pp_rank, 0)], by_coordinates[(pp_rank, 1)]
        for name, weight in tp0["norms"].items():
            assert torch.equal(weight, tp1["norms"][name]), f"stage {pp_rank} {name} differs across TP ranks"
            assert not torch.equal(weight, tp0["initial_norms"][name]), f"stage {pp_rank} {name} never trained"
    for tp_rank in (0, 1):
        assert torch.equal(
            by_coordinates[(0, tp_rank)]["shared_embedding"], by_coordinates[(1, tp_rank)]["shared_embedding"]
        ), f"tied embedding and its last-stage copy diverged on TP rank {tp_rank}"

    exported = next(report["exported"] for report in reports if report["exported"] is not None)
    hf_model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(qwen2_checkpoint["dir"]), attn_implementation="eager", dtype=torch.float32
    )
    missing, unexpected = hf_model.load_state_dict(exported, strict=False)
    assert unexpected == [] and missing in ([], ["lm_head.weight"])
    hf_model.tie_weights()
    hf_model.eval()
    with torch.no_grad():
        hf_logits = hf_model(qwen2_checkpoint["input_ids"]).logits
    max_abs_diff = (last_stage["logits"][..., :VOCAB] - hf_logits).abs().max().item()
    print(f"trained tp2pp2sp qwen2_tied: max |megatron - hf(exported)| = {max_abs_diff:.3g}")
    assert max_abs_diff <= MAX_ABS_DIFF
