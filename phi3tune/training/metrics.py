"""Reading ``metrics.jsonl`` (written by ``training.callbacks.MetricsFileCallback``), defensively.

A run killed mid-write leaves a truncated last line, and non-finite values are stored as null; both are
skipped, never fatal, so anything that reads a run (the report, the summary, resume) works for any run,
finished or interrupted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
