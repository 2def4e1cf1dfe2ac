"""Is a model or adapter folder complete enough to load? Checked before any weights are read.

An interrupted ``merge-adapter`` (``MERGE_INCOMPLETE``), a ``base_model/`` cut off by a kill or a full disk
(an empty ``config.json``, missing or truncated shards), an adapter folder without its weights, or one of
phi3tune's staging folders all used to reach transformers, which reported them as an unreachable hub or
an internal error. Here each becomes one exit-2 message naming the folder and what to do.

Only file headers are read (a safetensors header is a few KB), so the checks cost nothing next to a load.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Iterable

from phi3tune.errors import UsageError
from phi3tune.training.layout import BASE_MODEL_DIR
from phi3tune.training.atomic import STAGING_PREFIX

MERGE_INCOMPLETE = "MERGE_INCOMPLETE"
# Prefixes and suffixes of the folders phi3tune writes into before renaming them into place.
MERGE_STAGING_SUFFIX = ".phi3tune-merge"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"


def quoted(path: Path | str) -> str:
    """``path`` as a user can paste it into a shell."""
    return shlex.quote(str(path))


def is_staging_folder(path: Path) -> bool:
    """One of phi3tune's own half-written folders (never a finished artefact)."""
    return path.name.startswith(STAGING_PREFIX) or path.name.endswith(MERGE_STAGING_SUFFIX)


def staging_left_beside(path: Path) -> Path | None:
    """A staging folder that was to become ``path`` (``.tmp-adapter`` for ``adapter/``), if one is there."""
    for candidate in (path.with_name(f"{STAGING_PREFIX}{path.name}"), path.with_name(f".{path.name}{MERGE_STAGING_SUFFIX}")):
        if candidate.is_dir():
            return candidate
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file ``path`` cannot be read (a header that does not cover the file), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return None
    except Exception as exc:  # noqa: BLE001 - any failure to read the header means the file is unusable
        return f"{path.name} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def read_json_object(path: Path) -> dict | None:
    """``path``'s JSON object; None when it is missing, unreadable, not JSON or not an object."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return loaded if isinstance(loaded, dict) else None


def json_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable JSON object, or None."""
    if read_json_object(path) is not None:
        return None
    try:  # only on the failure path: say which failure it is
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return f"{path.name} is empty or not valid JSON"
    return f"{path.name} is not a JSON object"


def folder_problem(folder: Path, required: Iterable[str] = ()) -> str | None:
    """What is wrong with a saved folder (checkpoint, base model), as a phrase naming the file; None when whole.

    Args:
        folder: The saved folder.
        required: File names (globs allowed) of which at least one match must exist each.
    """
    for pattern in required:
        if not any(folder.glob(pattern)):
            return f"{pattern} is missing"
    for path in sorted(folder.rglob("*.json")):
        problem = json_problem(path)
        if problem:
            return f"{path.relative_to(folder).parent / problem}".removeprefix("./")
    for path in sorted(folder.rglob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            return f"{path.relative_to(folder).parent / problem}".removeprefix("./")
    return None


def model_dir_problem(path: Path) -> str | None:
    """Why the full-model folder ``path`` cannot be loaded, or None when it looks complete."""
    config_problem = json_problem(path / "config.json")
    if config_problem:
        return config_problem
    index = path / "model.safetensors.index.json"
    if index.is_file():
        loaded = read_json_object(index)
        if loaded is None:
            return json_problem(index)
        shards = sorted(set((loaded.get("weight_map") or {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            return f"weight shard(s) {', '.join(missing[:3])} named in {index.name} are missing"
    else:
        shards = [p.name for p in sorted(path.glob("*.safetensors"))]
        if not shards:
            if any(path.glob("pytorch_model*.bin")):
                return None  # pickled weights: refused or allowed by the pickle rule, not here
            return "it holds no weights (*.safetensors)"
    for shard in shards:
        problem = safetensors_problem(path / shard)
        if problem:
            return problem
    return None


def check_model_dir(path: Path, *, role: str = "model") -> None:
    """Refuse a full-model folder that is incomplete: a merge in progress or failed, or cut-off files.

    Args:
        path: The folder.
        role: What it is to the user (``model``, ``the run's base model``), for the message.

    Raises:
        UsageError: The folder cannot be used, with what to do about it.
    """
    if path.name.startswith(STAGING_PREFIX):
        raise UsageError(
            f"{path} is a staging folder phi3tune was still writing when it stopped; it is not a usable model.",
            hint=f"use the folder it was to become ({quoted(path.with_name(path.name[len(STAGING_PREFIX):]))}); "
            "if that is missing, resume the run that wrote it.",
        )
    if (path / MERGE_INCOMPLETE).exists() or path.name.endswith(MERGE_STAGING_SUFFIX):
        raise UsageError(
            f"{path} is an incomplete merged model: {MERGE_INCOMPLETE} is there, so `phi3tune merge-adapter` was "
            "interrupted or its verification failed.",
            hint=f"do not use it; rerun `phi3tune merge-adapter ADAPTER NEW_FOLDER` into a new folder, then delete "
            f"this one (rm -r {quoted(path)}).",
        )
    problem = model_dir_problem(path)
    if problem:
        if path.name == BASE_MODEL_DIR:
            hint = (f"the run's base model was cut off while being written (a kill or a full disk): restore "
                    f"{quoted(path)} from a copy of the run, or train the run again into a new folder.")
        else:
            hint = f"the folder was not completely written or copied; copy or save the model into {quoted(path)} again."
        raise UsageError(f"{role} folder {path} is incomplete: {problem}.", hint=hint)


def check_adapter_dir(path: Path) -> None:
    """Refuse an adapter folder without usable weights (``adapter_config.json`` alone, a staging folder).

    Raises:
        UsageError: The adapter cannot be loaded.
    """
    if path.name.startswith(STAGING_PREFIX):
        raise UsageError(
            f"{path} is phi3tune's staging folder for an adapter that was still being saved when the run stopped.",
            hint=f"use the run's adapter/ folder; if there is none, resume the run "
            f"(phi3tune train CONFIG --output-dir {quoted(path.parent)} --resume).",
        )
    config_problem = json_problem(path / "adapter_config.json")
    if config_problem:
        raise UsageError(f"adapter folder {path} is incomplete: {config_problem}.",
                         hint="copy the adapter folder again from where it was trained.")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (path / ADAPTER_PICKLE).is_file():
            return  # the pickle rule decides
        raise UsageError(
            f"adapter folder {path} has adapter_config.json but no weights ({ADAPTER_WEIGHTS}).",
            hint="copy the whole adapter folder (adapter_config.json and adapter_model.safetensors) from the run.",
        )
    problem = safetensors_problem(weights)
    if problem:
        raise UsageError(f"adapter folder {path} is incomplete: {problem}.",
                         hint="copy the adapter folder again from where it was trained.")
