"""Weight-sync throughput against a plain memory copy of the same bytes, measured in the same run.

    # Into the engines (one process, TP1, a real model; SGLang on CPU starts in 30-70 s here):
    python bench/bench_sync.py                                   # SmolLM2-135M-Instruct, fp32
    python bench/bench_sync.py --targets hf --bucket-mb 64
    # The Megatron side alone (gather + convert + bucket), random weights at a real shape:
    python bench/bench_sync.py --megatron-only --shape qwen2.5-1.5b --dtype bf16 --num-layers 2
    torchrun --nproc-per-node 8 bench/bench_sync.py --megatron-only --shape qwen2.5-7b --dtype bf16 --tp 4 --pp 2

Choices:
- Baseline: ``clone()`` of every HF tensor of the same model (the bytes a sync delivers, already
  materialised), on the device that holds them. The ratio ``sync bytes/s / clone bytes/s`` says
  how far a sync is from the cheapest thing that produces a copy of the weights.
- Targets: ``sglang`` (colocated transport: ``update_weights_from_tensor``, through shared memory on CPU),
  ``sglang-by-value`` (the same call with every bucket pickled by value, as before shared memory),
  ``sglang-disaggregated`` (gloo/NCCL broadcast to the same engine), ``hf`` (in process,
  ``HFEngine.load_state_dict``), and ``megatron`` (the producer only: TP gather, PP broadcast, HF
  conversion and bucketing, buckets dropped at once). One warm-up sync per target, then the
  median of ``--repeats``.
- ``--megatron-only`` builds a random-weight model at a named shape (optionally with fewer layers,
  for a CPU smoke run) and times only the producer; with TP/PP > 1 launch it with torchrun.
  Rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TARGETS = ("sglang", "sglang-by-value", "sglang-disaggregated", "hf", "megatron")
MIB = 2**20
TP1_NOTE = ("note: at TP1 the producer yields views of the parameters (only q/k/v are copied when split), "
            "so it can beat the clone baseline")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="HF directory or offline model name")
    parser.add_argument("--targets", default="sglang,hf,megatron", help=f"comma-separated, of {TARGETS}")
    parser.add_argument("--bucket-mb", type=float, default=512.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--megatron-only", action="store_true", help="time the producer on random weights")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--num-layers", type=int, default=None, help="fewer layers than the shape (smoke runs)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path (rank 0)")
    args = parser.parse_args()
    unknown = set(args.targets.split(",")) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {TARGETS}")
    return args


def init_distributed() -> torch.device:
    """torchrun's environment if present, else a one-process group on a free local port."""
    if "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(action: Callable[[], Any], repeats: int, device: torch.device) -> float:
    action()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        synchronize(device)
        started = time.perf_counter()
        action()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def clone_baseline(model: Any, hf_config: Any, repeats: int, device: torch.device) -> tuple[int, float]:
    """(bytes, seconds) of cloning every HF tensor once they are materialised (rank 0's copy)."""
    from rlsys.models.megatron_weights import export_hf_state_dict

    state = export_hf_state_dict(model, hf_config)
    total = sum(t.numel() * t.element_size() for t in state.values())
    seconds = median_seconds(lambda: [t.clone() for t in state.values()], repeats, device)
    return total, seconds


def line(label: str, total: int, seconds: float, baseline: float, measured: list[dict] | None = None) -> str:
    """One row of the printed table; with ``measured``, the numbers are also appended there (for --json)."""
    rate = total / seconds
    if measured is not None:
        measured.append({"path": label, "bytes": total, "seconds": seconds, "mib_per_s": rate / MIB,
                         "ratio_to_clone": rate / baseline})
    return (f"{label:<24} {total / MIB:9.1f} MiB  {seconds:8.3f} s  {rate / MIB:9.1f} MiB/s  "
            f"ratio to clone {rate / baseline:6.3f}")


def build_actor(hf_config: Any, tp: int, pp: int, dtype: torch.dtype | None) -> Any:
    from megatron.core import parallel_state, tensor_parallel

    from rlsys.models.megatron_model import build_gpt_model
    from rlsys.platform.megatron_cpu import enable_cpu_megatron

    enable_cpu_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_gpt_model(hf_config, params_dtype=dtype)
    model.eval()
    return model


def megatron_only(args: argparse.Namespace, device: torch.device) -> None:
    from transformers import Qwen2Config

    from rlsys.sync.buckets import BucketStats
    from rlsys.sync.weight_sync import iter_sync_buckets

    shape = dict(SHAPES[args.shape])
    if args.num_layers:
        shape["num_hidden_layers"] = args.num_layers
    hf_config = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    started = time.perf_counter()
    model = build_actor(hf_config, args.tp, args.pp, DTYPES[args.dtype])
    build_s = time.perf_counter() - started
    stats = BucketStats()

    def produce() -> None:
        stats.__init__()
        for bucket in iter_sync_buckets(model, hf_config, int(args.bucket_mb * MIB), stats):
            del bucket

    seconds = median_seconds(produce, args.repeats, device)
    total, clone_s = clone_baseline(model, hf_config, args.repeats, device)
    if dist.get_rank() == 0:
        baseline = total / clone_s
        print(f"shape {args.shape} ({shape['num_hidden_layers']} layers), {args.dtype}, tp={args.tp} pp={args.pp}, "
              f"world {dist.get_world_size()}, device {device}, model built in {build_s:.1f} s")
        print(f"{stats.num_tensors} HF tensors, {stats.num_buckets} buckets of {args.bucket_mb:g} MiB, "
              f"largest tensor {stats.largest_tensor_bytes / MIB:.1f} MiB")
        measured: list[dict] = []
        print(line("clone (baseline)", total, clone_s, baseline, measured))
        print(line("megatron gather+convert", stats.total_bytes, seconds, baseline, measured))
        write_json(args, measured)
        if args.tp == 1:
            print(TP1_NOTE)


def into_engines(args: argparse.Namespace, device: torch.device) -> None:
    from transformers import AutoConfig

    from rlsys.models.megatron_weights import load_hf_into_megatron
    from rlsys.models.offline import resolve_model_path
    from rlsys.sync.buckets import BucketStats
    from rlsys.sync.transports import ColocatedTransport, DisaggregatedTransport, InProcessTransport
    from rlsys.sync.weight_sync import iter_sync_buckets, sync_weights

    if dist.get_world_size() != 1:
        raise SystemExit("engine targets run in one process (the engine belongs to the sync source)")
    model_dir = resolve_model_path(args.model)
    hf_config = AutoConfig.from_pretrained(model_dir)
    model = build_actor(hf_config, 1, 1, None)
    load_hf_into_megatron(model, model_dir, hf_config)
    bucket_bytes = int(args.bucket_mb * MIB)
    targets = args.targets.split(",")
    total, clone_s = clone_baseline(model, hf_config, args.repeats, device)
    baseline = total / clone_s
    measured: list[dict] = []
    results = [line("clone (baseline)", total, clone_s, baseline, measured)]

    if "megatron" in targets:
        stats = BucketStats()

        def produce() -> None:
            for bucket in iter_sync_buckets(model, hf_config, bucket_bytes, stats):
                del bucket

        results.append(line("megatron gather+convert", total, median_seconds(produce, args.repeats, device), baseline,
                            measured))
    if "hf" in targets:
        from rlsys.rollout.hf_engine import HFEngine

        transport = InProcessTransport(HFEngine(model_dir))
        seconds = median_seconds(lambda: sync_weights(model, hf_config, transport, bucket_bytes=bucket_bytes),
                                 args.repeats, device)
        results.append(line("hf (in process)", total, seconds, baseline, measured))
    if {"sglang", "sglang-by-value", "sglang-disaggregated"} & set(targets):
        from rlsys.rollout.sglang_engine import SGLangEngine, serialize_named_tensors

        class ByValueTransport(ColocatedTransport):
            def send(self, bucket: Any) -> None:
                self.send_serialized([serialize_named_tensors(bucket, by_value=True)])

        engine = SGLangEngine(model_dir, device="cpu" if device.type == "cpu" else "cuda", max_total_tokens=4096)
        print(f"sglang engine started in {engine.startup_s:.1f} s", flush=True)
        try:
            for target, transport in [
                ("sglang", ColocatedTransport(engine)),
                ("sglang-by-value", ByValueTransport(engine)),
                ("sglang-disaggregated", DisaggregatedTransport(engine, backend="nccl" if device.type == "cuda"
                                                                else "gloo")),
            ]:
                if target in targets:
                    seconds = median_seconds(
                        lambda t=transport: sync_weights(model, hf_config, t, bucket_bytes=bucket_bytes),
                        args.repeats, device)
                    results.append(line(f"{target}", total, seconds, baseline, measured))
        finally:
            engine.shutdown()
    print(f"model {args.model} ({model_dir}), actor weights {next(model.parameters()).dtype}, "
          f"bucket {args.bucket_mb:g} MiB, median of {args.repeats}, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    print("\n".join(results))
    write_json(args, measured)
    if "megatron" in targets:
        print(TP1_NOTE)


def write_json(args: argparse.Namespace, measured: list[dict]) -> None:
    if args.json:
        args.json.write_text(json.dumps({"bench": "sync", "bucket_mb": args.bucket_mb, "repeats": args.repeats,
                                         "paths": measured}, indent=1))


def main() -> None:
    print("command:", " ".join([sys.executable, *sys.argv]), flush=True)
    args = parse_args()
    device = init_distributed()
    try:
        if args.megatron_only:
            megatron_only(args, device)
        else:
            into_engines(args, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
