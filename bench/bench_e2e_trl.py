"""End to end: GRPO with rlsys against TRL's ``GRPOTrainer``, same configuration, in one run.

The parent process runs each system in a child process of its own (rlsys first, then TRL), samples
the memory of each child's whole process tree, then prints one table and writes
``e2e_trl.json`` and ``e2e_trl.png`` (validation reward against step and against wall time) under
``--results-dir``.

What is matched. Both systems read one composed config: the CPU default experiment
(``configs/smollm2-135m-grpo-cpu.yaml``) with this script's flags as overrides.

* Model: SmolLM2-135M-Instruct (``rlsys.models.offline``), fp32, on the CPU.
* Data: rlsys' loader renders the prompts (chat template) and rlsys' sampler orders them; TRL gets
  the rendered texts of the same batches, in order, as plain prompts (``shuffle_dataset=False``),
  after a check that TRL's tokenizer call yields rlsys' prompt token ids exactly. Step k of both
  trains on the same prompts.
* GRPO: group size (``num_generations``), prompts per step (a TRL generation batch of
  prompts x group size completions and one optimizer step per batch), max new tokens, temperature,
  top-p, lr (constant), AdamW betas, eps and weight decay, gradient clip, seed, clip epsilon low and
  high, no KL (``beta=0``), fresh samples for every optimizer step, and the token-mean loss (TRL
  ``loss_type="dapo"``: the sum over the batch's tokens divided by the batch's token count, which is
  rlsys' ``agg_mode=token-mean``). TRL's micro-batch holds as many completions as rlsys' token
  budget per microbatch (``actor.max_tokens_per_microbatch``). A setting TRL cannot reproduce
  (another loss, KL, dual clip, several minibatches, ...) stops the bench before it runs.
* Advantages: group mean subtracted and divided by the group std in both. TRL divides by the
  unbiased std, rlsys by the population std: a constant factor sqrt((n-1)/n) on the loss, which
  Adam cancels except where the gradient-norm clip acts.
* Reward: rlsys' boxed-answer check (``rlsys.reward.math.is_correct``) with the config's correct and
  wrong scores (±5). TRL calls it in process; rlsys scores through its sandboxed process pool, so
  its reward phase includes that IPC.
* Validation: greedy, the same validation prompts (``runner.val_max_prompts``) and token budget,
  the same reward, before the first step and every ``--val-interval`` steps. rlsys validates with
  its runner (its rollout engine); for TRL a callback runs HF ``generate`` (greedy, one
  left-padded batch) on the trainer's model.

How it is measured:

* Priority: Ray starts its workers at nice 15, which on a machine shared with other work leaves
  rlsys' actor and engine the CPU others do not use; the bench sets ``RAY_worker_niceness=0`` so
  both systems run at the same priority.

* Time axis: seconds since the worker process was created (imports, model load, engine and Ray
  start-up included) minus the seconds spent validating, so validation speed does not move the
  training curves. Both workers put their validations on the same clock (a subclass of each
  trainer wraps its validation; behaviour is unchanged).
* Per step and per phase: rlsys' own ``time/*`` metrics; for TRL, a trainer subclass times
  ``_generate`` (rollout) and ``_calculate_rewards`` (reward) and a callback times each optimizer
  step; train = step - rollout - reward (log-prob forward, backward and optimizer). TRL has no
  weight sync: its policy and its generator are one model.
* Peak memory: a thread in the parent sums the RSS of the worker and all its descendants (Ray's
  GCS, raylet and workers, the SGLang engine's processes, the reward pool) every 0.5 s and keeps
  the maximum (PSS every 5 s). RSS counts a page shared by several processes (torch's libraries, above all) once
  per process, which overstates a tree of many processes; the PSS sum, sampled alongside, charges
  each process its share and is the RAM the tree really holds.
* Equal wall time: TRL keeps training past the step count until its training time reaches the time
  rlsys took for all its steps (at most ``--max-trl-steps``), validates at that point and stops;
  the table compares rlsys' final validation with TRL's latest validation finished by that time.
  When TRL is the slower one, that is a validation from before its last step.

Run from the repository root (installs the ``bench`` extra into .venv-bench-site first):
    bash scripts/ensure_bench_env.sh && .venv/bin/python bench/bench_e2e_trl.py
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
BENCH_SITE = REPO_ROOT / ".venv-bench-site"
EXPERIMENT = "smollm2-135m-grpo-cpu"
PHASES = ("rollout", "reward", "train", "sync")


# ---------------------------------------------------------------- shared configuration


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Unset flags keep the experiment's own value (configs/smollm2-135m-grpo-cpu.yaml), except the
    # step count: 4 of its steps keep both runs, validations included, near half an hour on 2 cores.
    parser.add_argument("--steps", type=int, default=4, help="training steps, one optimizer step each "
                        "(runner.total_steps)")
    parser.add_argument("--prompts-per-step", type=int, help="runner.prompts_per_step")
    parser.add_argument("--n-samples", type=int, help="responses per prompt, the group size (rollout.n_samples)")
    parser.add_argument("--max-new-tokens", type=int, help="rollout.max_new_tokens")
    parser.add_argument("--lr", type=float, help="actor.lr")
    parser.add_argument("--seed", type=int, help="runner.seed")
    parser.add_argument("--val-interval", type=int, default=1, help="validate every k steps and before step 1")
    parser.add_argument("--val-max-prompts", type=int,
                        help="first this many validation prompts (runner.val_max_prompts)")
    parser.add_argument("--engine", choices=("sglang", "hf"), help="rlsys rollout engine (rollout.engine)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config override, for both systems (repeatable)")
    parser.add_argument("--trl-micro-batch", type=int, default=None,
                        help="completions per TRL forward/backward "
                        "(default: as many as fit actor.max_tokens_per_microbatch)")
    parser.add_argument("--max-trl-steps", type=int, default=None,
                        help="cap on TRL's steps when it trains on to rlsys' wall time (default 4 x steps)")
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "outputs" / "bench" / "e2e_trl")
    parser.add_argument("--json", type=Path, default=None, help="also write the result JSON here")
    parser.add_argument("--systems", default="rlsys,trl", help="which systems to run (comma-separated)")
    # Internal: the parent starts itself again with --worker to run one system in a fresh process.
    parser.add_argument("--worker", choices=("rlsys", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--match-seconds", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.systems.split(",")) - {"rlsys", "trl"}
    if unknown:
        parser.error(f"--systems: unknown {sorted(unknown)}; choose from rlsys, trl")
    if args.val_interval < 1:
        parser.error("--val-interval must be >= 1")
    return args


FLAG_FIELDS = {
    "steps": "runner.total_steps",
    "prompts_per_step": "runner.prompts_per_step",
    "n_samples": "rollout.n_samples",
    "max_new_tokens": "rollout.max_new_tokens",
    "lr": "actor.lr",
    "seed": "runner.seed",
    "val_interval": "runner.val_interval",
    "val_max_prompts": "runner.val_max_prompts",
    "engine": "rollout.engine",
}


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The bench's settings as Hydra overrides of the experiment; both systems read the result."""
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in FLAG_FIELDS.items() if getattr(args, flag) is not None]
    return overrides + list(args.set)


def rlsys_overrides(args: argparse.Namespace) -> list[str]:
    # Bench runs start fresh and save nothing: a checkpoint would be time TRL does not spend.
    return config_overrides(args) + [f"runner.output_dir={args.results_dir / 'rlsys_run'}", "runner.save_interval=0",
                                     "runner.resume=false", "runner.progress_bar=false"]


def load_run_config(args: argparse.Namespace) -> Any:
    from rlsys.config import load_config

    return load_config(EXPERIMENT, rlsys_overrides(args))


def trl_mismatches(run: Any) -> list[str]:
    """Settings of the run that TRL's GRPOTrainer cannot reproduce (then the comparison is refused)."""
    algorithm, actor, reward = run.algorithm, run.actor, run.reward
    wanted = [
        ("algorithm.loss_type", algorithm.loss_type, "grpo_clip"),
        ("algorithm.agg_mode", algorithm.agg_mode, "token-mean"),
        ("algorithm.kl_coef", algorithm.kl_coef, 0.0),
        ("algorithm.entropy_coef", algorithm.entropy_coef, 0.0),
        ("algorithm.dual_clip_c", algorithm.dual_clip_c, None),
        ("algorithm.filter_zero_variance_groups", algorithm.filter_zero_variance_groups, False),
        ("actor.n_minibatches", actor.n_minibatches, 1),
        ("actor.lr_schedule", actor.lr_schedule, "constant"),
        ("reward.format_weight", reward.format_weight, 0.0),
        ("reward.extra", len(reward.extra), 0),
    ]
    return [f"{name}={value!r} (the comparison needs {need!r})" for name, value, need in wanted if value != need]


def process_age_s() -> float:
    """Seconds since this process was created (start-up is part of every system's time)."""
    import psutil

    return time.time() - psutil.Process().create_time()


class ValidationClock:
    """Training time = process age minus the seconds spent validating so far."""

    def __init__(self) -> None:
        self.val_seconds = 0.0
        self.points: list[dict[str, Any]] = []

    def train_s(self) -> float:
        return process_age_s() - self.val_seconds

    @contextmanager
    def validating(self, step: int):  # type: ignore[no-untyped-def]
        point = {"step": step, "train_s": self.train_s()}
        started = time.perf_counter()
        yield point
        self.val_seconds += time.perf_counter() - started
        self.points.append(point)


# ---------------------------------------------------------------- rlsys worker


def run_rlsys(args: argparse.Namespace) -> dict[str, Any]:
    from rlsys.runner.grpo import GRPOTrainer

    clock = ValidationClock()

    class ClockedTrainer(GRPOTrainer):
        """rlsys' trainer with its validations put on the bench's clock (behaviour unchanged)."""

        def validate(self, step: int) -> dict[str, float]:
            with clock.validating(step) as point:
                metrics = super().validate(step)
            point.update(reward=metrics["val/rewards"], accuracy=metrics["val/accuracy"])
            return metrics

    # The three calls of rlsys.runner.grpo.train, with the construction (Ray, actor, engine) timed.
    trainer = ClockedTrainer(load_run_config(args))
    try:
        startup_s = clock.train_s()
        result = trainer.fit()
        train_s = clock.train_s()
    finally:
        trainer.close()
    steps = [{"step": int(r["step"]), "rollout_reward": r.get("rollout/rewards"), "step_s": r["time/step"],
              **{phase: r.get(f"time/{phase}", 0.0) for phase in PHASES}}
             for r in result.history if r["step"] > 0 and "time/step" in r]
    return {"system": "rlsys", "startup_s": startup_s, "train_s": train_s, "steps": steps, "val": clock.points,
            "val_seconds": clock.val_seconds, "output_dir": str(result.output_dir)}


# ---------------------------------------------------------------- TRL worker


def trl_micro_batch(args: argparse.Namespace, run: Any, completions: int, longest_prompt: int) -> int:
    """Completions per TRL forward/backward: as many as rlsys' token budget per microbatch holds."""
    if args.trl_micro_batch is not None:
        if completions % args.trl_micro_batch:
            raise SystemExit(f"--trl-micro-batch {args.trl_micro_batch} must divide {completions} completions per step")
        return args.trl_micro_batch
    rows = max(1, run.actor.max_tokens_per_microbatch // (longest_prompt + run.rollout.max_new_tokens))
    return max(d for d in range(1, completions + 1) if completions % d == 0 and d <= rows)


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    # After .venv's own packages, so the bench extra cannot shadow a pinned one.
    sys.path.append(str(BENCH_SITE))
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlsys.config import REPO_ROOT as CONFIG_ROOT
    from rlsys.data import PromptBatches, load_train_prompts, load_val_prompts
    from rlsys.models.offline import load_tokenizer_for, resolve_model_path
    from rlsys.reward.math import is_correct

    run = load_run_config(args)
    mismatches = trl_mismatches(run)
    if mismatches:
        raise SystemExit("TRL's GRPOTrainer cannot match: " + "; ".join(mismatches))
    runner, rollout, actor, algorithm, reward = run.runner, run.rollout, run.actor, run.algorithm, run.reward
    tokenizer = load_tokenizer_for(run.model)
    # rlsys' loader renders the prompts and its sampler orders them: TRL gets the same batches.
    batches = PromptBatches.from_config(load_train_prompts(run.data, tokenizer, base=CONFIG_ROOT),
                                        runner.prompts_per_step, run.data)
    max_steps = args.max_trl_steps or 4 * runner.total_steps
    train = [prompt for _ in range(max_steps) for prompt in batches.next_batch()]
    val = list(load_val_prompts(run.data, tokenizer, base=CONFIG_ROOT))[:runner.val_max_prompts or None]
    for prompt in train + val:
        if tokenizer(prompt.text)["input_ids"] != list(prompt.token_ids):
            raise RuntimeError(f"{prompt.location}: TRL's tokenisation of the rendered prompt differs from rlsys'")
    dataset = datasets.Dataset.from_dict({"prompt": [p.text for p in train],
                                          "answers": [list(p.answers) for p in train]})

    def score(response: str, answers: list[str]) -> float:
        return reward.correct_score if is_correct(response, answers) else reward.wrong_score

    rollout_rewards: list[float] = []

    def rlsys_boxed_reward(prompts: list[str], completions: list[str], answers: list[list[str]],
                           **_: Any) -> list[float]:
        scores = [score(c, a) for c, a in zip(completions, answers)]
        rollout_rewards.append(sum(scores) / len(scores))
        return scores

    phase_seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def timed(phase: str):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            yield
        finally:
            phase_seconds[phase] += time.perf_counter() - started

    class PhaseTimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with its generation and reward calls timed (behaviour unchanged)."""

        def _generate(self, prompts):  # type: ignore[no-untyped-def]
            with timed("rollout"):
                return super()._generate(prompts)

        def _calculate_rewards(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            with timed("reward"):
                return super()._calculate_rewards(*args, **kwargs)

    # Greedy, as rlsys validates; disable_compile as TRL's own generation config has it.
    greedy = GenerationConfig(do_sample=False, max_new_tokens=rollout.val_max_new_tokens or rollout.max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              disable_compile=True)

    def validate(model: Any, point: dict[str, Any]) -> None:
        was_training = model.training
        model.eval()
        tokenizer.padding_side = "left"
        batch = tokenizer([p.text for p in val], return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(**batch, generation_config=greedy)
        model.train(was_training)
        texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        correct = [is_correct(t, list(p.answers)) for t, p in zip(texts, val)]
        point["reward"] = sum(reward.correct_score if c else reward.wrong_score for c in correct) / len(correct)
        point["accuracy"] = sum(correct) / len(correct)
        print(f"[trl] step {point['step']}: val reward {point['reward']:+.3f}, accuracy {point['accuracy']:.1%}, "
              f"train time {point['train_s']:.0f} s", flush=True)

    clock = ValidationClock()
    record: dict[str, Any] = {"system": "trl", "steps": [], "train_s": None}

    class BenchCallback(TrainerCallback):
        step_started = 0.0

        def on_train_begin(self, args_, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
            record["startup_s"] = clock.train_s()
            with clock.validating(0) as point:
                validate(model, point)

        def on_step_begin(self, args_, state, control, **kwargs):  # type: ignore[no-untyped-def]
            phase_seconds.clear()
            self.step_started = time.perf_counter()

        def on_step_end(self, args_, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
            step_s = time.perf_counter() - self.step_started
            step, spent = state.global_step, dict(phase_seconds)
            record["steps"].append({"step": step, "rollout_reward": rollout_rewards[-1] if rollout_rewards else None,
                                    "rollout": spent.get("rollout", 0.0), "reward": spent.get("reward", 0.0),
                                    "train": step_s - spent.get("rollout", 0.0) - spent.get("reward", 0.0),
                                    "sync": 0.0, "step_s": step_s})
            if step == runner.total_steps:
                record["train_s"] = clock.train_s()
            stop = step >= runner.total_steps and (args.match_seconds is None or clock.train_s() >= args.match_seconds)
            if step % runner.val_interval == 0 or step == runner.total_steps or stop or step == max_steps:
                with clock.validating(step) as point:
                    validate(model, point)
            control.should_training_stop = stop
            return control

    completions = runner.prompts_per_step * rollout.n_samples
    micro_batch = trl_micro_batch(args, run, completions, max(len(p.token_ids) for p in train))
    config = GRPOConfig(
        output_dir=str(args.results_dir / "trl_run"),
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast; rlsys trains in fp32 on the CPU (and so must TRL)
        seed=runner.seed,
        max_steps=runner.total_steps if args.match_seconds is None else max_steps,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=completions // micro_batch,
        num_generations=rollout.n_samples,
        max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        learning_rate=actor.lr,
        lr_scheduler_type="constant",
        weight_decay=actor.weight_decay,
        adam_beta1=actor.adam_beta1,
        adam_beta2=actor.adam_beta2,
        adam_epsilon=actor.adam_eps,
        max_grad_norm=actor.clip_grad,
        beta=algorithm.kl_coef,
        epsilon=algorithm.clip_low,
        epsilon_high=algorithm.clip_high,
        loss_type="dapo",
        scale_rewards="group" if algorithm.norm_adv_by_std else "none",
        num_iterations=1,
        shuffle_dataset=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(run.model.path), dtype=torch.float32)
    trainer = PhaseTimedGRPOTrainer(model=model, reward_funcs=[rlsys_boxed_reward], args=config,
                                    train_dataset=dataset, processing_class=tokenizer, callbacks=[BenchCallback()])
    trainer.train()
    record.update(val=clock.points, val_seconds=clock.val_seconds, micro_batch=micro_batch)
    return record


# ---------------------------------------------------------------- parent: run, measure, report


def process_role(process: Any) -> str:
    """A short name for a process of the tree: Ray's worker title, sglang's process title, or the command."""
    import psutil

    try:
        command = process.cmdline()
        name = process.name()
    except psutil.Error:
        return "?"
    title = " ".join(command) if command else name
    for marker in ("ray::", "sglang::"):
        if marker in title:
            return title[title.index(marker):].split()[0][:60]
    if command and "python" in command[0]:
        script = next((part for part in command[1:] if not part.startswith("-")), "")
        return f"python {Path(script).name or '-c'}"[:60]
    return name[:60]


class TreeMemorySampler:
    """Peaks of the summed RSS and PSS of a process and all its descendants, sampled in a thread.

    RSS counts a page shared by k processes (torch's libraries, Ray's object store) k times; PSS
    charges each process 1/k of it, so the PSS sum is what the tree holds in RAM. RSS is cheap to
    read (statm) and is sampled every ``interval_s``; PSS makes the kernel walk every mapped page
    (tens of milliseconds for a multi-GiB process, CPU taken from the systems under test), so it
    is sampled every ``pss_every`` samples only and its peak can be missed by a short spike."""

    def __init__(self, pid: int, interval_s: float = 0.5, pss_every: int = 10) -> None:
        import psutil

        self._root = psutil.Process(pid)
        self._interval_s = interval_s
        self._pss_every = pss_every
        self._samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_bytes = 0
        self.peak_pss_bytes = 0
        self.peak_processes = 0
        self.peak_breakdown: list[tuple[str, int]] = []
        """The largest processes at the RSS peak: (name, RSS bytes)."""
        self.peak_pss_breakdown: list[tuple[str, int]] = []
        """Every process at the PSS peak: (role, PSS bytes), largest first."""

    def _sample(self) -> None:
        import psutil

        try:
            processes = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return
        with_pss = self._samples % self._pss_every == 0
        self._samples += 1
        rss = pss = 0
        per_process, per_process_pss = [], []
        for process in processes:
            try:
                per_process.append((process, process.memory_info().rss))
                if with_pss:
                    process_pss = process.memory_full_info().pss
                    pss += process_pss
                    per_process_pss.append((process_role(process), process_pss))
            except psutil.Error:  # exited between listing and reading
                continue
        rss = sum(size for _, size in per_process)
        if rss > self.peak_bytes:
            self.peak_bytes, self.peak_processes = rss, len(processes)
            self.peak_breakdown = []
            for process, size in sorted(per_process, key=lambda item: -item[1])[:6]:
                try:
                    self.peak_breakdown.append((process.name(), size))
                except psutil.Error:
                    continue
        if pss > self.peak_pss_bytes:
            self.peak_pss_bytes = pss
            self.peak_pss_breakdown = sorted(per_process_pss, key=lambda item: -item[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval_s)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()


def forwarded_flags(args: argparse.Namespace) -> list[str]:
    """This run's settings as flags for a worker child."""
    flags = []
    for name in (*FLAG_FIELDS, "trl_micro_batch", "max_trl_steps", "results_dir"):
        if getattr(args, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for override in args.set:
        flags += ["--set", override]
    return flags


def matched_settings(run: Any) -> dict[str, Any]:
    """The values both systems run with (for the printout and the JSON)."""
    runner, rollout, actor, algorithm = run.runner, run.rollout, run.actor, run.algorithm
    return {"model": run.model.path, "train_files": run.data.train_files, "val_files": run.data.val_files,
            "steps": runner.total_steps, "prompts_per_step": runner.prompts_per_step,
            "n_samples": rollout.n_samples, "max_new_tokens": rollout.max_new_tokens,
            "max_prompt_length": run.data.max_prompt_length, "temperature": rollout.temperature,
            "top_p": rollout.top_p, "lr": actor.lr, "weight_decay": actor.weight_decay, "clip_grad": actor.clip_grad,
            "clip_low": algorithm.clip_low, "clip_high": algorithm.clip_high, "kl_coef": algorithm.kl_coef,
            "seed": runner.seed, "val_interval": runner.val_interval, "val_max_prompts": runner.val_max_prompts,
            "rlsys_engine": rollout.engine}


def run_worker(system: str, args: argparse.Namespace, match_seconds: float | None = None) -> dict[str, Any]:
    out = args.results_dir / f"{system}.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), *forwarded_flags(args), "--worker", system,
               "--worker-out", str(out)]
    if match_seconds is not None:
        command += ["--match-seconds", f"{match_seconds:.3f}"]
    log_path = args.results_dir / f"{system}.log"
    print(f"[{system}] running; log in {log_path}", flush=True)
    # Ray starts its workers at nice 15; the TRL worker runs at nice 0. On a machine shared with other
    # work that would hand rlsys' actor and engine the leftovers, so both run at the same priority.
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", RAY_worker_niceness="0")
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        with TreeMemorySampler(process.pid) as memory:
            code = process.wait()
    wall_s = time.monotonic() - started
    if code != 0 or not out.is_file():
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"[{system}] worker failed (exit {code}); last lines of {log_path}:\n" + "\n".join(tail))
    result = json.loads(out.read_text())
    result.update(peak_rss_bytes=memory.peak_bytes, peak_pss_bytes=memory.peak_pss_bytes,
                  peak_processes=memory.peak_processes, peak_rss_largest=memory.peak_breakdown,
                  peak_pss_by_process=memory.peak_pss_breakdown, process_wall_s=wall_s)
    print(f"[{system}] done in {wall_s:.0f} s, peak RSS {memory.peak_bytes / 2**30:.2f} GiB "
          f"(PSS {memory.peak_pss_bytes / 2**30:.2f} GiB) over {memory.peak_processes} processes", flush=True)
    for role, size in memory.peak_pss_breakdown:
        print(f"[{system}]   PSS at the peak {size / 2**30:6.2f} GiB  {role}", flush=True)
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def val_at(result: dict[str, Any], step: int) -> dict[str, Any] | None:
    return next((v for v in result["val"] if v["step"] == step), None)


def val_by_time(result: dict[str, Any], seconds: float) -> dict[str, Any] | None:
    """The latest validation done by ``seconds`` of training time (a small tolerance for timer noise)."""
    done = [v for v in result["val"] if v["train_s"] <= seconds * 1.02 + 1.0]
    return max(done, key=lambda v: v["train_s"]) if done else None


def summarize(rlsys: dict[str, Any], trl: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """Table rows: metric, rlsys value, TRL value, rlsys / TRL."""

    def step_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
        return [s for s in result["steps"] if s["step"] <= steps]

    rows = [
        ("start-up s (process start to step 1, excl. validation)", rlsys["startup_s"], trl["startup_s"]),
        ("wall s per step (mean)", _mean([s["step_s"] for s in step_rows(rlsys)]),
         _mean([s["step_s"] for s in step_rows(trl)])),
    ]
    for phase in PHASES:
        rows.append((f"  {phase} s per step", _mean([s[phase] for s in step_rows(rlsys)]),
                     _mean([s[phase] for s in step_rows(trl)]) if phase != "sync" else None))
    rows.append((f"training wall s for {steps} steps (start-up included)", rlsys["train_s"], trl["train_s"]))
    rows.append(("peak RSS of the process tree, GiB", rlsys["peak_rss_bytes"] / 2**30, trl["peak_rss_bytes"] / 2**30))
    rows.append(("peak PSS of the process tree, GiB", rlsys["peak_pss_bytes"] / 2**30, trl["peak_pss_bytes"] / 2**30))
    rows.append(("processes in the tree at the peak", rlsys["peak_processes"], trl["peak_processes"]))
    for step, label in ((0, "before training"), (steps, f"after {steps} steps")):
        ours, theirs = val_at(rlsys, step), val_at(trl, step)
        rows.append((f"val reward {label}", ours and ours["reward"], theirs and theirs["reward"]))
        rows.append((f"val accuracy {label}", ours and ours["accuracy"], theirs and theirs["accuracy"]))
    matched = rlsys["train_s"]
    theirs = val_by_time(trl, matched)
    ours = val_at(rlsys, steps)
    at = f" (TRL step {theirs['step']})" if theirs else ""
    rows.append((f"val reward at equal wall time {matched:.0f} s{at}", ours and ours["reward"],
                 theirs and theirs["reward"]))
    rows.append((f"val accuracy at equal wall time {matched:.0f} s", ours and ours["accuracy"],
                 theirs and theirs["accuracy"]))
    out = []
    for metric, ours_value, theirs_value in rows:
        # Rewards are ±5 means and accuracies can be 0: a ratio of them says nothing, so none is given.
        numbers = isinstance(ours_value, (int, float)) and isinstance(theirs_value, (int, float))
        ratio = ours_value / theirs_value if numbers and theirs_value and "val " not in metric else None
        out.append({"metric": metric.strip(), "rlsys": ours_value, "trl": theirs_value, "ratio": ratio,
                    "indent": metric.startswith("  ")})
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["metric"]) for r in rows) + 2
    lines = [f"{'metric':<{width}}{'rlsys':>10}{'TRL':>10}{'rlsys/TRL':>11}", "-" * (width + 31)]
    for row in rows:
        label = ("  " if row["indent"] else "") + row["metric"]
        lines.append(f"{label:<{width}}{_cell(row['rlsys']):>10}{_cell(row['trl']):>10}{_cell(row['ratio']):>11}")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in (("rlsys", "rlsys"), ("trl", "TRL GRPOTrainer")):
        if name not in results:
            continue
        vals = results[name]["val"]
        by_step.plot([v["step"] for v in vals], [v["reward"] for v in vals], marker="o", label=label)
        by_time.plot([v["train_s"] for v in vals], [v["reward"] for v in vals], marker="o", label=label)
    if "rlsys" in results:
        matched = results["rlsys"]["train_s"]
        by_time.axvline(matched, color="grey", linestyle="--", linewidth=1)
        by_time.annotate(" rlsys done", (matched, 0.02), xycoords=("data", "axes fraction"), color="grey")
    by_step.set(xlabel="training step", ylabel="validation reward (greedy, mean of ±5)", title="per step")
    by_time.set(xlabel="training wall time, s (start-up included, validation excluded)", title="per wall time")
    for axis in (by_step, by_time):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.results_dir = args.results_dir.resolve()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        result = run_rlsys(args) if args.worker == "rlsys" else run_trl(args)
        args.worker_out.write_text(json.dumps(result, indent=1))
        return 0

    print("$ " + shlex.join([os.path.relpath(sys.executable), *sys.argv]), flush=True)
    systems = args.systems.split(",")
    if "trl" in systems and not (BENCH_SITE / "trl").is_dir():
        raise SystemExit(f"TRL is not installed in {BENCH_SITE}; run: bash scripts/ensure_bench_env.sh")
    run = load_run_config(args)
    if not run.data.val_files:
        raise SystemExit("data.val_files is empty: the comparison validates both systems on it")
    if "trl" in systems and trl_mismatches(run):
        raise SystemExit("TRL's GRPOTrainer cannot match: " + "; ".join(trl_mismatches(run)))
    settings = matched_settings(run)
    print("matched settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()), flush=True)
    results: dict[str, dict[str, Any]] = {}
    if "rlsys" in systems:
        results["rlsys"] = run_worker("rlsys", args)
    if "trl" in systems:
        match = results["rlsys"]["train_s"] if "rlsys" in results else None
        results["trl"] = run_worker("trl", args, match_seconds=match)
    payload: dict[str, Any] = {"bench": "e2e_trl", "command": sys.argv, "settings": settings, "results": results}
    if len(results) == 2:
        rows = summarize(results["rlsys"], results["trl"], run.runner.total_steps)
        payload["table"] = rows
        print()
        print(format_table(rows))
    plot(results, args.results_dir / "e2e_trl.png")
    text = json.dumps(payload, indent=1)
    (args.results_dir / "e2e_trl.json").write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(f"\nwrote {args.results_dir / 'e2e_trl.json'} and {args.results_dir / 'e2e_trl.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
