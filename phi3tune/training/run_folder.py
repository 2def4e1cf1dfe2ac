"""Which folders are phi3tune's runs, which ones it must never delete, and a staged, undoable run-folder start.

A run folder carries a marker file (``.phi3tune-run``) written when phi3tune creates it. ``--overwrite`` and
``--resume`` act only on such folders (or an empty one), so a folder of the user's own files is never
emptied or trained into. ``--overwrite`` moves the old run aside and deletes it only once the new run has
started training; any failure before that puts the old run back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

import phi3tune
from phi3tune.training.atomic import atomic_write_text
from phi3tune.training.layout import ADAPTER_DIR, CHECKPOINTS_DIR, MARKER, RUN_CONFIG
from phi3tune.errors import UsageError



def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` was made by phi3tune (its marker, or the layout of a run made before the marker)."""
    if (folder / MARKER).is_file():
        return True
    # Runs made by phi3tune versions without the marker have run_config.yaml beside checkpoints/ or adapter/;
    # they are still phi3tune's and must stay resumable.
    return (folder / RUN_CONFIG).is_file() and ((folder / CHECKPOINTS_DIR).is_dir() or (folder / ADAPTER_DIR).is_dir())


def write_marker(folder: Path) -> None:
    """Mark ``folder`` as a phi3tune run (kept if already there: it records when the run was created)."""
    if (folder / MARKER).is_file():
        return
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_text(folder / MARKER, json.dumps({"tool": "phi3tune", "version": phi3tune.__version__,
                                                   "created": created}) + "\n")


def protected_paths(config_path: Path | None, data_paths: Iterable[Path]) -> dict[Path, str]:
    """Paths no run folder may contain when phi3tune would delete it, each with how to name it to the user."""
    protected = {
        Path.cwd().resolve(): "the current directory",
        Path.home().resolve(): "your home directory",
        Path(phi3tune.__file__).resolve().parent: "the phi3tune package itself",
    }
    if config_path is not None:
        protected[Path(config_path).resolve()] = "the config file"
    for path in data_paths:
        protected[Path(path).resolve()] = "a data file of this run"
    return protected


def contained(folder: Path, protected: dict[Path, str]) -> str | None:
    """What of ``protected`` lies in (or is) ``folder``, as a phrase; None when nothing does."""
    for path, what in protected.items():
        if path == folder or folder in path.parents:
            return f"{what} ({path})"
    return None


def check_writable(folder: Path) -> None:
    """Refuse up front (before any data or weights load) a run folder this process cannot write.

    The lock file and an overwrite's moved-aside run live beside the folder, so its parent must be writable
    too; a folder that does not exist yet is created in its nearest existing ancestor.
    """
    probe = folder.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot create {folder}: {probe} is a file, not a folder.",
                         hint="choose an --output-dir under a folder.")
    needed = [probe] + ([folder] if folder.is_dir() else [])
    for path in needed:
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(
                f"cannot write to {path}: permission denied (the run needs to write to "
                f"{folder}{' and beside it' if path != folder else ''}).",
                hint="choose an --output-dir you can write to, or fix the folder's permissions.",
            )


def leftover_old_runs(folder: Path) -> list[Path]:
    """Old runs an --overwrite moved aside and never got to delete or restore (the process was killed).

    Only the lock holder stages a folder, so with the lock held every such sibling is a leftover.
    """
    return sorted(folder.parent.glob(f".{folder.name}.phi3tune-old-*"))


class StagedRunFolder:
    """The folder of a new run, undoable until training has begun.

    ``create`` moves an old run aside (a hidden sibling ``.NAME.phi3tune-old-PID``) when replacing, then
    creates the folder with its marker. ``rollback`` (any failure before training begins) deletes what the
    new run wrote and puts the old run back; ``commit`` (training has begun) deletes the old run.
    """

    def __init__(self, folder: Path, *, replace: bool) -> None:
        self.folder = folder
        self.replace = replace
        self.aside: Path | None = None
        self.existed = folder.is_dir()
        self.done = False

    def create(self) -> None:
        if self.replace and self.folder.is_dir() and any(self.folder.iterdir()):
            aside = self.folder.with_name(f".{self.folder.name}.phi3tune-old-{os.getpid()}")
            n = 1
            while aside.exists():  # a leftover of an earlier process with the same pid: keep it, pick another name
                n += 1
                aside = self.folder.with_name(f".{self.folder.name}.phi3tune-old-{os.getpid()}-{n}")
            try:
                os.replace(self.folder, aside)
            except OSError as exc:
                raise UsageError(
                    f"--overwrite: cannot move the old run {self.folder} aside ({exc.strerror or exc}).",
                    hint="delete the old run yourself, or choose another --output-dir.",
                ) from exc
            self.aside = aside
        self.folder.mkdir(parents=True, exist_ok=True)
        write_marker(self.folder)

    def commit(self) -> None:
        if self.done:
            return
        self.done = True
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)

    def rollback(self) -> bool:
        """Undo ``create``; True when an old run was put back."""
        if self.done:
            return False
        self.done = True
        # Only what this run wrote is here: the folder was new, empty, or its old run was moved aside.
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.aside is not None:
            os.replace(self.aside, self.folder)
            return True
        if self.existed:
            self.folder.mkdir(parents=True, exist_ok=True)
        return False


def check_output_dir(
    output_dir: Path | None,
    *,
    resume: bool,
    overwrite: bool,
    config_path: Path | None = None,
    data_paths: Iterable[Path] = (),
) -> Path:
    """Validate the run's output directory by the rules in README ("A run's output directory"), touching nothing.

    Refuses the current directory, the home directory, the config's own directory and a file; a non-empty
    directory needs ``resume`` or ``overwrite``, and both act only on a phi3tune run folder. ``overwrite``
    is refused for a folder holding the current directory, home, the config, the data or phi3tune itself.
    Nothing is created or removed here, so a run that fails validation leaves the directory as it was.

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
        _check_non_empty(path, resume=resume, overwrite=overwrite,
                         holds=contained(path, protected_paths(config_path, data_paths)))
    elif resume:
        raise UsageError(f"--resume: {path} holds no run to resume.", hint="drop --resume to start a new run.")
    check_writable(path)
    return path


def _check_non_empty(path: Path, *, resume: bool, overwrite: bool, holds: str | None) -> None:
    run = is_run_folder(path)
    not_a_run = (f"{path} is not a phi3tune run folder (no {MARKER} marker, and no run_config.yaml with "
                 "checkpoints/ or adapter/); phi3tune never deletes, replaces or resumes a folder it did not create")
    if overwrite and holds:
        raise UsageError(f"--overwrite: {path} contains {holds}; phi3tune will not delete it.",
                         hint="choose a dedicated folder for the run, e.g. --output-dir runs/my-run")
    if (overwrite or resume) and not run:
        raise UsageError(f"{'--overwrite' if overwrite else '--resume'}: {not_a_run}.",
                         hint="choose a new or empty --output-dir.")
    if overwrite or resume:
        return
    if not run:
        raise UsageError(f"output directory {path} is not empty and is not a phi3tune run folder.",
                         hint="choose a new or empty --output-dir.")
    options = ["--resume to continue its newest complete checkpoint"]
    if not holds:
        options.append("--overwrite to replace it")
    raise UsageError(f"output directory {path} is not empty (it holds a phi3tune run).",
                     hint="pass " + ", ".join(options) + ", or choose another --output-dir.")
