"""The console script and ``python -m rlsys`` both work, and every subcommand has --help."""

import subprocess
import sys

import pytest

from rlsys.cli import _build_parser


def _subcommands() -> list[str]:
    parser = _build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_module_entry_point_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "rlsys", "--help"], capture_output=True, text=True, check=True).stdout
    for name in _subcommands():
        assert name in out


@pytest.mark.parametrize("name", _subcommands())
def test_each_subcommand_has_help(name):
    result = subprocess.run([sys.executable, "-m", "rlsys", name, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"usage: rlsys {name}" in result.stdout


def test_bad_config_exits_2_with_field_name():
    result = subprocess.run([sys.executable, "-m", "rlsys", "eval", "smollm2-135m-grpo-cpu", "reward.timeout_s=-1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "reward.timeout_s" in result.stderr


@pytest.mark.parametrize("direction", ["hf-to-mcore", "mcore-to-hf"])
def test_convert_directions_have_help(direction):
    result = subprocess.run([sys.executable, "-m", "rlsys", "convert", direction, "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"usage: rlsys convert {direction}" in result.stdout


def test_convert_round_trip_from_the_command_line_is_bitwise(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "hf")
    commands = [
        ["convert", "hf-to-mcore", "--hf-path", str(tmp_path / "hf"), "--output", str(tmp_path / "mcore"), "--tp", "2"],
        ["convert", "mcore-to-hf", "--mcore-path", str(tmp_path / "mcore"), "--output", str(tmp_path / "back")],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "rlsys", *command], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    original = load_file(tmp_path / "hf" / "model.safetensors")
    restored = {}
    for path in (tmp_path / "back").glob("*.safetensors"):
        restored.update(load_file(path))
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(restored[name], tensor), name
    assert Qwen2ForCausalLM.from_pretrained(tmp_path / "back") is not None
