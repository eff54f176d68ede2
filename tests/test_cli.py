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
