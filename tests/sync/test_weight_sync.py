"""Risks: after a sync the rollout engine does not hold the actor's weights (a layout, TP gather,
PP stage or bucket error; a transport that drops or reorders tensors; a stale prefix cache), or
a failing engine hangs the trainer.

One run of two gloo ranks (``tests/dist.py``) does everything, because starting the SGLang engine
(30-70 s here) and importing megatron dominate the time. Rank 0 is the sync source: it starts ONE
SGLang engine (TP1, CPU, fp32) from checkpoint E and an HF engine from E. The actor is then built
twice in turn, from other random checkpoints (so the engines start from other weights):

- TP2 (tp=2, pp=1) from checkpoint A, and PP2 (tp=1, pp=2) from checkpoint B. For each:
  * before any sync both engines' greedy tokens differ from the actor's (the check can fail, and
    a later match proves weights moved);
  * a sync through the first transport (TP2: colocated, PP2: disaggregated) makes SGLang's greedy
    continuation of 4 chat prompts (6 tokens) equal to the actor's own, computed by Megatron;
  * the HF engine, synced in process, follows it too;
  * a plain SGD step on a cross-entropy loss through megatron's schedule changes the actor's
    greedy tokens; without a sync both engines still give the old ones (the check fails); after a
    sync (SGLang: through the other transport) they follow the new weights.
  The disaggregated transport's process group is formed once and serves both layouts. Buckets
  are 64 KiB, so layers arrive in several buckets and the 39 MB embedding and output layer
  alone; every sync's report must keep the bucket rule.
- The vocabulary-parallel argmax ignores padded columns and breaks ties like ``torch.argmax``.
- Faults, on the PP2 actor, each bounded in time on BOTH ranks: the engine lost its update group
  (it never joins the broadcast: fails at bucket 0, well inside the timeout); the engine's
  scheduler stopped (SIGSTOP: the sync times out); the scheduler killed (SIGKILL) while a sync
  waits on it, and a sync after it died: a clear error, not a hang.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any

import pytest
import torch

from rlsys.models.offline import load_tokenizer
from tests.dist import run_distributed
from tests.rollout.tiny_models import chat_prompts
from tests.sync.sync_models import save_random_qwen2

NUM_PROMPTS = 4
GREEDY_TOKENS = 6
BUCKET_BYTES = 64 * 1024
CALL_TIMEOUT_S = 120.0
HUNG_ENGINE_TIMEOUT_S = 5.0
GROUP_NAME = "rlsys_sync_test"

# (name, tp, pp, actor checkpoint, first transport, second transport)
LAYOUTS = [
    ("tp2", 2, 1, "actor_a", "colocated", "disaggregated"),
    ("pp2", 1, 2, "actor_b", "disaggregated", "colocated"),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tokenizer = load_tokenizer("qwen2.5-tokenizer")
    dirs = {name: str(save_random_qwen2(tmp_path_factory.mktemp(name), tokenizer, seed))
            for name, seed in [("engine", 0), ("actor_a", 1), ("actor_b", 2)]}
    return {"dirs": dirs, "prompts": chat_prompts(tokenizer)[:NUM_PROMPTS]}


def _sgd_step(model: Any, vocab_size: int, seed: int, lr: float) -> float:
    """One plain SGD step on the cross entropy of random labels for random tokens, through
    megatron's schedule (so it runs under PP); padded vocabulary columns are masked as the actor
    masks them, so the output layer's padding rows stay zero."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    generator = torch.Generator().manual_seed(seed)
    batches = [{"tokens": torch.randint(0, vocab_size, (1, 16), generator=generator),
                "labels": torch.randint(0, vocab_size, (1, 16), generator=generator)} for _ in range(2)]
    tp_group = model.tp_group

    def forward_step(data_iterator: Any, stage: Any) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        output = stage(batch["tokens"], torch.arange(16).unsqueeze(0), None)

        def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            partition = logits.shape[-1]
            columns = torch.arange(tp_group.rank() * partition, (tp_group.rank() + 1) * partition)
            logits = logits.float().masked_fill(columns >= vocab_size, float("-inf"))
            loss = vocab_parallel_cross_entropy(logits, batch["labels"]).mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    model.train()
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                                         num_microbatches=len(batches), seq_length=16, micro_batch_size=1,
                                         forward_only=False)
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param.add_(param.grad, alpha=-lr)
                param.grad = None
    model.eval()
    return float(sum(loss["loss"] for loss in losses)) if losses else 0.0


def _argmax_cases(tp_group: Any) -> dict[str, bool]:
    """Vocabulary 7 padded to 8 over 2 TP ranks: rank 0 holds columns 0-3, rank 1 columns 4-7."""
    from rlsys.sync.verify import vocab_parallel_argmax

    full = torch.tensor([
        [0.1, 0.5, 0.2, 0.3, 0.4, 0.0, 0.2, 9.0],  # padded column 7 is the largest: 1 must win
        [0.1, 0.7, 0.2, 0.3, 0.4, 0.7, 0.2, 0.0],  # tie across ranks: the lower index, 1
        [0.1, 0.2, 0.2, 0.3, 0.4, 0.0, 0.8, 0.0],  # best on rank 1: 6
    ])
    shard = full.chunk(tp_group.size(), dim=-1)[tp_group.rank()]
    got = vocab_parallel_argmax(shard, vocab_size=7, tp_group=tp_group).tolist()
    return {"argmax": got == [1, 1, 6] == full[:, :7].argmax(dim=-1).tolist()}


def _sync_worker(rank: int, world_size: int, dirs: dict[str, str], prompts: list[list[int]]) -> dict[str, Any]:
    import psutil
    from megatron.core import parallel_state, tensor_parallel
    from transformers import AutoConfig

    from rlsys.models.megatron_model import build_gpt_model
    from rlsys.models.megatron_weights import load_hf_into_megatron
    from rlsys.platform.megatron_cpu import enable_cpu_megatron
    from rlsys.rollout.hf_engine import HFEngine
    from rlsys.sync.transports import ColocatedTransport, DisaggregatedTransport, InProcessTransport, WeightSyncError
    from rlsys.sync.verify import SyncVerificationError, actor_greedy_tokens, check_engine_follows_actor
    from rlsys.sync.weight_sync import sync_weights

    enable_cpu_megatron(force=True)
    source = rank == 0
    report: dict[str, Any] = {}
    started_engine: dict[str, Any] = {}
    engine_thread = None
    if source:
        def start_engine() -> None:
            from rlsys.rollout.sglang_engine import SGLangEngine

            try:
                started_engine["engine"] = SGLangEngine(dirs["engine"], device="cpu", timeout_s=CALL_TIMEOUT_S,
                                                        max_total_tokens=16_384)
            except BaseException as error:
                started_engine["error"] = error

        # The engine starts in its own processes while this rank builds the actor.
        engine_thread = threading.Thread(target=start_engine, daemon=True)
        engine_thread.start()

    def check(model: Any, hf_config: Any, engine: Any) -> str | None:
        try:
            check_engine_follows_actor(model, hf_config, engine, prompts, GREEDY_TOKENS)
        except SyncVerificationError as error:
            return str(error)
        return None

    sglang = hf_engine = None
    transports: dict[str, Any] = {}
    model = hf_config = None
    for name, tp, pp, actor_dir, first, second in LAYOUTS:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        torch.manual_seed(0)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        hf_config = AutoConfig.from_pretrained(dirs[actor_dir])
        model = build_gpt_model(hf_config, transformer_impl="local")
        load_hf_into_megatron(model, dirs[actor_dir], hf_config)
        model.eval()
        if tp == 2:
            report.update({f"{name}/{key}": value for key, value in _argmax_cases(model.tp_group).items()})
        if source:
            if sglang is None:
                engine_thread.join(timeout=600)
                if "error" in started_engine:
                    raise started_engine["error"]
                sglang = started_engine["engine"]
                report["engine_startup_s"] = sglang.startup_s
                transports["colocated"] = ColocatedTransport(sglang, timeout_s=CALL_TIMEOUT_S)
                transports["disaggregated"] = DisaggregatedTransport(sglang, backend="gloo", group_name=GROUP_NAME,
                                                                     timeout_s=CALL_TIMEOUT_S)
            hf_engine = HFEngine(dirs["engine"])
            transports["in_process"] = InProcessTransport(hf_engine)

        def sync(transport_name: str) -> Any:
            started = time.monotonic()
            sync_report = sync_weights(model, hf_config, transports.get(transport_name), bucket_bytes=BUCKET_BYTES)
            report[f"{name}/seconds/{transport_name}"] = time.monotonic() - started
            report.setdefault(f"{name}/reports", []).append(sync_report)
            return sync_report

        report[f"{name}/before/sglang"] = check(model, hf_config, sglang)
        report[f"{name}/before/hf"] = check(model, hf_config, hf_engine)
        sync(first)
        report[f"{name}/after_first/sglang"] = check(model, hf_config, sglang)
        sync("in_process")
        report[f"{name}/after_first/hf"] = check(model, hf_config, hf_engine)

        tokens_before_step = actor_greedy_tokens(model, hf_config, prompts, GREEDY_TOKENS)
        report[f"{name}/loss"] = _sgd_step(model, hf_config.vocab_size, seed=tp * 10 + pp, lr=2.0)
        tokens_after_step = actor_greedy_tokens(model, hf_config, prompts, GREEDY_TOKENS)
        report[f"{name}/step_changed_actor"] = tokens_after_step != tokens_before_step
        report[f"{name}/stale/sglang"] = check(model, hf_config, sglang)
        report[f"{name}/stale/hf"] = check(model, hf_config, hf_engine)
        sync(second)
        report[f"{name}/after_second/sglang"] = check(model, hf_config, sglang)
        sync("in_process")
        report[f"{name}/after_second/hf"] = check(model, hf_config, hf_engine)
        if name != LAYOUTS[-1][0]:
            parallel_state.destroy_model_parallel()

    # ---------------------------------------------------------------- faults (PP2 actor)
    def failing_sync(label: str, transport: Any) -> None:
        started = time.monotonic()
        try:
            sync_weights(model, hf_config, transport, bucket_bytes=BUCKET_BYTES)
            report[f"fault/{label}"] = None
        except WeightSyncError as error:
            report[f"fault/{label}"] = str(error)
        report[f"fault/{label}/seconds"] = time.monotonic() - started

    # 1. The engine lost its update group: it answers the broadcast's metadata with an error and
    # never joins the broadcast.
    if source:
        sglang.destroy_weights_update_group(GROUP_NAME)
    failing_sync("lost_group", transports.get("disaggregated"))
    if source:
        sglang.health_check(timeout_s=CALL_TIMEOUT_S)
        report["fault/lost_group/engine_healthy"] = True

    # 2. A stopped scheduler: nothing answers; the sync gives up after its timeout.
    scheduler = None
    engine_processes: list[Any] = []
    if source:
        worker = psutil.Process(sglang.worker_pid)
        engine_processes = [worker, *worker.children(recursive=True)]
        schedulers = [p for p in engine_processes if "scheduler" in " ".join([p.name(), *p.cmdline()])]
        scheduler = schedulers[0]
        scheduler.send_signal(signal.SIGSTOP)
    failing_sync("hung", ColocatedTransport(sglang, timeout_s=HUNG_ENGINE_TIMEOUT_S) if source else None)

    # 3. The scheduler is killed while a sync waits on it.
    if source:
        threading.Timer(3.0, lambda: os.kill(scheduler.pid, signal.SIGKILL)).start()
    failing_sync("killed_during", ColocatedTransport(sglang, timeout_s=CALL_TIMEOUT_S) if source else None)

    # 4. Syncs into the dead engine.
    failing_sync("dead_colocated", ColocatedTransport(sglang, timeout_s=CALL_TIMEOUT_S) if source else None)
    failing_sync("dead_disaggregated", DisaggregatedTransport(sglang, backend="gloo", group_name="after_death",
                                                              timeout_s=CALL_TIMEOUT_S) if source else None)
    if source:
        sglang.shutdown()
        _, alive = psutil.wait_procs(engine_processes, timeout=15)
        report["fault/engine_gone"] = not alive
    parallel_state.destroy_model_parallel()
    return {f"rank{rank}/{key}": value for key, value in report.items()}


@pytest.fixture(scope="module")
def sync_report(checkpoints: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    reports = run_distributed(_sync_worker, world_size=2, args=(checkpoints["dirs"], checkpoints["prompts"]),
                              timeout_s=900)
    merged: dict[str, Any] = {}
    for report in reports:
        merged.update(report)
    print(f"\nsync run: {time.monotonic() - started:.0f} s (engine start-up {merged['rank0/engine_startup_s']:.0f} s)")
    for key, value in merged.items():
        if "/seconds" in key:
            print(f"  {key}: {value:.2f} s")
        elif key.startswith("rank0/fault/") and isinstance(value, str):
            print(f"  {key}: {value[:600]}")
    return merged


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_engines_start_from_other_weights(sync_report: dict[str, Any], layout: str) -> None:
    for engine in ("sglang", "hf"):
        message = sync_report[f"rank0/{layout}/before/{engine}"]
        assert message is not None and "does not follow the actor" in message, (engine, message)
        # The verdict reaches every rank.
        assert sync_report[f"rank1/{layout}/before/{engine}"] == message


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_sglang_follows_actor_through_both_transports(sync_report: dict[str, Any], layout: str) -> None:
    assert sync_report[f"rank0/{layout}/after_first/sglang"] is None
    assert sync_report[f"rank0/{layout}/after_second/sglang"] is None


@pytest.mark.parametrize("engine", ["sglang", "hf"])
@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_engine_follows_optimizer_step_only_after_a_sync(sync_report: dict[str, Any], layout: str,
                                                         engine: str) -> None:
    assert math.isfinite(sync_report[f"rank0/{layout}/loss"])
    assert sync_report[f"rank0/{layout}/step_changed_actor"]
    stale = sync_report[f"rank0/{layout}/stale/{engine}"]
    assert stale is not None and "does not follow the actor" in stale
    assert sync_report[f"rank0/{layout}/after_second/{engine}"] is None


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_hf_engine_follows_actor_in_process(sync_report: dict[str, Any], layout: str) -> None:
    assert sync_report[f"rank0/{layout}/after_first/hf"] is None
    assert sync_report[f"rank0/{layout}/after_second/hf"] is None


def test_sync_reports_keep_the_bucket_rule(sync_report: dict[str, Any]) -> None:
    reports = [r for layout, *_ in LAYOUTS for r in sync_report[f"rank0/{layout}/reports"]]
    assert len(reports) == 4 * len(LAYOUTS)
    for report in reports:
        # Every rank returns the source's report.
        assert report.num_tensors == 2 * 12 + 3  # 12 HF tensors per layer, embedding, norm, lm_head
        assert report.oversized_tensors == 2  # the embedding and the output layer, each alone
        assert report.num_buckets >= 6
        assert report.max_bucket_bytes <= max(BUCKET_BYTES, report.largest_tensor_bytes)
        assert report.largest_tensor_bytes == 151_665 * 64 * 4
    assert sync_report["rank1/tp2/reports"] == sync_report["rank0/tp2/reports"]


def test_vocab_parallel_argmax(sync_report: dict[str, Any]) -> None:
    assert sync_report["rank0/tp2/argmax"] and sync_report["rank1/tp2/argmax"]


def test_engine_that_never_joins_the_broadcast_fails_fast(sync_report: dict[str, Any]) -> None:
    message = sync_report["rank0/fault/lost_group"]
    assert message is not None
    # Which side notices first varies: the engine's error reply, or the broadcast that the engine
    # closed its end of.
    assert "disaggregated transport" in message and "sglang engine" in message and "at bucket 0" in message
    assert "engine receiving failed" in message or "broadcast from the source failed" in message
    assert sync_report["rank0/fault/lost_group/seconds"] < 30
    assert "failed on global rank 0" in sync_report["rank1/fault/lost_group"]
    assert sync_report["rank0/fault/lost_group/engine_healthy"]


def test_hung_engine_times_out(sync_report: dict[str, Any]) -> None:
    message = sync_report["rank0/fault/hung"]
    assert message is not None and "failed at begin" in message and "timed out" in message
    # One timeout for the call, at most one more to close the session.
    assert sync_report["rank0/fault/hung/seconds"] < 2 * HUNG_ENGINE_TIMEOUT_S + 10
    assert sync_report["rank1/fault/hung"] is not None


def test_engine_killed_during_and_before_a_sync(sync_report: dict[str, Any]) -> None:
    for label in ("killed_during", "dead_colocated", "dead_disaggregated"):
        message = sync_report[f"rank0/fault/{label}"]
        assert message is not None and "sglang engine" in message and "exited" in message, (label, message)
        assert sync_report[f"rank1/fault/{label}"] is not None
    assert sync_report["rank0/fault/killed_during/seconds"] < CALL_TIMEOUT_S / 2
    assert sync_report["rank0/fault/dead_colocated/seconds"] < 15
    assert sync_report["rank0/fault/dead_disaggregated/seconds"] < 15
    assert sync_report["rank0/fault/engine_gone"]
