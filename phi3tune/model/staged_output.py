"""Write an output folder (a merged model, an ONNX export) beside itself, then publish it with one rename.

Used by ``merge-adapter`` and ``export onnx``. The output is written into a hidden staging folder next to
OUTPUT_DIR, marked incomplete; only once it is verified is the marker removed and the folder renamed to
OUTPUT_DIR, so tools that know nothing of phi3tune's markers never see a half-written or unverified
model under the name the user asked for. A staging folder left by a killed run is ours only when it
holds the marker (or nothing): anything else there is the user's and is left alone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rich.console import Console

from phi3tune.errors import UsageError
from phi3tune.model.artefacts import quoted


def check_new_output(output_dir: Path, source: Path, *, what: str, source_role: str) -> Path:
    """``output_dir`` resolved, if it is absent or an empty folder and not inside ``source``.

    Args:
        output_dir: Where the user wants the result.
        source: The folder the result is made from (an adapter, a model).
        what: The result, for messages (``merged model``).
        source_role: What ``source`` is, for messages (``adapter``).

    Raises:
        UsageError: The output is a file, a non-empty folder, or inside the source.
    """
    out = output_dir.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} is a file.", hint=f"choose a new folder for the {what}.")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"output directory {out} is not empty.", hint="choose a new or empty folder.")
    if out == source.resolve() or source.resolve() in out.parents:
        raise UsageError(f"the {what} cannot be written inside the {source_role} folder.")
    return out


def staging_dir(out: Path, suffix: str) -> Path:
    """The hidden folder beside ``out`` that is written before being renamed to ``out``."""
    return out.with_name(f".{out.name}{suffix}")


def fresh_staging(out: Path, *, suffix: str, marker: str, command: str, console: Console) -> Path:
    """An empty staging folder for ``out``, holding only ``marker``; one left by a killed run is replaced.

    Args:
        out: The output folder the staging folder will become.
        suffix: The staging folder's name suffix (``staging_dir``).
        marker: The incomplete marker's file name.
        command: The phi3tune command writing it (``merge-adapter``), for messages.
        console: Where the removal of a stale folder is reported.

    Raises:
        UsageError: A folder of that name exists that phi3tune did not make (not marked, not empty).
    """
    staging = staging_dir(out, suffix)
    if staging.exists():
        if not (staging.is_dir() and ((staging / marker).is_file() or not any(staging.iterdir()))):
            raise UsageError(f"{staging} exists and was not made by phi3tune {command}; it is left alone.",
                             hint="move it away, or choose another output folder.")
        console.print(f"[yellow]removing {staging}, left by an earlier {command} that did not finish", highlight=False)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / marker).write_text(
        f"phi3tune {command} started; this folder is not a usable model until this file is gone.\n")
    return staging


def publish(staging: Path, out: Path, *, what: str) -> None:
    """Rename the verified staging folder to ``out`` (an absent or still-empty folder).

    Raises:
        UsageError: Something was written into ``out`` meanwhile; the result stays in ``staging``.
    """
    try:
        os.rename(staging, out)
    except OSError as exc:
        raise UsageError(
            f"could not move the {what} into {out} ({exc.strerror}): something was written there meanwhile.",
            hint=f"the verified {what} is in {quoted(staging)}; move it where you want it.",
        ) from exc
