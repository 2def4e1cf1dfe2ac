"""The run's YAML: read (parse), checked against a schema and the installed trl/peft fields, legacy keys translated.

    cfg = load_config("configs/lora.yaml", ["training_config.max_steps=5"])
"""

from __future__ import annotations

import importlib
from typing import Any

# The public face, imported on first use: a leaf module of this package (say its file names) must be
# importable without pulling in the rest, or the packages' imports would run in circles.
_PUBLIC = {
    "RunConfig": "phi3tune.config.load",
    "load_config": "phi3tune.config.load",
    "max_length_of": "phi3tune.config.schema",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
