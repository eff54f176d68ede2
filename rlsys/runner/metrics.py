"""Where the numbers of a run go: tensorboard event files, wandb (optional), the console.

- tensorboard: ``<output_dir>/tensorboard``, one scalar per metric, ``global_step`` = training
  step (validation before the first step is step 0). A resumed run purges anything the killed run
  logged after its checkpoint, so the curves have no duplicate steps.
- wandb: only when ``runner.loggers`` names it; a missing package is a config error at start.
- console: one line per step with the headline numbers, under a tqdm progress bar (when stderr is
  a terminal and ``runner.progress_bar``) that shows the step, its phase, the reward and time.
  Besides these, only the driver's own ``[rlsys]`` lines (``console``): where the worker logs are,
  which checkpoint a run resumed from. The workers write to files (``rlsys.cluster.logs``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rlsys.config import ConfigError, RunnerConfig

HEADLINE = ("rollout/rewards", "rollout/response_length", "train/policy_loss", "train/entropy_loss",
            "train/logprob_mismatch", "time/step")


def console(message: str) -> None:
    """One ``[rlsys]`` line on stderr, above the progress bar when there is one."""
    tqdm.write(f"[rlsys] {message}", file=sys.stderr)


def check_loggers(runner: RunnerConfig) -> None:
    """Fail at start, not after the workers are up, when a logger's package is missing."""
    if "wandb" in runner.loggers:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("runner.loggers: 'wandb' needs the wandb package (pip install wandb)") from None


class MetricsLogger:
    def __init__(self, runner: RunnerConfig, output_dir: Path, config: dict[str, Any], *, start_step: int,
                 total_steps: int) -> None:
        self.console = "console" in runner.loggers
        self.writer = None
        if "tensorboard" in runner.loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.wandb = None
        if "wandb" in runner.loggers:
            check_loggers(runner)
            import wandb

            self.wandb = wandb.init(project=runner.wandb_project, name=runner.experiment_name, config=config,
                                    dir=str(output_dir), resume="allow")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (runner.progress_bar and sys.stderr.isatty()))

    def phase(self, step: int, name: str) -> None:
        self.bar.set_description(f"step {step} {name}")

    def log(self, step: int, metrics: dict[str, float], *, advance: bool = True) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if self.writer is not None:
            for key, value in finite.items():
                self.writer.add_scalar(key, value, global_step=step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(finite, step=step)
        if advance:
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{finite.get('rollout/rewards', float('nan')):+.2f}",
                                 step_s=f"{finite.get('time/step', float('nan')):.1f}")
        if self.console:
            shown = [f"{k.split('/')[-1] if k.startswith('train/') else k}={finite[k]:.4g}"
                     for k in (*HEADLINE, "val/accuracy", "val/rewards") if k in finite]
            console(f"step {step}: " + " ".join(shown))

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
