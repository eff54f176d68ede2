"""``rlsys plot RUN_DIR...``: PNG training curves from a run's tensorboard event files.

Choices:
- Scalars are read with tensorboard's own ``EventAccumulator`` (every event kept, no sampling),
  one event file at a time, so that merging is ours and explicit: a resumed run writes a new
  file into the same directory and repeats some steps; for a repeated (tag, step) the value
  with the later wall time wins, whichever file it is in.
- A RUN_DIR is searched recursively for ``events.out.tfevents.*``, so both a run's output
  directory and its ``tensorboard/`` directory work. Tags from all files of one run share one
  namespace (the training loop writes plain ``add_scalar`` tags, no per-subdirectory runs).
- A non-empty file from which tensorboard reads no event at all is an error: tensorboard itself
  would skip it silently and the run's data would vanish. An empty file (a writer that opened
  and crashed before its first flush) is not.
- Figures compare runs: one colour per run, one panel per metric (two metrics that belong
  together, e.g. mean and max response length, share a panel with different line styles).
  A panel no run has data for is dropped; a figure left with no panel is not written.
- ``--smooth`` is tensorboard's debiased exponential moving average with the same weight
  meaning (0 = raw, 0.9 = heavy); the raw curve stays visible, faint, behind the smoothed one.
- Matplotlib ``Figure`` objects are built directly, without pyplot: no global state and no GUI
  backend; ``savefig`` renders PNGs with Agg, so no display is needed, and tests can inspect them.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EVENT_GLOB = "events.out.tfevents.*"

Scalars = dict[str, list[tuple[int, float]]]


class PlotError(ValueError):
    """Bad plot input: a missing run directory, no event files, an unreadable file, bad options."""


@dataclass(frozen=True)
class Panel:
    """One axes: its title and the (tag, line style, legend suffix) curves drawn on it."""

    title: str
    curves: tuple[tuple[str, str, str], ...]


def _panel(tag: str, title: str | None = None) -> Panel:
    return Panel(title or tag, ((tag, "-", ""),))


# File name (without .png) -> panels. Order within a figure is the reading order of the grid.
FIGURES: dict[str, tuple[Panel, ...]] = {
    "reward": (
        _panel("rollout/rewards", "rollout reward (mean)"),
        _panel("val/rewards", "validation reward (mean)"),
        _panel("val/accuracy", "validation accuracy"),
    ),
    "response_length": (
        Panel("response length (tokens)", (("rollout/response_length", "-", "mean"),
                                          ("rollout/response_length_max", "--", "max"))),
    ),
    "entropy": (_panel("train/entropy_loss", "entropy"),),
    "logprob_mismatch": (_panel("train/logprob_mismatch", "rollout vs actor logprob mismatch"),),
    "async": (
        Panel("staleness (versions)", (("rollout/staleness_mean", "-", "mean"), ("rollout/staleness_max", "--", "max"))),
        _panel("rollout/partial_fraction", "partial responses (fraction)"),
        Panel("samples dropped / refills", (("rollout/dropped_stale", "-", "dropped stale"),
                                            ("rollout/refill_rounds", "--", "refill rounds"))),
        Panel("importance weight", (("train/is_weight_mean", "-", "mean"), ("train/is_weight_max", "--", "max"))),
        _panel("train/is_clipped_fraction", "tokens truncated or masked (fraction)"),
    ),
    "time_per_phase": (
        _panel("time/rollout", "rollout (s)"),
        _panel("time/reward", "reward (s)"),
        _panel("time/train", "train (s)"),
        _panel("time/sync", "weight sync (s)"),
        _panel("time/step", "whole step (s)"),
    ),
    "overview": (
        _panel("rollout/rewards", "rollout reward"),
        _panel("val/accuracy", "validation accuracy"),
        _panel("rollout/response_length", "response length (mean)"),
        _panel("rollout/fraction_properly_ended", "fraction properly ended"),
        _panel("train/policy_loss", "policy loss"),
        _panel("train/entropy_loss", "entropy"),
        _panel("train/approx_kl", "approx KL"),
        _panel("train/clip_fraction", "clip fraction"),
        _panel("train/grad_norm", "grad norm"),
        _panel("train/logprob_mismatch", "logprob mismatch"),
        _panel("time/step", "step time (s)"),
        _panel("throughput/tokens_per_s", "tokens / s"),
    ),
}


def find_event_files(run_dir: str | Path) -> list[Path]:
    """All tensorboard event files under ``run_dir`` (recursively), sorted; errors name the path."""
    root = Path(run_dir)
    if not root.exists():
        raise PlotError(f"{root}: no such directory")
    if not root.is_dir():
        raise PlotError(f"{root}: not a directory")
    files = sorted(p for p in root.rglob(EVENT_GLOB) if p.is_file())
    if not files:
        raise PlotError(f"{root}: no tensorboard event files ({EVENT_GLOB}) in it or below it")
    return files


def read_scalars(run_dir: str | Path) -> Scalars:
    """Every scalar of a run as ``{tag: [(step, value), ...]}`` sorted by step.

    All event files under ``run_dir`` are merged; for a step logged more than once (a resumed
    run), the value with the later wall time wins.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea

    latest: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> step -> (wall_time, value)
    for path in find_event_files(run_dir):
        # purge_orphaned_data=False: the wall-time rule below is the only one that drops data.
        acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0}, purge_orphaned_data=False)
        acc.Reload()
        if acc.file_version is None and path.stat().st_size > 0:
            raise PlotError(f"{path}: not a readable tensorboard event file")
        for tag in acc.Tags()[ea.SCALARS]:
            steps = latest.setdefault(tag, {})
            for event in acc.Scalars(tag):
                kept = steps.get(event.step)
                if kept is None or event.wall_time >= kept[0]:
                    steps[event.step] = (event.wall_time, event.value)
    if not latest:
        raise PlotError(f"{run_dir}: its event files hold no scalars")
    return {tag: [(step, value) for step, (_, value) in sorted(steps.items())]
            for tag, steps in sorted(latest.items())}


def smooth_values(values: list[float], weight: float) -> list[float]:
    """Tensorboard's debiased EMA; non-finite values pass through and do not enter the average."""
    out, last, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        last = last * weight + (1 - weight) * value
        count += 1
        out.append(last / (1 - weight**count))  # debias: early points are not pulled to 0
    return out


def _run_label(run_dir: str | Path) -> str:
    path = Path(run_dir).resolve()
    # A run's tensorboard/ folder is named after the run, not "tensorboard".
    return path.parent.name if path.name == "tensorboard" else path.name


def default_labels(run_dirs: list[str | Path]) -> list[str]:
    """Directory names, or the paths as given when two names collide."""
    labels = [_run_label(d) for d in run_dirs]
    if len(set(labels)) < len(labels):
        return [str(d) for d in run_dirs]
    return labels


def make_figures(runs: list[Scalars], labels: list[str], *, smooth: float = 0.0) -> dict[str, Figure]:
    """Build every figure that has data; ``runs[i]`` is drawn in colour i with legend ``labels[i]``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    colors = [f"C{i % 10}" for i in range(len(runs))]
    figures = {}
    for name, panels in FIGURES.items():
        panels = [p for p in panels if any(run.get(tag) for run in runs for tag, _, _ in p.curves)]
        if not panels:
            continue
        ncols = min(len(panels), 4 if len(panels) > 6 else 3)
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(4.5 * ncols, 3.4 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, panel in zip(axes, panels):
            for run, label, color in zip(runs, labels, colors):
                for tag, style, suffix in panel.curves:
                    points = run.get(tag)
                    if points:
                        _draw(ax, points, f"{label} {suffix}".strip(), color, style, smooth)
            ax.set_title(panel.title, fontsize=10)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(name.replace("_", " "))
        figures[name] = fig
    return figures


def _draw(ax, points: list[tuple[int, float]], label: str, color: str, style: str, smooth: float) -> None:
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    # Markers keep sparse series (validation every N steps, a single point) visible.
    marker = "o" if len(points) <= 40 else None
    if smooth > 0:
        ax.plot(steps, values, color=color, linestyle=style, alpha=0.25, linewidth=1)
        values = smooth_values(values, smooth)
    ax.plot(steps, values, color=color, linestyle=style, marker=marker, markersize=3, label=label)


def plot_runs(run_dirs: list[str | Path], output_dir: str | Path | None = None, *,
              labels: list[str] | None = None, smooth: float = 0.0) -> list[Path]:
    """Write one PNG per figure that has data into ``output_dir`` (default ``<run_dirs[0]>/plots``).

    Returns the paths written; a figure with no data in any run is skipped with a printed note.
    """
    if not run_dirs:
        raise PlotError("no run directory given")
    if labels is not None and len(labels) != len(run_dirs):
        raise PlotError(f"--labels: got {len(labels)} label(s) for {len(run_dirs)} RUN_DIR(s); "
                        "give one per RUN_DIR")
    if not 0.0 <= smooth < 1.0:
        raise PlotError(f"--smooth: must be in [0, 1), got {smooth}")
    runs = [read_scalars(d) for d in run_dirs]
    figures = make_figures(runs, labels or default_labels(run_dirs), smooth=smooth)
    out = Path(output_dir) if output_dir is not None else Path(run_dirs[0]) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FIGURES:
        if name not in figures:
            print(f"[rlsys plot] skipped {name}.png: none of its tags is in any run", file=sys.stderr)
            continue
        path = out / f"{name}.png"
        figures[name].savefig(path, dpi=100)
        written.append(path)
    return written


def add_parser(sub: argparse._SubParsersAction) -> None:
    plot = sub.add_parser(
        "plot", help="PNG training curves from tensorboard event files",
        description="Read the scalars of one or more training runs from their tensorboard event files "
                    "(searched recursively under each RUN_DIR; the files of a resumed run are merged, the "
                    "later write of a step wins) and write comparison PNGs: "
                    + ", ".join(f"{name}.png" for name in FIGURES) + ". "
                    "Figures whose metrics no run logged are skipped.",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="a run's output directory (runner.output_dir) or a directory of event files")
    plot.add_argument("--output", default=None, metavar="DIR",
                      help="directory for the PNGs (default: <first RUN_DIR>/plots)")
    plot.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                      help="legend name per RUN_DIR, in the same order; put it after the RUN_DIRs "
                           "(default: directory names)")
    plot.add_argument("--smooth", type=float, default=0.0, metavar="WEIGHT",
                      help="tensorboard-style EMA weight in [0, 1); 0 plots raw values (default: %(default)s)")
    plot.set_defaults(handler=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    try:
        paths = plot_runs(args.run_dirs, args.output, labels=args.labels, smooth=args.smooth)
    except PlotError as exc:
        print(f"rlsys plot: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
