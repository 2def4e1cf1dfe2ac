"""LoRA inputs stay in the autocast dtype: peft's float32 copy of every LoRA input is skipped.

peft keeps LoRA weights in float32 and, before ``lora_A``, copies the (bf16) layer input to float32; under
bf16 autocast ``lora_A``'s matmul then casts it straight back to bf16. The round trip is exact, so skipping it
changes no number (with ``lora_dropout: 0``); it saves two full-size copies per LoRA layer forward and two in
backward (~15% of a step on an H100, docs/benchmarks.md). Only applies while autocast is on with the
input's dtype.

API: ``patch() -> bool``, ``unpatch()``, ``is_patched() -> bool``, like every module of ``phi3tune/fastpath/``.
"""

from __future__ import annotations

from typing import Any

import torch

_ORIGINAL: Any = None  # peft's BaseTunerLayer._cast_input_dtype while patched


def _cast_input_dtype(self: Any, x: Any, dtype: torch.dtype) -> Any:
    if (
        isinstance(x, torch.Tensor)
        and dtype == torch.float32
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.is_autocast_enabled(x.device.type)
        and torch.get_autocast_dtype(x.device.type) == x.dtype
    ):
        return x
    return _ORIGINAL(self, x, dtype)


def is_patched() -> bool:
    return _ORIGINAL is not None


def patch() -> bool:
    """Install the cast shortcut on peft's ``BaseTunerLayer`` (process-wide, idempotent)."""
    global _ORIGINAL
    if _ORIGINAL is not None:
        return True
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # pragma: no cover - peft missing
        return False
    _ORIGINAL = BaseTunerLayer._cast_input_dtype
    BaseTunerLayer._cast_input_dtype = _cast_input_dtype
    return True


def unpatch() -> None:
    global _ORIGINAL
    if _ORIGINAL is None:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    BaseTunerLayer._cast_input_dtype = _ORIGINAL
    _ORIGINAL = None
