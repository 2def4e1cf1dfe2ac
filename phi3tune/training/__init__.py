"""The training loop's parts: SFTConfig arguments (one place), the trainer, the run folder (layout, marker,
lock, staged overwrite), atomic writes, checkpoints and resume, callbacks, signals, resource errors.
"""

from __future__ import annotations

import importlib
from typing import Any

# The public face, imported on first use: a leaf module of this package (say its file names) must be
# importable without pulling in the rest, or the packages' imports would run in circles.
_PUBLIC = {
    "build_training_args": "phi3tune.training.arguments",
    "Phi3Trainer": "phi3tune.training.trainer",
    "folder_lock": "phi3tune.training.run_lock",
    "atomic_write_json": "phi3tune.training.atomic",
    "atomic_write_text": "phi3tune.training.atomic",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
