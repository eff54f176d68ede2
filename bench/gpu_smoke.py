"""GPU smoke check: the Megatron actor, its log-probs against HF, a CUDA-IPC weight sync and memory.

Run through ``bench/gpu_smoke.sh`` (it installs the carried wheels first). One JSON file (``--out``):
- ``train``: ``MegatronActor`` (rlsys's own build, local layer spec, no Transformer Engine) in bf16 at
  the Qwen2.5-1.5B shape (``rlsys/models/known_models/Qwen2.5-1.5B.json``) with random weights:
  seconds per ``train_step`` (forward, backward, optimizer step) on 8 x 1024 tokens, tokens/s and
  MFU. FLOPs per token as ``bench/bench_actor.py`` (6 x matmul weights + causal attention), counted
  for forward and backward only; MFU divides by the device's dense bf16 peak (PEAK_TFLOPS, chosen
  by the device name; ``--peak-tflops`` overrides).
- ``logprobs``: the actor's response log-probs against HF transformers on the same weights (the
  actor is loaded from the HF directory the random HF model was saved to): max and mean |diff|,
  the tolerances, pass.
- ``weight_sync``: a second process holds an ``HFEngine`` (``rlsys.rollout.hf_engine``) whose weights
  were replaced by other random ones. rlsys's ``sync_weights`` streams the trained actor's HF-named
  buckets (``iter_hf_weights`` via ``iter_buckets``) into a transport that pickles each bucket with
  torch.multiprocessing's reductions (on GPU with rlsys's ``serialize_named_tensors``, the bytes
  SGLang's ``update_weights_from_tensor`` receives: CUDA IPC handles, no copy; on CPU, shared
  memory) and hands the bytes over a pipe; the engine rebuilds the tensors and loads them with
  ``load_state_dict``. Before and after: rlsys's greedy check (``actor_greedy_tokens`` against the
  engine's greedy generation, ``greedy_mismatch``) and the engine's log-probs of its own greedy
  tokens against the actor's (max and mean |diff|; the mean is what ``logprob_mismatch`` reports).
  Before the sync both must disagree (else the check could not fail); after it both must agree. A
  greedy divergence where the actor's logits of the two tokens are within ``near_tie_logit_gap``
  counts as a near tie (bf16 kernels flip those; see SETTINGS): ``greedy_agreement`` is exact,
  ``greedy_agreement_up_to_near_ties`` is what passes.
- ``memory``: ``torch.cuda`` allocated / reserved (and the device's used bytes, all processes) after
  every phase; what ``empty_cache`` gave back after training, and what the actor's
  ``offload_to_host`` gave back (bytes it moved, allocated and reserved before / after), then
  ``reload_to_device`` and checks that weights and optimizer state came back bit for bit (exact
  checksums; ``reload_exact``) and whether log-probs after the round trip are identical.
- the device name, torch / transformers / megatron-core versions, and the wall time of every phase.

``--dry-run``: the same code path on the CPU (gloo, fp32) at a tiny shape, with IPC through CPU
shared memory by the same reductions; MFU and peak are null there. Both modes write the same keys.
Exit status 0 when every check passed, 1 when one failed, 2 on an error (the JSON then holds the
traceback and whatever was measured before it).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (str(REPO_ROOT), str(Path(__file__).resolve().parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Dense (non-sparse) bf16 tensor-core peaks per device, from NVIDIA's data sheets; the first name
# contained in torch.cuda.get_device_name() wins, so the specific variants come first.
PEAK_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
)

MODEL_NAME = "Qwen2.5-1.5B"
SETTINGS = {
    "gpu": dict(dtype="bf16", batch_size=8, seq_len=1024, prompt_len=256, microbatch_tokens=4096, warmup_steps=1,
                timed_steps=3, greedy_prompts=4, greedy_prompt_len=16, greedy_tokens=8, bucket_mb=256.0,
                init_std=0.02, max_abs_tolerance=1.0, mean_abs_tolerance=0.1, near_tie_logit_gap=0.1),
    "dry-run": dict(dtype="fp32", batch_size=4, seq_len=64, prompt_len=16, microbatch_tokens=128, warmup_steps=1,
                    timed_steps=2, greedy_prompts=4, greedy_prompt_len=8, greedy_tokens=6, bucket_mb=0.05,
                    init_std=0.3, max_abs_tolerance=1e-4, mean_abs_tolerance=1e-4, near_tie_logit_gap=0.0),
}
"""Per mode. Log-prob tolerances (max and mean |diff|, for actor vs HF and for engine vs actor):
fp32 on CPU is held to rlsys's 1e-4 (megatron's upstream attention is bit-exact with HF eager
there). bf16 ones come from this shape run in bf16 on the CPU (megatron SDPA vs HF SDPA, 192
tokens): max 0.13, mean 0.03 for actor vs HF; 0.06 and 0.02 for engine vs actor; wrong weights give
a mean of several nats. To be revisited with the first GPU run. ``near_tie_logit_gap``: at this
shape with random weights the next-token distribution is nearly flat (top log-probs about -9
against -11.9 uniform) and bf16 greedy decoding of HF and megatron diverged on that CPU run in 3
of 4 prompts, each time where the actor's two candidates were 0.016-0.031 apart (one or two bf16
steps); a wrong weight puts them about a logit or more apart."""

# The dry run's tiny cut of the shape: 2 layers, 4 query and 2 KV heads, hidden 64, vocabulary 512.
DRY_RUN_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512)

# Random weights: HF's init with ``init_std`` as initializer_range (Qwen2.5's 0.02 at the real shape;
# 0.3 at the tiny one, where with 0.02 the tied input embedding dominates the residual stream and
# greedy decoding repeats the last token whatever the other weights are, so the greedy check could
# not fail). Norm weights and q/k/v biases are randomised on top (1 + 0.1 N and init_std N): with
# HF's ones and zeros a dropped norm or bias in the mapping or the sync would change nothing.

SEED = 1
ENGINE_TIMEOUT_S = 300.0


# ---------------------------------------------------------------------- measuring


class Recorder:
    """Phases in order, each with its wall time and the memory after it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)

    def memory(self) -> dict[str, float]:
        snapshot = {"cuda_allocated_bytes": 0, "cuda_reserved_bytes": 0, "cuda_peak_allocated_bytes": 0,
                    "device_used_bytes": 0, "host_rss_bytes": _rss_bytes()}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            snapshot.update(cuda_allocated_bytes=torch.cuda.memory_allocated(self.device),
                            cuda_reserved_bytes=torch.cuda.memory_reserved(self.device),
                            cuda_peak_allocated_bytes=torch.cuda.max_memory_allocated(self.device),
                            device_used_bytes=total - free)
        return snapshot


class _Phase:
    def __init__(self, recorder: Recorder, name: str) -> None:
        self.recorder, self.name = recorder, name

    def __enter__(self) -> _Phase:
        if self.recorder.device.type == "cuda":
            torch.cuda.synchronize(self.recorder.device)
            torch.cuda.reset_peak_memory_stats(self.recorder.device)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.recorder.device.type == "cuda" and exc[0] is None:
            torch.cuda.synchronize(self.recorder.device)
        wall = time.perf_counter() - self.started
        self.recorder.phases.append({"name": self.name, "wall_s": wall, **self.recorder.memory()})
        print(f"[gpu_smoke] {self.name}: {wall:.1f} s", flush=True)


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    for key, peak in PEAK_TFLOPS:
        if key in device_name:
            return peak, f"dense bf16 peak of {key} ({peak:g} TFLOP/s), matched in {device_name!r}"
    return None, f"no dense bf16 peak known for {device_name!r}"


# ---------------------------------------------------------------------- the model


def hf_config_for(mode: str, init_std: float) -> Any:
    """Qwen2.5-1.5B's shape from rlsys's known models (the dry run cuts it down)."""
    from importlib import resources

    from transformers import AutoConfig

    from rlsys.models.shapes import KNOWN_MODELS_DIR, known_shape

    entry = resources.files("rlsys.models").joinpath(KNOWN_MODELS_DIR, f"{MODEL_NAME}.json")
    fields = json.loads(entry.read_text(encoding="utf-8"))
    shape = known_shape(MODEL_NAME)
    sizes = dict(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                 num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
                 num_key_value_heads=shape.num_key_value_heads, vocab_size=shape.vocab_size)
    if mode == "dry-run":
        sizes.update(DRY_RUN_SHAPE)
    return AutoConfig.for_model(
        fields["model_type"], **sizes, tie_word_embeddings=fields["tie_word_embeddings"],
        # Qwen2.5-1.5B's config.json values of what known_models does not record.
        rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768, initializer_range=init_std,
        # A random model practically never emits the last id; ending on it is still handled.
        eos_token_id=sizes["vocab_size"] - 1, bos_token_id=None, pad_token_id=None,
    )


def save_random_hf_model(hf_config: Any, directory: Path, device: torch.device, dtype: torch.dtype,
                         attention: str) -> Any:
    """A random HF model (returned, on ``device``) saved with a word-level tokenizer to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attention)
    model = model.to(device=device, dtype=dtype).eval()
    generator = torch.Generator(device=device).manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(hf_config.initializer_range * noise)
    model.save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(hf_config.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0",
                            eos_token=f"t{hf_config.eos_token_id}").save_pretrained(directory)
    return model


def hf_response_logprobs(model: Any, prompts: list[list[int]], responses: list[list[int]],
                         device: torch.device, chunk: int = 2) -> list[torch.Tensor]:
    """log softmax of HF's logits (float32) at each response token, ``chunk`` sequences at a time."""
    results = []
    with torch.no_grad():
        for start in range(0, len(prompts), chunk):
            rows = [p + r for p, r in zip(prompts[start:start + chunk], responses[start:start + chunk])]
            ids = torch.tensor(rows, device=device)  # equal lengths: no padding
            logits = model(input_ids=ids).logits.float()
            for row, (prompt, response) in enumerate(zip(prompts[start:start + chunk],
                                                         responses[start:start + chunk])):
                scoring = torch.log_softmax(logits[row, len(prompt) - 1:len(prompt) - 1 + len(response)], dim=-1)
                target = torch.tensor(response, device=device)[:, None]
                results.append(scoring.gather(-1, target)[:, 0].cpu())
            del logits
    return results


def within(max_diff: float, mean_diff: float, settings: dict[str, Any]) -> bool:
    return max_diff <= settings["max_abs_tolerance"] and mean_diff <= settings["mean_abs_tolerance"]


def max_and_mean_abs_diff(first: list[torch.Tensor], second: list[torch.Tensor]) -> tuple[float, float]:
    diffs = torch.cat([(a.float() - b.float()).abs().flatten() for a, b in zip(first, second, strict=True)])
    return diffs.max().item(), diffs.mean().item()


# ---------------------------------------------------------------------- the engine process


def engine_main(connection: Any, model_dir: str, device: str, dtype_name: str, init_std: float,
                threads: int | None) -> None:
    """A second process holding an HFEngine; serves requests from the pipe until 'stop'."""
    try:
        if threads:
            torch.set_num_threads(threads)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        import torch.multiprocessing as _reductions  # noqa: F401  (registers the tensor reductions buckets need)

        from rlsys.rollout.base import SamplingParams
        from rlsys.rollout.hf_engine import HFEngine

        started = time.perf_counter()
        engine = HFEngine(model_dir, dtype=_DTYPES[dtype_name], device=device)
        # Other random weights, so that only a working sync can make the engine follow the actor.
        generator = torch.Generator(device=device).manual_seed(SEED + 1000)
        with torch.no_grad():
            for name, param in engine.model.named_parameters():
                noise = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
                param.copy_(1.0 + 0.1 * noise if "norm" in name else init_std * noise)
        connection.send(("ready", {"load_s": time.perf_counter() - started, **_engine_memory(device)}))
        unsent: set[str] = set()
        received_bytes = 0
        while True:
            request, *args = connection.recv()
            if request == "stop":
                connection.send(("ok", None))
                return
            if request == "generate":
                prompts, max_new_tokens = args
                samples = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
                reply: Any = [(s.prompt_index, s.response_ids, s.logprobs, s.finish_reason) for s in samples]
            elif request == "begin":
                unsent, received_bytes = set(engine.parameter_names()), 0
                reply = None
            elif request == "bucket":
                bucket = pickle.loads(args[0])  # ForkingPickler's payload: rebuilds the shared tensors
                engine.load_state_dict(dict(bucket))
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                received_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                unsent.difference_update(name for name, _ in bucket)
                del bucket
                reply = received_bytes
            elif request == "finish":
                reply = sorted(unsent)
            elif request == "memory":
                reply = _engine_memory(device)
            else:
                raise ValueError(f"unknown request {request!r}")
            connection.send(("ok", reply))
    except BaseException:
        connection.send(("error", traceback.format_exc()))


def _engine_memory(device: str) -> dict[str, int]:
    if not device.startswith("cuda"):
        return {"cuda_allocated_bytes": 0, "cuda_reserved_bytes": 0, "host_rss_bytes": _rss_bytes()}
    return {"cuda_allocated_bytes": torch.cuda.memory_allocated(), "cuda_reserved_bytes": torch.cuda.memory_reserved(),
            "host_rss_bytes": _rss_bytes()}


class EngineProcess:
    """The parent's end of ``engine_main``: a spawned process and a pipe, every wait with a timeout."""

    def __init__(self, model_dir: Path, device: torch.device, dtype_name: str, init_std: float,
                 threads: int | None) -> None:
        import torch.multiprocessing as mp

        context = mp.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=engine_main, args=(child, str(model_dir), str(device), dtype_name,
                                                                 init_std, threads), daemon=True)
        self.process.start()
        child.close()
        self.ready: dict[str, Any] | None = None

    def wait_ready(self) -> dict[str, Any]:
        if self.ready is None:
            self.ready = self._reply()
        return self.ready

    def call(self, request: str, *args: Any) -> Any:
        self.wait_ready()
        self.connection.send((request, *args))
        return self._reply()

    def _reply(self) -> Any:
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while not self.connection.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"the engine process died (exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine process did not answer within {ENGINE_TIMEOUT_S:g} s")
        status, value = self.connection.recv()
        if status == "error":
            raise RuntimeError(f"engine process failed:\n{value}")
        return value

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.connection.send(("stop",))
                self.process.join(30)
            except (OSError, EOFError):
                pass
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)


class EngineProcessTransport:
    """A ``rlsys.sync.transports`` transport into ``EngineProcess``: one pickled payload per bucket.

    CUDA: the payload is ``rlsys.rollout.sglang_engine.serialize_named_tensors(bucket)``, the very
    bytes rlsys hands SGLang's ``update_weights_from_tensor`` (ForkingPickler: CUDA IPC handles, no
    copy). CPU (dry run): ForkingPickler of owning copies, so the same reductions move the copies into
    shared memory. Not the actor's own tensors: the reduction moves a CPU storage into shared memory
    in place, and the actor's offload (which frees storages and rebuilds them) then crashes; rlsys's
    serializer avoids that by pickling CPU tensors by value, which would skip the IPC path here.
    """

    def __init__(self, engine: EngineProcess) -> None:
        self.engine = engine
        self.name = "HFEngine in a second process via torch.multiprocessing reductions"
        self.payload_bytes = 0

    def begin(self) -> None:
        self.engine.call("begin")

    def send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        if all(tensor.is_cuda for _, tensor in bucket):
            from rlsys.rollout.sglang_engine import serialize_named_tensors

            payload = serialize_named_tensors(bucket)
        else:
            from multiprocessing.reduction import ForkingPickler

            import torch.multiprocessing as _reductions  # noqa: F401  (registers the tensor reductions)

            payload = bytes(ForkingPickler.dumps([(name, tensor.detach().clone()) for name, tensor in bucket]))
        self.payload_bytes += len(payload)
        # The reply comes after the engine copied the tensors: the bucket may be freed then.
        self.engine.call("bucket", payload)

    def finish(self) -> None:
        from rlsys.sync.transports import WeightSyncError

        unsent = self.engine.call("finish")
        if unsent:
            raise WeightSyncError(f"parameters of the engine's model the sync did not send: {unsent[:8]}")

    def abort(self) -> None:
        pass


# ---------------------------------------------------------------------- checks


def greedy_comparison(actor: Any, engine: EngineProcess, prompts: list[list[int]], num_tokens: int,
                      device: torch.device) -> dict[str, Any]:
    """rlsys's greedy check both ways round, plus the engine-vs-actor log-prob mismatch."""
    from rlsys.actor.microbatch import RolloutBatch
    from rlsys.rollout.base import Sample
    from rlsys.sync.verify import actor_greedy_tokens, greedy_mismatch

    actor_tokens = actor_greedy_tokens(actor.model, actor.hf_config, prompts, num_tokens)
    samples = [Sample(index, ids, "", logprobs, reason)
               for index, ids, logprobs, reason in engine.call("generate", prompts, num_tokens)]
    mismatch = greedy_mismatch(actor_tokens, samples)
    divergences = []
    for index, (ours, sample) in enumerate(zip(actor_tokens, samples, strict=True)):
        position = next((j for j, (a, e) in enumerate(zip(ours, sample.response_ids)) if a != e), None)
        if position is not None:
            gap = _logit_gap(actor, prompts[index] + ours[:position], ours[position], sample.response_ids[position],
                             device)
            divergences.append({"prompt": index, "position": position, "actor_token": ours[position],
                                "engine_token": sample.response_ids[position], "actor_logit_gap": gap})
    scored = [i for i, s in enumerate(samples) if s.response_ids]
    batch = RolloutBatch.build([prompts[i] for i in scored], [samples[i].response_ids for i in scored])
    actor_logprobs = actor.compute_logprobs(batch).logprobs
    engine_logprobs = [torch.tensor(samples[i].logprobs) for i in scored]
    max_diff, mean_diff = max_and_mean_abs_diff(engine_logprobs, actor_logprobs)
    return {"greedy_agreement": mismatch is None, "greedy_mismatch": mismatch, "divergences": divergences,
            "engine_vs_actor_logprob_max_abs_diff": max_diff, "engine_vs_actor_logprob_mean_abs_diff": mean_diff,
            "actor_tokens": actor_tokens}


def _logit_gap(actor: Any, context: list[int], actor_token: int, engine_token: int, device: torch.device) -> float:
    """The actor's logit of its own greedy token minus that of the engine's token, after ``context``."""
    tokens = torch.tensor([context], device=device)
    positions = torch.arange(len(context), device=device)[None]
    with torch.no_grad():
        logits = actor.forward_module(tokens, positions, None)[0, -1].float()
    return (logits[actor_token] - logits[engine_token]).item()


def parameter_checksums(actor: Any) -> list[int]:
    """An exact fingerprint of the actor's weights and optimizer state: per tensor, the integer sum of
    its bit patterns (what ``offload_to_host`` / ``reload_to_device`` promise to keep bit for bit)."""
    tensors = list(actor.model.parameters())
    if actor.optimizer is not None:
        for member in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
            inner = getattr(member, "optimizer", None)
            if inner is None:
                continue
            for group in inner.param_groups:
                tensors.extend(group["params"])
            for state in inner.state.values():
                tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return [int(t.detach().contiguous().view(bits[t.element_size()]).sum(dtype=torch.int64)) for t in tensors]


# ---------------------------------------------------------------------- the run


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _init_process_group(backend: str) -> None:
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend, timeout=timedelta(minutes=20))


def _versions() -> dict[str, Any]:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda}
    for package in ("transformers", "megatron-core", "hydra-core", "psutil"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    mode = "dry-run" if args.dry_run else "gpu"
    settings = dict(SETTINGS[mode])
    result["settings"] = settings
    if args.dry_run:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --dry-run on a CPU machine")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    dtype = _DTYPES[settings["dtype"]]
    recorder = Recorder(device)
    result["phases"] = recorder.phases
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    result["device"] = {"name": device_name, "type": device.type, **_versions()}
    workdir = Path(tempfile.mkdtemp(prefix="rlsys-gpu-smoke-", dir=args.workdir))
    engine: EngineProcess | None = None
    try:
        with recorder.phase("init"):
            _init_process_group("gloo" if args.dry_run else "nccl")
            from bench_actor import flops_per_token

            from rlsys.actor.actor import MegatronActor
            from rlsys.actor.microbatch import RolloutBatch
            from rlsys.config import ActorConfig
            from rlsys.sync.weight_sync import sync_weights
            hf_config = hf_config_for(mode, settings["init_std"])
            result["model"] = {"shape_of": MODEL_NAME, "dry_run_cut": args.dry_run, "dtype": settings["dtype"],
                               **{k: getattr(hf_config, k) for k in ("hidden_size", "intermediate_size",
                                                                     "num_hidden_layers", "num_attention_heads",
                                                                     "num_key_value_heads", "vocab_size",
                                                                     "tie_word_embeddings")}}

        # Eager attention on CPU (bit-exact with megatron's there), SDPA on GPU (the actor's GPU default too).
        hf_attention = "eager" if args.dry_run else "sdpa"
        with recorder.phase("hf_model"):
            model_dir = workdir / "hf"
            reference = save_random_hf_model(hf_config, model_dir, device, dtype, hf_attention)
            result["model"]["parameters"] = sum(p.numel() for p in reference.parameters())

        with recorder.phase("engine_spawn"):
            # Starts loading in its own process while the actor builds.
            engine = EngineProcess(model_dir, device, settings["dtype"], settings["init_std"],
                                   threads=1 if args.dry_run else None)

        with recorder.phase("actor_build"):
            actor = MegatronActor(
                ActorConfig(precision=settings["dtype"], transformer_impl="local", lr=1e-5,
                            max_tokens_per_microbatch=settings["microbatch_tokens"]),
                model_path=model_dir, seed=SEED)

        generator = torch.Generator().manual_seed(SEED)
        batch_size, seq_len, prompt_len = settings["batch_size"], settings["seq_len"], settings["prompt_len"]
        ids = torch.randint(0, hf_config.vocab_size - 1, (batch_size, seq_len), generator=generator).tolist()
        prompts, responses = [row[:prompt_len] for row in ids], [row[prompt_len:] for row in ids]
        advantages = torch.where(torch.rand(batch_size, generator=generator) < 0.5, -1.0, 1.0)

        with recorder.phase("logprobs"):
            actor_logprobs = actor.compute_logprobs(RolloutBatch.build(prompts, responses)).logprobs
            hf_logprobs = hf_response_logprobs(reference, prompts, responses, device)
            max_diff, mean_diff = max_and_mean_abs_diff(actor_logprobs, hf_logprobs)
            result["logprobs"] = {
                "reference": f"HF transformers {result['device']['transformers']}, {hf_attention} attention, "
                             f"{settings['dtype']}, float32 log-softmax",
                "actor": "MegatronActor.compute_logprobs (local spec, "
                         f"{'megatron' if args.dry_run else 'sdpa'} core attention)",
                "tokens": sum(len(r) for r in responses), "max_abs_diff": max_diff, "mean_abs_diff": mean_diff,
                "max_abs_tolerance": settings["max_abs_tolerance"],
                "mean_abs_tolerance": settings["mean_abs_tolerance"],
                "pass": within(max_diff, mean_diff, settings)}
            del reference
            if device.type == "cuda":
                torch.cuda.empty_cache()

        with recorder.phase("train"):
            rollout = RolloutBatch.build(prompts, responses, advantages=advantages, old_logprobs=actor_logprobs)
            times, metrics = [], {}
            for step in range(settings["warmup_steps"] + settings["timed_steps"]):
                _synchronize(device)
                started = time.perf_counter()
                metrics = actor.train_step(rollout)
                _synchronize(device)
                if step >= settings["warmup_steps"]:
                    times.append(time.perf_counter() - started)
            step_s = statistics.median(times)
            tokens_per_s = batch_size * seq_len / step_s
            flops = flops_per_token(hf_config, seq_len)
            achieved = tokens_per_s * flops / 1e12
            peak, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else (
                peak_tflops(device_name) if device.type == "cuda" else (None, "no peak for a CPU dry run"))
            result["train"] = {
                "batch_size": batch_size, "seq_len": seq_len, "tokens_per_step": batch_size * seq_len,
                "microbatch_tokens": settings["microbatch_tokens"], "warmup_steps": settings["warmup_steps"],
                "step_s": times, "step_s_median": step_s, "tokens_per_s": tokens_per_s,
                "flops_per_token": flops, "achieved_tflops": achieved, "peak_tflops": peak,
                "peak_source": peak_source, "mfu": achieved / peak if peak else None,
                "optimizer_steps": metrics.get("optimizer_steps"), "grad_norm": metrics.get("grad_norm"),
                "what": "MegatronActor.train_step: forward, backward, optimizer step; FLOPs count forward + backward"}

        memory: dict[str, Any] = {"after_train": recorder.memory()}
        result["memory"] = memory
        with recorder.phase("empty_cache"):
            if device.type == "cuda":
                torch.cuda.empty_cache()
        memory["after_empty_cache"] = recorder.memory()
        memory["empty_cache_released_bytes"] = (memory["after_train"]["cuda_reserved_bytes"]
                                                - memory["after_empty_cache"]["cuda_reserved_bytes"])

        with recorder.phase("weight_sync"):
            ready = engine.wait_ready()
            greedy = dict(prompts=settings["greedy_prompts"], length=settings["greedy_prompt_len"])
            greedy_prompts = torch.randint(0, hf_config.vocab_size - 1, (greedy["prompts"], greedy["length"]),
                                           generator=generator).tolist()
            before = greedy_comparison(actor, engine, greedy_prompts, settings["greedy_tokens"], device)
            transport = EngineProcessTransport(engine)
            sync_started = time.perf_counter()
            report = sync_weights(actor.model, hf_config, transport, bucket_bytes=int(settings["bucket_mb"] * 2**20))
            sync_s = time.perf_counter() - sync_started
            if device.type == "cuda":
                torch.cuda.ipc_collect()
            after = greedy_comparison(actor, engine, greedy_prompts, settings["greedy_tokens"], device)
            gap = settings["near_tie_logit_gap"]
            near_ties = all(abs(d["actor_logit_gap"]) <= gap for d in after["divergences"])
            near_ties_before = all(abs(d["actor_logit_gap"]) <= gap for d in before["divergences"])
            result["weight_sync"] = {
                "transport": transport.name, "mechanism": "multiprocessing.reduction.ForkingPickler with "
                "torch.multiprocessing.reductions (" + ("CUDA IPC handles" if device.type == "cuda" else
                                                         "CPU shared memory") + "), bytes over a pipe",
                "engine_load_s": ready["load_s"], "engine_memory_at_start": {k: v for k, v in ready.items()
                                                                             if k != "load_s"},
                "bytes": report.total_bytes, "tensors": report.num_tensors, "buckets": report.num_buckets,
                "bucket_bytes": report.bucket_bytes, "payload_bytes": transport.payload_bytes, "seconds": sync_s,
                "gib_per_s": report.total_bytes / sync_s / 2**30,
                "greedy_prompts": greedy["prompts"], "greedy_prompt_len": greedy["length"],
                "greedy_tokens": settings["greedy_tokens"],
                "before_sync": {k: v for k, v in before.items() if k != "actor_tokens"},
                "greedy_agreement": after["greedy_agreement"], "greedy_mismatch": after["greedy_mismatch"],
                "divergences": after["divergences"], "near_tie_logit_gap": gap,
                "greedy_agreement_up_to_near_ties": near_ties,
                "greedy_agreement_up_to_near_ties_before_sync": near_ties_before,
                "engine_vs_actor_logprob_max_abs_diff": after["engine_vs_actor_logprob_max_abs_diff"],
                "engine_vs_actor_logprob_mean_abs_diff": after["engine_vs_actor_logprob_mean_abs_diff"],
                "max_abs_tolerance": settings["max_abs_tolerance"],
                "mean_abs_tolerance": settings["mean_abs_tolerance"],
                # After the sync the engine follows the actor; before it, it must not (or the
                # check could not fail).
                "pass": (near_ties and within(after["engine_vs_actor_logprob_max_abs_diff"],
                                              after["engine_vs_actor_logprob_mean_abs_diff"], settings)
                         and not near_ties_before
                         and before["engine_vs_actor_logprob_mean_abs_diff"] > settings["mean_abs_tolerance"]),
                "engine_memory_after": engine.call("memory")}

        offload = getattr(actor, "offload_to_host", None)
        reload = getattr(actor, "reload_to_device", None)
        probe = RolloutBatch.build(prompts[:2], responses[:2])
        probe_before = actor.compute_logprobs(probe).logprobs
        checksums_before = parameter_checksums(actor)
        memory["before_offload"] = recorder.memory()
        if offload is not None and reload is not None:
            memory["offload_method"] = "MegatronActor.offload_to_host / reload_to_device"
            with recorder.phase("offload"):
                offload()
            memory["offloaded_bytes"] = sum(item.nbytes for item in getattr(actor, "_offloaded", None) or [])
            memory["after_offload"] = recorder.memory()
            with recorder.phase("reload"):
                reload()
            memory["after_reload"] = recorder.memory()
        else:
            memory["offload_method"] = None
            memory["offloaded_bytes"] = 0
            memory["after_offload"] = memory["after_reload"] = memory["before_offload"]
        for kind in ("allocated", "reserved"):
            memory[f"offload_released_{kind}_bytes"] = (memory["before_offload"][f"cuda_{kind}_bytes"]
                                                        - memory["after_offload"][f"cuda_{kind}_bytes"])
        probe_after = actor.compute_logprobs(probe).logprobs
        memory["reload_logprobs_max_abs_diff"] = max_and_mean_abs_diff(probe_before, probe_after)[0]
        memory["reload_logprobs_identical"] = all(torch.equal(a, b) for a, b in zip(probe_before, probe_after,
                                                                                  strict=True))
        memory["reload_exact"] = parameter_checksums(actor) == checksums_before
        actor.close()
    finally:
        if engine is not None:
            engine.close()
        shutil.rmtree(workdir, ignore_errors=True)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        result["total_wall_s"] = time.perf_counter() - recorder.started


def checks(result: dict[str, Any]) -> dict[str, bool]:
    return {
        "logprobs_within_tolerance": bool(result.get("logprobs", {}).get("pass")),
        "weight_sync": bool(result.get("weight_sync", {}).get("pass")),
        "reload_exact": bool(result.get("memory", {}).get("reload_exact")),
        "train_steps_applied": result.get("train", {}).get("optimizer_steps") == 1.0,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, fp32 (the same code path)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device dense bf16 peak, for MFU")
    parser.add_argument("--workdir", default=None, help="where the random HF checkpoint is written (removed after)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict[str, Any] = {"smoke": "gpu", "mode": "dry-run" if args.dry_run else "gpu",
                              "command": " ".join([sys.executable, *sys.argv])}
    status = 0
    try:
        run(args, result)
        result["checks"] = checks(result)
        result["pass"] = all(result["checks"].values())
        status = 0 if result["pass"] else 1
    except BaseException as error:  # the JSON must come back with what was measured
        result["error"] = "".join(traceback.format_exception(error))
        result["pass"] = False
        status = 2
    finally:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=_json_default, allow_nan=True))
        print(f"[gpu_smoke] wrote {args.out}: pass={result.get('pass')} in {result.get('total_wall_s', 0):.1f} s",
              flush=True)
        if "error" in result:
            print(result["error"], file=sys.stderr)
    return status


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
