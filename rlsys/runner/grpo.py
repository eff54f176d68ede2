"""The GRPO loop: one step is rollout -> reward -> advantages -> update (old log-probs first) -> weight sync.

    result = train_from_config("smollm2-135m-grpo-cpu", ["runner.total_steps=4"])

Choices, and what must stay true:
- Order within a step: metrics (and validation, when due) are logged before the checkpoint is
  saved, so a resumed run, which purges event-file steps after its checkpoint, loses nothing it
  cannot replay.
- Sampling seed of step ``s``: derived from ``(runner.seed, s)``, so the same step of a resumed
  run asks the engine for the same samples. Engines that honour it (HF; SGLang with deterministic
  inference on GPU) then reproduce a run exactly; SGLang on CPU samples from its scheduler's own
  generator, seeded once at start.
- Weights: the engine starts from the model's HF weights, which are the actor's only on a fresh
  run; a resumed run syncs once before its first rollout.
- Validation is greedy on ``data.val_files`` (the first ``runner.val_max_prompts``), through the
  same ``rlsys.eval`` code and reward as ``rlsys eval``: before the first step, every
  ``runner.val_interval`` steps and after the last.
- A step whose every group the filter dropped trains on nothing and skips the sync.
- Memory when colocated on GPU: the engines release theirs for the train phase; with
  ``actor.offload`` the actor's state lives on the host from the end of each sync until the next
  train phase (RLinf's order), so the engines generate with the whole GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray

from rlsys.cluster.groups import Cluster
from rlsys.cluster.logs import log_dir
from rlsys.config import REPO_ROOT, RunConfig, load_config, to_dict
from rlsys.data import PromptBatches, load_train_prompts, load_val_prompts
from rlsys.eval.benchmark import evaluate_prompts, write_results
from rlsys.models.offline import load_tokenizer_for, resolve_model_path
from rlsys.models.shapes import check_model_layout
from rlsys.reward.pool import RewardPool
from rlsys.rollout.base import SamplingParams, derive_seed
from rlsys.runner import checkpoints
from rlsys.runner.batch import build_train_batch
from rlsys.runner.metrics import MetricsLogger, check_loggers, console

TRAIN_METRICS = {"policy_loss": "train/policy_loss", "entropy": "train/entropy_loss", "ratio": "train/ratio",
                 "clip_fraction": "train/clip_fraction", "approx_kl": "train/approx_kl",
                 "grad_norm": "train/grad_norm", "lr": "train/lr", "early_stopped": "train/early_stopped",
                 "skipped_nonfinite": "train/skipped_nonfinite", "optimizer_steps": "train/optimizer_steps",
                 "skipped_overflow": "train/skipped_overflow", "loss_scale": "train/loss_scale",
                 "logprob_mismatch": "train/logprob_mismatch", "is_weight_mean": "train/is_weight_mean",
                 "is_weight_max": "train/is_weight_max", "is_clipped_fraction": "train/is_clipped_fraction"}


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


def train(run: RunConfig) -> TrainResult:
    trainer = GRPOTrainer(run)
    try:
        return trainer.fit()
    finally:
        trainer.close()


class GRPOTrainer:
    def __init__(self, run: RunConfig) -> None:
        # Everything that can be wrong with the config or the data fails here, before Ray starts.
        run.data.check_files_exist(base=REPO_ROOT)
        check_model_layout(run)
        check_loggers(run.runner)
        self.run, self.output_dir = run, Path(run.runner.output_dir)
        tokenizer = load_tokenizer_for(run.model)
        self.batches = PromptBatches.from_config(load_train_prompts(run.data, tokenizer, base=REPO_ROOT),
                                                 run.runner.prompts_per_step, run.data)
        self.val_prompts = list(load_val_prompts(run.data, tokenizer, base=REPO_ROOT))
        self.val_prompts = self.val_prompts[:run.runner.val_max_prompts or None]
        self.resumed_from = checkpoints.resume_point(self.output_dir / "checkpoints", run.runner.resume,
                                                     run.runner.resume_dir)
        self.step, self.times = 0, {}
        self.started_ray = not ray.is_initialized()
        self.reward, self.cluster, self.logger = RewardPool(run.reward).__enter__(), None, None
        console(f"writing to {self.output_dir}/; worker logs in {log_dir(self.output_dir)}/")
        try:
            self.cluster = Cluster.start(run, str(resolve_model_path(run.model.path)))
            self.actor, self.rollout = self.cluster.actor, self.cluster.rollout
            up = self.cluster.startup_s
            console(f"workers up in {up['total']:.1f} s (Ray {up['ray']:.1f} s; actor built in "
                    f"{up['actor_build']:.1f} s, engine started in {up['engine_start']:.1f} s, in parallel)")
            if self.resumed_from is not None:
                self.resume(self.resumed_from)
            self.actor.offload()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.logger = MetricsLogger(run.runner, self.output_dir, to_dict(run), start_step=self.step,
                                        total_steps=run.runner.total_steps)
        except BaseException:
            self.close()
            raise
        self.result = TrainResult(self.output_dir, resumed_from=self.resumed_from)
        # Logged with the first record: from this process's start to here, and the workers' parts.
        self.startup_metrics = {"time/startup": process_age_s(),
                                **{f"time/startup_{part}": s for part, s in self.cluster.startup_s.items()}}

    def resume(self, directory: Path) -> None:
        self.actor.load(str(directory))
        state = checkpoints.read_trainer_state(directory)
        self.step = state["step"]
        self.batches.load_state_dict(state["data"])
        self.actor.sync_weights()
        position = self.batches.state_dict()
        console(f"resumed from {directory} (step {self.step}, data epoch {position['epoch']} "
                f"offset {position['offset']})")

    def fit(self) -> TrainResult:
        runner = self.run.runner
        if self.step == 0 and runner.val_interval:
            self.record(0, self.validate(0), advance=False)
        while self.step < runner.total_steps:
            self.step += 1
            metrics = self.train_step(self.step)
            last = self.step == runner.total_steps
            if runner.val_interval and (self.step % runner.val_interval == 0 or last):
                metrics |= self.validate(self.step)
            self.record(self.step, metrics)
            if runner.save_interval and (self.step % runner.save_interval == 0 or last):
                self.save()
        return self.result

    def train_step(self, step: int) -> dict[str, float]:
        """One GRPO step, one role per line."""
        self.times = {}
        with self.timed("step"):
            prompts = self.batches.next_batch()
            with self.timed("rollout"):
                samples = self.rollout.generate([list(p.token_ids) for p in prompts], self.sampling(step))
            with self.timed("reward"):
                scored = self.reward.score_batch([s.response_text for s in samples],
                                                 [list(prompts[s.prompt_index].answers) for s in samples])
            train = build_train_batch(prompts, samples, scored.scores, group_size=self.run.rollout.n_samples,
                                      max_new_tokens=self.run.rollout.max_new_tokens, algorithm=self.run.algorithm)
            metrics = dict(train.metrics)
            if train.batch is not None:
                with self.timed("train"):
                    self.rollout.release_memory()
                    self.actor.reload()
                    updated = self.actor.train_step(train.batch, train.rollout_logprobs)
                    self.rollout.resume_memory()
                metrics |= {TRAIN_METRICS[k]: v for k, v in updated.items() if k in TRAIN_METRICS}
                with self.timed("sync"):
                    metrics |= self.actor.sync_weights()
                self.actor.offload()
        metrics |= {f"time/{phase}": seconds for phase, seconds in self.times.items()}
        metrics["throughput/tokens_per_s"] = metrics["rollout/tokens"] / metrics["time/step"]
        metrics["reward/timeouts"], metrics["reward/crashes"] = float(scored.n_timeout), float(scored.n_crash)
        return metrics

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

    def sampling(self, step: int) -> SamplingParams:
        rollout = self.run.rollout
        seed = derive_seed(self.run.runner.seed, step)
        return SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p,
                              max_new_tokens=rollout.max_new_tokens, n=rollout.n_samples, seed=seed)

    def record(self, step: int, metrics: dict[str, float], *, advance: bool = True) -> None:
        metrics, self.startup_metrics = {**self.startup_metrics, **metrics}, {}
        self.logger.log(step, metrics, advance=advance)
        self.result.history.append({"step": float(step), **metrics})

    def save(self) -> None:
        root = self.output_dir / "checkpoints"
        directory = checkpoints.step_dir(root, self.step)
        self.logger.phase(self.step, "checkpoint")
        if directory.exists():  # an unfinished save of this step by a killed run
            import shutil

            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        self.actor.reload()  # an offloaded actor saves from the device, as it trained
        self.actor.save(str(directory))
        self.actor.offload()
        checkpoints.write_trainer_state(directory, {"step": self.step, "data": self.batches.state_dict(),
                                                    "config": to_dict(self.run)})
        checkpoints.mark_complete(directory)
        checkpoints.prune(root, self.run.runner.keep_last_checkpoints)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        if phase != "step" and self.logger is not None:
            self.logger.phase(self.step, phase)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] = time.perf_counter() - started

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if self.cluster is not None:
            self.cluster.shutdown()
        self.reward.__exit__(None, None, None)
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
