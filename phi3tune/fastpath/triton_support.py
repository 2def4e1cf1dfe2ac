"""Whether phi3tune's own Triton kernels can run here (fp8_kernels, swiglu_backward).

Kept apart from the kernels so that asking does not import them (an fp8 module is imported only by an fp8 run).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the Triton kernels can run here (a CUDA device and an importable Triton)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - no Triton, or a broken install: the torch path runs instead
        return False
    return True
