"""``rlsys plot``: real tensorboard event files in, real PNGs out.

Risks aimed at: a blank or missing PNG; a comparison figure that silently drops a run; a resumed
run whose repeated steps keep the stale value; a corrupt event file that vanishes without a word;
bad input that fails with a traceback instead of a message naming the path.
"""

import math
import subprocess
import sys

import pytest
from PIL import Image, ImageStat

from rlsys.cli import main
from rlsys.plot import FIGURES, default_labels, make_figures, plot_runs, read_scalars, smooth_values

TAGS = [
    "rollout/rewards", "rollout/response_length", "rollout/response_length_max", "rollout/prompt_length",
    "rollout/fraction_properly_ended", "rollout/advantages_mean", "rollout/advantages_max",
    "rollout/advantages_min", "train/policy_loss", "train/entropy_loss", "train/ratio", "train/clip_fraction",
    "train/approx_kl", "train/grad_norm", "train/lr", "train/early_stopped", "train/logprob_mismatch",
    "time/rollout", "time/reward", "time/train", "time/sync", "time/step", "throughput/tokens_per_s",
    "rollout/staleness_mean", "rollout/staleness_max", "rollout/partial_fraction", "rollout/dropped_stale",
    "rollout/refill_rounds", "train/is_weight_mean", "train/is_weight_max", "train/is_clipped_fraction",
]
VAL_TAGS = ["val/rewards", "val/accuracy"]
STEPS = 6


def _value(tag: str, step: int, run: int) -> float:
    # Distinct per tag, step and run, so a curve drawn from the wrong data is caught.
    return (run + 1) * 10.0 + step + (TAGS + VAL_TAGS).index(tag) / 100


def _write(log_dir, scalars) -> None:
    """``scalars``: [(tag, step, value, wall_time or None)], written by torch's SummaryWriter."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for tag, step, value, wall_time in scalars:
        writer.add_scalar(tag, value, step, walltime=wall_time)
    writer.close()


def _write_run(run_dir, run: int, tags=TAGS) -> None:
    scalars = [(tag, step, _value(tag, step, run), None) for step in range(STEPS) for tag in tags]
    scalars += [(tag, step, _value(tag, step, run), None) for step in range(0, STEPS, 2) for tag in VAL_TAGS]
    _write(run_dir / "tensorboard", scalars)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _write_run(root / "alpha", 0)
    # beta never logs weight-sync time (colocated engine): its curve is simply absent.
    _write_run(root / "beta", 1, tags=[t for t in TAGS if t != "time/sync"])
    return root / "alpha", root / "beta"


def _legend(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def _axes(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def test_command_writes_nonblank_pngs_for_two_runs(runs, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "rlsys", "plot", *map(str, runs), "--output", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = [out / f"{name}.png" for name in FIGURES]
    assert result.stdout.split() == [str(p) for p in expected]
    for path in expected:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 400 and image.height >= 300, (path, image.size)
            assert max(ImageStat.Stat(image.convert("L")).var) > 0, f"{path} is blank"


def test_comparison_figures_draw_every_run_with_its_own_values(runs):
    figures = make_figures([read_scalars(d) for d in runs], ["alpha", "beta"])
    assert set(figures) == set(FIGURES)
    reward = _axes(figures["reward"], "rollout reward (mean)")
    assert _legend(reward) == ["alpha", "beta"]
    for line, run in zip(reward.get_lines(), (0, 1)):
        assert list(line.get_xdata()) == list(range(STEPS))
        assert list(line.get_ydata()) == pytest.approx([_value("rollout/rewards", s, run) for s in range(STEPS)])
    accuracy = _axes(figures["reward"], "validation accuracy")
    assert list(accuracy.get_lines()[1].get_xdata()) == [0, 2, 4]
    lengths = _axes(figures["response_length"], "response length (tokens)")
    assert _legend(lengths) == ["alpha mean", "alpha max", "beta mean", "beta max"]
    assert _legend(_axes(figures["time_per_phase"], "weight sync (s)")) == ["alpha"]
    assert _legend(_axes(figures["time_per_phase"], "whole step (s)")) == ["alpha", "beta"]


def test_labels_and_default_output_dir(runs, capsys):
    assert main(["plot", str(runs[0] / "tensorboard"), str(runs[1]), "--labels", "base", "tuned"]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(runs[0] / "tensorboard" / "plots" / f"{name}.png") for name in FIGURES]
    # Default labels: the run's name, also when pointed at its tensorboard/ folder; paths when names collide.
    assert default_labels([runs[0] / "tensorboard", runs[1]]) == ["alpha", "beta"]
    assert default_labels([runs[0], runs[0] / "tensorboard"]) == [str(runs[0]), str(runs[0] / "tensorboard")]


def test_resumed_run_keeps_the_later_write_of_each_step(tmp_path):
    log_dir = tmp_path / "run" / "tensorboard"
    # The first file holds the later writes of steps 2-3: wall time decides, not file order.
    _write(log_dir, [("rollout/rewards", s, -1.0, 2000.0 + s) for s in (2, 3)])
    _write(log_dir, [("rollout/rewards", s, float(s), 1000.0 + s) for s in range(5)])
    assert read_scalars(tmp_path / "run") == {"rollout/rewards": [(0, 0.0), (1, 1.0), (2, -1.0), (3, -1.0),
                                                                  (4, 4.0)]}


def test_figure_without_data_is_skipped_with_a_note(tmp_path, capsys):
    _write(tmp_path / "run", [("rollout/rewards", 0, 1.0, None), ("rollout/rewards", 1, 3.0, None)])
    written = plot_runs([tmp_path / "run"], tmp_path / "out")
    assert [p.name for p in written] == ["reward.png", "overview.png"]
    note = capsys.readouterr().err
    for name in ("response_length", "entropy", "logprob_mismatch", "time_per_phase"):
        assert f"skipped {name}.png" in note
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["overview.png", "reward.png"]


def test_smoothing_is_tensorboards_debiased_ema(tmp_path):
    # By hand: the running average a_k = 0.5 a_{k-1} + 0.5 x_k from a_0 = 0, divided by 1 - 0.5^k;
    # the NaN passes through and does not count.
    a1 = 0.5 * 1.0
    a2 = 0.5 * a1 + 0.5 * 3.0
    a3 = 0.5 * a2 + 0.5 * 5.0
    smoothed = smooth_values([1.0, 3.0, float("nan"), 5.0], 0.5)
    assert smoothed[:2] == pytest.approx([a1 / 0.5, a2 / 0.75])
    assert math.isnan(smoothed[2])
    assert smoothed[3] == pytest.approx(a3 / 0.875)
    _write(tmp_path / "run", [("train/entropy_loss", s, float(s % 2), None) for s in range(4)])
    ax = make_figures([read_scalars(tmp_path / "run")], ["r"], smooth=0.5)["entropy"].axes[0]
    raw, smooth = ax.get_lines()
    assert list(raw.get_ydata()) == [0.0, 1.0, 0.0, 1.0]
    assert list(smooth.get_ydata()) == pytest.approx(smooth_values([0.0, 1.0, 0.0, 1.0], 0.5))


def test_missing_run_dir_exits_2_naming_it_from_the_command_line(tmp_path):
    missing = tmp_path / "nope"
    result = subprocess.run([sys.executable, "-m", "rlsys", "plot", str(missing)], capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{missing}: no such directory" in result.stderr


def test_bad_input_exits_2_with_a_message_naming_it(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "events.out.tfevents.1.host").write_bytes(b"not an event file" * 8)
    cases = [
        ([str(empty)], f"{empty}: no tensorboard event files"),
        ([str(runs[0]), str(corrupt)], f"{corrupt / 'events.out.tfevents.1.host'}: not a readable"),
        ([str(runs[0]), str(runs[1]), "--labels", "only-one"], "--labels: got 1 label(s) for 2 RUN_DIR(s)"),
        ([str(runs[0]), "--smooth", "1.0"], "--smooth: must be in [0, 1)"),
    ]
    for args, message in cases:
        assert main(["plot", *args, "--output", str(tmp_path / "out")]) == 2, args
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
