"""Risk: memory or open files grow with every step or every weight sync, so a run that is fine for
the 2-8 steps of the other tests dies hours into a real run (out of memory, EMFILE), or leaves
shared-memory blocks behind in /dev/shm until the host runs out.

Two soaks, run by ``make test-long`` only (marker ``long``), each with real components:

- ``test_training_soak_through_the_cli``: the real ``rlsys train smollm2-135m-grpo-cpu`` on the
  tiny random Qwen2 (``tests/runner/conftest.py``) for ``SOAK_STEPS`` steps with validation and a
  checkpoint every 10 steps, real Ray, real SGLang on CPU, the sandboxed reward pool. At each
  console line "[rlsys] step N:" every process of the run (found by the ``RLSYS_TEST_RUN`` mark in
  its environment) is sampled: resident set and open file descriptors, summed per role (from
  the process title). Over the window (after ``TRAIN_WARMUP_STEPS`` steps, without the samples
  taken while a checkpoint is written) each role's growth, its least-squares slope and its fd
  change must stay within the bounds below; the run must exit 0 and leave no process behind.
- ``test_back_to_back_weight_syncs_into_sglang``: ``SYNCS`` syncs through ``sync_weights`` and
  the colocated transport (shared memory on CPU) from a real Megatron actor into a real
  ``SGLangEngine`` on CPU, in this process. The trainer (this process) and every engine process
  are sampled every ``SAMPLE_EVERY`` syncs; after ``SYNC_WARMUP`` syncs growth and slope must stay
  within the bounds, /dev/shm must hold no more of the trainer's blocks than before, and the
  engine must still generate, with the actor's weights (``check_engine_follows_actor``: the
  engine starts from other random weights, so this passes only if the syncs landed).

How the bounds were chosen: a leak that matters keeps something the size of the work unit alive
each time. The tiny model is about 20M fp32 parameters (74 MiB of weights, printed); a leaked
weight copy, optimizer state or bucket per step or sync is tens of MiB, so it exceeds the growth
bound within a step or a sync, and the slope bound catches leaks down to a few percent of that,
while the bounds sit more than 5 times above what healthy processes measured (the numbers next
to each constant; both soaks print their per-process tables).
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from tests.runner.conftest import loop_overrides, prompt_files, tiny_model_dir  # noqa: F401  (fixtures)
from tests.runner.test_interrupt import processes_marked, start_train, wait_gone

MIB = 2**20

# ---------------------------------------------------------------- bounds of the training soak
SOAK_STEPS = 40
SAVE_INTERVAL = 10
"""Validation and a checkpoint every 10 steps, so the window holds several of each."""
TRAIN_WARMUP_STEPS = 10
"""Steps 1..10 are warm-up (first validation and checkpoint, allocator and import caches filling):
the window starts at the first sample after them."""
TRAIN_RSS_GROWTH_MIB = 32
"""Most a role's summed resident set may grow over the window. Measured in healthy roles over
steps 11..39: at most 2.4 MiB (gcs_server); a leaked weight copy per step would add 74 MiB each step."""
TRAIN_RSS_SLOPE_MIB_PER_STEP = 1.0
"""Most a role's least-squares RSS slope over the window may be: a steady leak of 1 MiB per step
fails. Measured: at most 0.09 MiB/step (gcs_server), 0.07 for the actor worker, 0.005 for the
engine worker; SGLang's scheduler 0 in 3 of 5 runs, 0.28-0.33 in 2 (a single 7 MiB jump mid-window:
a one-off jump of J MiB in the middle reads as about J/19 MiB/step, so this bound lets one-off
jumps up to the growth bound pass)."""
TRAIN_FD_GROWTH = 8
"""Most a role's open file descriptors may grow over the window. Measured: 0 in every role."""
RUN_TIMEOUT_S = 1500
"""Longest the run may take (about 160-260 s on 2 busy cores)."""
SYNC_TIMEOUT_S = 1500
"""Longest the sync soak's rank may take (about 150-220 s on 2 busy cores)."""
STEP_LINE = re.compile(r"\[rlsys\] step (\d+):")
BOUNDED_ROLES = ("driver", "gcs_server", "raylet", "ray::ActorWorker", "ray::EngineWorker", "sglang worker",
                 "sglang::scheduler", "sglang::detokenizer", "forkserver", "reward workers")
"""Roles whose bounds are asserted; the rest ("other": Ray's dashboard, agents, log monitor,
idle workers, which come and go) are printed only."""

# ---------------------------------------------------------------- bounds of the sync soak
SYNCS = 200
SYNC_WARMUP = 20
SAMPLE_EVERY = 10
SYNC_BUCKET_MB = 64
SYNC_RSS_GROWTH_MIB = 16
"""Most the trainer's or an engine process's resident set may grow from sync 20 to the last.
Measured: at most 0.4 MiB (the trainer); one leaked bucket (37-64 MiB) exceeds it at the first sync."""
SYNC_RSS_SLOPE_KIB_PER_SYNC = 64
"""Most a process's least-squares slope may be. Measured: 2.6 KiB/sync (trainer), 0.1 (engine);
a leaked bucket per sync is 38,000-65,536 KiB/sync. Leaks under about 64 KiB per sync pass."""
SYNC_FD_GROWTH = 4
"""Measured: 0 in every process."""
SHM_GROWTH = 0
"""/dev/shm entries after the soak minus before: every bucket's block must be unlinked."""


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
            / sum((x - mean_x) ** 2 for x in xs))


def process_figures(pid: int) -> tuple[int, int] | None:
    """(resident bytes, open fds) of ``pid``, or None when it is gone or unreadable."""
    try:
        process = psutil.Process(pid)
        return process.memory_info().rss, process.num_fds()
    except (psutil.Error, OSError):
        return None


# ---------------------------------------------------------------- the training soak


def role_of(pid: int, driver: int, forkservers: set[int]) -> str:
    """The role of a marked process, from its title (see BOUNDED_ROLES)."""
    if pid == driver:
        return "driver"
    try:
        process = psutil.Process(pid)
        cmdline = " ".join(process.cmdline())
        parent = process.ppid()
    except psutil.Error:
        return "gone"
    if parent in forkservers:
        return "reward workers"
    if "multiprocessing.forkserver" in cmdline:
        return "forkserver"
    if cmdline.startswith("ray::"):
        # A Ray worker's title is ray::Class while idle and ray::Class.method while it runs one.
        name = cmdline.split()[0].split(".")[0]
        return name if name in BOUNDED_ROLES else "other"
    if cmdline.startswith("sglang::"):
        name = cmdline.split()[0]
        # sglang titles carry the TP rank on GPU (sglang::scheduler_TP0): one role for all.
        return "sglang::scheduler" if name.startswith("sglang::scheduler") else name
    if "rlsys.rollout.sglang_engine" in cmdline:
        return "sglang worker"
    for name in ("gcs_server", "raylet"):
        if cmdline.split()[0].endswith(name):
            return name
    return "other"


@dataclass
class RoleSeries:
    steps: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


def sample_run(mark: str, driver: int) -> dict[str, tuple[int, int, int]]:
    """Per role: (summed RSS bytes, summed open fds, processes)."""
    pids = processes_marked(mark)
    forkservers = set()
    for pid in pids:
        try:
            if "multiprocessing.forkserver" in " ".join(psutil.Process(pid).cmdline()):
                forkservers.add(pid)
        except psutil.Error:
            continue
    totals: dict[str, list[int]] = {}
    for pid in pids:
        role = role_of(pid, driver, forkservers)
        figures = process_figures(pid)
        if figures is None or role == "gone":
            continue
        entry = totals.setdefault(role, [0, 0, 0])
        entry[0] += figures[0]
        entry[1] += figures[1]
        entry[2] += 1
    return {role: tuple(values) for role, values in totals.items()}


@pytest.mark.long
@pytest.mark.timeout(RUN_TIMEOUT_S + 120)  # pyproject's 900 s is for the short tests
def test_training_soak_through_the_cli(tiny_model_dir, prompt_files, tmp_path):  # noqa: F811
    """Risk: a per-step leak (memory or fds) in any process of a training run: driver, Ray, the
    actor and engine workers, SGLang's processes, the reward pool."""
    output, mark, log = tmp_path / "run", uuid.uuid4().hex, tmp_path / "console.log"
    overrides = loop_overrides(tiny_model_dir, prompt_files, output, **{
        "runner.total_steps": SOAK_STEPS, "runner.val_interval": SAVE_INTERVAL,
        "runner.save_interval": SAVE_INTERVAL,
        "rollout.engine": "sglang"})
    started = time.monotonic()
    run = start_train(overrides, mark, log)
    series: dict[str, RoleSeries] = {}
    seen = 0
    try:
        while True:
            steps = [int(s) for s in STEP_LINE.findall(log.read_text(errors="replace"))]
            if steps and steps[-1] > seen:
                # Sampled as soon as the line appears: every sample is at the same point of a step.
                seen = steps[-1]
                for role, (rss, fds, count) in sample_run(mark, run.pid).items():
                    entry = series.setdefault(role, RoleSeries())
                    entry.steps.append(seen)
                    entry.rss.append(rss)
                    entry.fds.append(fds)
                    entry.counts.append(count)
            if run.poll() is not None:
                break
            assert time.monotonic() - started < RUN_TIMEOUT_S, f"no exit within {RUN_TIMEOUT_S}s"
            time.sleep(0.2)
    finally:
        if run.poll() is None:
            run.kill()
    wall_s = time.monotonic() - started
    console = log.read_text(errors="replace")
    assert run.returncode == 0, console[-4000:]
    assert seen == SOAK_STEPS, f"sampled up to step {seen} of {SOAK_STEPS}"
    assert not wait_gone(mark), f"processes of the run left after its exit: {processes_marked(mark)}"

    # Window: after warm-up, without the samples taken while a checkpoint is written (the line of a
    # step that saves is printed just before its save starts, and the actor worker is then
    # mid-write, +130-450 MiB) and without the last step's (it saves too).
    window_steps = [step for step in range(TRAIN_WARMUP_STEPS + 1, SOAK_STEPS) if step % SAVE_INTERVAL]
    start, end = window_steps[0], window_steps[-1]
    print(f"\ntraining soak: {SOAK_STEPS} steps in {wall_s:.0f} s ({wall_s / SOAK_STEPS:.1f} s/step), "
          f"model {model_mib(tiny_model_dir):.0f} MiB of fp32 weights, validation and checkpoint every "
          f"{SAVE_INTERVAL} steps; window steps {start}..{end} (not the saving steps)")
    print(f"bounds: RSS growth <= {TRAIN_RSS_GROWTH_MIB} MiB, slope <= {TRAIN_RSS_SLOPE_MIB_PER_STEP} MiB/step, "
          f"fds <= +{TRAIN_FD_GROWTH} per role (roles {', '.join(BOUNDED_ROLES)})")
    print(f"{'role':<22} {'procs':>5} {f'RSS@{start} MiB':>11} {f'RSS@{end} MiB':>11} {'growth MiB':>11} "
          f"{'slope MiB/step':>15} {f'fds@{start}':>7} {f'fds@{end}':>7} {'fd change':>9}")
    problems = []
    for role in sorted(series):
        entry = series[role]
        window = [i for i, step in enumerate(entry.steps) if step in window_steps]
        if len(window) < 2:
            print(f"{role:<22} (sampled at steps {entry.steps} only)")
            continue
        first, last = window[0], window[-1]
        growth = (entry.rss[last] - entry.rss[first]) / MIB
        rate = slope([entry.steps[i] for i in window], [entry.rss[i] / MIB for i in window])
        fd_change = entry.fds[last] - entry.fds[first]
        counts = {entry.counts[first], entry.counts[last]}
        procs = "-".join(str(n) for n in sorted(counts))
        print(f"{role:<22} {procs:>5} {entry.rss[first] / MIB:11.1f} {entry.rss[last] / MIB:11.1f} {growth:11.1f} "
              f"{rate:15.3f} {entry.fds[first]:7d} {entry.fds[last]:7d} {fd_change:+9d}")
        if role not in BOUNDED_ROLES:
            continue
        if growth > TRAIN_RSS_GROWTH_MIB or rate > TRAIN_RSS_SLOPE_MIB_PER_STEP or fd_change > TRAIN_FD_GROWTH:
            trace = " ".join(f"{step}:{rss / MIB:.0f}" for step, rss in zip(entry.steps, entry.rss, strict=True))
            problems.append(f"{role}: RSS {growth:+.1f} MiB, {rate:.3f} MiB/step, fds {fd_change:+d} "
                            f"(RSS MiB by step: {trace})")
    missing = [role for role in BOUNDED_ROLES if role not in series]
    assert not missing, f"roles never sampled (the classification is off): {missing}; seen {sorted(series)}"
    assert not problems, "growth past the bounds after warm-up: " + "; ".join(problems)


def model_mib(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / MIB


# ---------------------------------------------------------------- the sync soak


def engine_processes(worker_pid: int) -> dict[str, int]:
    """The SGLang worker and every process under it, by title."""
    found = {"sglang worker": worker_pid}
    try:
        children = psutil.Process(worker_pid).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "multiprocessing.resource_tracker" in cmdline:
            title = "resource_tracker"
        else:
            title = cmdline.split(" ")[0] or child.name()
        found[f"{title} ({child.pid})"] = child.pid
    return found


def shm_files_of(pids: list[int]) -> set[str]:
    """/dev/shm files that ``pids`` hold open or mapped."""
    found = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            found.update(f.path for f in process.open_files() if f.path.startswith("/dev/shm/"))
            found.update(m.path for m in process.memory_maps() if m.path.startswith("/dev/shm/"))
    return found


def own_shm_entries(pid: int) -> list[str]:
    """/dev/shm entries of this process's buckets: torch names its file_system blocks
    /torch_<pid>_<n>_<n> (other work on the host has entries there too)."""
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(f"torch_{pid}_"))


def _sync_soak_rank(rank: int, world_size: int, engine_dir: str, actor_dir: str) -> dict:
    from rlsys.actor.actor import MegatronActor
    from rlsys.config import ActorConfig
    from rlsys.models.offline import load_tokenizer
    from rlsys.rollout.base import SamplingParams
    from rlsys.rollout.sglang_engine import SGLangEngine, _file_system_sharing, serialize_named_tensors
    from rlsys.sync.transports import ColocatedTransport
    from rlsys.sync.verify import check_engine_follows_actor
    from rlsys.sync.weight_sync import EngineFeed, sync_weights
    from tests.rollout.tiny_models import chat_prompts

    # The engine starts from other weights than the actor's: the check at the end can only pass
    # if the syncs landed.
    actor = MegatronActor(ActorConfig(precision="fp32", transformer_impl="local"), model_path=actor_dir)
    engine = SGLangEngine(engine_dir, device="cpu", max_total_tokens=4096)
    trainer = os.getpid()
    feed = EngineFeed(ColocatedTransport(engine), lead_rank=0)
    samples: list[dict] = []
    shm_total_before = len(os.listdir("/dev/shm"))
    try:
        def sample(syncs: int) -> None:
            processes = {"trainer": trainer, **engine_processes(engine.worker_pid)}
            # Children of the trainer other than the engine (torch's shm manager, if it runs).
            for child in psutil.Process(trainer).children(recursive=False):
                if child.pid != engine.worker_pid:
                    with contextlib.suppress(psutil.Error):
                        processes[f"trainer child {child.name()} ({child.pid})"] = child.pid
            figures = {name: process_figures(pid) for name, pid in processes.items()}
            samples.append({"syncs": syncs, "figures": figures, "shm_own": len(own_shm_entries(trainer)),
                            "shm_total": len(os.listdir("/dev/shm"))})

        # The /dev/shm check can fail: a serialised bucket's block exists until its receiver has
        # rebuilt and dropped it (torch counts the references), and it has the name we look for.
        probe_before = own_shm_entries(trainer)
        probe = serialize_named_tensors([("probe", torch.ones(1024))])
        probe_entries = [name for name in own_shm_entries(trainer) if name not in probe_before]
        with _file_system_sharing():
            received = pickle.loads(probe)
        del received, probe
        gc.collect()
        probe_left = [name for name in own_shm_entries(trainer) if name not in probe_before]
        shm_own_before = own_shm_entries(trainer)
        sample(0)
        report = None
        started = time.monotonic()
        for index in range(1, SYNCS + 1):
            report = sync_weights(actor.model, actor.hf_config, feed=feed, bucket_bytes=SYNC_BUCKET_MB * MIB)
            if index % SAMPLE_EVERY == 0:
                sample(index)
        sync_s = time.monotonic() - started
        shm_own_after = own_shm_entries(trainer)
        # Files the engine itself keeps in /dev/shm (not per sync): printed with what its
        # shutdown leaves behind.
        engine_shm = shm_files_of(list(engine_processes(engine.worker_pid).values()))
        prompts = chat_prompts(load_tokenizer("qwen2.5-tokenizer"))[:4]
        generated = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=4))
        check_engine_follows_actor(actor.model, actor.hf_config, engine, prompts, num_tokens=6)
        result = {"samples": samples, "sync_s": sync_s, "num_buckets": report.num_buckets,
                  "total_bytes": report.total_bytes, "shm_own_before": shm_own_before, "shm_own_after": shm_own_after,
                  "shm_total_before": shm_total_before, "shm_total_after": len(os.listdir("/dev/shm")),
                  "generated": list(generated[0].response_ids), "startup_s": engine.startup_s,
                  "probe_entries": probe_entries, "probe_left": probe_left, "engine_shm": sorted(engine_shm)}
    finally:
        engine.shutdown()
        actor.close()
    result["engine_shm_left"] = [path for path in result["engine_shm"] if os.path.exists(path)]
    return result


@pytest.mark.long
@pytest.mark.timeout(SYNC_TIMEOUT_S + 120)
def test_back_to_back_weight_syncs_into_sglang(tmp_path):
    """Risk: each weight sync leaves something behind (a bucket, a shared-memory block, a file
    descriptor, a mapping in the scheduler) in the trainer or in SGLang's processes."""
    from rlsys.models.offline import load_tokenizer
    from tests.dist import run_distributed
    from tests.sync.sync_models import save_random_qwen2

    tokenizer = load_tokenizer("qwen2.5-tokenizer")
    engine_dir = save_random_qwen2(tmp_path / "engine", tokenizer, seed=0)
    actor_dir = save_random_qwen2(tmp_path / "actor", tokenizer, seed=1)
    started = time.monotonic()
    (result,) = run_distributed(_sync_soak_rank, world_size=1, args=(str(engine_dir), str(actor_dir)),
                                timeout_s=SYNC_TIMEOUT_S)
    wall_s = time.monotonic() - started
    assert result["generated"], "the engine generated nothing after the soak"

    assert len(result["probe_entries"]) == 1 and not result["probe_left"], \
        f"the /dev/shm measurement does not see or release torch's blocks: " \
        f"{result['probe_entries']} created, {result['probe_left']} left"
    samples = result["samples"]
    window = [s for s in samples if s["syncs"] >= SYNC_WARMUP]
    first, last = window[0], window[-1]
    print(f"\nsync soak: {SYNCS} syncs of {result['total_bytes'] / MIB:.1f} MiB in {result['num_buckets']} buckets "
          f"of {SYNC_BUCKET_MB} MiB, {result['sync_s'] / SYNCS:.3f} s/sync ({result['sync_s']:.0f} s), "
          f"engine start {result['startup_s']:.0f} s, test wall {wall_s:.0f} s")
    print(f"bounds: RSS growth <= {SYNC_RSS_GROWTH_MIB} MiB, slope <= {SYNC_RSS_SLOPE_KIB_PER_SYNC} KiB/sync, "
          f"fds <= +{SYNC_FD_GROWTH} per process, syncs {first['syncs']}..{last['syncs']}; /dev/shm +{SHM_GROWTH}")
    start = f"@{first['syncs']}"
    print(f"{'process':<36} {'RSS' + start + ' MiB':>11} {'RSS@end MiB':>12} {'growth MiB':>11} "
          f"{'slope KiB/sync':>15} {'fds' + start:>7} {'fds@end':>8} {'fd change':>9}")
    problems = []
    for name in first["figures"]:
        points = [(s["syncs"], s["figures"].get(name)) for s in window]
        points = [(x, f) for x, f in points if f is not None]
        assert len(points) == len(window), f"{name} was gone at some samples: {points}"
        growth = (points[-1][1][0] - points[0][1][0]) / MIB
        rate = slope([x for x, _ in points], [f[0] / 1024 for _, f in points])
        fd_change = points[-1][1][1] - points[0][1][1]
        print(f"{name:<36} {points[0][1][0] / MIB:11.1f} {points[-1][1][0] / MIB:12.1f} {growth:11.1f} {rate:15.1f} "
              f"{points[0][1][1]:7d} {points[-1][1][1]:8d} {fd_change:+9d}")
        if growth > SYNC_RSS_GROWTH_MIB or rate > SYNC_RSS_SLOPE_KIB_PER_SYNC or fd_change > SYNC_FD_GROWTH:
            problems.append(f"{name}: RSS {growth:+.1f} MiB, {rate:.1f} KiB/sync, fds {fd_change:+d}")
    shm_change = len(result["shm_own_after"]) - len(result["shm_own_before"])
    print(f"/dev/shm: this trainer's torch blocks {len(result['shm_own_before'])} before, "
          f"{len(result['shm_own_after'])} after (per sample: {[s['shm_own'] for s in samples]}); "
          f"all entries {result['shm_total_before']} -> {result['shm_total_after']} (shared host)")
    print(f"engine's own /dev/shm files: {result['engine_shm']}; left after its shutdown: "
          f"{result['engine_shm_left']} (once per engine start, not per sync: printed, not asserted)")
    print(f"after the soak: the engine generated {result['generated']}, and its greedy continuation of 4 chat "
          f"prompts (6 tokens) is the actor's")
    assert shm_change <= SHM_GROWTH, f"/dev/shm blocks left by the syncs: {result['shm_own_after'][:8]}"
    assert not problems, "growth past the bounds after warm-up: " + "; ".join(problems)
