"""An exclusive, per-folder lock so two phi3tune processes never write the same run or output folder.

The lock is an ``flock`` on ``.NAME.phi3tune-lock`` beside the folder (not inside it, so that a folder
being moved aside, replaced or created still has one lock). The kernel drops an ``flock`` when its
process dies, so a crashed run never blocks the next one; the file it leaves behind names the dead pid,
and the next holder says it took the lock over.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from phi3tune.errors import UsageError

log = logging.getLogger(__name__)


def lock_path(folder: Path) -> Path:
    folder = Path(folder).expanduser().resolve()
    return folder.with_name(f".{folder.name}.phi3tune-lock")


def _blocked_by(folder: Path) -> str | None:
    """A file standing where a parent folder of ``folder`` should be, said as a reason; None if there is none."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, not a folder"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(fd: int) -> tuple[int | None, str]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    pid_text, _, purpose = text.partition(" ")
    return (int(pid_text) if pid_text.isdigit() else None), purpose


@contextmanager
def folder_lock(folder: Path, purpose: str) -> Iterator[None]:
    """Hold the exclusive lock on ``folder`` for the duration of the block.

    Args:
        folder: The run or output folder (it need not exist yet; its parent is created if missing).
        purpose: What this process does there (``train``, ``eval``, ``merge``), shown to a second process.

    Raises:
        UsageError: Another live process holds the lock (exit 2, naming its pid and purpose).
    """
    path = lock_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {path.parent} for {folder}: {_blocked_by(path.parent) or exc.strerror}.",
                         hint="choose a folder whose parents are folders you can write to.") from exc
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise UsageError(f"cannot write in {path.parent} ({exc.strerror}).",
                             hint="choose a folder you can write to.") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, held_for = _read_holder(fd)
            os.close(fd)
            who = f"process {pid}" if pid else "another process"
            raise UsageError(
                f"{folder} is in use by {who}" + (f" (phi3tune {held_for})" if held_for else "") + ".",
                hint="wait for it to finish (or stop it), or choose another folder.",
            )
        # The previous holder may have removed the file between our open and our flock: then we hold a
        # lock on a deleted inode that nobody else can see, so start over on the current file.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale_pid, _ = _read_holder(fd)
    if stale_pid and stale_pid != os.getpid() and not _pid_alive(stale_pid):
        log.warning("took over the lock on %s left by process %d, which is no longer running", folder, stale_pid)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()} {purpose}\n".encode())
    try:
        yield
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
