"""Complete-checkpoint lookup, and what changed since the run being resumed.

Only checkpoints that finished writing (marked complete) are ever resumed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from phi3tune.errors import UsageError
from phi3tune.training.atomic import STAGING_PREFIX, atomic_write_text

COMPLETE_MARKER = "phi3tune_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(checkpoint_dir: Path, step: int) -> None:
    """Write the completeness marker last, after every other file of the checkpoint is flushed."""
    atomic_write_text(checkpoint_dir / COMPLETE_MARKER, json.dumps({"step": step}))


def is_complete(checkpoint_dir: Path) -> bool:
    return (checkpoint_dir / COMPLETE_MARKER).is_file()


def complete_checkpoints(checkpoints_root: Path) -> list[Path]:
    """Complete checkpoints under ``checkpoints_root``, oldest first."""
    if not checkpoints_root.is_dir():
        return []
    found = []
    for child in checkpoints_root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_complete_checkpoint(checkpoints_root: Path) -> Path | None:
    found = complete_checkpoints(checkpoints_root)
    return found[-1] if found else None


def incomplete_checkpoints(checkpoints_root: Path) -> list[Path]:
    """Half-written checkpoints (no completeness marker) and staging folders, which resume removes."""
    if not checkpoints_root.is_dir():
        return []
    return sorted(child for child in checkpoints_root.iterdir() if child.is_dir() and (
        child.name.startswith(STAGING_PREFIX) or (_CHECKPOINT_RE.match(child.name) and not is_complete(child))))


_COMPARED_SECTIONS = ("model", "data", "training_config", "peft_config")
# Keys whose change cannot alter the trajectory being resumed.
_IGNORED_ON_RESUME = {"training_config.output_dir", "model.token"}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: node}


def read_previous_run_config(path: Path) -> dict[str, Any]:
    """A resumed run's ``run_config.yaml`` as a dict (``{}`` when absent).

    Raises:
        UsageError: It is there but unreadable (cut short, edited into invalid YAML, not a mapping).
    """
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        problem = None if isinstance(loaded, dict) or loaded is None else "not a YAML mapping"
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        loaded, problem = None, str(exc).splitlines()[0]
    if problem:
        raise UsageError(
            f"--resume: {path} is damaged ({problem}).",
            hint=f"restore it from a backup, or delete {path}: this run rewrites it from the config.",
        )
    return loaded or {}


def resume_changes(previous_run_config: Path, current: dict[str, Any], data_fingerprint: str | None) -> list[str]:
    """What differs between the run being resumed (its run_config.yaml) and this one, one line per key.

    A resumed run equals an uninterrupted one only with the same config and data; a changed value (say a
    longer ``max_steps``) may be on purpose, so the caller warns rather than refuses.
    """
    before = read_previous_run_config(previous_run_config)
    old = _flatten({k: before.get(k) for k in _COMPARED_SECTIONS})
    new = _flatten({k: current.get(k) for k in _COMPARED_SECTIONS})
    changes = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if key not in _IGNORED_ON_RESUME and old.get(key) != new.get(key)]  # fmt: skip
    old_fingerprint = (before.get("data_report") or {}).get("fingerprint")
    if old_fingerprint and data_fingerprint and old_fingerprint != data_fingerprint:
        changes.append("the training data changed (fingerprint differs): batches will not replay the same rows")
    return changes
