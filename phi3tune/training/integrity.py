"""Is a saved folder (checkpoint, base model) whole? Cheap checks that catch cut-short and damaged files.

Every JSON file must parse and every safetensors file must have a header that covers the file (a truncated
or zero-filled write fails here), without reading the tensors themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from safetensors import safe_open


def folder_problem(folder: Path, required: Iterable[str] = ()) -> str | None:
    """What is wrong with ``folder``, as a phrase naming the file; None when it looks whole.

    Args:
        folder: The saved folder.
        required: File names (globs allowed) of which at least one match must exist each.
    """
    for pattern in required:
        if not any(folder.glob(pattern)):
            return f"{pattern} is missing"
    for path in sorted(folder.rglob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            return f"{path.relative_to(folder)} is damaged ({str(exc).splitlines()[0][:120]})"
    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
            return f"{path.relative_to(folder)} is damaged ({str(exc).splitlines()[0][:120]})"
    return None
