"""The shipped config tree: every experiment composes from its groups and fits its model, the GPU
recipes launch on a GPU cluster (their RLinf numbers: tests/test_recipe_fidelity.py), and a config
that cannot run fails at start naming the field.

Risks: a group file that silently stops applying (experiment values left at schema defaults), a
parallel layout that only fails inside megatron or SGLang on the cluster, a shipped model shape
with a wrong number, and an error that does not say which field to fix.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlsys.config import REPO_ROOT, ConfigError, ModelConfig, available_configs, load_config
from rlsys.models.shapes import check_model_layout, known_model_names, known_shape, model_shape

EXPERIMENTS = available_configs()


def _fails_at_start(name: str, overrides: list[str]) -> str:
    """The ConfigError message of composing ``name`` and checking it against its model."""
    with pytest.raises(ConfigError) as info:
        check_model_layout(load_config(name, overrides))
    return str(info.value)


# ---------------------------------------------------------------- every shipped experiment


def test_the_top_level_holds_the_experiments():
    assert {
        "smollm2-135m-grpo-cpu",
        "qwen2.5-1.5b-grpo-megatron",
        "qwen2.5-7b-grpo-megatron",
        "qwen2.5-math-1.5b-grpo-r1zero",
        "qwen2.5-0.5b-instruct-grpo-gsm8k",
    } <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_fits_its_model(name):
    run = load_config(name)
    assert run.runner.experiment_name == name
    # Every shipped model has a shape here, so its TP/PP check really ran and was not skipped.
    assert model_shape(run.model) is not None
    check_model_layout(run)
    # Data that ships with the repository must be there; other paths are the user's to provide.
    if not any(Path(f).is_absolute() for f in run.data.train_files + run.data.val_files):
        run.data.check_files_exist(base=REPO_ROOT)


@pytest.mark.parametrize("name", ["smollm2-135m-grpo-cpu", "smollm2-135m-grpo-gsm-cpu"])
def test_cpu_experiments_run_offline_on_shipped_files(name):
    run = load_config(name)
    assert (run.cluster.device, run.cluster.total_devices, run.cluster.ray_address) == ("cpu", 1, "local")
    assert run.model.path == "smollm2-135m-instruct" and run.rollout.engine == "sglang"
    assert all(f.startswith("examples/reasoning/data/") for f in run.data.train_files + run.data.val_files)


@pytest.mark.parametrize("name", ["qwen2.5-1.5b-grpo-megatron", "qwen2.5-7b-grpo-megatron"])
def test_rlinf_recipes_launch_on_a_gpu_cluster(name):
    # RLinf's own numbers, and each departure from them, are checked in tests/test_recipe_fidelity.py.
    run = load_config(name)
    assert "DeepSeek-R1-Distill-Qwen" in run.model.path
    assert run.data.prompt_template is None, "Boba prompts are already in the model's chat format"
    assert (run.cluster.device, run.cluster.ray_address, run.cluster.devices_per_node) == ("cuda", "auto", 8)
    assert run.rollout.engine == "sglang" and run.actor.transformer_impl == "auto"


def test_seed_recipes_use_their_prompt_formats():
    r1zero = load_config("qwen2.5-math-1.5b-grpo-r1zero").data
    assert (r1zero.prompt_key, r1zero.answer_key, r1zero.apply_chat_template, r1zero.prompt_template) == (
        "problem", "answer", False, "r1_zero")
    gsm8k = load_config("qwen2.5-0.5b-instruct-grpo-gsm8k").data
    assert (gsm8k.prompt_key, gsm8k.answer_key, gsm8k.apply_chat_template, gsm8k.prompt_template) == (
        "question", "answer", True, "boxed")


# ---------------------------------------------------------------- overrides and groups


def test_groups_and_values_are_overridden_from_the_command_line():
    run = load_config("qwen2.5-1.5b-grpo-megatron", ["cluster=gpu_4x8", "rollout.n_samples=8", "model.path=/x/y"])
    assert (run.cluster.num_nodes, run.rollout.n_samples, run.model.path) == (4, 8, "/x/y")
    run = load_config("smollm2-135m-grpo-cpu", ["data=gsm_style"])
    assert run.data.train_files == ["examples/reasoning/data/gsm_train.jsonl"]


def test_an_unknown_group_option_names_the_group():
    with pytest.raises(ConfigError, match=r"data/nope"):
        load_config("smollm2-135m-grpo-cpu", ["data=nope"])


def test_an_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"^actor\.bogus: "):
        load_config("smollm2-135m-grpo-cpu", ["actor.bogus=1"])


def test_an_unknown_key_in_a_group_file_names_the_key(tmp_path):
    # Group files are checked against the schema like the experiment itself.
    shutil.copytree(REPO_ROOT / "configs", tmp_path / "configs")
    with (tmp_path / "configs" / "actor" / "cpu.yaml").open("a") as group:
        group.write("lrr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"^actor\.lrr: "):
        load_config("smollm2-135m-grpo-cpu", config_dir=tmp_path / "configs")


# ---------------------------------------------------------------- bad layouts fail at start


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        # 28 heads: TP 3 fits 24 GPUs but not the model.
        ("qwen2.5-7b-grpo-megatron", ["actor.tp=3", "cluster.num_nodes=3"],
         r"^actor\.tp: 3 must divide the model's 28 attention heads"),
        # ... and on the recipe's 32 GPUs it does not even fit the devices.
        ("qwen2.5-7b-grpo-megatron", ["actor.tp=3"], r"^actor\.tp: .*must divide the actor's 32 devices"),
        # 28 layers over 5 stages (TP 4 x PP 5 on 40 GPUs).
        ("qwen2.5-7b-grpo-megatron", ["actor.pp=5", "cluster.num_nodes=5"],
         r"^actor\.pp: 5 must divide the model's 28 layers"),
        # Rollout TP 3 on 24 GPUs, with a batch that splits over the 6 x 3 actor ranks and minibatches.
        ("qwen2.5-7b-grpo-megatron",
         ["rollout.tp=3", "cluster.num_nodes=3", "actor.n_minibatches=3", "runner.prompts_per_step=576"],
         r"^rollout\.tp: 3 must divide the model's 28 attention heads"),
        # 12 heads split by 3, but 2 KV heads can be neither split nor replicated over 3 ranks.
        ("qwen2.5-1.5b-grpo-megatron", ["actor.tp=3", "cluster.num_nodes=3"],
         r"^actor\.tp: 3 and the model's 2 KV heads must divide one another"),
        # SmolLM2: 9 heads and 3 KV heads allow TP 9, its MLP width 1536 does not.
        ("smollm2-135m-grpo-cpu", ["actor.tp=9", "cluster.devices_per_node=9"],
         r"^actor\.tp: 9 must divide the model's MLP width 1536"),
        ("smollm2-135m-grpo-cpu", ["rollout.tp=2", "cluster.devices_per_node=2"],
         r"^rollout\.tp: 2 must divide the model's 9 attention heads"),
    ],
)
def test_a_layout_the_model_cannot_take_names_the_field(name, overrides, message):
    assert re.search(message, _fails_at_start(name, overrides))


def test_tp_above_the_kv_heads_replicates_them():
    # 2 KV heads, TP 4: megatron and SGLang replicate each KV head on two ranks.
    check_model_layout(load_config("qwen2.5-1.5b-grpo-megatron", ["actor.tp=4", "rollout.tp=4"]))


@pytest.mark.parametrize(
    "name, overrides, field",
    [
        ("qwen2.5-1.5b-grpo-megatron", ["runner.prompts_per_step=3"], "runner.prompts_per_step"),
        ("smollm2-135m-grpo-cpu", ["runner.prompts_per_step=3", "actor.n_minibatches=5"], "runner.prompts_per_step"),
        ("smollm2-135m-grpo-cpu", ["cluster.rollout_devices=1"], "cluster.rollout_devices"),
        ("qwen2.5-1.5b-grpo-megatron", ["cluster.placement=disaggregated"], "cluster.rollout_devices"),
        ("qwen2.5-1.5b-grpo-megatron", ["cluster.placement=disaggregated", "cluster.rollout_devices=16"],
         "cluster.rollout_devices"),
        ("qwen2.5-7b-grpo-megatron", ["rollout.tp=16"], "rollout.tp"),
    ],
)
def test_a_batch_or_device_layout_that_does_not_divide_names_the_field(name, overrides, field):
    assert _fails_at_start(name, overrides).startswith(field + ":")


def test_a_disaggregated_layout_that_divides_is_accepted():
    run = load_config("qwen2.5-1.5b-grpo-megatron", ["cluster.placement=disaggregated", "cluster.rollout_devices=8"])
    check_model_layout(run)
    assert (run.cluster.actor_devices, run.cluster.engine_devices) == (8, 8)


def test_a_missing_data_file_names_the_field():
    run = load_config("smollm2-135m-grpo-cpu", ["data.train_files=[nope.jsonl]"])
    with pytest.raises(ConfigError, match=r"^data\.train_files\[0\]: no such file: .*nope\.jsonl"):
        run.data.check_files_exist(base=REPO_ROOT)


# ---------------------------------------------------------------- the command line


def _rlsys(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlsys", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT)


@pytest.mark.parametrize("overrides, field", [(["actor.tp=2"], "actor.tp"), (["actor.bogus=1"], "actor.bogus")])
def test_the_command_line_reports_a_bad_config_and_exits_2(overrides, field):
    # `rlsys eval` composes the same config with the same overrides as `rlsys train`.
    result = _rlsys("eval", "smollm2-135m-grpo-cpu", *overrides)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "config error" in result.stderr and field in result.stderr


def test_train_reports_a_layout_the_model_cannot_take_before_starting():
    # The devices allow TP 9; only the model's shape rules it out, before Ray or any worker starts.
    result = _rlsys("train", "smollm2-135m-grpo-cpu", "actor.tp=9", "cluster.devices_per_node=9")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "actor.tp: 9 must divide the model's MLP width 1536" in result.stderr


# ---------------------------------------------------------------- model shapes


def test_the_offline_model_shape_is_its_config():
    from transformers import AutoConfig

    from rlsys.models.offline import resolve_model_path

    shape = model_shape(ModelConfig(path="smollm2-135m-instruct"))
    config = AutoConfig.from_pretrained(resolve_model_path("smollm2-135m-instruct"), local_files_only=True)
    assert (shape.num_layers, shape.num_attention_heads, shape.num_key_value_heads) == (
        config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    assert (shape.hidden_size, shape.intermediate_size, shape.vocab_size) == (
        config.hidden_size, config.intermediate_size, config.vocab_size)


PUBLISHED_PARAMETERS = {
    # Parameter counts of the safetensors checkpoints on the hub (each model card's "Model size").
    "Qwen2.5-0.5B": 494_032_768,
    "Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen2.5-1.5B": 1_543_714_304,
    "Qwen2.5-1.5B-Instruct": 1_543_714_304,
    "Qwen2.5-Math-1.5B": 1_543_714_304,
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen2.5-7B-Instruct": 7_615_616_512,
    "DeepSeek-R1-Distill-Qwen-1.5B": 1_777_088_000,
    "DeepSeek-R1-Distill-Qwen-7B": 7_615_616_512,
}


@pytest.mark.parametrize("name", known_model_names())
def test_known_shapes_give_the_published_parameter_count(name):
    # A mistyped width, layer or head count changes the count; the Qwen2 layout is q/k/v with
    # biases, o, gate/up/down, two norms per layer, a final norm, and an untied head when untied.
    fields = json.loads((REPO_ROOT / "rlsys" / "models" / "known_models" / f"{name}.json").read_text())
    shape = known_shape(name)
    hidden, head_dim = shape.hidden_size, shape.hidden_size // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim
    attention = hidden * hidden + hidden + 2 * (hidden * kv + kv) + hidden * hidden
    layer = attention + 3 * hidden * shape.intermediate_size + 2 * hidden
    embeddings = shape.vocab_size * hidden * (1 if fields["tie_word_embeddings"] else 2)
    assert embeddings + shape.num_layers * layer + hidden == PUBLISHED_PARAMETERS[name]


def test_known_shapes_match_the_path_basename_ignoring_case():
    for path in ["/models/deepseek-r1-distill-qwen-7b", "Qwen/Qwen2.5-7B-Instruct", "~/ckpt/QWEN2.5-7B"]:
        shape = model_shape(ModelConfig(path=path))
        assert (shape.num_layers, shape.num_attention_heads, shape.num_key_value_heads) == (28, 28, 4), path


def test_a_local_directory_wins_over_a_known_name(tmp_path):
    # A directory named like a known model, holding another model: its own config.json counts.
    directory = tmp_path / "Qwen2.5-7B-Instruct"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
        "hidden_size": 192, "intermediate_size": 512, "vocab_size": 1000}))
    shape = model_shape(ModelConfig(path=str(directory)))
    assert (shape.num_layers, shape.num_attention_heads, shape.source) == (6, 6, str(directory / "config.json"))
    overrides = [f"model.path={directory}", "actor.pp=4", "cluster.devices_per_node=4"]
    message = _fails_at_start("smollm2-135m-grpo-cpu", overrides)
    assert message.startswith("actor.pp: 4 must divide the model's 6 layers")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"^model\.path: .* is a directory without config\.json"),
        ("{not json", r"^model\.path: cannot read .*config\.json"),
        ('{"num_hidden_layers": 2}', r"^model\.path: .*config\.json: num_attention_heads must be a positive integer"),
        ('{"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 8, "intermediate_size": 8, '
         '"vocab_size": "many"}', r"^model\.path: .*vocab_size must be a positive integer, got 'many'"),
    ],
)
def test_a_bad_model_directory_names_model_path(tmp_path, content, message):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        model_shape(ModelConfig(path=str(tmp_path)))


def test_missing_kv_heads_means_one_per_attention_head(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 8, "intermediate_size": 8,
        "vocab_size": 10}))
    assert model_shape(ModelConfig(path=str(tmp_path))).num_key_value_heads == 4


def test_an_unknown_model_is_not_checked_and_says_so(caplog):
    run = load_config("smollm2-135m-grpo-cpu", ["model.path=/models/Some-Other-Model"])
    assert model_shape(run.model) is None
    with caplog.at_level(logging.WARNING, logger="rlsys.models.shapes"):
        check_model_layout(run)
    assert "/models/Some-Other-Model" in caplog.text and "not checked" in caplog.text


def test_a_tokenizer_only_builtin_has_no_shape():
    assert model_shape(ModelConfig(path="qwen2.5-tokenizer")) is None
