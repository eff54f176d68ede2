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
    OVERLONG_PROMPTS: ClassVar[tuple[str, ...]] = ("drop", "truncate", "error")

    train_files: list[str] = field(default_factory=lambda: ["examples/reasoning/data/arithmetic_train.jsonl"])
    """JSONL files of training prompts (Boba format: prompt, solutions)."""
    val_files: list[str] = field(default_factory=lambda: ["examples/reasoning/data/arithmetic_val.jsonl"])
    """JSONL files used for validation with the same reward."""
    prompt_key: str = "prompt"
    """Key of the prompt: a string, or a list of chat messages ({role, content}; roles system, user, assistant)."""
    answer_key: str = "solutions"
    """Key of the reference answer(s): a string or number, or a non-empty list of them (numbers kept as written)."""
    apply_chat_template: bool = True
    """Render prompts with the tokenizer's own chat template."""
    system_prompt: str | None = None
    """System message prepended to string prompts when the chat template is applied."""
    prompt_template: str | None = None
    """Template applied to string prompts before any chat template: a preset name from
    ``rlsys.data.templates`` (e.g. 'r1_zero', 'boxed') or a string containing '{prompt}'."""
    max_prompt_length: int = 1024
    """Longest prompt in tokens, counted after the prompt and chat templates (see overlong_prompts)."""
    overlong_prompts: str = "drop"
    """What happens to a longer prompt: 'drop' (counted, printed at start and logged as
    data/*_dropped_overlong), 'truncate' (keep its first and last max_prompt_length/2 tokens) or
    'error' (stop, naming file:line). 'drop' is the default: a math problem cut short is another
    problem with the same reference answer, so training on it rewards noise, and a few long
    problems in a large public set should not stop a run."""
    max_malformed_fraction: float = 0.01
    """Malformed lines (bad JSON or UTF-8, wrong types, unknown roles, over max_line_bytes) are
    dropped and counted while at most this fraction of a file's lines is bad; above it the file is
    an error listing the first bad lines (a wrong key or format). 0 makes every bad line an error."""
    max_line_bytes: int = 1 << 20
    """Longest line of a data file in bytes (1 MiB); a longer one is a malformed line, skipped unread."""
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
        if self.overlong_prompts not in self.OVERLONG_PROMPTS:
            _fail(self.SECTION, "overlong_prompts",
                  f"must be one of {', '.join(self.OVERLONG_PROMPTS)}, got {self.overlong_prompts!r}")
        if not 0 <= self.max_malformed_fraction < 1:
            _fail(self.SECTION, "max_malformed_fraction", f"must be in [0, 1), got {self.max_malformed_fraction}")
        if self.max_line_bytes <= 0:
            _fail(self.SECTION, "max_line_bytes", f"must be positive, got {self.max_line_bytes}")
        if self.prompt_template is not None:
            from rlsys.data.templates import resolve_template

            resolve_template(self.prompt_template)

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
    LOGGERS: ClassVar[tuple[str, ...]] = ("tensorboard", "wandb", "console")

    experiment_name: str = "rlsys"
    """Name used for the output directory and in logs."""
    output_dir: str = "outputs/${runner.experiment_name}"
    """Where event files, checkpoints and validation outputs go."""
    seed: int = 1
    """Base seed; every other seed derives from it and (step, index)."""
    total_steps: int = 10
    """Training steps (one rollout batch and one update each)."""
    prompts_per_step: int = 8
    """Prompts per step; each gets ``rollout.n_samples`` responses."""
    val_interval: int = 5
    """Validate every k steps, before the first step and after the last (0: never)."""
    val_max_prompts: int = 0
    """Validate on the first this many validation prompts (0: all)."""
    save_interval: int = 0
    """Save a checkpoint every k steps and after the last (0: never)."""
    keep_last_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one completed."""
    resume: bool = True
    """Resume from the newest complete checkpoint in ``output_dir`` when there is one."""
    save_on_interrupt: bool = True
    """On SIGINT or SIGTERM, finish the current step, save a checkpoint, then stop (exit 130 or 143)."""
    resume_dir: str | None = None
    """Resume from this checkpoint (a step directory, or a checkpoints directory: its newest)."""
    loggers: list[str] = field(default_factory=lambda: ["tensorboard", "console"])
    """Metric backends: tensorboard (event files in output_dir/tensorboard), wandb, console."""
    wandb_project: str = "rlsys"
    """wandb project (with the 'wandb' logger)."""
    progress_bar: bool = True
    """A console progress bar over rollout and training (only when stderr is a terminal)."""

    def __post_init__(self) -> None:
        if not self.output_dir:
            _fail(self.SECTION, "output_dir", "must be set")
        for name in ("total_steps", "prompts_per_step", "keep_last_checkpoints"):
            if getattr(self, name) < 1:
                _fail(self.SECTION, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("val_interval", "val_max_prompts", "save_interval"):
            if getattr(self, name) < 0:
                _fail(self.SECTION, name, f"must be >= 0, got {getattr(self, name)}")
        for i, logger in enumerate(self.loggers):
            if logger not in self.LOGGERS:
                _fail(self.SECTION, f"loggers[{i}]", f"must be one of {', '.join(self.LOGGERS)}, got {logger!r}")


@dataclass
class RolloutConfig:
    SECTION: ClassVar[str] = "rollout"
    ENGINES: ClassVar[tuple[str, ...]] = ("sglang", "hf")

    engine: str = "sglang"
    """'sglang' (the default on every device) or 'hf' (HF transformers generate, the fallback)."""
    tp: int = 1
    """Tensor-parallel size of each engine; the engines together use the rollout devices."""
    n_samples: int = 8
    """Responses per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (validation is greedy). The actor's log-probs are
    at temperature 1: another value samples slightly off-policy, and train/logprob_mismatch then
    includes the temperature's effect."""
    top_p: float = 1.0
    """Nucleus sampling of training rollouts."""
    max_new_tokens: int = 1024
    """Response budget; longer responses are cut and end with finish reason 'length'."""
    val_max_new_tokens: int | None = None
    """Response budget of validation (default: max_new_tokens)."""
    dtype: str = "auto"
    """Engine dtype: 'auto' (bfloat16 on GPU, float32 on CPU), 'bfloat16', 'float16', 'float32'."""
    mem_fraction_static: float | None = None
    """SGLang's static memory fraction (weights + KV cache) on GPU; None takes SGLang's default."""
    max_total_tokens: int | None = None
    """SGLang's KV-cache pool, in tokens. None: sized from mem_fraction_static on GPU, 32,768 tokens on CPU
    (rlsys.platform.sglang_cpu). On CPU the pool is allocated up front and held for the whole run."""
    timeout_s: float = 1800.0
    """Progress limit of generation: the run fails when no request of an engine finished for this
    long (a batch as a whole may take longer); also the limit of every other engine call."""
    health_check_s: float = 30.0
    """Liveness period of each SGLang engine: idle, it must generate one token within this long;
    busy, none of its processes may be stopped or, during a generate, use no CPU for this long.
    A hung engine is killed and the run ends naming it. 0 turns the check off."""
    max_running_requests: int = 64
    """Requests in flight per engine; the rest of a batch streams in as they finish (RLinf: 64).
    Also passed to SGLang as its own cap on running requests."""
    attention_backend: str | None = None
    """SGLang attention backend on GPU (e.g. 'flashinfer', 'fa3', 'triton'); None takes SGLang's
    default. CPU engines always use 'torch_native'."""
    cuda_graph_max_bs: int | None = None
    """Largest batch SGLang captures CUDA graphs for (GPU only); None takes SGLang's default."""
    partial_rollout_tokens: int = 0
    """Partial rollout: generate in segments of at most this many new tokens, so that a weight
    update waits for one segment, not a whole batch; unfinished responses continue with the new
    weights (rlsys.runner.rollouts). 0: one call per batch."""
    max_staleness: int = 0
    """Asynchronous rollout bound (eta): a sample generated by the weights of step v trains at a step
    no later than v + 1 + max_staleness. 0 is the synchronous loop; >= 1 overlaps generation with
    training and needs cluster.placement=disaggregated. Older samples are dropped and counted."""

    def __post_init__(self) -> None:
        if self.engine not in self.ENGINES:
            _fail(self.SECTION, "engine", f"must be one of {', '.join(self.ENGINES)}, got {self.engine!r}")
        for name in ("tp", "n_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                _fail(self.SECTION, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("val_max_new_tokens", "max_total_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                _fail(self.SECTION, name, f"must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            _fail(self.SECTION, "temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            _fail(self.SECTION, "top_p", f"must be in (0, 1], got {self.top_p}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            _fail(self.SECTION, "dtype", f"must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            _fail(self.SECTION, "mem_fraction_static", f"must be in (0, 1), got {self.mem_fraction_static}")
        if self.timeout_s <= 0:
            _fail(self.SECTION, "timeout_s", f"must be positive, got {self.timeout_s}")
        if self.health_check_s < 0:
            _fail(self.SECTION, "health_check_s", f"must be >= 0 (0: off), got {self.health_check_s}")
        if self.max_running_requests < 1:
            _fail(self.SECTION, "max_running_requests", f"must be >= 1, got {self.max_running_requests}")
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 1:
            _fail(self.SECTION, "cuda_graph_max_bs", f"must be >= 1 (or null), got {self.cuda_graph_max_bs}")
        if self.partial_rollout_tokens < 0:
            _fail(self.SECTION, "partial_rollout_tokens", f"must be >= 0, got {self.partial_rollout_tokens}")
        if self.max_staleness < 0:
            _fail(self.SECTION, "max_staleness", f"must be >= 0, got {self.max_staleness}")


@dataclass
class ClusterConfig:
    SECTION: ClassVar[str] = "cluster"
    PLACEMENTS: ClassVar[tuple[str, ...]] = ("colocated", "disaggregated")

    placement: str = "colocated"
    """'colocated': actor ranks and engines share every device (the engine's memory is released
    while the actor trains); 'disaggregated': the engines get ``rollout_devices`` of their own."""
    device: str = "auto"
    """'cuda', 'cpu', or 'auto' (cuda when this machine has a GPU)."""
    num_nodes: int = 1
    """Nodes of the Ray cluster the run uses."""
    devices_per_node: int = 1
    """GPUs per node (on CPU: worker processes per node, one CPU each)."""
    rollout_devices: int = 0
    """Disaggregated only: devices of the rollout engines (the actor gets the rest)."""
    ray_address: str = "local"
    """'local' starts a Ray instance for this run; 'auto' or host:port joins a running cluster."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU, for the per-phase memory estimate of ``rlsys plan`` and its warning."""
    start_timeout_s: float = 300.0
    """Limit of every start-up wait: the placement group, each worker's start, each engine's start."""

    def __post_init__(self) -> None:
        if self.placement not in self.PLACEMENTS:
            _fail(self.SECTION, "placement", f"must be one of {', '.join(self.PLACEMENTS)}, got {self.placement!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            _fail(self.SECTION, "device", f"must be auto, cuda or cpu, got {self.device!r}")
        for name in ("num_nodes", "devices_per_node"):
            if getattr(self, name) < 1:
                _fail(self.SECTION, name, f"must be >= 1, got {getattr(self, name)}")
        if self.gpu_memory_gib <= 0:
            _fail(self.SECTION, "gpu_memory_gib", f"must be positive, got {self.gpu_memory_gib}")
        if self.start_timeout_s <= 0:
            _fail(self.SECTION, "start_timeout_s", f"must be positive, got {self.start_timeout_s}")
        if self.placement == "colocated" and self.rollout_devices:
            _fail(self.SECTION, "rollout_devices", "is for placement=disaggregated; colocated engines share the actor's devices")
        if self.placement == "disaggregated" and not 0 < self.rollout_devices < self.total_devices:
            _fail(self.SECTION, "rollout_devices",
                  f"must be in [1, {self.total_devices - 1}] with placement=disaggregated, got {self.rollout_devices}")

    @property
    def total_devices(self) -> int:
        return self.num_nodes * self.devices_per_node

    @property
    def actor_devices(self) -> int:
        return self.total_devices - self.rollout_devices

    @property
    def engine_devices(self) -> int:
        return self.rollout_devices if self.placement == "disaggregated" else self.total_devices


SYNC_TRANSPORTS = ("colocated", "disaggregated", "in_process")


@dataclass
class SyncConfig:
    """Weight sync from the actor into the rollout engines."""

    SECTION: ClassVar[str] = "sync"

    bucket_mb: float = 512.0
    """Bucket size in MiB: peak extra memory of a sync is one bucket plus one tensor being gathered."""
    transport: str = "auto"
    """'colocated' (update_weights_from_tensor), 'disaggregated' (broadcast over a process group the
    engine joins), 'in_process' (HFEngine.load_state_dict), or 'auto': the one of the placement
    (in_process for the hf engine)."""
    timeout_s: float = 600.0
    """Limit of every engine call and wait of one sync step; a sync never hangs longer."""
    backend: str = "auto"
    """Disaggregated only: 'nccl', 'gloo', or 'auto' (gloo for CPU weights, NCCL for CUDA ones)."""
    master_address: str = "auto"
    """Disaggregated only: an address of the sync source's host that the engine's host can reach;
    'auto' takes the source's node IP as Ray reports it, found at run time."""
    master_port: int = 0
    """Disaggregated only: port of the group's TCP store on the source; 0 picks a free one."""
    group_name: str = "rlsys_weight_sync"
    """Disaggregated only: name of the weight-update process group on the engine."""
    verify_greedy_tokens: int = 0
    """After a sync, compare this many greedy tokens of the engine and the actor (0: no check)."""

    def __post_init__(self) -> None:
        if self.bucket_mb <= 0:
            _fail(self.SECTION, "bucket_mb", f"must be positive, got {self.bucket_mb}")
        if self.transport not in (*SYNC_TRANSPORTS, "auto"):
            _fail(self.SECTION, "transport", f"one of {(*SYNC_TRANSPORTS, 'auto')}, got {self.transport!r}")
        if self.timeout_s <= 0:
            _fail(self.SECTION, "timeout_s", f"must be positive, got {self.timeout_s}")
        if self.backend not in ("auto", "gloo", "nccl"):
            _fail(self.SECTION, "backend", f"one of 'auto', 'gloo', 'nccl', got {self.backend!r}")
        if not 0 <= self.master_port < 65536:
            _fail(self.SECTION, "master_port", f"must be in [0, 65535], got {self.master_port}")
        if not self.group_name:
            _fail(self.SECTION, "group_name", "must not be empty")
        if self.verify_greedy_tokens < 0:
            _fail(self.SECTION, "verify_greedy_tokens", f"must be >= 0, got {self.verify_greedy_tokens}")

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * 2**20)


@dataclass
class ActorConfig:
    SECTION: ClassVar[str] = "actor"

    TRANSFORMER_IMPLS: ClassVar[tuple[str, ...]] = ("auto", "local", "transformer_engine")
    PRECISIONS: ClassVar[tuple[str, ...]] = ("auto", "fp32", "bf16", "fp16")
    LR_SCHEDULES: ClassVar[tuple[str, ...]] = ("constant", "warmup", "cosine")
    RECOMPUTE_GRANULARITIES: ClassVar[tuple[str, ...]] = ("full", "selective")
    RECOMPUTE_METHODS: ClassVar[tuple[str, ...]] = ("uniform", "block")

    tp: int = 1
    """Tensor-parallel size; must divide the attention heads and the KV heads (or be a multiple of them)."""
    pp: int = 1
    """Pipeline-parallel size; must divide the number of layers. DP is world size / (tp * pp)."""
    transformer_impl: str = "auto"
    """Layer implementation: local, transformer_engine, or auto (TE when CUDA and TE are present)."""
    precision: str = "auto"
    """Weights and compute: fp32, bf16, fp16 (with megatron's loss scaler), or auto (fp32 on CPU, bf16 on GPU);
    optimizer state and main weights are fp32 in every case."""
    loss_scale: float | None = None
    """fp16: a constant loss scale (megatron's ConstantGradScaler); null scales dynamically (the four below)."""
    initial_loss_scale: float = 2.0**32
    """fp16, dynamic scale: the loss scale of the first step (megatron's default)."""
    min_loss_scale: float = 1.0
    """fp16, dynamic scale: the scale never halves below this."""
    loss_scale_window: int = 1000
    """fp16, dynamic scale: the scale doubles after this many optimizer steps in a row without overflow."""
    hysteresis: int = 2
    """fp16, dynamic scale: overflows since the scale last doubled before it halves; each later overflow halves it."""
    sequence_parallel: bool = False
    """Megatron sequence parallel (needs tp > 1): splits norms and dropout activations over TP ranks."""
    recompute_granularity: str | None = None
    """Activation recompute in backward: null (none), full (whole layers, see recompute_method) or selective
    (core attention only)."""
    recompute_method: str | None = None
    """Full recompute only: uniform (all layers, in chunks of recompute_num_layers) or block (the first
    recompute_num_layers layers of each pipeline stage)."""
    recompute_num_layers: int | None = None
    """Full recompute only: layers per chunk (uniform) or recomputed layers per pipeline stage (block)."""
    offload: bool = False
    """Keep weights, gradients and optimizer state in host memory while the rollout engines generate (colocated)."""
    max_tokens_per_microbatch: int = 4096
    """Token budget of one microbatch, counting padding: rows times its longest sequence."""
    n_minibatches: int = 1
    """Optimizer steps per rollout batch; the batch is split into this many contiguous minibatches."""
    lr: float = 1e-6
    """Peak learning rate."""
    lr_schedule: str = "constant"
    """constant; warmup: linear from min_lr to lr over lr_warmup_steps optimizer steps, then constant;
    cosine: the same warmup (lr_warmup_steps may be 0), then a cosine from lr down to min_lr at optimizer
    step lr_decay_steps, and min_lr after it."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warmup (lr_schedule=warmup or cosine)."""
    lr_decay_steps: int = 0
    """Optimizer step at which the cosine reaches min_lr (lr_schedule=cosine): runner.total_steps times
    actor.n_minibatches to decay over the whole run."""
    min_lr: float = 0.0
    """Learning rate of the first warmup step, and the floor of the cosine."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay; megatron exempts biases and norm weights."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.999
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 turns clipping off."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron's DistributedOptimizer)."""
    recompute_old_logprobs: bool = True
    """Old log-probs are the actor's (true) or the rollout engine's (false)."""
    old_logprobs_from_update: bool = True
    """With recompute_old_logprobs and one minibatch, take the actor's old log-probs from the update's own
    forward pass (detached; the weights have not moved since sampling, so the ratio is 1 by construction)
    instead of a forward pass of their own. Same gradient, one pass less per step."""
    skip_zero_advantage: bool = True
    """Leave sequences whose advantage is 0 on every token (groups with equal rewards) out of the update's
    passes: their gradient is exactly 0 and the loss keeps its normaliser, so the step is the same for
    less work. Off by itself when algorithm.kl_coef or entropy_coef is set (those terms do count them).
    The train/ metrics are then over the trained sequences."""
    logits_chunk_tokens: int = 1024
    """Response positions per chunk of the output layer in log-prob and entropy passes: at most this many
    rows of float32 logits (over this rank's vocabulary shard) exist at once."""
    entropy_metric_stride: int = 1
    """train/entropy_loss is measured on every k-th response token (1: all; 0: not measured, NaN). An entropy
    loss term (algorithm.entropy_coef != 0) always uses every token."""
    max_consecutive_nonfinite: int = 3
    """Raise after this many optimizer steps in a row were skipped for a non-finite loss or grad norm."""
    save_optimizer: bool = True
    """Include optimizer and scheduler state in checkpoints (needed to resume exactly)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "max_tokens_per_microbatch", "n_minibatches", "max_consecutive_nonfinite",
                     "logits_chunk_tokens"):
            if getattr(self, name) < 1:
                _fail(self.SECTION, name, f"must be >= 1, got {getattr(self, name)}")
        choices = {
            "transformer_impl": self.TRANSFORMER_IMPLS,
            "precision": self.PRECISIONS,
            "lr_schedule": self.LR_SCHEDULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                _fail(self.SECTION, name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        self._check_loss_scale()
        self._check_recompute()
        if self.entropy_metric_stride < 0:
            _fail(self.SECTION, "entropy_metric_stride", f"must be >= 0, got {self.entropy_metric_stride}")
        if self.sequence_parallel and self.tp == 1:
            _fail(self.SECTION, "sequence_parallel", "needs tp > 1")
        if self.lr <= 0:
            _fail(self.SECTION, "lr", f"must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            _fail(self.SECTION, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.lr_warmup_steps < 0:
            _fail(self.SECTION, "lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps}")
        if self.lr_schedule == "warmup" and self.lr_warmup_steps == 0:
            _fail(self.SECTION, "lr_warmup_steps", "must be >= 1 with lr_schedule=warmup")
        if self.lr_schedule == "cosine" and self.lr_decay_steps <= self.lr_warmup_steps:
            _fail(self.SECTION, "lr_decay_steps",
                  f"must be > lr_warmup_steps={self.lr_warmup_steps} with lr_schedule=cosine, got {self.lr_decay_steps}")
        if self.weight_decay < 0:
            _fail(self.SECTION, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(self.SECTION, name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            _fail(self.SECTION, "adam_eps", f"must be positive, got {self.adam_eps}")
        if self.clip_grad < 0:
            _fail(self.SECTION, "clip_grad", f"must be >= 0 (0 turns clipping off), got {self.clip_grad}")

    def _check_loss_scale(self) -> None:
        if self.loss_scale is not None:
            if self.precision != "fp16":
                _fail(self.SECTION, "loss_scale", f"is for precision=fp16, got precision={self.precision!r}")
            if self.loss_scale <= 0:
                _fail(self.SECTION, "loss_scale", f"must be positive (or null), got {self.loss_scale}")
        if self.min_loss_scale <= 0:
            _fail(self.SECTION, "min_loss_scale", f"must be positive, got {self.min_loss_scale}")
        if self.initial_loss_scale < self.min_loss_scale:
            _fail(self.SECTION, "initial_loss_scale",
                  f"must be >= min_loss_scale ({self.min_loss_scale}), got {self.initial_loss_scale}")
        for name in ("loss_scale_window", "hysteresis"):
            if getattr(self, name) < 1:
                _fail(self.SECTION, name, f"must be >= 1, got {getattr(self, name)}")

    def _check_recompute(self) -> None:
        # Megatron's TransformerConfig rules, raised here with the field's name; stricter in one way:
        # a method or layer count that megatron would ignore is refused rather than left unused.
        granularity, method, num_layers = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if granularity is not None and granularity not in self.RECOMPUTE_GRANULARITIES:
            _fail(self.SECTION, "recompute_granularity",
                  f"must be null or one of {', '.join(self.RECOMPUTE_GRANULARITIES)}, got {granularity!r}")
        if method is not None and method not in self.RECOMPUTE_METHODS:
            _fail(self.SECTION, "recompute_method",
                  f"must be null or one of {', '.join(self.RECOMPUTE_METHODS)}, got {method!r}")
        if granularity == "full":
            if method is None:
                _fail(self.SECTION, "recompute_method", "must be uniform or block with recompute_granularity=full")
            if num_layers is None or num_layers < 1:
                _fail(self.SECTION, "recompute_num_layers",
                      f"must be >= 1 with recompute_granularity=full, got {num_layers}")
        else:
            for name in ("recompute_method", "recompute_num_layers"):
                if getattr(self, name) is not None:
                    _fail(self.SECTION, name, f"is for recompute_granularity=full, got {granularity}")


@dataclass
class AlgorithmConfig:
    SECTION: ClassVar[str] = "algorithm"

    LOSS_TYPES: ClassVar[tuple[str, ...]] = ("grpo_clip", "reinforce_with_baseline", "no_baseline")
    AGG_MODES: ClassVar[tuple[str, ...]] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
    EARLY_STOP_GRANULARITIES: ClassVar[tuple[str, ...]] = ("microbatch", "minibatch")
    CORRECTIONS: ClassVar[tuple[str, ...]] = ("none", "tis", "mis", "decoupled_ppo")
    CORRECTION_LEVELS: ClassVar[tuple[str, ...]] = ("token", "sequence", "geometric")

    loss_type: str = "grpo_clip"
    """Policy loss: grpo_clip (clipped ratio), reinforce_with_baseline, or no_baseline."""
    clip_low: float = 0.2
    """Lower clip: the ratio of a token with negative advantage is clipped at 1 - clip_low."""
    clip_high: float = 0.28
    """Upper clip (clip-higher): the ratio of a token with positive advantage is clipped at 1 + clip_high."""
    dual_clip_c: float | None = None
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens; null turns it off."""
    agg_mode: str = "token-mean"
    """Loss aggregation: token-mean, seq-mean-token-mean or seq-mean-token-sum."""
    kl_coef: float = 0.0
    """Weight of the k3 KL penalty to the reference policy (needs reference log-probs)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    early_stop_imp_ratio: float | None = 5.0
    """Skip data whose mean importance ratio exceeds this; null turns the check off."""
    early_stop_granularity: str = "microbatch"
    """Unit the early stop drops: one microbatch, or a whole minibatch (one optimizer step)."""
    norm_adv_by_std: bool = True
    """Divide group-relative advantages by the group's standard deviation."""
    filter_zero_variance_groups: bool = False
    """Drop groups whose rewards are all equal (they carry no gradient) before the update."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment over the last this many tokens of rollout.max_new_tokens (0: off)."""
    overlong_penalty_factor: float = 1.0
    """Scale of that punishment (it reaches -factor at the response budget)."""
    partial_rollout_mask_old: bool = False
    """Leave out of the loss a partial response's tokens generated before its last weight update
    (rollout.partial_rollout_tokens; slime's --mask-offpolicy-in-partial-rollout)."""
    max_refill_rounds: int = 0
    """With filter_zero_variance_groups: when the filter drops groups, generate for this many more
    rounds of prompts, keeping groups with a signal, until the batch holds prompts_per_step groups (DAPO's
    dynamic sampling). 0: train on the kept groups only."""
    off_policy_correction: str = "none"
    """Importance weights pi_prox / pi_behav of the actor's recomputed log-probs against the engine's
    (rlsys.algorithms.off_policy): none, tis (truncate at correction_high), mis (zero outside
    [correction_low, correction_high]) or decoupled_ppo (token-level truncation, AReaL)."""
    correction_level: str = "token"
    """Where the weight is taken: token, sequence (product over the response) or geometric (its
    per-token geometric mean). decoupled_ppo is token level."""
    correction_low: float = 0.5
    """Lower bound of mis (sequence-level MIS anchors use 0.5)."""
    correction_high: float = 2.0
    """Truncation of tis and decoupled_ppo, upper bound of mis (the anchors use 2.0)."""

    def __post_init__(self) -> None:
        choices = {
            "loss_type": self.LOSS_TYPES,
            "agg_mode": self.AGG_MODES,
            "early_stop_granularity": self.EARLY_STOP_GRANULARITIES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                _fail(self.SECTION, name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0 <= self.clip_low < 1:
            _fail(self.SECTION, "clip_low", f"must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0:
            _fail(self.SECTION, "clip_high", f"must be >= 0, got {self.clip_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            _fail(self.SECTION, "dual_clip_c", f"must be > 1 (or null), got {self.dual_clip_c}")
        if self.kl_coef < 0:
            _fail(self.SECTION, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        if self.overlong_buffer < 0:
            _fail(self.SECTION, "overlong_buffer", f"must be >= 0, got {self.overlong_buffer}")
        if self.early_stop_imp_ratio is not None and self.early_stop_imp_ratio <= 1:
            _fail(self.SECTION, "early_stop_imp_ratio", f"must be > 1 (or null), got {self.early_stop_imp_ratio}")
        if self.max_refill_rounds < 0:
            _fail(self.SECTION, "max_refill_rounds", f"must be >= 0, got {self.max_refill_rounds}")
        if self.off_policy_correction not in self.CORRECTIONS:
            _fail(self.SECTION, "off_policy_correction",
                  f"must be one of {', '.join(self.CORRECTIONS)}, got {self.off_policy_correction!r}")
        if self.correction_level not in self.CORRECTION_LEVELS:
            _fail(self.SECTION, "correction_level",
                  f"must be one of {', '.join(self.CORRECTION_LEVELS)}, got {self.correction_level!r}")
        if self.off_policy_correction == "decoupled_ppo" and self.correction_level != "token":
            _fail(self.SECTION, "correction_level", f"decoupled_ppo is token level, got {self.correction_level!r}")
        if self.correction_low < 0:
            _fail(self.SECTION, "correction_low", f"must be >= 0, got {self.correction_low}")
        if self.correction_high < self.correction_low:
            _fail(self.SECTION, "correction_high",
                  f"must be >= correction_low ({self.correction_low}), got {self.correction_high}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        check_layout(self)


def check_layout(run: RunConfig) -> None:
    """Checks across sections that need no model: devices, parallel sizes, batch divisibility."""
    cluster, actor, rollout = run.cluster, run.actor, run.rollout
    if cluster.actor_devices % (actor.tp * actor.pp):
        _fail("actor", "tp", f"tp * pp = {actor.tp} * {actor.pp} must divide the actor's {cluster.actor_devices} "
                             f"devices (cluster.num_nodes * cluster.devices_per_node - cluster.rollout_devices)")
    if cluster.engine_devices % rollout.tp:
        _fail("rollout", "tp", f"must divide the rollout's {cluster.engine_devices} devices, got {rollout.tp}")
    if rollout.tp > cluster.devices_per_node:
        _fail("rollout", "tp", f"an engine lives on one node: must be <= cluster.devices_per_node "
                               f"({cluster.devices_per_node}), got {rollout.tp}")
    dp = cluster.actor_devices // (actor.tp * actor.pp)
    responses = run.runner.prompts_per_step * rollout.n_samples
    if responses % (dp * actor.n_minibatches):
        _fail("runner", "prompts_per_step",
              f"prompts_per_step * rollout.n_samples = {responses} responses must split evenly into "
              f"actor.n_minibatches ({actor.n_minibatches}) x data-parallel ranks ({dp})")
    if run.algorithm.overlong_buffer > rollout.max_new_tokens:
        _fail("algorithm", "overlong_buffer", f"must be <= rollout.max_new_tokens ({rollout.max_new_tokens}), "
                                              f"got {run.algorithm.overlong_buffer}")
    if run.sync.transport == "in_process" and rollout.engine != "hf":
        _fail("sync", "transport", "in_process needs rollout.engine=hf")
    if rollout.engine == "hf" and run.sync.transport in ("colocated", "disaggregated"):
        _fail("sync", "transport", f"the hf engine takes weights in process; use auto or in_process, "
                                   f"got {run.sync.transport!r}")
    if rollout.max_staleness > 0 and cluster.placement != "disaggregated":
        _fail("rollout", "max_staleness", f"asynchronous rollout (max_staleness={rollout.max_staleness}) needs "
                                          f"cluster.placement=disaggregated: colocated engines and actor take turns "
                                          f"on the same devices")
    if run.algorithm.off_policy_correction != "none" and not actor.recompute_old_logprobs:
        _fail("algorithm", "off_policy_correction",
              "weighs the actor's recomputed log-probs against the engine's: it needs actor.recompute_old_logprobs")
    if run.algorithm.max_refill_rounds and not run.algorithm.filter_zero_variance_groups:
        _fail("algorithm", "max_refill_rounds", "refills what the group filter drops: it needs "
                                                "algorithm.filter_zero_variance_groups=true")


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
    # Hydra chains the OmegaConf error that names the key as __cause__ or as __context__.
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ConfigError) and not getattr(cause, "full_key", None):
        cause = cause.__cause__ or cause.__context__
    cause = cause or exc.__cause__ or exc
    if isinstance(cause, ConfigError):
        return cause
    key = getattr(cause, "full_key", None)
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if key:
        return ConfigError(f"{key}: {reason} (config {config_name!r})")
    return ConfigError(f"config {config_name!r}: {reason}")
