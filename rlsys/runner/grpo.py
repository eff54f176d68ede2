"""The GRPO loop: one step is rollout -> reward -> advantages -> update -> weight sync.

    result = train_from_config("smollm2-135m-grpo-cpu", ["runner.total_steps=4"])

Choices, and what must stay true:
- Order within a step: metrics (and validation, when due) are logged before the checkpoint is
  saved, so a resumed run, which purges event-file steps after its checkpoint, loses nothing it
  cannot replay.
- Rollouts come from ``rlsys.runner.rollouts``: generated when the step asks for them
  (``rollout.max_staleness = 0``), or by a producer thread ahead of the trainer, each token
  versioned, at most ``max_staleness`` weight versions old when trained on. A weight sync holds
  the engine lock, so no generation segment runs during one.
- Dynamic sampling with refill (``algorithm.max_refill_rounds``): while the group filter leaves
  fewer than ``prompts_per_step`` groups, the step takes another batch (counted in
  ``rollout/refill_rounds``); groups beyond ``prompts_per_step`` are left out.
- Sampling seed of batch ``b`` (the ``b``-th batch taken; step ``b``'s without refills): derived
  from ``(runner.seed, b)``, so the same batch of a resumed run asks the engine for the same samples. Engines that honour it (HF; SGLang with deterministic
  inference on GPU) then reproduce a run exactly; SGLang on CPU samples from its scheduler's own
  generator, seeded once at start.
- Weights: the engine starts from the model's HF weights, which are the actor's only on a fresh
  run; a resumed run syncs once before its first rollout.
- Validation is greedy on ``data.val_files`` (the first ``runner.val_max_prompts``), through the
  same ``rlsys.eval`` code and reward as ``rlsys eval``: before the first step, every
  ``runner.val_interval`` steps and after the last.
- A step whose every group the filter dropped trains on nothing and skips the sync.
- Timestamps (seconds since the trainer started): ``time/generation_start``/``_end`` of the step's
  first batch and ``time/train_start``/``_end``, so overlap can be read from the event files.
- A failure inside a step (a worker died or failed, an engine hung, a save failed) ends the run
  as ``RunFailed``: the step, its phase, the part that failed and the last complete checkpoint, in
  one line; the workers are then given 10 s to stop before they are killed.
- Memory when colocated on GPU: the engines release theirs for the train phase; with
  ``actor.offload`` the actor's state lives on the host from the end of each sync until the next
  train phase (RLinf's order), so the engines generate with the whole GPU.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from rlsys.cluster.groups import Cluster, WorkerFailed, failure_reason
from rlsys.cluster.logs import log_dir
from rlsys.config import REPO_ROOT, RunConfig, load_config, to_dict
from rlsys.data import PromptBatches, load_train_prompts, load_val_prompts
from rlsys.eval.benchmark import evaluate_prompts, write_results
from rlsys.models.offline import load_tokenizer_for, resolve_model_path
from rlsys.models.shapes import check_model_layout
from rlsys.reward.pool import RewardPool
from rlsys.rollout.base import SamplingParams, derive_seed
from rlsys.runner import checkpoints
from rlsys.runner.batch import build_train_batch, groups_with_signal
from rlsys.runner.metrics import MetricsLogger, check_loggers, console
from rlsys.runner.rollouts import AsyncRollouts, EngineWeights, Rollout, SyncRollouts, generate_versioned

TRAIN_METRICS = {"policy_loss": "train/policy_loss", "entropy": "train/entropy_loss", "ratio": "train/ratio",
                 "clip_fraction": "train/clip_fraction", "approx_kl": "train/approx_kl",
                 "grad_norm": "train/grad_norm", "lr": "train/lr", "early_stopped": "train/early_stopped",
                 "skipped_nonfinite": "train/skipped_nonfinite", "optimizer_steps": "train/optimizer_steps",
                 "skipped_overflow": "train/skipped_overflow", "loss_scale": "train/loss_scale",
                 "logprob_mismatch": "train/logprob_mismatch", "is_weight_mean": "train/is_weight_mean",
                 "is_weight_max": "train/is_weight_max", "is_clipped_fraction": "train/is_clipped_fraction",
                 "skipped_zero_advantage": "train/skipped_zero_advantage"}


def process_age_s() -> float:
    """Seconds since this process first imported rlsys (``rlsys.IMPORTED_AT``)."""
    import rlsys

    return time.monotonic() - rlsys.IMPORTED_AT


@dataclass
class TrainResult:
    output_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    """Per logged step: ``step`` and every metric (validation before the first step is step 0)."""
    resumed_from: Path | None = None


def train_from_config(name: str, overrides: list[str] | None = None) -> TrainResult:
    return train(load_config(name, overrides))


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run at a safe point (after a step)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        saved = f"last complete checkpoint: {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"stopped by {name} after step {step}; {saved}")


class RunFailed(RuntimeError):
    """A step failed: ``phase`` of ``step``, because of ``error``; ``checkpoint`` is the last
    complete one (None: none yet). ``expected``: a fault of a part (a worker died, an engine hung,
    a save failed), as opposed to an error in rlsys itself, whose traceback is worth showing."""

    def __init__(self, step: int, phase: str, error: BaseException, checkpoint: Path | None) -> None:
        self.step, self.phase, self.error, self.checkpoint = step, phase, error, checkpoint
        self.expected = isinstance(error, (WorkerFailed, checkpoints.CheckpointSaveError, TimeoutError))
        saved = (f"last complete checkpoint: {checkpoint} (a rerun with the same runner.output_dir resumes "
                 f"from it)") if checkpoint else "no checkpoint was saved yet"
        where = f"step {step} failed in {phase}" if step else f"{phase} before the first step failed"
        super().__init__(f"{where}: {failure_reason(error)}; {saved}")


def train(run: RunConfig) -> TrainResult:
    stop = StopSignals()
    try:
        trainer = GRPOTrainer(run, stop)
        try:
            result = trainer.fit()
        except BaseException:
            trainer.close(shutdown_timeout_s=10.0)
            raise
        trainer.close()
        return result
    finally:
        stop.restore()


class StopSignals:
    """SIGINT/SIGTERM ask the run to stop at the next safe point; a second one stops it now.

    Armed at start and again once Ray is up: ``ray.init`` installs its own SIGTERM handler in the
    driver, which aborts the process."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}
        self.arm()

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread: nothing to catch here
        for s in (signal.SIGINT, signal.SIGTERM):
            handler = signal.signal(s, self.ask_to_stop)
            self.previous.setdefault(s, handler)

    def ask_to_stop(self, signum: int, frame: object) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received.append(signum)
        console(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop now)")

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class GRPOTrainer:
    def __init__(self, run: RunConfig, stop: StopSignals | None = None) -> None:
        # Everything that can be wrong with the config or the data fails here, before Ray starts.
        run.data.check_files_exist(base=REPO_ROOT)
        check_model_layout(run)
        check_loggers(run.runner)
        self.run, self.output_dir = run, Path(run.runner.output_dir)
        tokenizer = load_tokenizer_for(run.model)
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.started_at = time.time()
        train_data = load_train_prompts(run.data, tokenizer, base=REPO_ROOT)
        val_data = load_val_prompts(run.data, tokenizer, base=REPO_ROOT)
        console(f"data: training {train_data.summary()}; validation {val_data.summary()}")
        self.batches = PromptBatches.from_config(train_data, run.runner.prompts_per_step, run.data)
        self.val_prompts = list(val_data)
        self.val_prompts = self.val_prompts[:run.runner.val_max_prompts or None]
        self.resumed_from = checkpoints.resume_point(self.output_dir / "checkpoints", run.runner.resume,
                                                     run.runner.resume_dir)
        self.step, self.times, self.batches_taken, self.phase = 0, {}, 0, "start-up"
        self.stop = stop
        self.weights, self.rollouts = EngineWeights(), None
        self.started_ray = not ray.is_initialized()
        self.reward, self.cluster, self.logger = RewardPool(run.reward).__enter__(), None, None
        console(f"writing to {self.output_dir}/; worker logs in {log_dir(self.output_dir)}/")
        try:
            self.cluster = Cluster.start(run, str(resolve_model_path(run.model.path)))
            if stop is not None:
                stop.arm()
            self.actor, self.rollout = self.cluster.actor, self.cluster.rollout
            up = self.cluster.startup_s
            console(f"workers up in {up['total']:.1f} s (Ray {up['ray']:.1f} s; actor built in "
                    f"{up['actor_build']:.1f} s, engine started in {up['engine_start']:.1f} s, in parallel)")
            if self.resumed_from is not None:
                self.resume(self.resumed_from)
            self.data_state = self.batches.state_dict()
            self.rollouts = self.start_rollouts()
            self.actor.offload()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.logger = MetricsLogger(run.runner, self.output_dir, to_dict(run), start_step=self.step,
                                        total_steps=run.runner.total_steps)
        except BaseException:
            self.close()
            raise
        self.result = TrainResult(self.output_dir, resumed_from=self.resumed_from)
        # Logged with the first record: from this process's start to here, the workers' parts, the data counts.
        self.startup_metrics = {"time/startup": process_age_s(),
                                **{f"time/startup_{part}": s for part, s in self.cluster.startup_s.items()},
                                **{f"data/{split}_{k}": n for split, d in (("train", train_data), ("val", val_data))
                                   for k, n in d.counts().items()}}

    def resume(self, directory: Path) -> None:
        self.actor.load(str(directory))
        state = checkpoints.read_trainer_state(directory)
        self.step = state["step"]
        self.batches_taken = state.get("batches_taken", self.step)
        self.batches.load_state_dict(state["data"])
        self.actor.sync_weights()
        self.weights.version = self.step
        position = self.batches.state_dict()
        console(f"resumed from {directory} (step {self.step}, data epoch {position['epoch']} "
                f"offset {position['offset']})")

    def start_rollouts(self) -> SyncRollouts | AsyncRollouts:
        if self.run.rollout.max_staleness == 0:
            return SyncRollouts(self.generate_batch, self.next_prompts, first_batch_number=self.batches_taken)
        return AsyncRollouts(self.generate_batch, self.next_prompts, ahead=self.run.rollout.max_staleness,
                             first_batch_number=self.batches_taken, timeout_s=self.run.rollout.timeout_s)

    def fit(self) -> TrainResult:
        try:
            return self.steps()
        except Interrupted:
            raise
        except Exception as error:
            raise RunFailed(self.step, self.phase, error, self.last_checkpoint()) from error

    def steps(self) -> TrainResult:
        runner = self.run.runner
        if self.step == 0 and runner.val_interval:
            self.record(0, self.validate(0), advance=False)
        while self.step < runner.total_steps:
            self.stop_if_asked(saved=False)
            self.step += 1
            metrics = self.train_step(self.step)
            last = self.step == runner.total_steps
            if runner.val_interval and (self.step % runner.val_interval == 0 or last):
                metrics |= self.validate(self.step)
            self.record(self.step, metrics)
            saved = bool(runner.save_interval and (self.step % runner.save_interval == 0 or last))
            if saved:
                self.save()
            if not last:
                self.stop_if_asked(saved)
        return self.result

    def stop_if_asked(self, saved: bool) -> None:
        """The safe point between steps: save (``runner.save_on_interrupt``) and stop on a signal."""
        if self.stop is None or not self.stop.received:
            return
        if self.run.runner.save_on_interrupt and not saved and self.step > 0:
            self.save()
        raise Interrupted(self.stop.received[0], self.step, self.last_checkpoint())

    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint with a COMPLETE marker (unverified: hashing a large one takes
        minutes; resume verifies), else the one this run resumed from."""
        root = self.output_dir / "checkpoints"
        complete = checkpoints.complete_checkpoints(root) if root.is_dir() else []
        return complete[-1][1] if complete else self.resumed_from

    def train_step(self, step: int) -> dict[str, float]:
        """One GRPO step, one role per line."""
        self.times = {}
        with self.timed("step"):
            prompts, samples, scores, versions, metrics = self.collect(step)
            train = build_train_batch(prompts, samples, scores, group_size=self.run.rollout.n_samples,
                                      max_new_tokens=self.run.rollout.max_new_tokens, algorithm=self.run.algorithm,
                                      token_versions=versions)
            metrics |= train.metrics
            if train.batch is not None:
                metrics["time/train_start"] = time.time() - self.started_at
                with self.timed("train"):
                    self.rollout.release_memory()
                    self.actor.reload()
                    updated = self.actor.train_step(train.batch, train.rollout_logprobs)
                    self.rollout.resume_memory()
                metrics["time/train_end"] = time.time() - self.started_at
                metrics |= {TRAIN_METRICS[k]: v for k, v in updated.items() if k in TRAIN_METRICS}
                with self.timed("sync"), self.weights.lock:
                    metrics |= self.actor.sync_weights()
                self.actor.offload()
            self.weights.version = step  # unchanged weights (nothing trained) are this step's too
        metrics |= {f"time/{phase}": seconds for phase, seconds in self.times.items()}
        metrics["throughput/tokens_per_s"] = metrics["rollout/tokens"] / metrics["time/step"]
        return metrics

    def collect(self, step: int) -> tuple[list, list, list[float], list[list[int]], dict[str, float]]:
        """This step's groups: the next batch, and more while the group filter leaves fewer than
        ``prompts_per_step`` (``algorithm.max_refill_rounds``), without groups older than
        ``rollout.max_staleness`` versions."""
        algorithm, group, wanted = self.run.algorithm, self.run.rollout.n_samples, self.run.runner.prompts_per_step
        prompts, samples, scores, versions = [], [], [], []
        dropped = timeouts = crashes = generation_s = kept = refills = 0
        window_start = self.weights.version - self.run.rollout.max_staleness
        for refill in range(algorithm.max_refill_rounds + 1):
            with self.timed("rollout"):
                rollout = self.rollouts.take()
            if refill == 0:
                first = rollout
            refills, generation_s = refill, generation_s + rollout.generation_s
            with self.timed("reward"):
                scored = self.reward.score_batch([s.response_text for s in rollout.samples],
                                                 [list(rollout.prompts[s.prompt_index].answers) for s in rollout.samples])
            timeouts, crashes = timeouts + scored.n_timeout, crashes + scored.n_crash
            signal = groups_with_signal(rollout.samples, scored.scores, group_size=group,
                                        max_new_tokens=self.run.rollout.max_new_tokens, algorithm=algorithm)
            oldest = rollout.oldest_versions()
            for g, prompt in enumerate(rollout.prompts):
                members = range(g * group, (g + 1) * group)
                if any(oldest[i] < window_start for i in members):
                    dropped += group
                    continue
                if kept >= wanted:
                    continue  # the batch is full: a refill's extra groups are left out
                kept += signal[g]
                for i in members:
                    samples.append(dataclasses.replace(rollout.samples[i], prompt_index=len(prompts)))
                    scores.append(scored.scores[i])
                    versions.append(rollout.token_versions[i])
                prompts.append(prompt)
            self.data_state = rollout.data_state
            self.batches_taken += 1
            if not algorithm.filter_zero_variance_groups or kept >= wanted:
                break
        staleness = [self.weights.version - min(v) for v in versions if v]
        metrics = {"rollout/staleness_mean": sum(staleness) / len(staleness) if staleness else 0.0,
                   "rollout/staleness_max": float(max(staleness, default=0)),
                   "rollout/dropped_stale": float(dropped), "rollout/refill_rounds": float(refills),
                   "reward/timeouts": float(timeouts), "reward/crashes": float(crashes),
                   "reward/pool_restarts": float(self.reward.pool_restarts),
                   "time/generation": generation_s,
                   "time/generation_start": first.started - self.started_at,
                   "time/generation_end": first.finished - self.started_at}
        return prompts, samples, scores, versions, metrics

    def generate_batch(self, prompts: list, batch_number: int, data_state: dict[str, int]) -> Rollout:
        """One batch of prompts through the engines, each token versioned (``rlsys.runner.rollouts``)."""
        started = time.time()
        samples, versions, busy = generate_versioned(
            self.rollout, [list(p.token_ids) for p in prompts], self.sampling(batch_number), weights=self.weights,
            segment_tokens=self.run.rollout.partial_rollout_tokens, decode=self.decode)
        return Rollout(prompts, samples, versions, data_state, started, time.time(), busy)

    def next_prompts(self) -> tuple[list, dict[str, int]]:
        prompts = self.batches.next_batch()
        return prompts, self.batches.state_dict()

    def validate(self, step: int) -> dict[str, float]:
        if not self.val_prompts:
            return {}
        self.logger.phase(step, "validation")
        params = SamplingParams(temperature=0.0, max_new_tokens=self.run.rollout.val_max_new_tokens
                                or self.run.rollout.max_new_tokens, n=1, seed=self.run.runner.seed)
        with self.timed("validation"):
            result = evaluate_prompts(self.rollout, self.val_prompts, self.reward, params, name="val")
        write_results([result], self.output_dir / "validation" / f"step_{step:08d}")
        return {"val/rewards": result.summary["mean_reward"], "val/accuracy": result.summary["accuracy"],
                "time/validation": self.times.pop("validation")}

    def sampling(self, batch_number: int) -> SamplingParams:
        """Batch ``b`` (1, 2, ...; the batch of step ``b`` without refills) samples with seed ``(seed, b)``."""
        rollout = self.run.rollout
        seed = derive_seed(self.run.runner.seed, batch_number)
        return SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p,
                              max_new_tokens=rollout.max_new_tokens, n=rollout.n_samples, seed=seed)

    def record(self, step: int, metrics: dict[str, float], *, advance: bool = True) -> None:
        metrics, self.startup_metrics = {**self.startup_metrics, **metrics}, {}
        self.logger.log(step, metrics, advance=advance)
        self.result.history.append({"step": float(step), **metrics})

    def save(self) -> None:
        root = self.output_dir / "checkpoints"
        directory = checkpoints.step_dir(root, self.step)
        self.phase = "checkpoint"
        self.logger.phase(self.step, "checkpoint")
        # Replaces an unfinished save of this step (a killed run's); a failed save is removed and
        # an OS error (disk full) ends the run as CheckpointSaveError, the previous checkpoint kept.
        with checkpoints.saving(directory):
            self.actor.reload()  # an offloaded actor saves from the device, as it trained
            self.actor.save(str(directory))
            self.actor.offload()
            checkpoints.write_trainer_state(directory, {"step": self.step, "data": self.data_state,
                                                        "batches_taken": self.batches_taken,
                                                        "config": to_dict(self.run)})
            checkpoints.mark_complete(directory)  # the manifest of every file, written last
        checkpoints.prune(root, self.run.runner.keep_last_checkpoints, saved=directory)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        if phase != "step":
            self.phase = phase
            if self.logger is not None:
                self.logger.phase(self.step, phase)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - started

    def close(self, shutdown_timeout_s: float = 120.0) -> None:
        self.weights.closing.set()
        if self.rollouts is not None:
            self.rollouts.close()
        if self.logger is not None:
            self.logger.close()
        if self.cluster is not None:
            self.cluster.shutdown(shutdown_timeout_s)
        self.reward.__exit__(None, None, None)
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
