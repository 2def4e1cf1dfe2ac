"""The model side: loading (dtype, attention, QLoRA, random init), what a RUN_OR_ADAPTER_OR_MODEL argument points
at (``targets``), completeness checks of saved folders (``artefacts``), LoRA target names for Phi-3's fused
projections, and the chat template with its special-token rule.
"""

from __future__ import annotations

import importlib
from typing import Any

# The public face, imported on first use: a leaf module of this package (say its file names) must be
# importable without pulling in the rest, or the packages' imports would run in circles.
_PUBLIC = {
    "Target": "phi3tune.model.targets",
    "resolve_target": "phi3tune.model.targets",
    "load_for_inference": "phi3tune.model.targets",
    "load_model": "phi3tune.model.loading",
    "load_tokenizer": "phi3tune.model.loading",
    "device_type": "phi3tune.model.loading",
    "render_prompt": "phi3tune.model.chat_template",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
