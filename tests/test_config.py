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
    ],
)
def test_bad_value_names_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config("smollm2-135m-grpo-cpu", [override])
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_unknown_config_lists_available_ones():
    with pytest.raises(ConfigError) as info:
        load_config("qwen9-grpo")
    assert "smollm2-135m-grpo-cpu" in str(info.value)


def test_missing_data_file_names_field_and_path(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1", "solutions": ["2"]}\n')
    run = load_config("smollm2-135m-grpo-cpu", ["data.train_files=[train.jsonl]", "data.val_files=[nowhere/val.jsonl]"])
    with pytest.raises(ConfigError, match=r"^data\.val_files\[0\]: no such file: .*nowhere/val\.jsonl"):
        run.data.check_files_exist(base=tmp_path)
