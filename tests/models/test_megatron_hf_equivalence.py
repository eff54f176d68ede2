"""Risk: the Megatron actor is not the HF model it was loaded from.

For tiny random Qwen2 (tied and untied) and Llama configs, with randomised norm weights and
biases so that a swapped or mis-sliced tensor changes the output, a Megatron model built by
``build_gpt_model`` and loaded by ``load_hf_into_megatron`` must
- give HF transformers' logits (eager attention, fp32) within 1e-5, at TP1, TP2 (with and
  without sequence parallel), PP2 and TP2xPP2, with upstream's attention (the CPU default) and
  with our SDPA attention (the GPU default), through megatron's own pipeline schedule
  (forward_only, two micro-batches) with the last stage's logits gathered over TP;
- export back to an HF state dict bitwise equal to the checkpoint it was loaded from.

Shapes: hidden 64, 4 layers, 4 query heads with 2 KV heads (Qwen2) or 1 KV head (Llama: fewer KV
heads than TP ranks, megatron's gather-and-reslice path), vocabulary 301 (padded to 384, not a
multiple of TP), 16 tokens, batch 2. Each process group runs several layouts and all three
configs (``LAYOUTS``), since starting a process and importing megatron dominate the time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.dist import run_distributed
from tests.tiny_configs import HF_CONFIGS, VOCAB, make_hf_config, make_randomised_model

MAX_ABS_DIFF = 1e-5
BATCH, SEQ = 2, 16

# name -> (world size, [(tp, pp, sequence_parallel, local core attention), ...]) run in one
# process group (ranks left over form data-parallel replicas). "megatron" is the CPU default
# attention, "sdpa" the GPU one.
LAYOUTS: dict[str, tuple[int, list[tuple[int, int, bool, str]]]] = {
    "tp1_pp2": (2, [(1, 1, False, "megatron"), (1, 1, False, "sdpa"), (1, 2, False, "megatron")]),
    "tp2": (2, [(2, 1, False, "megatron"), (2, 1, True, "megatron"), (2, 1, True, "sdpa")]),
    "tp2pp2": (4, [(2, 2, False, "megatron"), (2, 2, True, "sdpa")]),
}


def _layout_name(tp: int, pp: int, sequence_parallel: bool, attention: str) -> str:
    return f"tp{tp}pp{pp}" + ("sp" if sequence_parallel else "") + f"-{attention}"


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per config: saved checkpoint dir, input ids, and HF's reference logits."""
    checkpoints = {}
    for index, (name, settings) in enumerate(HF_CONFIGS.items()):
        model = make_randomised_model(settings, seed=1000 + index)
        input_ids = torch.randint(0, VOCAB, (BATCH, SEQ))
        with torch.no_grad():
            logits = model(input_ids).logits
        directory = tmp_path_factory.mktemp(name)
        # One checkpoint is sharded so the safetensors index path is read too.
        model.save_pretrained(directory, max_shard_size="100KB" if name == "qwen2_untied" else "1GB")
        checkpoints[name] = {"dir": str(directory), "input_ids": input_ids, "logits": logits}
    return checkpoints


def _megatron_worker(
    rank: int, world_size: int, layouts: list[tuple[int, int, bool, str]], checkpoints: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Runs in each spawned rank: every layout x config; rank 0 of the last stage reports."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoConfig

    from rlsys.models.megatron_model import build_gpt_model
    from rlsys.models.megatron_weights import export_hf_state_dict, load_hf_into_megatron
    from rlsys.platform.megatron_cpu import enable_cpu_megatron

    enable_cpu_megatron(force=True)
    report: dict[str, Any] = {}
    for tp, pp, sequence_parallel, attention in layouts:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        torch.manual_seed(7)
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        reports_here = (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        )
        for name, checkpoint in checkpoints.items():
            hf_config = AutoConfig.from_pretrained(checkpoint["dir"])
            model = build_gpt_model(
                hf_config, transformer_impl="local", local_core_attention=attention, sequence_parallel=sequence_parallel
            )
            load_hf_into_megatron(model, checkpoint["dir"])
            model.eval()

            input_ids: torch.Tensor = checkpoint["input_ids"]
            micro_batches = [
                {"tokens": input_ids[i : i + 1], "position_ids": torch.arange(SEQ).unsqueeze(0)} for i in range(BATCH)
            ]

            def gather_logits(output: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
                return tensor_parallel.gather_from_tensor_model_parallel_region(output)

            def forward_step(data_iterator: Any, stage_model: Any) -> tuple[torch.Tensor, Any]:
                batch = next(data_iterator)
                return stage_model(batch["tokens"], batch["position_ids"], None), gather_logits

            with torch.no_grad():
                outputs = get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=iter(micro_batches),
                    model=[model],
                    num_microbatches=len(micro_batches),
                    seq_length=SEQ,
                    micro_batch_size=1,
                    forward_only=True,
                    collect_non_loss_data=True,
                )
            exported = export_hf_state_dict(model, hf_config)
            if reports_here:
                layout = _layout_name(tp, pp, sequence_parallel, attention)
                report[f"{layout}/{name}/logits"] = torch.cat(outputs, dim=0)
                report[f"{layout}/{name}/export"] = exported
        parallel_state.destroy_model_parallel()
    return report


@pytest.fixture(scope="module", params=list(LAYOUTS))
def megatron_report(request: pytest.FixtureRequest, hf_checkpoints: dict[str, dict[str, Any]]) -> dict[str, Any]:
    world_size, layouts = LAYOUTS[request.param]
    checkpoints = {name: {"dir": c["dir"], "input_ids": c["input_ids"]} for name, c in hf_checkpoints.items()}
    reports = run_distributed(_megatron_worker, world_size, args=(layouts, checkpoints), timeout_s=200)
    merged: dict[str, Any] = {}
    for report in reports:
        merged.update(report)
    return {"layouts": [_layout_name(*layout) for layout in layouts], "results": merged}


@pytest.mark.parametrize("config_name", list(HF_CONFIGS))
def test_megatron_logits_equal_hf(
    megatron_report: dict[str, Any], hf_checkpoints: dict[str, Any], config_name: str
) -> None:
    reference = hf_checkpoints[config_name]["logits"]
    for layout in megatron_report["layouts"]:
        logits = megatron_report["results"][f"{layout}/{config_name}/logits"]
        # Columns past the HF vocabulary belong to the zero padding rows, not to the model.
        assert logits.shape == (BATCH, SEQ, 384), layout
        max_abs_diff = (logits[..., :VOCAB] - reference).abs().max().item()
        print(f"{layout} {config_name}: max |megatron - hf| = {max_abs_diff:.3g}")
        assert max_abs_diff <= MAX_ABS_DIFF, f"{layout} {config_name}: {max_abs_diff}"


@pytest.mark.parametrize("config_name", list(HF_CONFIGS))
def test_export_round_trip_is_bitwise(
    megatron_report: dict[str, Any], hf_checkpoints: dict[str, Any], config_name: str
) -> None:
    from safetensors.torch import load_file

    directory = Path(hf_checkpoints[config_name]["dir"])
    original: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        original.update(load_file(file))
    for layout in megatron_report["layouts"]:
        exported = megatron_report["results"][f"{layout}/{config_name}/export"]
        assert sorted(exported) == sorted(original), layout
        differing = [
            name
            for name in original
            if exported[name].dtype != original[name].dtype or not torch.equal(exported[name], original[name])
        ]
        assert not differing, f"{layout} {config_name}: {differing}"
