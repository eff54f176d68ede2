"""Risk: the loop runs but a phase is silently missing or mis-wired (no sync, no scalars, no
validation), or it only works colocated. Runs the real thing for 2 steps: Megatron TP2 actor ranks
and an SGLang engine as Ray actors in a placement group of a local Ray (disaggregated: the engine
has a device of its own and receives weights by broadcast), the sandboxed reward, tensorboard."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlsys.config import load_config
from tests.runner.conftest import loop_overrides

REQUIRED_SCALARS = (
    "rollout/rewards", "rollout/response_length", "rollout/response_length_max", "rollout/prompt_length",
    "rollout/fraction_properly_ended", "rollout/advantages_mean", "rollout/advantages_max", "rollout/advantages_min",
    "train/policy_loss", "train/entropy_loss", "train/ratio", "train/clip_fraction", "train/approx_kl",
    "train/grad_norm", "train/lr", "train/early_stopped", "train/logprob_mismatch",
    "time/rollout", "time/reward", "time/train", "time/sync", "time/step", "throughput/tokens_per_s",
    "val/rewards", "val/accuracy",
    "rollout/staleness_mean", "rollout/staleness_max", "rollout/partial_fraction", "rollout/dropped_stale",
    "rollout/refill_rounds", "time/generation", "train/is_weight_mean", "train/is_weight_max",
    "train/is_clipped_fraction",
)


def read_event_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return scalars


@pytest.mark.slow
def test_two_steps_tp2_sglang_disaggregated_write_every_scalar(tiny_model_dir, prompt_files, tmp_path):
    from rlsys.runner.grpo import train

    run = load_config("smollm2-135m-grpo-cpu", loop_overrides(
        tiny_model_dir, prompt_files, tmp_path / "run",
        **{"actor.tp": 2, "cluster.placement": "disaggregated", "cluster.devices_per_node": 3,
           "cluster.rollout_devices": 1, "rollout.engine": "sglang", "runner.save_interval": 2}))
    result = train(run)

    scalars = read_event_scalars(tmp_path / "run")
    missing = [tag for tag in REQUIRED_SCALARS if tag not in scalars]
    assert not missing, f"scalars missing from the event files: {missing}"
    for tag in REQUIRED_SCALARS:
        expected_steps = {0, 2} if tag.startswith("val/") else {1, 2}
        assert set(scalars[tag]) == expected_steps, (tag, sorted(scalars[tag]))
    # The engine follows the actor: after a sync its log-probs of the sampled tokens are the
    # actor's up to numerics (a missed sync leaves a gap of the size of one update at lr 1e-3).
    assert scalars["train/logprob_mismatch"][2] < 1e-3, scalars["train/logprob_mismatch"]
    assert scalars["sync/num_tensors"][1] > 0
    assert scalars["train/grad_norm"][1] > 0
    assert [h["step"] for h in result.history] == [0.0, 1.0, 2.0]
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert (tmp_path / "run" / "validation" / "step_00000002").is_dir()

    # HF export of a training checkpoint (saved at TP2): transformers loads it, and it holds the
    # trained weights, not the initial ones.
    import torch
    from safetensors.torch import load_file

    from rlsys.actor.convert import convert_mcore_to_hf

    exported = convert_mcore_to_hf(tmp_path / "run" / "checkpoints" / "step_00000002" / "actor", tmp_path / "hf")
    def weights(directory: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}

    trained, initial = weights(exported), weights(tiny_model_dir)
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[name], initial[name]) for name in initial)

    # rlsys plot on a real run's event files.
    from PIL import Image

    from rlsys.plot import plot_runs

    for png in plot_runs([tmp_path / "run"], tmp_path / "plots"):
        with Image.open(png) as image:
            assert image.size[0] > 100 and len(set(image.convert("L").getdata())) > 1, png
