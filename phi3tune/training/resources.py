"""Resource failures (GPU out of memory, missing GPU) turned into exit 3 with hints from the active config."""

from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Any, Iterator

from phi3tune.config.schema import max_length_of
from phi3tune.errors import ResourceError


def oom_hints(cfg: Any) -> list[str]:
    """Concrete next steps for an out-of-memory run, naming the values the config has now."""
    tc = cfg.training_config
    batch = int(tc.get("per_device_train_batch_size", 8))
    accum = int(tc.get("gradient_accumulation_steps", 1))
    max_length = max_length_of(tc)
    hints = []
    if batch > 1:
        hints.append(
            f"halve the micro-batch and keep the effective batch: --set training_config.per_device_train_batch_size="
            f"{max(1, batch // 2)} --set training_config.gradient_accumulation_steps={accum * 2} (now {batch} x {accum})"
        )
    if max_length and int(max_length) > 512:
        hints.append(f"shorten sequences: --set training_config.max_length={int(max_length) // 2} (now {max_length})")
    checkpointing = tc.get("gradient_checkpointing", tc.get("activation_checkpointing"))
    if not checkpointing:
        key = "gradient_checkpointing" if "activation_checkpointing" not in tc else "activation_checkpointing"
        hints.append(f"recompute activations: --set training_config.{key}=true (now off)")
    if not cfg.model.quantization:
        hints.append("load the base in 4 bits (QLoRA): --set model.quantization=4bit (now off)")
    return hints


def out_of_memory_error(cfg: Any | None, detail: str = "") -> ResourceError:
    hints = oom_hints(cfg) if cfg is not None else []
    text = "the GPU ran out of memory" + (f" ({detail.splitlines()[0][:160]})" if detail else "") + "."
    if hints:
        text += "\n  try one of:\n" + "\n".join(f"    - {h}" for h in hints)
    return ResourceError(text, hint="a complete checkpoint, if one was saved, resumes with --resume.")


def _disk_full(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain that says the disk (or quota) is full, if any.

    An OSError carries ENOSPC/EDQUOT; safetensors and tokenizers (Rust) only say it in their message.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        text = str(current)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return current
        current = current.__cause__ or current.__context__
    return None


def disk_full_error(exc: BaseException) -> ResourceError:
    name = getattr(exc, "filename", None)
    where = f" while writing {name}" if name else ""
    return ResourceError(
        f"the disk is full{where} ({str(exc).splitlines()[0][:160]}).",
        hint="free some space (or point the output at a larger disk) and run again; a training run resumes "
        "from its newest complete checkpoint with --resume.",
    )


def translate_resource_error(exc: BaseException, cfg: Any | None = None) -> ResourceError | None:
    """Map library exceptions that mean "not enough machine" (GPU memory, disk) to a ResourceError, else None."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc):
        return out_of_memory_error(cfg, str(exc))
    full = _disk_full(exc)
    if full is not None:
        return disk_full_error(full)
    return None


@contextmanager
def oom_guard(cfg: Any) -> Iterator[None]:
    """Re-raise CUDA OOM as exit 3 with hints built from ``cfg``."""
    try:
        yield
    except ResourceError:
        raise
    except Exception as exc:
        translated = translate_resource_error(exc, cfg)
        if translated is None:
            raise
        raise translated from exc


def nonfinite_hints(args: Any) -> list[str]:
    """Next steps after a NaN/inf loss or gradient, naming the values the run used (SFTConfig ``args``)."""
    lr = float(getattr(args, "learning_rate", 0.0) or 0.0)
    hints = []
    if lr > 0:
        hints.append(f"lower the learning rate: --set training_config.learning_rate={lr / 4:.2g} (now {lr:.2g})")
    max_grad_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
    if max_grad_norm <= 0 or max_grad_norm > 1.0:
        hints.append(f"clip gradients: --set training_config.max_grad_norm=1.0 (now {max_grad_norm:g})")
    if getattr(args, "fp16", False):
        hints.append("fp16 overflows easily; use bf16: --set training_config.fp16=false --set training_config.bf16=true")
    hints.append("check the data for empty, huge or garbled rows: phi3tune data check CONFIG")
    return hints
