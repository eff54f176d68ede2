"""Per-GPU memory of each phase of a GRPO step, from the config and the model's shape alone.

``estimate_memory(run)`` is pure arithmetic: no model is built, no device is touched, nothing is
imported from megatron, SGLang or Ray. ``rlsys plan`` renders its result. Every number is GiB
(2**30 bytes) per GPU. Checked against megatron-core 0.16.1, SGLang 0.5.21 and torch 2.13.

Phases, and where each component lives
- ``colocated``: every GPU holds one actor rank and one engine TP rank (two processes).
  ``rollout``: the engine's static pool (weights + KV cache) and its runtime memory, plus the
  actor's weights, gradients and optimizer state unless ``actor.offload`` (then 0: the actor's
  storages are freed to host memory, ``rlsys.actor.offload``). ``training``: the actor's full
  state, activations and logits; the engine has released its pool (SGLang's memory saver), and
  ``engine_released`` counts what it keeps.
- ``disaggregated``: ``rollout`` is an engine GPU (the engine only), ``training`` an actor GPU
  (the actor only; it has no rollout phase of its own and never offloads).
- Every process counts ``CUDA_CONTEXT_GIB``. Weight sync (one ``sync.bucket_mb`` bucket and the
  tensor being gathered) is not a phase here: it is small next to either phase.

Actor state (megatron, as ``rlsys.actor.build`` configures it)
- Parameters per GPU are counted exactly for the worst pipeline stage (not ``total / (tp*pp)``):
  its ``num_layers / pp`` layers with the interleaved q/k/v rows, o and the MLP split evenly over
  TP (megatron splits q/k/v rows evenly even when TP exceeds the KV heads; SGLang's engine then
  replicates one KV head per rank instead), norms replicated, plus one
  vocabulary matrix of the TP-padded vocabulary (``padded_vocab_size``) per stage, two at PP=1
  when the embeddings are not tied. The final norm is counted; the rotary cache is not (no
  parameters).
- Weights at the training precision (``actor.precision``; 'auto' is fp32 on ``cluster.device=cpu``
  and bf16 otherwise):
  4 bytes fp32, 2 bytes bf16/fp16.
- Gradients: megatron DDP's grad buffer, full size on every DP rank (the DistributedOptimizer
  reduce-scatters INTO it; it does not shrink it), in fp32 because ``rlsys.actor.build`` sets
  ``grad_reduce_in_fp32=True`` (megatron's own default is False): 4 bytes per parameter.
- Optimizer: Adam's m and v in fp32 (8 bytes), plus fp32 main weights (4 bytes) for bf16/fp16;
  fp32 training keeps no separate main weights (the DistributedOptimizer's fp32 shards are views
  of the parameter buffer). Divided by DP with ``actor.use_distributed_optimizer``. The
  optimizer's bucket padding is ignored.

Activations (``actor.max_tokens_per_microbatch`` tokens, T, of one microbatch)
- Per layer and token, counted the way Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models") count, for the layers rlsys builds instead of
  their GPT: the tensors autograd keeps, at the compute precision (p bytes). The GPU path uses
  fused (flash / SDPA) attention, which keeps Q, K, V, its output and a per-head logsumexp but
  no score matrix, so the paper's ``5as/h`` term is absent; dropout is 0 in rlsys's megatron
  config, so there are no dropout masks either. What is kept:
    attention: the norm's input (h), the QKV projection's input (h), Q after RoPE (a*d/t),
    K after RoPE and V (kv*d each, kv the KV heads per rank: kv/t, or 1 when TP exceeds the KV
    heads and megatron gathers q/k/v and re-slices; the gathered tensor V is a view of is then
    not counted), the core attention's output, which is also the output projection's input
    (a*d/t);
    MLP (SwiGLU, unfused: ``bias_activation_fusion=False``): the norm's input (h), fc1's input
    (h), fc1's output gate|up (2f/t), silu(gate) (f/t), fc2's input silu(gate)*up (f/t).
  The four h-wide tensors are replicated over TP ranks without sequence parallel and split by t
  with it (megatron then keeps the sequence shard and re-gathers in backward). For GPT with
  MHA, a 4h GeLU MLP and dropout this count is the paper's 34*s*b*h bytes; for Qwen2.5-7B it is
  ~44*s*b*h. The logsumexp (a/t fp32 values per token) and the final norm's two h-wide tensors
  are left out (<1%).
- Recompute (``recompute_granularity`` / ``recompute_method`` / ``recompute_num_layers``): 'full' keeps only a
  recomputed unit's input (T*h/t with SP, T*h without, p bytes). 'block' recomputes the first N
  layers of each stage and keeps the rest in full; 'uniform' recomputes all layers in chunks of
  N and keeps one input per chunk. 'selective' recomputes megatron's core attention, which with
  fused attention keeps nothing beyond its inputs Q, K, V: it saves nothing here and is counted
  as no recompute.
- Plus one working set: the activations of one layer (of one chunk of N layers under 'uniform'),
  which a recomputed unit rebuilds in backward and which, without recompute, stands for
  backward's transient gradient tensors. Added to the full stored set: an upper bound.
- Pipeline: megatron's 1F1B first stage holds ``pp`` microbatches in flight, each with
  ``num_layers / pp`` layers, so the stored set is multiplied by ``pp`` (not divided): the first
  stage's activations equal one microbatch through all layers, as the paper observes. The
  logits below are the last stage's; both are summed, an upper bound for PP > 1.

Logits (the last stage): the output layer runs on ``actor.logits_chunk_tokens`` scored positions
at a time (``rlsys.actor.vocab_parallel``), each chunk recomputed in backward, so one chunk lives
at once: min(chunk, T) x (padded vocabulary / t) in fp32, 4 bytes, times ``LOGIT_COPIES``
fp32 copies: the logits, and at the peak of ``rlsys.actor.vocab_parallel``'s entropy the shifted
logits, their exp and their product (4); with ``algorithm.entropy_coef != 0`` the entropy's
graph keeps two of them and the cross entropy's softmax into backward (5).

Rollout engine
- SGLang's static pool (weights + KV cache) is ``rollout.mem_fraction_static`` of the GPU. None
  takes SGLang 0.5.21's default (``arg_groups/memory_hook.handle_gpu_memory_settings``):
  ``(M - reserved) / M`` with M the GPU's MiB and ``reserved = 512 + 1.5 * max(chunked_prefill,
  2048) + tp/8 * 1024 + 2 * decode_graph_max_bs + 8 * prefill_graph_sizes`` MiB, floored at 10240
  MiB above 60 GiB; the chunked-prefill size and decode graph batch by SGLang's GPU-memory tier
  (``min(rollout.cuda_graph_max_bs, rollout.max_running_requests)`` when set, as
  ``rlsys.cluster.workers`` passes it); prefill CUDA graphs are assumed on. SGLang's VLM,
  aiter and post-capture-sizing adjustments do not apply to these models and are left out.
- The fraction is of the GPU's total memory. SGLang 0.5.21 actually takes it of the memory free
  when the engine starts (``kv_cache_configurator._profile_available_bytes``), so memory other
  processes hold then shrinks the KV cache instead of adding to the total: the estimate is the
  upper bound.
- Within the pool: ``engine_weights`` (parameters / ``rollout.tp``, unpadded vocabulary, at
  ``rollout.dtype``; 'auto' is bf16, the models' own dtype) and ``engine_kv_cache`` (the rest).
  Weights larger than the pool cannot start: a warning, and ``fits`` is False.
- ``engine_runtime`` (outside the pool): one prefill chunk's largest live set of one layer
  (``chunk * (2h + 3f/tp) * p``: residual, normed input, gate|up, activation), the sampling
  logits of ``rollout.max_running_requests`` rows over the gathered vocabulary (fp32, 2 copies),
  and SGLang's own CUDA-graph reserve (the graph terms above).
- The 'hf' engine has no pool: its weights, a KV cache of ``max_running_requests`` sequences of
  ``data.max_prompt_length + rollout.max_new_tokens`` tokens, and those sampling logits.
- Released (colocated training): ``ENGINE_RELEASED_GIB`` stays (allocations the memory saver
  does not own: NCCL and sampling buffers, the caching allocator's leftovers). A rough figure.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlsys.config import ConfigError
from rlsys.models.architecture import padded_vocab_size

if TYPE_CHECKING:
    from rlsys.config import RunConfig
    from rlsys.models.shapes import ModelShape

GIB = 2**30
MIB = 2**20

CUDA_CONTEXT_GIB = 1.0
"""Per process on a GPU: the CUDA context (~0.5 GiB), NCCL communicators, cuBLAS workspaces and
allocator fragmentation."""
ENGINE_RELEASED_GIB = 1.0
"""What a colocated SGLang engine still holds on its GPU after releasing its pool (a rough figure)."""
LOGIT_COPIES = 4
"""fp32 copies of the logit shard at the peak of log-prob + entropy (see the module doc)."""
LOGIT_COPIES_ENTROPY_GRAD = 5
"""The same with ``algorithm.entropy_coef != 0`` (the entropy keeps its graph into backward)."""

PHASES = ("rollout", "training")

_PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_ENGINE_DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}
_KNOWN_SHAPE_PREFIX = "known shape "
"""How ``rlsys.models.shapes`` names a shipped shape's source (used to read its extra fields)."""


@dataclass(frozen=True)
class ModelDims:
    """A model shape with what the memory needs beyond ``ModelShape``: tied embeddings, qkv bias, head width."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool


@dataclass
class MemoryEstimate:
    """GiB per GPU by phase and component; ``fits`` when every phase fits ``gpu_memory_gib``."""

    phases: dict[str, dict[str, float]]
    gpu_memory_gib: float
    fits: bool
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    """Derived inputs for display: parameter counts, DP size, precision, the pool fraction used."""

    def total(self, phase: str) -> float:
        return sum(self.phases[phase].values())

    def to_json(self) -> dict[str, Any]:
        return {
            "memory_per_gpu_gib": {phase: dict(components) for phase, components in self.phases.items()},
            "gpu_memory_gib": self.gpu_memory_gib,
            "fits": self.fits,
        }


def estimate_memory(run: RunConfig, shape: ModelShape | ModelDims | None = None) -> MemoryEstimate:
    """The per-GPU memory of each phase of ``run`` (see the module doc for every assumption)."""
    if shape is None:
        from rlsys.models.shapes import model_shape

        shape = model_shape(run.model)
        if shape is None:
            raise ConfigError(f"model.path: no shape known for {run.model.path!r}; the memory cannot be estimated")
    dims = model_dims(shape)
    actor, cluster = run.actor, run.cluster
    gpu = float(cluster.gpu_memory_gib)
    precision = _precision(run)
    dp = cluster.actor_devices // (actor.tp * actor.pp)

    state = _actor_state_gib(dims, run, precision, dp)
    engine, fraction, engine_warnings = _engine_gib(dims, run)
    training_extra = {
        "activations": activation_bytes(dims, run, precision) / GIB,
        "logits": logit_bytes(dims, run) / GIB,
    }
    if cluster.placement == "colocated":
        resident = {k: (0.0 if actor.offload else v) for k, v in state.items()}
        phases = {
            "rollout": {**engine, **resident, "cuda_context": 2 * CUDA_CONTEXT_GIB},
            "training": {**state, **training_extra, "engine_released": ENGINE_RELEASED_GIB,
                         "cuda_context": 2 * CUDA_CONTEXT_GIB},
        }
    else:
        phases = {
            "rollout": {**engine, "cuda_context": CUDA_CONTEXT_GIB},
            "training": {**state, **training_extra, "cuda_context": CUDA_CONTEXT_GIB},
        }

    warnings = list(engine_warnings)
    for phase in PHASES:
        total = sum(phases[phase].values())
        if total > gpu:
            largest = sorted(phases[phase].items(), key=lambda item: -item[1])[:3]
            warnings.append(
                f"{phase}: needs {total:.1f} GiB per GPU, {total - gpu:.1f} GiB more than the {gpu:g} GiB GPU "
                f"(largest: {', '.join(f'{name} {value:.1f}' for name, value in largest)})"
            )
    details = {
        "parameters": parameter_count(dims),
        "actor_parameters_per_gpu": actor_parameters_per_gpu(dims, actor.tp, actor.pp),
        "engine_parameters_per_gpu": engine_parameters_per_gpu(dims, _engine_tp(run)),
        "data_parallel": dp,
        "precision": precision,
        "mem_fraction_static": fraction,
    }
    return MemoryEstimate(phases=phases, gpu_memory_gib=gpu, fits=not warnings, warnings=warnings, details=details)


# --- the model -------------------------------------------------------------------------------


def model_dims(shape: ModelShape | ModelDims) -> ModelDims:
    """``shape`` with tied embeddings, qkv bias and head width, read from the config it came from.

    Attributes on ``shape`` win; otherwise ``shape.source`` (a config.json path or a shipped known
    shape) is read for ``tie_word_embeddings``, ``model_type`` (qwen2 has a q/k/v bias) and
    ``head_dim``. Unreadable: untied (the larger count), no bias, ``hidden / heads``.
    """
    if isinstance(shape, ModelDims):
        return shape
    fields = _source_fields(getattr(shape, "source", ""))
    tied = getattr(shape, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(shape, "tied_embeddings", None)
    if tied is None:
        tied = bool(fields.get("tie_word_embeddings", False))
    qkv_bias = getattr(shape, "qkv_bias", None)
    if qkv_bias is None:
        qkv_bias = fields.get("model_type") == "qwen2"
    head_dim = getattr(shape, "head_dim", None) or fields.get("head_dim")
    head_dim = head_dim or shape.hidden_size // shape.num_attention_heads
    return ModelDims(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=int(head_dim),
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        tied_embeddings=bool(tied),
        qkv_bias=bool(qkv_bias),
    )


def parameter_count(dims: ModelDims) -> int:
    """Parameters of the whole HF model (unpadded vocabulary; tied embeddings counted once)."""
    matrices = 1 if dims.tied_embeddings else 2
    embeddings = matrices * dims.vocab_size * dims.hidden_size
    return dims.num_layers * _layer_parameters(dims, 1) + embeddings + dims.hidden_size


def actor_parameters_per_gpu(dims: ModelDims, tp: int, pp: int) -> int:
    """Parameters of the actor's largest pipeline stage on one TP rank (megatron's padded vocabulary)."""
    rows = padded_vocab_size(dims.vocab_size, tp) // tp
    matrices = (1 if dims.tied_embeddings else 2) if pp == 1 else 1
    layers = dims.num_layers // pp
    return layers * _layer_parameters(dims, tp) + matrices * rows * dims.hidden_size + dims.hidden_size


def engine_parameters_per_gpu(dims: ModelDims, tp: int) -> int:
    """Parameters of one rollout engine TP rank (unpadded vocabulary)."""
    rows = _ceil_div(dims.vocab_size, tp)
    matrices = 1 if dims.tied_embeddings else 2
    layers = dims.num_layers * _layer_parameters(dims, tp, kv_replicated=True)
    return layers + matrices * rows * dims.hidden_size + dims.hidden_size


def _layer_parameters(dims: ModelDims, tp: int, kv_replicated: bool = False) -> int:
    h = dims.hidden_size
    q = _q_width(dims, tp)
    if kv_replicated:
        qkv_rows = q + 2 * _kv_width(dims, tp)
    else:
        # megatron splits the interleaved [q.. k v] rows evenly, also when TP exceeds the KV heads.
        qkv_rows = _ceil_div((dims.num_attention_heads + 2 * dims.num_key_value_heads) * dims.head_dim, tp)
    qkv = h * qkv_rows + (qkv_rows if dims.qkv_bias else 0)
    return 2 * h + qkv + q * h + 3 * h * _ceil_div(dims.intermediate_size, tp)


def _q_width(dims: ModelDims, tp: int) -> int:
    return _ceil_div(dims.num_attention_heads, tp) * dims.head_dim


def _kv_width(dims: ModelDims, tp: int) -> int:
    # KV heads split over TP, or one per rank (replicated) when TP is a multiple of them.
    return max(dims.num_key_value_heads // tp, 1) * dims.head_dim


# --- the actor -------------------------------------------------------------------------------


def _precision(run: RunConfig) -> str:
    precision = run.actor.precision
    if precision == "auto":
        precision = "fp32" if run.cluster.device == "cpu" else "bf16"
    return precision


def _actor_state_gib(dims: ModelDims, run: RunConfig, precision: str, dp: int) -> dict[str, float]:
    actor = run.actor
    params = actor_parameters_per_gpu(dims, actor.tp, actor.pp)
    optimizer_bytes = 8 + (0 if precision == "fp32" else 4)
    shards = dp if actor.use_distributed_optimizer else 1
    return {
        "actor_weights": params * _PRECISION_BYTES[precision] / GIB,
        "actor_gradients": params * 4 / GIB,
        "actor_optimizer": params * optimizer_bytes / shards / GIB,
    }


def _recompute(actor: Any) -> tuple[str | None, str, int]:
    return actor.recompute_granularity, actor.recompute_method or "uniform", actor.recompute_num_layers or 1


def layer_activation_elements(dims: ModelDims, tp: int, sequence_parallel: bool) -> int:
    """Elements autograd keeps per token for one layer on one TP rank (module doc)."""
    h = dims.hidden_size
    replicated = 4 * h
    split = 2 * _q_width(dims, tp) + 2 * _kv_width(dims, tp) + 4 * _ceil_div(dims.intermediate_size, tp)
    return (replicated // tp if sequence_parallel else replicated) + split


def activation_bytes(dims: ModelDims, run: RunConfig, precision: str | None = None) -> int:
    """Activation bytes of one training microbatch on the actor's first pipeline stage."""
    actor = run.actor
    p = _PRECISION_BYTES[precision or _precision(run)]
    tokens = actor.max_tokens_per_microbatch
    sp = actor.sequence_parallel
    layer = tokens * layer_activation_elements(dims, actor.tp, sp) * p
    unit_input = tokens * (dims.hidden_size // actor.tp if sp else dims.hidden_size) * p
    layers = dims.num_layers // actor.pp
    granularity, method, n = _recompute(actor)
    if granularity == "full":
        n = min(n, layers)
        if method == "block":
            stored, working = n * unit_input + (layers - n) * layer, layer
        else:
            stored, working = math.ceil(layers / n) * unit_input, n * layer
    else:
        stored, working = layers * layer, layer
    return stored * actor.pp + working


def logit_bytes(dims: ModelDims, run: RunConfig) -> int:
    """Bytes of the log-prob and entropy computation over one microbatch's logit shard."""
    tp = run.actor.tp
    copies = LOGIT_COPIES_ENTROPY_GRAD if run.algorithm.entropy_coef != 0 else LOGIT_COPIES
    rows = min(run.actor.logits_chunk_tokens, run.actor.max_tokens_per_microbatch)
    return rows * (padded_vocab_size(dims.vocab_size, tp) // tp) * 4 * copies


# --- the rollout engine ----------------------------------------------------------------------


def _engine_tp(run: RunConfig) -> int:
    return 1 if run.rollout.engine == "hf" else run.rollout.tp


def _engine_gib(dims: ModelDims, run: RunConfig) -> tuple[dict[str, float], float | None, list[str]]:
    rollout = run.rollout
    gpu = float(run.cluster.gpu_memory_gib)
    tp = _engine_tp(run)
    p = _ENGINE_DTYPE_BYTES[rollout.dtype]
    weights = engine_parameters_per_gpu(dims, tp) * p / GIB
    sampling_logits = rollout.max_running_requests * dims.vocab_size * 4 * 2 / GIB
    if rollout.engine == "hf":
        tokens = run.data.max_prompt_length + rollout.max_new_tokens
        kv = rollout.max_running_requests * tokens * 2 * dims.num_layers * _kv_width(dims, 1) * p / GIB
        return {"engine_weights": weights, "engine_kv_cache": kv, "engine_runtime": sampling_logits}, None, []
    # As rlsys.cluster.workers.sglang_engine_args passes it: no larger than the running requests.
    graph_bs = min(rollout.cuda_graph_max_bs, rollout.max_running_requests) if rollout.cuda_graph_max_bs else None
    fraction = rollout.mem_fraction_static
    if fraction is None:
        fraction = sglang_default_mem_fraction_static(gpu, tp, graph_bs)
    pool = fraction * gpu
    chunk, max_bs = _sglang_tier(gpu, tp)
    prefill = chunk * (2 * dims.hidden_size + 3 * _ceil_div(dims.intermediate_size, tp)) * p / GIB
    graphs = _sglang_graph_reserve_mib(chunk, graph_bs or max_bs) * MIB / GIB
    warnings = []
    if weights > pool:
        warnings.append(
            f"rollout: the engine's weights ({weights:.1f} GiB per GPU) exceed its static pool "
            f"(mem_fraction_static {fraction:g} x {gpu:g} GiB = {pool:.1f} GiB): SGLang cannot start"
        )
    components = {
        "engine_weights": weights,
        "engine_kv_cache": max(pool - weights, 0.0),
        "engine_runtime": prefill + sampling_logits + graphs,
    }
    return components, fraction, warnings


def sglang_default_mem_fraction_static(gpu_memory_gib: float, tp: int, cuda_graph_max_bs: int | None = None) -> float:
    """SGLang 0.5.21's default ``mem_fraction_static`` for one GPU of this size (module doc)."""
    gpu_mib = gpu_memory_gib * 1024
    chunk, max_bs = _sglang_tier(gpu_memory_gib, tp)
    graphs = _sglang_graph_reserve_mib(chunk, cuda_graph_max_bs or max_bs)
    reserved = 512 + max(chunk, 2048) * 1.5 + tp / 8 * 1024 + graphs
    if gpu_mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return round((gpu_mib - reserved) / gpu_mib, 3)


def _sglang_tier(gpu_memory_gib: float, tp: int) -> tuple[int, int]:
    """(chunked prefill tokens, decode CUDA-graph max batch) of SGLang's GPU-memory tiers."""
    gpu_mib = gpu_memory_gib * 1024
    if gpu_mib < 20 * 1024:
        return 2048, 8
    if gpu_mib < 35 * 1024:
        return 4096, 48 if tp < 4 else 160
    if gpu_mib < 60 * 1024:
        return 4096, 32 if tp < 4 else 160
    if gpu_mib < 160 * 1024:
        return 8192, 256 if tp < 4 else 512
    return 16384, 512


def _sglang_graph_reserve_mib(chunk: int, decode_max_bs: int) -> float:
    """SGLang's ``reserve_for_graph_mb``: 2 MiB per decode batch slot, 8 MiB per prefill graph size."""
    sizes = [
        *range(4, 33, 4), *range(48, 257, 16), *range(288, 513, 32), *range(576, 1025, 64),
        *range(1280, 4097, 256), *range(4608, chunk + 1, 512),
    ]
    return decode_max_bs * 2 + 8 * sum(1 for size in sizes if size <= chunk)


# --- helpers ---------------------------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _source_fields(source: str) -> dict[str, Any]:
    """The HF config fields behind a shape's ``source``; {} when it cannot be read."""
    try:
        if source.startswith(_KNOWN_SHAPE_PREFIX):
            from rlsys.models.shapes import KNOWN_MODELS_DIR

            entry = resources.files("rlsys.models").joinpath(KNOWN_MODELS_DIR, source[len(_KNOWN_SHAPE_PREFIX):])
            fields = json.loads(entry.read_text(encoding="utf-8"))
        elif source and Path(source).is_file():
            fields = json.loads(Path(source).read_text(encoding="utf-8"))
        else:
            return {}
    except (OSError, ValueError):
        return {}
    return fields if isinstance(fields, dict) else {}
