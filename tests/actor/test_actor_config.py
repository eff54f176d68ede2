"""Risk: a bad actor or algorithm setting fails late inside a worker, or with a message that hides the field.

Each bad value must raise ``ConfigError`` naming ``section.field`` when the config is composed,
through the same Hydra path the CLI uses; the shipped defaults must compose and validate.
"""

from __future__ import annotations

import pytest

from rlsys.config import ActorConfig, AlgorithmConfig, ConfigError, load_config


def test_defaults_compose_with_the_sections() -> None:
    overrides = ["actor.tp=2", "cluster.devices_per_node=2", "algorithm.dual_clip_c=3", "actor.lr_schedule=warmup", "actor.lr_warmup_steps=10"]
    run = load_config("smollm2-135m-grpo-cpu", overrides)
    assert isinstance(run.actor, ActorConfig) and isinstance(run.algorithm, AlgorithmConfig)
    assert (run.actor.tp, run.algorithm.dual_clip_c, run.actor.lr_warmup_steps) == (2, 3.0, 10)
    assert run.runner.output_dir == "outputs/smollm2-135m-grpo-cpu"
    assert run.algorithm.early_stop_imp_ratio == 5.0 and run.actor.use_distributed_optimizer


@pytest.mark.parametrize(
    "override, field",
    [
        ("actor.tp=0", "actor.tp"),
        ("actor.transformer_impl=apex", "actor.transformer_impl"),
        ("actor.precision=float16", "actor.precision"),
        ("actor.loss_scale=1024", "actor.loss_scale"),
        ("actor.min_loss_scale=0", "actor.min_loss_scale"),
        ("actor.initial_loss_scale=0.5", "actor.initial_loss_scale"),
        ("actor.loss_scale_window=0", "actor.loss_scale_window"),
        ("actor.hysteresis=0", "actor.hysteresis"),
        ("actor.recompute_granularity=layer", "actor.recompute_granularity"),
        ("actor.recompute_granularity=full", "actor.recompute_method"),
        ("actor.recompute_num_layers=2", "actor.recompute_num_layers"),
        ("actor.sequence_parallel=true", "actor.sequence_parallel"),
        ("actor.lr_schedule=linear", "actor.lr_schedule"),
        ("actor.lr_schedule=cosine", "actor.lr_decay_steps"),
        ("actor.lr_schedule=cosine actor.lr_warmup_steps=3 actor.lr_decay_steps=3", "actor.lr_decay_steps"),
        ("actor.lr_schedule=warmup", "actor.lr_warmup_steps"),
        ("actor.min_lr=1.0", "actor.min_lr"),
        ("actor.adam_beta2=1.0", "actor.adam_beta2"),
        ("actor.clip_grad=-1", "actor.clip_grad"),
        ("actor.max_tokens_per_microbatch=0", "actor.max_tokens_per_microbatch"),
        ("actor.max_consecutive_nonfinite=0", "actor.max_consecutive_nonfinite"),
        ("algorithm.loss_type=ppo", "algorithm.loss_type"),
        ("algorithm.agg_mode=sum", "algorithm.agg_mode"),
        ("algorithm.clip_low=1.0", "algorithm.clip_low"),
        ("algorithm.dual_clip_c=0.5", "algorithm.dual_clip_c"),
        ("algorithm.kl_coef=-0.1", "algorithm.kl_coef"),
        ("algorithm.early_stop_imp_ratio=1.0", "algorithm.early_stop_imp_ratio"),
        ("algorithm.early_stop_granularity=token", "algorithm.early_stop_granularity"),
    ],
)
def test_bad_value_names_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("smollm2-135m-grpo-cpu", override.split())
    assert str(info.value).startswith(field + ":"), str(info.value)


def test_early_stop_can_be_turned_off() -> None:
    run = load_config("smollm2-135m-grpo-cpu", ["algorithm.early_stop_imp_ratio=null"])
    assert run.algorithm.early_stop_imp_ratio is None


def test_fp16_loss_scale_and_recompute_compose_when_consistent() -> None:
    recompute = ["actor.recompute_granularity=full", "actor.recompute_method=block"]
    run = load_config("smollm2-135m-grpo-cpu", ["actor.precision=fp16", "actor.loss_scale=65536",
                                                *recompute, "actor.recompute_num_layers=20"])
    actor = run.actor
    assert (actor.precision, actor.loss_scale, actor.recompute_method, actor.recompute_num_layers) == (
        "fp16", 65536.0, "block", 20)
    with pytest.raises(ConfigError, match=r"^actor\.recompute_num_layers:"):
        load_config("smollm2-135m-grpo-cpu", recompute)
