"""Every file and folder phi3tune writes: through a temp file or a staging folder, flushed, renamed into place.

A reader (or a crash) never sees half a file or a folder that looks whole but is not, and what lands has
the permissions the user's umask gives, whatever the library that wrote it chose.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

STAGING_PREFIX = ".tmp-"


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the current umask (0644 under umask 022).

    ``mkstemp`` and safetensors create their files 0600 whatever the umask. (Reading the umask means setting it
    for an instant; phi3tune creates no files from other threads meanwhile.)
    """
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def settle_tree(path: Path) -> None:
    """Before a saved folder is renamed into place: give every file the umask's mode, and flush it to disk."""
    mode = file_mode()
    for file in path.rglob("*"):
        if file.is_file() and not file.is_symlink():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Have ``write(temp_path)`` produce the file, then rename it to ``path`` with the umask's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fchmod(fd, file_mode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a flushed temp file and a rename: readers never see half a file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def publish_folder(staging: Path, final: Path) -> None:
    """Rename a written ``staging`` folder to ``final``: files settled first, a previous ``final`` moved aside
    and removed only once the new one is in place."""
    settle_tree(staging)
    old = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Write a folder as a whole: yields an empty ``.tmp-NAME`` beside ``final``, published when the block ends
    normally; an exception leaves ``final`` as it was and removes the staging folder."""
    staging = final.with_name(f"{STAGING_PREFIX}{final.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_folder(staging, final)
