"""Training data: read from files or the hub, formats detected and normalised, rows validated, rendered with
Phi-3's chat template and tokenised with assistant-only labels.

    data = prepare_datasets(cfg.data, tokenizer, max_length=2048, seed=0)   # data.train, data.eval, data.report
    messages = to_phi3_messages(openai_messages, tools)   # a tool-calling chat rendered as training did
"""

from __future__ import annotations

import importlib
from typing import Any

# The public face, imported on first use: a leaf module of this package (say its file names) must be
# importable without pulling in the rest, or the packages' imports would run in circles.
_PUBLIC = {
    "PreparedData": "phi3tune.data.prepare",
    "prepare_datasets": "phi3tune.data.prepare",
    "load_eval_dataset": "phi3tune.data.evaluation",
    "to_phi3_messages": "phi3tune.data.tools",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
