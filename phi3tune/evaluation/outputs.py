"""Where ``phi3tune eval`` writes, and what it may replace there.

Nothing a user made is overwritten: ``--output`` must be a new file, an earlier eval's output (its
``written_by`` marker) or a run's training-time ``eval_metrics.json`` (kept under ``training_eval``), and
the generations file beside it new or an earlier eval's; a folder or any other file is exit 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from phi3tune.errors import UsageError
from phi3tune.model.artefacts import quoted, read_json_object
from phi3tune.model.targets import Target
from phi3tune.training.layout import EVAL_METRICS, RUN_CONFIG

METRIC_KEYS = ("eval_loss", "perplexity", "token_accuracy")
TRAINING_METRIC_KEYS = {*METRIC_KEYS, "n_samples", "n_tokens"}
WRITTEN_BY = "phi3tune eval"  # the marker that makes an existing --output file ours to replace


def default_output(target: Target) -> Path:
    if target.run_dir is not None:
        return target.run_dir / EVAL_METRICS
    if Path(target.path).is_dir():
        return Path(target.path) / EVAL_METRICS
    raise UsageError(f"{target.path} is a hub id: there is no run folder to write metrics to.",
                     hint="pass --output FILE.json")


def generations_path(output: Path) -> Path:
    if output.name == EVAL_METRICS:
        return output.with_name("eval_generations.jsonl")
    return output.with_name(f"{output.stem}.generations.jsonl")


def _is_training_time_metrics(path: Path, loaded: dict[str, Any] | None) -> bool:
    """The eval_metrics.json ``phi3tune train`` writes into a run: only the metric keys, in a run folder."""
    return (path.name == EVAL_METRICS and loaded is not None and bool(loaded)
            and set(loaded) <= TRAINING_METRIC_KEYS and (path.parent / RUN_CONFIG).is_file())


def _is_generations_file(path: Path) -> bool:
    """An eval_generations file an earlier eval wrote: JSON lines with prompt and answer, or empty."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [json.loads(line) for line in lines]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return all(isinstance(row, dict) and {"prompt", "answer"} <= set(row) for row in rows)


def check_output(output: Path) -> Path:
    """Refuse an ``--output`` that would overwrite something that is not an earlier eval's output.

    Accepted: a new file; a JSON file an earlier ``phi3tune eval`` wrote (``written_by``); a run's
    training-time ``eval_metrics.json`` (kept under ``training_eval``). The generations file written beside
    it must likewise be new or an earlier eval's.

    Raises:
        UsageError: ``output`` is a folder or something else, or an existing file eval did not write.
    """
    output = Path(output).expanduser()
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--output {output}: {parent} is a file, not a folder.",
                                 hint="give a path under a folder.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"--output {output}: cannot write in {parent} (permission denied).",
                                 hint="give a path in a folder you can write to.")
            break
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; --output names the metrics file.",
                         hint=f"e.g. --output {quoted(output / EVAL_METRICS)}")
    if output.exists() and not output.is_file():
        raise UsageError(f"--output {output} is not a regular file.", hint="give a new .json file path.")
    if output.is_file():
        loaded = read_json_object(output)
        ours = loaded is not None and loaded.get("written_by") == WRITTEN_BY
        if not (ours or _is_training_time_metrics(output, loaded)):
            raise UsageError(
                f"--output {output} already exists and was not written by phi3tune eval; it will not be overwritten.",
                hint=f"give a new file, e.g. --output {quoted(output.with_name(output.stem + '.eval.json'))}",
            )
    generations = generations_path(output)
    if generations.exists() and not (generations.is_file() and _is_generations_file(generations)):
        raise UsageError(
            f"{generations} (where eval writes its sample generations) exists and was not written by phi3tune "
            "eval; it will not be overwritten.",
            hint="choose another --output name.",
        )
    return output


def run_folder_holding(output: Path, target: Target) -> Path | None:
    """The run folder ``output`` is written into (to be locked), if any."""
    parent = output.expanduser().resolve().parent
    if target.run_dir is not None and parent == Path(target.run_dir).resolve():
        return parent
    return parent if (parent / RUN_CONFIG).is_file() else None


def previous_training_eval(output: Path) -> dict[str, Any] | None:
    """The training-time metrics found at ``output`` (kept, not clobbered), if any."""
    if not output.is_file():
        return None
    previous = read_json_object(output)
    if previous is None:
        return None
    if previous.get("written_by") == WRITTEN_BY:
        return previous.get("training_eval")  # an earlier eval: carry its preserved training section on
    return previous
