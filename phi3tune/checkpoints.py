"""Output-directory policy, complete-checkpoint lookup and atomic file writes.

Nothing a user made is ever overwritten without ``--overwrite``, and only checkpoints that finished
writing (marked complete) are ever resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from phi3tune.errors import UsageError

COMPLETE_MARKER = "phi3tune_complete.json"
CHECKPOINTS_DIR = "checkpoints"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def check_output_dir(
    output_dir: Path | None, *, resume: bool, overwrite: bool, config_path: Path | None = None
) -> Path:
    """Validate the run's output directory according to DESIGN.md §3, touching nothing.

    Refuses the current directory, the home directory, the config's own directory, a file, and any
    non-empty directory unless ``resume`` or ``overwrite`` is given. Nothing is created or removed here, so
    a run that fails validation later leaves the directory exactly as it was.

    Returns:
        The resolved directory.

    Raises:
        UsageError: The directory is not acceptable for this run.
    """
    if output_dir is None:
        raise UsageError(
            "no output directory: set training_config.output_dir or pass --output-dir.",
            hint="e.g. phi3tune train CONFIG --output-dir runs/my-run",
        )
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one.")
    path = Path(output_dir).expanduser().resolve()
    forbidden = {Path.cwd().resolve(): "the current directory", Path.home().resolve(): "your home directory",
                 Path(path.anchor): "the filesystem root"}
    if config_path is not None:
        forbidden[Path(config_path).resolve().parent] = "the config file's own directory"
    if path in forbidden:
        raise UsageError(
            f"output directory {path} is {forbidden[path]}; phi3tune will not write a run there.",
            hint="choose a dedicated folder, e.g. --output-dir runs/my-run",
        )
    if path.exists() and not path.is_dir():
        raise UsageError(f"output directory {path} is a file.", hint="choose another --output-dir.")
    if path.is_dir() and any(path.iterdir()):
        if not (overwrite or resume):
            raise UsageError(
                f"output directory {path} is not empty.",
                hint="pass --resume to continue its newest complete checkpoint, --overwrite to replace it, "
                "or choose another --output-dir.",
            )
    elif resume:
        raise UsageError(f"--resume: {path} holds no run to resume.", hint="drop --resume to start a new run.")
    return path


def create_output_dir(path: Path, *, overwrite: bool) -> Path:
    """Create (or, with ``overwrite``, empty) a directory that ``check_output_dir`` accepted."""
    if overwrite and path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_output_dir(
    output_dir: Path | None, *, resume: bool, overwrite: bool, config_path: Path | None = None
) -> Path:
    """``check_output_dir`` then ``create_output_dir`` in one call."""
    path = check_output_dir(output_dir, resume=resume, overwrite=overwrite, config_path=config_path)
    return create_output_dir(path, overwrite=overwrite)


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


def remove_incomplete_checkpoints(checkpoints_root: Path) -> list[Path]:
    """Delete half-written checkpoints (no marker, or temp dirs); return what was removed."""
    removed = []
    if not checkpoints_root.is_dir():
        return removed
    for child in checkpoints_root.iterdir():
        if child.is_dir() and (child.name.startswith(".tmp-") or (_CHECKPOINT_RE.match(child.name) and not is_complete(child))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a flushed temp file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


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


def resume_changes(previous_run_config: Path, current: dict[str, Any], data_fingerprint: str | None) -> list[str]:
    """What differs between the run being resumed (its run_config.yaml) and this one, one line per key.

    A resumed run equals an uninterrupted one only with the same config and data; a changed value (say a
    longer ``max_steps``) may be on purpose, so the caller warns rather than refuses.
    """
    import yaml

    if not previous_run_config.is_file():
        return []
    before = yaml.safe_load(previous_run_config.read_text(encoding="utf-8")) or {}
    old = _flatten({k: before.get(k) for k in _COMPARED_SECTIONS})
    new = _flatten({k: current.get(k) for k in _COMPARED_SECTIONS})
    changes = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if key not in _IGNORED_ON_RESUME and old.get(key) != new.get(key)]  # fmt: skip
    old_fingerprint = (before.get("data_report") or {}).get("fingerprint")
    if old_fingerprint and data_fingerprint and old_fingerprint != data_fingerprint:
        changes.append("the training data changed (fingerprint differs): batches will not replay the same rows")
    return changes
