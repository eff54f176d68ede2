"""Model shapes (layers, heads, widths) read without loading a model, and the layout checks they allow.

``check_model_layout(run)`` runs at the start of training, on CPU and before any worker starts:
tensor and pipeline parallel sizes that cannot split the model fail with a ``ConfigError`` that
names the field, instead of an assertion deep inside megatron or SGLang on the cluster.

Where a shape comes from, in order
    1. ``model.path`` is a directory: its ``config.json``.
    2. ``model.path`` is an offline builtin (``rlsys.models.offline``): the ``config.json`` of its
       cached HF directory, built on first use (a few seconds for SmolLM2, once per machine).
    3. Otherwise the path's last component (``/models/Qwen2.5-7B-Instruct``, or a hub id such as
       ``Qwen/Qwen2.5-7B-Instruct``) is looked up, ignoring case, among the shapes shipped in
       ``known_models/``: the numbers of the public HF ``config.json`` files, so the GPU
       experiments validate on a laptop that does not hold the weights.
    4. Nothing matches: there is no shape, and the check is skipped with a warning that says so.

What is checked (the rules of megatron-core 0.16.1 and SGLang 0.5.21, which agree)
    * TP must divide the attention heads (megatron ``TransformerConfig``, SGLang ``Qwen2Attention``
      and ``LlamaAttention``).
    * TP and the KV heads must divide one way or the other: KV heads are split when there are at
      least TP of them, and replicated when TP is a multiple of them (megatron: "num_query_groups
      must be a multiple or divisor of tensor_model_parallel_size"; SGLang the same assertion).
    * TP must divide the MLP width: both split ``intermediate_size`` evenly over TP ranks.
    * PP must divide the layers: stages hold equal, contiguous runs of layers
      (``rlsys.models.architecture.layers_of_stage``).
    The vocabulary needs no check: both pad it to a multiple of TP.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlsys.config import ConfigError

if TYPE_CHECKING:
    from rlsys.config import ModelConfig, RunConfig

logger = logging.getLogger(__name__)

KNOWN_MODELS_DIR = "known_models"
"""Folder of ``rlsys.models`` holding one ``<HF model name>.json`` per known shape."""

_FIELDS = {
    "num_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
}
"""ModelShape field -> HF config.json key."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of an HF decoder config that parallel layouts depend on."""

    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    source: str
    """Where the numbers were read: a config.json path or a shipped known-shape file."""


def model_shape(model: ModelConfig) -> ModelShape | None:
    """The shape of the model ``model.path`` names, or None when it is unknown (see module doc)."""
    from rlsys.models.offline import BUILTINS, OfflineModelError, resolve_model_path

    path = Path(model.path).expanduser()
    if path.is_dir():
        return _read_config_json(path / "config.json")
    if model.path in BUILTINS:
        try:
            directory = resolve_model_path(model.path)
        except OfflineModelError as exc:
            raise ConfigError(f"model.path: {exc}") from None
        config_json = directory / "config.json"
        # A builtin may be a tokenizer only (qwen2.5-tokenizer): no model, so no shape.
        return _read_config_json(config_json) if config_json.is_file() else None
    return known_shape(path.name)


def known_shape(model_name: str) -> ModelShape | None:
    """The shipped shape of an HF model name such as ``Qwen2.5-7B-Instruct`` (case ignored), or None."""
    wanted = model_name.lower() + ".json"
    for entry in resources.files("rlsys.models").joinpath(KNOWN_MODELS_DIR).iterdir():
        if entry.name.lower() == wanted:
            return _shape_from(json.loads(entry.read_text(encoding="utf-8")), f"known shape {entry.name}")
    return None


def known_model_names() -> list[str]:
    """Names of the models whose shapes ship with rlsys."""
    folder = resources.files("rlsys.models").joinpath(KNOWN_MODELS_DIR)
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


def check_model_layout(run: RunConfig) -> None:
    """Fail with ``ConfigError`` naming the field when TP or PP cannot split the model."""
    shape = model_shape(run.model)
    if shape is None:
        logger.warning(
            "model.path=%r: no config.json, offline model or known shape (known: %s); actor.tp, "
            "actor.pp and rollout.tp are not checked against the model's heads and layers",
            run.model.path,
            ", ".join(known_model_names()),
        )
        return
    _check_tp("actor.tp", run.actor.tp, shape)
    if shape.num_layers % run.actor.pp:
        raise ConfigError(
            f"actor.pp: {run.actor.pp} must divide the model's {shape.num_layers} layers "
            f"(pipeline stages hold equal numbers of layers; {shape.source})"
        )
    _check_tp("rollout.tp", run.rollout.tp, shape)


def _check_tp(field: str, tp: int, shape: ModelShape) -> None:
    if shape.num_attention_heads % tp:
        raise ConfigError(
            f"{field}: {tp} must divide the model's {shape.num_attention_heads} attention heads ({shape.source})"
        )
    kv = shape.num_key_value_heads
    if kv % tp and tp % kv:
        raise ConfigError(
            f"{field}: {tp} and the model's {kv} KV heads must divide one another "
            f"(KV heads are split over TP, or replicated when TP is a multiple of them; {shape.source})"
        )
    if shape.intermediate_size % tp:
        raise ConfigError(f"{field}: {tp} must divide the model's MLP width {shape.intermediate_size} ({shape.source})")


def _read_config_json(path: Path) -> ModelShape:
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"model.path: {path.parent} is a directory without config.json, not an HF model") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model.path: cannot read {path}: {exc}") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"model.path: {path} does not hold a JSON object")
    return _shape_from(fields, str(path))


def _shape_from(fields: dict[str, Any], source: str) -> ModelShape:
    values: dict[str, int] = {}
    for name, key in _FIELDS.items():
        value = fields.get(key)
        if key == "num_key_value_heads" and value is None:
            # HF's convention: without the key, every attention head has its own KV head.
            value = fields.get("num_attention_heads")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.path: {source}: {key} must be a positive integer, got {value!r}")
        values[name] = value
    return ModelShape(**values, source=source)
