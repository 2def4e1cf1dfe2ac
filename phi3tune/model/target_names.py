"""Tell a local path from a Hugging Face hub id in a command's target argument.

``org/name`` is both a valid hub id and a valid relative path. Taking a mistyped local path for a hub id
fails late with a misleading network error offline, and online fetches a stranger's repository of that
name, so a target is a hub id only when nothing says it is meant as a path: it does not start with
``/ ./ ../ ~``, its first component is not a local folder (``runs/`` exists), and its parent does not
exist either.
"""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_PATH_PREFIXES = ("/", "./", "../", "~", ".")


def looks_like_local_path(text: str) -> bool:
    """Whether ``text`` (not an existing path) was evidently meant as a local path."""
    if text.startswith(_PATH_PREFIXES) or "\\" in text:
        return True
    path = Path(text).expanduser()
    first = Path(path.parts[0]) if path.parts else None
    if first is not None and len(path.parts) > 1 and first.is_dir():
        return True
    return len(path.parts) > 1 and path.parent.exists()


def could_be_hub_id(text: str) -> bool:
    """Whether ``text`` is shaped like a hub model id (``org/name``) and not evidently a local path."""
    return bool(_HUB_ID.match(text)) and not looks_like_local_path(text)
