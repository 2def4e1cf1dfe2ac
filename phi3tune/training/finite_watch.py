"""Non-finite loss and gradient-norm detection that never makes the CPU wait for the GPU.

Reading a loss on the host (``bool(torch.isfinite(loss))``, ``float(grad_norm)``) waits for every kernel queued
before it. The CPU then does the step boundary's Python (clipping, optimizer, callbacks, the next batch) while
the GPU sits idle: with transformers' own per-micro-batch check, ~15 ms a step on an H200 (docs/benchmarks.md,
"2026-12-02" profiles). So each optimizer step's verdict is reduced on the device, copied to pinned host memory
behind a CUDA event, and read one step later (the CPU runs at most one step ahead), or at once before anything is
logged or saved. Under several processes the loss verdict is reduced over the ranks on the device first, so every
rank stops at the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Verdict:
    step: int
    host: torch.Tensor  # [every loss of the step finite (1/0), gradient norm]
    ready: Any  # a CUDA event, or None where ``host`` was filled synchronously
    skipped: bool  # the optimizer skipped the step (fp16's grad scaler): a non-finite norm is expected then


class FiniteWatch:
    """Collects each optimizer step's losses and gradient norm and reports the first non-finite one."""

    def __init__(self) -> None:
        self._loss_ok: torch.Tensor | None = None
        self._pending: list[_Verdict] = []
        self.last_step: int | None = None

    def add_loss(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss (on its device; nothing is read back)."""
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def end_step(self, step: int, grad_norm: Any, skipped: bool = False) -> None:
        """Close optimizer step ``step``: queue its verdict (the micro-batch losses since the last call)."""
        loss_ok = self._loss_ok if self._loss_ok is not None else torch.tensor(True)
        if grad_norm is None:
            grad_norm = 0.0
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()  # FSDP2's norm is a DTensor; a plain pinned copy refuses it
        norm = grad_norm.detach().float().reshape(()) if torch.is_tensor(grad_norm) else torch.tensor(float(grad_norm))
        device = loss_ok.device if loss_ok.is_cuda else norm.device
        packed = torch.stack([loss_ok.to(device, torch.float32), norm.to(device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must stop at the same step: a loss is per rank (the norm is already global)
            torch.distributed.all_reduce(packed[:1], op=torch.distributed.ReduceOp.MIN)
        if packed.is_cuda:
            host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = packed, None
        self._pending.append(_Verdict(step, host, ready, skipped))
        self._loss_ok = None
        self.last_step = step

    def first_problem(self, *, wait: bool) -> tuple[str, int] | None:
        """``(what, step)`` of the earliest non-finite verdict, or None.

        ``wait=False`` reads every verdict but the newest (whose kernels may still be running), ``wait=True`` all of
        them. Which are read never depends on the GPU's progress, so every rank stops at the same step.
        """
        while self._pending:
            verdict = self._pending[0]
            if verdict.ready is not None:
                if len(self._pending) == 1 and not wait:
                    return None
                verdict.ready.synchronize()
            self._pending.pop(0)
            loss_ok, norm = verdict.host.tolist()
            if not loss_ok:
                return "the training loss", verdict.step
            if not math.isfinite(norm) and not verdict.skipped:
                return f"the gradient norm ({norm})", verdict.step
        return None
