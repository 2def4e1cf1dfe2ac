"""``phi3tune report``: ``train_report.png`` (loss, eval loss, learning rate vs step) and the run's summary, the
same table the end of ``phi3tune train`` prints. Works for any run, finished or interrupted."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from phi3tune.training.atomic import atomic_write
from phi3tune.errors import UsageError
from phi3tune.model.artefacts import read_json_object
from phi3tune.training.layout import ADAPTER_DIR, EVAL_METRICS, METRICS, REPORT
from phi3tune.training.metrics import RunMetrics, read_metrics

log = logging.getLogger(__name__)



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
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
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
    path = run_dir / REPORT
    try:
        plot_report(read_metrics(run_dir / METRICS), path, title=run_dir.resolve().name)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("could not draw %s (%s: %s); run `phi3tune report %s` to retry", path, type(exc).__name__,
                    exc, shlex.quote(str(run_dir)))
    return path


@dataclass
class RunSummary:
    """A run as the user sees it at the end of training and in ``phi3tune report``, read from its folder."""

    output_dir: Path
    finished: bool
    steps: int | None
    first_loss: float | None
    final_loss: float | None
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    tokens: int | None = None
    tokens_per_second: float | None = None  # median of the logged rates
    seconds: float | None = None
    already_finished: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir / ADAPTER_DIR


def _read_eval_metrics(run_dir: Path) -> tuple[dict[str, Any], str | None]:
    path = run_dir / EVAL_METRICS
    if not path.is_file():
        return {}, None
    loaded = read_json_object(path)
    return (loaded, None) if loaded is not None else ({}, f"{EVAL_METRICS} is unreadable")


def summarize_run(run_dir: Path, *, steps: int | None = None, seconds: float | None = None,
                  already_finished: bool = False) -> RunSummary:
    """Summarise a run folder from its metrics.jsonl, eval_metrics.json and adapter/.

    Args:
        run_dir: The run's output directory, finished or interrupted.
        steps: The trainer's own step count, where known (else the last logged step).
        seconds: Wall time of this invocation, for the end-of-training summary.
        already_finished: ``--resume`` found the run finished and changed nothing.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / METRICS)
    eval_metrics, eval_note = _read_eval_metrics(run_dir)
    rates = sorted(metrics.tokens_per_second)
    summary = RunSummary(
        output_dir=run_dir,
        finished=(run_dir / ADAPTER_DIR / "adapter_config.json").is_file(),
        steps=steps if steps is not None else (metrics.loss[-1][0] if metrics.loss else None),
        first_loss=metrics.loss[0][1] if metrics.loss else None,
        final_loss=metrics.loss[-1][1] if metrics.loss else None,
        eval_metrics=eval_metrics,
        tokens=metrics.tokens,
        tokens_per_second=rates[len(rates) // 2] if rates else None,
        seconds=seconds,
        already_finished=already_finished,
    )
    if metrics.eval_loss:
        best_step, best = min(metrics.eval_loss, key=lambda p: p[1])
        summary.notes.append(f"eval loss during training: {metrics.eval_loss[-1][1]:.4f} (last), best {best:.4f} "
                             f"at step {best_step}")
    if metrics.nonfinite_steps:
        summary.notes.append(f"non-finite values logged at steps {metrics.nonfinite_steps[:10]}")
    if metrics.skipped_lines:
        summary.notes.append(f"skipped {metrics.skipped_lines} unreadable line(s) of {METRICS} (e.g. cut off by a kill)")
    if eval_note:
        summary.notes.append(eval_note)
    return summary


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(summary: RunSummary, console: Console, *, title: str) -> None:
    """The one-screen table shown at the end of training and by ``phi3tune report``."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("run", f"{summary.output_dir} ({'finished' if summary.finished else 'not finished: no adapter/ yet'})")
    if summary.finished:
        table.add_row("adapter", str(summary.adapter_dir))
    table.add_row("steps", "-" if summary.steps is None else str(summary.steps))
    table.add_row("train loss", f"{_fmt(summary.first_loss)} -> {_fmt(summary.final_loss)}")
    ev = summary.eval_metrics
    if ev.get("eval_loss") is not None:
        samples = f", {ev['n_samples']} samples" if ev.get("n_samples") else ""
        table.add_row("eval loss", f"{_fmt(ev.get('eval_loss'))} (perplexity {_fmt(ev.get('perplexity'), '.2f')}{samples})")
    if summary.tokens is not None:
        rate = f", {summary.tokens_per_second:,.0f} tokens/s (median)" if summary.tokens_per_second else ""
        table.add_row("tokens", f"{summary.tokens:,}{rate}")
    if summary.seconds is not None:
        minutes, seconds = divmod(int(summary.seconds), 60)
        table.add_row("time", f"{minutes}m {seconds:02d}s")
    for note in summary.notes:
        table.add_row("note", note)
    if summary.finished:
        table.add_row("next", f"phi3tune eval {shlex.quote(str(summary.output_dir))} --compare-base")
    console.print(table)


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
    if not (run_dir / METRICS).is_file():
        raise UsageError(
            f"{run_dir} has no {METRICS}; it is not a phi3tune run (or it logged nothing yet).",
            hint="give the output directory of `phi3tune train`.",
        )
    png = plot_report(read_metrics(run_dir / METRICS), run_dir / REPORT, title=run_dir.resolve().name)
    print_summary(summarize_run(run_dir), console, title="phi3tune report")
    console.print(f"wrote {png}", highlight=False)
