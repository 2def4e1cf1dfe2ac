"""Training report: ``train_report.png`` (loss, eval loss, learning rate vs step) and a text summary.

Reads ``metrics.jsonl`` defensively: a run killed mid-write leaves a truncated last line, and
non-finite values are stored as null; both are skipped, never fatal, so the report works for any
run, finished or interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from phi3tune.training.checkpoints import file_mode
from phi3tune.errors import UsageError

log = logging.getLogger(__name__)

REPORT_FILE = "train_report.png"
METRICS_FILE = "metrics.jsonl"


@dataclass
class RunMetrics:
    """Series read from metrics.jsonl; each is a list of ``(step, value)`` with finite values only."""

    loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    learning_rate: list[tuple[int, float]] = field(default_factory=list)
    tokens: int | None = None
    tokens_per_second: list[float] = field(default_factory=list)
    skipped_lines: int = 0
    nonfinite_steps: list[int] = field(default_factory=list)


def _number(value: Any) -> float | None:
    # bool is an int subclass; null (non-finite at write time) and strings are not plottable either.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def read_metrics(path: Path) -> RunMetrics:
    """Parse ``metrics.jsonl``, skipping unreadable lines (e.g. a truncated last line) and null values.

    Args:
        path: The run's metrics.jsonl (may be missing or empty).

    Returns:
        The series found; empty when there is no file.
    """
    metrics = RunMetrics()
    if not path.is_file():
        return metrics
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            metrics.skipped_lines += 1
            continue
        step = _number(row.get("step")) if isinstance(row, dict) else None
        if step is None:
            metrics.skipped_lines += 1
            continue
        if row.get("nonfinite"):
            metrics.nonfinite_steps.append(int(step))
        for key in ("loss", "eval_loss", "learning_rate"):
            value = _number(row.get(key))
            if value is not None:
                getattr(metrics, key).append((int(step), value))
        if _number(row.get("tokens")) is not None:
            metrics.tokens = int(row["tokens"])
        if _number(row.get("tokens_per_second")) is not None:
            metrics.tokens_per_second.append(float(row["tokens_per_second"]))
    return metrics


def plot_report(metrics: RunMetrics, path: Path, title: str) -> Path:
    """Draw the loss and learning-rate panels and write the PNG atomically.

    Args:
        metrics: Series from :func:`read_metrics`.
        path: Destination PNG.
        title: Figure title (the run's name).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must be chosen before pyplot is imported
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    if metrics.loss:
        ax_loss.plot(*zip(*metrics.loss), label="train loss", color="tab:blue")
    if metrics.eval_loss:
        ax_loss.plot(*zip(*metrics.eval_loss), "o-", label="eval loss", color="tab:orange")
    if not (metrics.loss or metrics.eval_loss):
        ax_loss.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax_loss.transAxes)
    for step in metrics.nonfinite_steps:
        ax_loss.axvline(step, color="red", alpha=0.3)
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    if metrics.loss or metrics.eval_loss:
        ax_loss.legend()
    if metrics.learning_rate:
        ax_lr.plot(*zip(*metrics.learning_rate), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    # Write through a temp file and a rename, so an interrupted write never leaves a broken PNG.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.fchmod(fd, file_mode())  # mkstemp makes it 0600; the PNG follows the umask like every other file
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def write_report(run_dir: Path) -> Path:
    """Write ``RUN_DIR/train_report.png`` at the end of training; never fails the run.

    A finished training must not exit with an error because a plot could not be drawn (a full disk, a
    broken font cache): problems are logged as a warning and ``phi3tune report`` can redraw it later.

    Args:
        run_dir: The run's output directory.

    Returns:
        The PNG's path (which may be missing when drawing failed).
    """
    run_dir = Path(run_dir)
    path = run_dir / REPORT_FILE
    try:
        plot_report(read_metrics(run_dir / METRICS_FILE), path, title=run_dir.resolve().name)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("could not draw %s (%s: %s); run `phi3tune report %s` to retry", path, type(exc).__name__,
                    exc, shlex.quote(str(run_dir)))
    return path


def summary_lines(run_dir: Path, metrics: RunMetrics) -> list[str]:
    """A few lines describing the run: state, steps, losses, throughput, eval metrics."""
    finished = (run_dir / "adapter" / "adapter_config.json").is_file()
    lines = [f"run {run_dir}: {'finished' if finished else 'not finished (no adapter/ yet)'}"]
    if metrics.loss:
        (s0, l0), (s1, l1) = metrics.loss[0], metrics.loss[-1]
        lines.append(f"train loss {l0:.4f} (step {s0}) -> {l1:.4f} (step {s1}), {len(metrics.loss)} points")
    else:
        lines.append("no training loss logged yet")
    if metrics.eval_loss:
        best_step, best = min(metrics.eval_loss, key=lambda p: p[1])
        lines.append(f"eval loss {metrics.eval_loss[-1][1]:.4f} (last), best {best:.4f} at step {best_step}")
    if metrics.learning_rate:
        lines.append(f"learning rate {metrics.learning_rate[-1][1]:.3g} at the last logged step")
    if metrics.tokens is not None:
        rates = sorted(metrics.tokens_per_second)
        rate = f", median {rates[len(rates) // 2]:,.0f} tokens/s" if rates else ""
        lines.append(f"{metrics.tokens:,} tokens seen{rate}")
    if metrics.nonfinite_steps:
        lines.append(f"non-finite values logged at steps {metrics.nonfinite_steps[:10]}")
    if metrics.skipped_lines:
        lines.append(f"skipped {metrics.skipped_lines} unreadable line(s) of {METRICS_FILE} (e.g. cut off by a kill)")
    eval_file = run_dir / "eval_metrics.json"
    if eval_file.is_file():
        try:
            ev = json.loads(eval_file.read_text(encoding="utf-8"))
            lines.append(f"eval_metrics.json: eval_loss {ev.get('eval_loss')}, perplexity {ev.get('perplexity')}")
        except (json.JSONDecodeError, AttributeError):
            lines.append("eval_metrics.json is unreadable")
    return lines


def run_report(run_dir: Path, *, console: Console | None = None) -> None:
    """``phi3tune report RUN_DIR``: regenerate the PNG and print a short summary.

    Args:
        run_dir: A run's output directory, finished or interrupted.
        console: Where the summary is printed.

    Raises:
        UsageError: Not a directory, or no metrics.jsonl in it.
    """
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory.", hint="give a run's output directory.")
    if not (run_dir / METRICS_FILE).is_file():
        raise UsageError(
            f"{run_dir} has no {METRICS_FILE}; it is not a phi3tune run (or it logged nothing yet).",
            hint="give the output directory of `phi3tune train`.",
        )
    metrics = read_metrics(run_dir / METRICS_FILE)
    png = plot_report(metrics, run_dir / REPORT_FILE, title=run_dir.resolve().name)
    for line in summary_lines(run_dir, metrics):
        console.print(line, highlight=False)
    console.print(f"wrote {png}", highlight=False)
