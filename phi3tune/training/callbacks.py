"""Trainer callbacks: metrics.jsonl, and a progress display with loss and tokens/s."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from phi3tune.training.atomic import atomic_write_text

_KEEP = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "entropy")


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: a non-finite number is written as null (and flagged), never as 0.0."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after ``last_step``: a resumed run repeats them, so the file reads as one clean run.

    Called when training begins: ``last_step`` is the step resumed from (0 for a fresh start).
    """
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill mid-write
            continue
        if int(row.get("step", 0)) <= last_step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class MetricsFileCallback(TrainerCallback):
    """Appends one JSON object per logging step to ``metrics.jsonl`` (train and eval entries).

    tokens is cumulative real (non-pad) input tokens as counted by trl; tokens_per_second is measured
    between two logging steps so it excludes set-up, evaluation and checkpoint time.
    """

    def __init__(self, path: Path, tokens_offset: int = 0) -> None:
        self.path = path
        self._last_time: float | None = None
        self._last_tokens: int | None = None
        self._tokens_offset = tokens_offset

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = None
        if state.is_world_process_zero:
            truncate_metrics(self.path, state.global_step)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            for key in _KEEP:
                if key in logs:
                    row[key] = logs[key]
            tokens = logs.get("num_tokens")
            if tokens is not None:
                tokens = int(tokens) + self._tokens_offset
                row["tokens"] = tokens
                if self._last_tokens is not None and self._last_time is not None and now > self._last_time:
                    row["tokens_per_second"] = round((tokens - self._last_tokens) / (now - self._last_time), 1)
                self._last_tokens = tokens
            self._last_time = now
        elif any(key.startswith("eval_") for key in logs):
            row.update({k: v for k, v in logs.items() if k.startswith("eval_") and not k.endswith("_runtime")})
            # Evaluation time must not count against the next training interval's throughput.
            self._last_time = None
            self._last_tokens = None
        else:
            return
        nonfinite = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if nonfinite:
            row["nonfinite"] = nonfinite
        row = {k: _finite_or_none(v) for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    def on_step_end(self, args, state, control, **kwargs):
        if self._last_time is None:
            self._last_time = time.perf_counter()


class ProgressCallback(TrainerCallback):
    """A progress bar with step, loss and tokens/s; plain lines when stdout is not a terminal."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task = None
        self._tokens_start: tuple[float, int] | None = None
        self._status = ""

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=state.max_steps, completed=state.global_step, status="")

    def on_step_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not logs or self._progress is None:
            return
        if "loss" in logs:
            now, tokens = time.perf_counter(), int(logs.get("num_tokens", 0))
            rate = ""
            if self._tokens_start is not None and now > self._tokens_start[0]:
                rate = f"  {(tokens - self._tokens_start[1]) / (now - self._tokens_start[0]):,.0f} tok/s"
            self._tokens_start = (now, tokens)
            self._status = f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}{rate}"
            self._progress.update(self._task, status=self._status)
            if not self.console.is_terminal:
                self.console.print(f"step {state.global_step}/{state.max_steps}  {self._status}")
        elif "eval_loss" in logs:
            self.console.print(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")
            self._tokens_start = None

    def on_train_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class TrainBeganCallback(TrainerCallback):
    """Calls ``action`` once, when training begins (optimizer and scheduler built: trl accepted the settings)."""

    def __init__(self, action) -> None:
        self.action = action
        self.began = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.began:
            self.began = True
            self.action()
