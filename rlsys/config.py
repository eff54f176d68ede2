"""Typed run configuration.

One dataclass per component, each field with a one-line doc, checks in ``__post_init__``.
``RunConfig`` is registered with Hydra's ConfigStore as ``rlsys_schema``; the YAML files under
``configs/`` only compose and override it. A bad value raises ``ConfigError`` naming the field
as ``section.field`` before any worker starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the dotted field name."""


def _fail(section: str, name: str, message: str) -> None:
    raise ConfigError(f"{section}.{name}: {message}")


@dataclass
class ModelConfig:
    SECTION: ClassVar[str] = "model"

    path: str = "smollm2-135m-instruct"
    """HF model directory, or the name of a model shipped in a pip package (see rlsys.models.offline)."""
    tokenizer_path: str | None = None
    """Tokenizer directory; defaults to the model's own."""

    def __post_init__(self) -> None:
        if not self.path:
            _fail(self.SECTION, "path", "must name an HF directory or an offline model")


@dataclass
class DataConfig:
    SECTION: ClassVar[str] = "data"

    train_files: list[str] = field(default_factory=lambda: ["examples/reasoning/data/arithmetic_train.jsonl"])
    """JSONL files of training prompts (Boba format: prompt, solutions)."""
    val_files: list[str] = field(default_factory=lambda: ["examples/reasoning/data/arithmetic_val.jsonl"])
    """JSONL files used for validation with the same reward."""
    prompt_key: str = "prompt"
    """Key of the prompt: a string, or a list of chat messages ({role, content})."""
    answer_key: str = "solutions"
    """Key of the reference answer(s): a string or a non-empty list of strings."""
    apply_chat_template: bool = True
    """Render prompts with the tokenizer's own chat template."""
    system_prompt: str | None = None
    """System message prepended to string prompts when the chat template is applied."""
    max_prompt_length: int = 1024
    """Prompts longer than this many tokens are dropped (and counted) when the dataset loads."""
    shuffle: bool = True
    """Shuffle training prompts each epoch with a seed derived from (seed, epoch)."""
    seed: int = 1
    """Seed of the shuffle order."""

    def __post_init__(self) -> None:
        for name in ("train_files", "val_files"):
            files = getattr(self, name)
            if isinstance(files, str):
                setattr(self, name, [files])
        if not self.train_files:
            _fail(self.SECTION, "train_files", "needs at least one JSONL file")
        for key in ("prompt_key", "answer_key"):
            if not getattr(self, key):
                _fail(self.SECTION, key, "must be a non-empty key name")
        if self.max_prompt_length <= 0:
            _fail(self.SECTION, "max_prompt_length", f"must be positive, got {self.max_prompt_length}")

    def check_files_exist(self, base: Path | None = None) -> None:
        """Missing data files fail at start, naming the field and the path."""
        for name in ("train_files", "val_files"):
            for i, path in enumerate(getattr(self, name)):
                resolved = Path(path) if base is None else base / path
                if not resolved.is_file():
                    _fail(self.SECTION, f"{name}[{i}]", f"no such file: {resolved}")


@dataclass
class RewardTerm:
    """An extra reward function, imported by path and added with a weight."""

    path: str = ""
    """Import path 'package.module:function'; the function takes (response, reference) -> float."""
    weight: float = 1.0
    """Multiplier applied to the function's value before it is added."""


@dataclass
class RewardConfig:
    SECTION: ClassVar[str] = "reward"

    correct_score: float = 5.0
    """Reward when the final boxed answer equals a reference."""
    wrong_score: float = -5.0
    """Reward when it does not, when there is no box, or when checking times out or crashes."""
    timeout_s: float = 5.0
    """Hard limit per response; the checking process is killed past it."""
    memory_limit_mb: int = 2048
    """Address-space limit of each checking process."""
    num_workers: int = 0
    """Checking processes; 0 means one per CPU core."""
    format_weight: float = 0.0
    """Weight of the <think>...</think><answer>...</answer> format reward (0 turns it off)."""
    extra: list[RewardTerm] = field(default_factory=list)
    """Further reward terms combined by import path."""

    def __post_init__(self) -> None:
        if self.correct_score <= self.wrong_score:
            _fail(self.SECTION, "correct_score", f"must exceed wrong_score ({self.correct_score} <= {self.wrong_score})")
        if self.timeout_s <= 0:
            _fail(self.SECTION, "timeout_s", f"must be positive, got {self.timeout_s}")
        if self.memory_limit_mb < 256:
            _fail(self.SECTION, "memory_limit_mb", f"must be at least 256, got {self.memory_limit_mb}")
        if self.num_workers < 0:
            _fail(self.SECTION, "num_workers", f"must be >= 0, got {self.num_workers}")
        for i, term in enumerate(self.extra):
            if ":" not in term.path:
                _fail(self.SECTION, f"extra[{i}].path", f"must look like 'package.module:function', got {term.path!r}")


@dataclass
class RunnerConfig:
    SECTION: ClassVar[str] = "runner"

    experiment_name: str = "rlsys"
    """Name used for the output directory and in logs."""
    output_dir: str = "outputs/${runner.experiment_name}"
    """Where event files, checkpoints and validation outputs go."""
    seed: int = 1
    """Base seed; every other seed derives from it and (step, index)."""

    def __post_init__(self) -> None:
        if not self.output_dir:
            _fail(self.SECTION, "output_dir", "must be set")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)


ConfigStore.instance().store(name="rlsys_schema", node=RunConfig)


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Experiment names: the YAML files at the top of the config directory."""
    return sorted(p.stem for p in config_dir.glob("*.yaml"))


def load_config(name: str, overrides: list[str] | None = None, config_dir: Path = CONFIG_DIR) -> RunConfig:
    """Compose experiment ``name`` with ``key=value`` overrides into a checked ``RunConfig``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    names = available_configs(config_dir)
    if name not in names:
        raise ConfigError(f"unknown config {name!r}; available: {', '.join(names)}")
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            composed = compose(config_name=name, overrides=list(overrides or []))
        run = OmegaConf.to_object(composed)
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException) as exc:
        raise _explain(name, exc) from None
    assert isinstance(run, RunConfig)
    return run


def to_dict(run: Any) -> dict:
    """Plain nested dict of a config dataclass, for logging and checkpoints."""
    return dataclasses.asdict(run)


def _explain(config_name: str, exc: BaseException) -> ConfigError:
    """Turn a Hydra/OmegaConf error into one line that starts with the offending field."""
    cause = exc.__cause__ or exc
    if isinstance(cause, ConfigError):
        return cause
    key = getattr(cause, "full_key", None)
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if key:
        return ConfigError(f"{key}: {reason} (config {config_name!r})")
    return ConfigError(f"config {config_name!r}: {reason}")
