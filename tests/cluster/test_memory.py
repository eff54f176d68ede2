"""Risks of the per-GPU memory estimate (``rlsys.cluster.memory``) behind ``rlsys plan``.

- A parameter count is wrong (a missed bias, tied embeddings counted twice, a TP split that is
  not megatron's): checked against the published sizes of Qwen2.5-1.5B and -7B (total and
  non-embedding, within 1%), against HF's own count of tiny models, and against the shards the
  weight mapping (the one megatron loads) cuts for every TP / PP rank.
- A component is mis-sized or sits in the wrong phase: every component of a small made-up model
  is compared with bytes computed by hand here (weights, fp32 grad buffer, DP-sharded fp32 Adam
  and main weights, activations under each recompute setting and PP, logits, the engine pool
  and runtime), colocated with and without offload, and disaggregated.
- SGLang's default memory fraction drifts from its heuristic: hand-computed for three GPU tiers.
- The shipped GPU recipes are misjudged: both fit at 80 GiB with finite positive components,
  and the 7B without offload on a 24 GiB GPU does not fit, with a warning naming each phase.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from rlsys.cluster import memory
from rlsys.cluster.memory import (
    GIB,
    MIB,
    actor_parameters_per_gpu,
    estimate_memory,
    model_dims,
    parameter_count,
    sglang_default_mem_fraction_static,
)
from rlsys.config import (
    ActorConfig,
    AlgorithmConfig,
    ClusterConfig,
    ModelConfig,
    RolloutConfig,
    RunConfig,
    load_config,
)
from rlsys.models.shapes import ModelShape, known_shape, model_shape

# A made-up model: h=64, 4 heads of 16, 2 KV heads, MLP 96, 4 layers, vocabulary 1000 (padded
# to 1024 for TP 2). Its source names no file: untied embeddings, no q/k/v bias.
SHAPE = ModelShape(
    num_layers=4, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=96,
    vocab_size=1000, source="made up for the test",
)
TOKENS = 512


def make_run(*, actor: dict | None = None, cluster: dict | None = None, rollout: dict | None = None,
             entropy_coef: float = 0.0) -> RunConfig:
    actor_settings = dict(tp=2, pp=1, sequence_parallel=True, precision="bf16", max_tokens_per_microbatch=TOKENS,
                          use_distributed_optimizer=True, offload=False)
    cluster_settings = dict(placement="colocated", device="cuda", num_nodes=1, devices_per_node=4, gpu_memory_gib=80.0)
    rollout_settings = dict(tp=1, mem_fraction_static=0.5, max_running_requests=64, cuda_graph_max_bs=128)
    return RunConfig(
        model=ModelConfig(path="made-up"),
        actor=ActorConfig(**{**actor_settings, **(actor or {})}),
        cluster=ClusterConfig(**{**cluster_settings, **(cluster or {})}),
        rollout=RolloutConfig(**{**rollout_settings, **(rollout or {})}),
        algorithm=AlgorithmConfig(entropy_coef=entropy_coef),
    )


# Hand counts for SHAPE on one actor rank at TP 2 (see make_run).
# Per layer: 2 norms 2*64 = 128; qkv rows (4 + 2*2) heads * 16 / 2 = 64, so 64*64 = 4096; o: 32 rows
# of q width * 64 = 2048; MLP 3 * 64 * 96/2 = 9216. Sum 15488, times 4 layers = 61952.
# Embedding and output layer 2 * (1024/2 rows * 64) = 65536, final norm 64.
ACTOR_PARAMS_TP2 = 61952 + 65536 + 64
# One layer's kept activations per token at TP 2 with SP: 4 h-wide tensors / 2 = 128, Q and O 2 * 32,
# K and V 2 * 16, MLP 4 * 96/2 = 192: 416 elements, 2 bytes, 512 tokens.
LAYER_BYTES = 416 * 2 * TOKENS
LAYER_INPUT_BYTES = 64 // 2 * 2 * TOKENS
# The logit shard 512 tokens x 1024/2 columns in fp32, 4 copies.
LOGIT_BYTES = TOKENS * 512 * 4 * 4
# Engine at TP 1: per layer 128 + qkv 64 * (64 + 2*32) = 8192 + o 4096 + MLP 3*64*96 = 18432 = 30848;
# times 4 = 123392, plus 2 * 1000 * 64 (unpadded vocabulary) and the final norm 64; bf16.
ENGINE_WEIGHT_BYTES = (123392 + 128000 + 64) * 2
# SGLang runtime at 80 GiB: chunk 8192 x (2*64 + 3*96) x 2 bytes; 64 sampling rows x 1000 x 4 bytes x 2;
# CUDA graphs 2 MiB x 64 decode slots (cuda_graph_max_bs 128 capped at the 64 running requests)
# + 8 MiB x 58 prefill sizes up to 8192 (8+14+8+8+12+8).
ENGINE_RUNTIME_BYTES = 8192 * 416 * 2 + 64 * 1000 * 8 + (128 + 464) * MIB


def gib(nbytes: float) -> float:
    return nbytes / GIB


def test_published_qwen25_parameter_counts():
    # Model cards: Qwen2.5-1.5B 1.54B (1.31B non-embedding, tied); Qwen2.5-7B 7.61B (6.53B, untied).
    for name, total, non_embedding, tied in (("Qwen2.5-1.5B", 1.54e9, 1.31e9, True),
                                             ("Qwen2.5-7B", 7.61e9, 6.53e9, False)):
        dims = model_dims(known_shape(name))
        assert dims.tied_embeddings is tied and dims.qkv_bias
        count = parameter_count(dims)
        assert count == pytest.approx(total, rel=0.01), name
        embedding = (1 if tied else 2) * dims.vocab_size * dims.hidden_size
        assert count - embedding == pytest.approx(non_embedding, rel=0.01), name


@pytest.mark.parametrize("settings", ["qwen2_tied", "qwen2_untied", "llama_tied"])
def test_parameter_count_equals_hf_and_the_megatron_shards(settings, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlsys.models.weight_mapping import hf_to_megatron_shard
    from tests.tiny_configs import HF_CONFIGS, make_hf_config

    config = make_hf_config(HF_CONFIGS[settings])
    model = AutoModelForCausalLM.from_config(config)
    config.save_pretrained(tmp_path)
    dims = model_dims(model_shape(ModelConfig(path=str(tmp_path))))
    # parameters() yields a tied weight once.
    assert parameter_count(dims) == sum(p.numel() for p in model.parameters())
    state = model.state_dict()
    for tp in (1, 2, 4):  # 4 exceeds the KV heads of every tiny config
        for pp in (1, 2):
            per_rank = [
                sum(t.numel() for t in hf_to_megatron_shard(state, config, tp_rank, tp, pp_rank, pp).values())
                for tp_rank in range(tp) for pp_rank in range(pp)
            ]
            assert actor_parameters_per_gpu(dims, tp, pp) == max(per_rank), (tp, pp)


def test_colocated_components_by_hand():
    est = estimate_memory(make_run(), SHAPE)
    training = est.phases["training"]
    assert training["actor_weights"] == pytest.approx(gib(ACTOR_PARAMS_TP2 * 2))
    assert training["actor_gradients"] == pytest.approx(gib(ACTOR_PARAMS_TP2 * 4))  # grad_reduce_in_fp32
    # m, v and fp32 main weights, sharded over DP = 4 devices / TP 2.
    assert training["actor_optimizer"] == pytest.approx(gib(ACTOR_PARAMS_TP2 * 12 / 2))
    assert training["activations"] == pytest.approx(gib(4 * LAYER_BYTES + LAYER_BYTES))  # 4 layers + working set
    assert training["logits"] == pytest.approx(gib(LOGIT_BYTES))
    assert training["engine_released"] == memory.ENGINE_RELEASED_GIB
    assert training["cuda_context"] == 2 * memory.CUDA_CONTEXT_GIB

    rollout = est.phases["rollout"]
    assert rollout["engine_weights"] == pytest.approx(gib(ENGINE_WEIGHT_BYTES))
    assert rollout["engine_weights"] + rollout["engine_kv_cache"] == pytest.approx(0.5 * 80)
    assert rollout["engine_runtime"] == pytest.approx(gib(ENGINE_RUNTIME_BYTES))
    for name in ("actor_weights", "actor_gradients", "actor_optimizer"):
        assert rollout[name] == training[name] > 0  # resident without offload
    assert "activations" not in rollout and "engine_kv_cache" not in training
    assert est.fits and not est.warnings
    assert est.to_json() == {"memory_per_gpu_gib": est.phases, "gpu_memory_gib": 80.0, "fits": True}
    assert est.total("training") == pytest.approx(sum(training.values()))


def test_offload_frees_the_actor_during_rollout_only():
    plain = estimate_memory(make_run(), SHAPE)
    offloaded = estimate_memory(make_run(actor=dict(offload=True)), SHAPE)
    for name in ("actor_weights", "actor_gradients", "actor_optimizer"):
        assert offloaded.phases["rollout"][name] == 0.0
    assert offloaded.phases["training"] == plain.phases["training"]
    assert offloaded.total("rollout") == pytest.approx(plain.total("rollout") - gib(ACTOR_PARAMS_TP2 * (2 + 4 + 6)))


def test_disaggregated_gpus_hold_one_side_each():
    run = make_run(cluster=dict(placement="disaggregated", rollout_devices=2))
    est = estimate_memory(run, SHAPE)
    assert set(est.phases["rollout"]) == {"engine_weights", "engine_kv_cache", "engine_runtime", "cuda_context"}
    assert set(est.phases["training"]) == {"actor_weights", "actor_gradients", "actor_optimizer", "activations",
                                           "logits", "cuda_context"}
    assert est.phases["rollout"]["cuda_context"] == est.phases["training"]["cuda_context"] == memory.CUDA_CONTEXT_GIB
    # The actor has 2 devices at TP 2: DP 1, nothing to shard the optimizer over.
    assert est.phases["training"]["actor_optimizer"] == pytest.approx(gib(ACTOR_PARAMS_TP2 * 12))


@pytest.mark.parametrize(
    ("actor", "expected"),
    [
        # Full, block, first 2 of 4 layers: 2 inputs kept, 2 layers in full, one layer rebuilt in backward.
        (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
         2 * LAYER_INPUT_BYTES + 2 * LAYER_BYTES + LAYER_BYTES),
        # Full, uniform, chunks of 2: one input per chunk, a whole chunk rebuilt.
        (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
         2 * LAYER_INPUT_BYTES + 2 * LAYER_BYTES),
        # Block over more layers than the stage has: every layer recomputed.
        (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=20),
         4 * LAYER_INPUT_BYTES + LAYER_BYTES),
        # Selective recomputes fused core attention, which keeps nothing extra: as no recompute.
        (dict(recompute_granularity="selective"), 5 * LAYER_BYTES),
        # Without sequence parallel the 4 h-wide tensors are whole on each rank: 416 - 128 + 256.
        (dict(sequence_parallel=False), 5 * 544 * 2 * TOKENS),
        # fp32: 4 bytes per element.
        (dict(precision="fp32"), 5 * 416 * 4 * TOKENS),
    ],
)
def test_activations_by_hand(actor, expected):
    activations = estimate_memory(make_run(actor=actor), SHAPE).phases["training"]["activations"]
    assert activations == pytest.approx(gib(expected))


def test_pipeline_stage_holds_pp_microbatches():
    # TP 2 x PP 2 on 4 devices: 2 layers per stage, 2 microbatches in flight on the first stage.
    est = estimate_memory(make_run(actor=dict(pp=2)), SHAPE)
    assert est.phases["training"]["activations"] == pytest.approx(gib(2 * 2 * LAYER_BYTES + LAYER_BYTES))
    # The largest stage: 2 layers, one vocabulary matrix, the final norm; DP 1.
    params = 2 * 15488 + 32768 + 64
    assert est.phases["training"]["actor_weights"] == pytest.approx(gib(params * 2))
    assert est.phases["training"]["actor_optimizer"] == pytest.approx(gib(params * 12))


def test_auto_precision_is_the_devices():
    auto = SimpleNamespace(actor=SimpleNamespace(precision="auto"), cluster=SimpleNamespace(device="cpu"))
    assert memory._precision(auto) == "fp32"
    auto.cluster.device = "cuda"
    assert memory._precision(auto) == "bf16"


def test_entropy_gradient_keeps_a_fifth_logit_copy():
    est = estimate_memory(make_run(entropy_coef=0.01), SHAPE)
    assert est.phases["training"]["logits"] == pytest.approx(gib(LOGIT_BYTES / 4 * 5))


def test_sglang_default_mem_fraction_static():
    # SGLang 0.5.21 memory_hook: reserved MiB = 512 + 1.5 * chunk + tp/8 * 1024 + 2 * decode max_bs
    # + 8 * prefill graph sizes; fraction = (M - reserved) / M, 3 decimals.
    # 80 GiB, TP 1, max_bs 128 (rlsys's recipes): chunk 8192, 58 sizes.
    reserved = 512 + 12288 + 128 + 256 + 464
    assert sglang_default_mem_fraction_static(80, 1, 128) == round((81920 - reserved) / 81920, 3)
    # 40 GiB, TP 1: chunk 4096, max_bs 32, 50 sizes up to 4096.
    assert sglang_default_mem_fraction_static(40, 1) == round((40960 - (512 + 6144 + 128 + 64 + 400)) / 40960, 3)
    # 16 GiB: chunk 2048 (activation tokens at least 2048), max_bs 8, 42 sizes up to 2048.
    assert sglang_default_mem_fraction_static(16, 1) == round((16384 - (512 + 3072 + 128 + 16 + 336)) / 16384, 3)
    est = estimate_memory(make_run(rollout=dict(mem_fraction_static=None)), SHAPE)
    rollout = est.phases["rollout"]
    # In a run the decode graphs stop at the 64 running requests: 2 MiB x 64.
    fraction = round((81920 - (512 + 12288 + 128 + 128 + 464)) / 81920, 3)
    assert rollout["engine_weights"] + rollout["engine_kv_cache"] == pytest.approx(fraction * 80)
    assert est.details["mem_fraction_static"] == fraction == 0.835


@pytest.mark.parametrize("name", ["qwen2.5-7b-grpo-megatron", "qwen2.5-1.5b-grpo-megatron"])
def test_shipped_recipes_fit_at_80_gib(name):
    est = estimate_memory(load_config(name))
    assert est.gpu_memory_gib == 80.0
    for phase in ("rollout", "training"):
        components = est.phases[phase]
        assert all(math.isfinite(v) and v >= 0 for v in components.values()), components
        assert est.total(phase) <= 80.0
    # Offloaded during rollout: everything else is positive.
    engine_side = {k: v for k, v in est.phases["rollout"].items() if not k.startswith("actor_")}
    positive = {**est.phases["training"], **engine_side}
    assert all(v > 0 for v in positive.values()), positive
    assert est.fits and not est.warnings


def test_7b_without_offload_does_not_fit_24_gib():
    run = load_config("qwen2.5-7b-grpo-megatron", ["cluster.gpu_memory_gib=24", "actor.offload=false"])
    est = estimate_memory(run)
    assert not est.fits and est.to_json()["fits"] is False
    for phase in ("rollout", "training"):
        assert est.total(phase) > 24
        over = est.total(phase) - 24
        assert any(w.startswith(f"{phase}:") and f"{over:.1f} GiB more" in w for w in est.warnings), est.warnings


def test_engine_weights_larger_than_the_pool_do_not_fit():
    est = estimate_memory(load_config("qwen2.5-7b-grpo-megatron", ["rollout.mem_fraction_static=0.05"]))
    assert not est.fits
    assert any("exceed its static pool" in w for w in est.warnings)
    assert est.phases["rollout"]["engine_kv_cache"] == 0.0
