"""The base model's context length, found without loading it, to check ``training_config.max_length`` against.

Read, in order: a ``random_init.max_position_embeddings`` override, ``config.json`` in a local model folder or in
the Hugging Face cache (never the network), then the context the Phi-3 model id names (``-4k-``, ``-128k-``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_NAMED_CONTEXT = {"4k": 4096, "8k": 8192, "128k": 131072}


def _from_config_json(path: Path | str | None) -> int | None:
    try:
        value = json.loads(Path(str(path)).read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_context(model: Any) -> int | None:
    """``max_position_embeddings`` of the configured base model, or None when it cannot be told offline.

    Args:
        model: The ``model`` config section (``name_or_path``, ``revision``, ``random_init``).
    """
    override = (model.random_init or {}).get("max_position_embeddings")
    if isinstance(override, int) and override > 0:
        return override
    name = str(model.name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        return _from_config_json(local / "config.json")
    try:
        from huggingface_hub import try_to_load_from_cache  # deferred: heavy, and only hub ids need it

        cached = try_to_load_from_cache(name, "config.json", revision=model.revision)
    except Exception:  # an id the hub library rejects: no cache entry to read
        cached = None
    found = _from_config_json(cached) if isinstance(cached, str) else None
    if found is not None:
        return found
    named = re.search(r"-(4k|8k|128k)-", name.lower())
    return _NAMED_CONTEXT[named.group(1)] if named else None


def context_warnings(tc: dict[str, Any], model: Any) -> list[str]:
    """A warning when ``training_config.max_length`` exceeds the model's context.

    A warning, not an error: ``max_length`` is only a cap, and nothing breaks while every row is shorter than the
    context; but rows longer than it would train on positions the model never saw, which is never intended.
    """
    max_length = tc.get("max_length")
    if not isinstance(max_length, int) or isinstance(max_length, bool):
        return []
    context = model_context(model)
    if context is None or max_length <= context:
        return []
    return [
        f"training_config.max_length={max_length} is above the context of {model.name_or_path} ({context} tokens, "
        f"max_position_embeddings): longer rows would train on positions the model never saw; "
        f"set training_config.max_length to {context} or less"
    ]
