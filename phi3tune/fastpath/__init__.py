"""The GPU fast path: a policy that decides (``policy.py``), a memory model (``memory.py``), and one module per
process-wide patch, each with the same face: ``patch() -> bool``, ``unpatch()``, ``is_patched() -> bool``.

    plan = plan_fast_path(cfg.model, training_args, device)   # decides, touches nothing
    apply_patches(plan)                                       # turns the decided patches on
    ...                                                       # train
    unpatch_all()                                             # and off again
"""

from __future__ import annotations

import logging
from types import ModuleType

from phi3tune.fastpath import attention, lora_fused, peft_cast, phi3_layers
from phi3tune.fastpath.memory import MemoryEstimate, estimate
from phi3tune.fastpath.policy import FastPathPlan, gpu_memory_bytes, plan_fast_path, resolve_attn_implementation

log = logging.getLogger(__name__)

PATCHES: dict[str, ModuleType] = {
    "attention": attention,
    "phi3_layers": phi3_layers,
    "peft_cast": peft_cast,
    "lora_fused": lora_fused,
}


def apply_patches(plan: FastPathPlan) -> list[str]:
    """Turn on the patches ``plan`` decided; return the names of those that could not be applied."""
    if "attention" in plan.patches and not attention.varlen_kernel_available("cuda"):
        log.warning("attention: varlen requested; no CUDA varlen kernel here, running its exact reference path")
    return [name for name in plan.patches if not PATCHES[name].patch()]


def unpatch_all() -> None:
    """Undo every fast-path patch (end of a run, and after each test)."""
    for module in reversed(PATCHES.values()):
        module.unpatch()


__all__ = [
    "FastPathPlan",
    "MemoryEstimate",
    "apply_patches",
    "estimate",
    "gpu_memory_bytes",
    "plan_fast_path",
    "resolve_attn_implementation",
    "unpatch_all",
]
