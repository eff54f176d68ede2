"""Config risks: a shipped config that no longer composes, and bad values that fail late or vaguely."""

import pytest

from rlsys.config import ConfigError, load_config


def test_command_line_overrides_apply():
    run = load_config("smollm2-135m-grpo-cpu", ["reward.timeout_s=2.5", "data.seed=7", "runner.experiment_name=x"])
    assert run.reward.timeout_s == 2.5
    assert run.data.seed == 7
    assert run.runner.output_dir == "outputs/x"


@pytest.mark.parametrize(
    "override, field",
    [
        ("reward.timeout_s=0", "reward.timeout_s"),
        ("reward.correct_score=-6", "reward.correct_score"),
        ("reward.memory_limit_mb=10", "reward.memory_limit_mb"),
        ("data.max_prompt_length=-1", "data.max_prompt_length"),
        ("data.prompt_key=''", "data.prompt_key"),
        ("data.max_prompt_length=many", "data.max_prompt_length"),
        ("reward.no_such_field=1", "reward.no_such_field"),
        ("reward.extra=[{path: not_an_import_path}]", "reward.extra[0].path"),
        # Asynchronous rollout and off-policy correction.
        ("rollout.max_staleness=-1", "rollout.max_staleness"),
        ("rollout.max_staleness=1", "rollout.max_staleness"),  # async with colocated placement
        (("algorithm.correction_low=2.0", "algorithm.correction_high=0.5"), "algorithm.correction_high"),
        ("algorithm.correction_low=-0.1", "algorithm.correction_low"),
        ("algorithm.off_policy_correction=tris", "algorithm.off_policy_correction"),
        (("algorithm.off_policy_correction=decoupled_ppo", "algorithm.correction_level=sequence"),
         "algorithm.correction_level"),
        (("algorithm.off_policy_correction=tis", "actor.recompute_old_logprobs=false"), "algorithm.off_policy_correction"),
        ("algorithm.max_refill_rounds=-1", "algorithm.max_refill_rounds"),
        ("algorithm.max_refill_rounds=2", "algorithm.max_refill_rounds"),  # without the group filter
    ],
)
def test_bad_value_names_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config("smollm2-135m-grpo-cpu", [override] if isinstance(override, str) else list(override))
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_async_with_disaggregated_placement_composes():
    run = load_config("smollm2-135m-grpo-cpu", ["cluster.placement=disaggregated", "cluster.devices_per_node=2",
                                                "cluster.rollout_devices=1", "rollout.max_staleness=2",
                                                "algorithm.off_policy_correction=mis",
                                                "algorithm.correction_level=geometric"])
    assert run.rollout.max_staleness == 2 and run.algorithm.correction_level == "geometric"


def test_unknown_config_lists_available_ones():
    with pytest.raises(ConfigError) as info:
        load_config("qwen9-grpo")
    assert "smollm2-135m-grpo-cpu" in str(info.value)


def test_missing_data_file_names_field_and_path(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1", "solutions": ["2"]}\n')
    run = load_config("smollm2-135m-grpo-cpu", ["data.train_files=[train.jsonl]", "data.val_files=[nowhere/val.jsonl]"])
    with pytest.raises(ConfigError, match=r"^data\.val_files\[0\]: no such file: .*nowhere/val\.jsonl"):
        run.data.check_files_exist(base=tmp_path)
