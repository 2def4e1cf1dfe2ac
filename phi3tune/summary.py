"""The one-screen summary printed at the end of a training run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def print_train_summary(summary: Any, console: Console) -> None:
    title = "phi3tune: run already finished (nothing resumed)" if getattr(summary, "already_finished", False) \
        else "phi3tune: training finished"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("adapter", str(summary.adapter_dir))
    table.add_row("run", str(summary.output_dir))
    table.add_row("steps", str(summary.steps))
    table.add_row("train loss", f"{_fmt(summary.first_loss)} -> {_fmt(summary.final_loss)}")
    ev = summary.eval_metrics or {}
    if ev:
        table.add_row("eval loss", f"{_fmt(ev.get('eval_loss'))} (perplexity {_fmt(ev.get('perplexity'), '.2f')})")
    if summary.tokens_per_second:
        table.add_row("throughput", f"{summary.tokens_per_second:,.0f} tokens/s")
    minutes, seconds = divmod(int(summary.seconds), 60)
    table.add_row("time", f"{minutes}m {seconds:02d}s")
    table.add_row("next", f"phi3tune eval {summary.output_dir} --compare-base")
    console.print(table)
