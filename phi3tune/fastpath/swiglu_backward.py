"""Phi-3's SwiGLU with its backward as one Triton kernel that reads each input once.

``phi3_layers.swiglu`` (``up * silu(gate)`` on the fused ``gate_up_proj`` output) is compiled with
``torch.compile``; its forward runs at the GPU's bandwidth, but Inductor writes the fused gradient
``[d_gate | d_up]`` as a concatenation whose every element loads its own ``gate``, ``up`` and incoming gradient,
so each is read twice. Here one program computes both halves from one load of each. Measured on an H200
(``scripts/bench_layer_kernels.py swiglu``, 8,192 tokens, Phi-3-mini's 8,192-wide MLP, bf16): 0.169 ms against
Inductor's 0.293 ms a call.

``apply(gate_up, forward)`` runs ``forward(gate_up)`` (the compiled SwiGLU, or the fp8 path's variant that also
quantises the output) without recording it for autograd, and gives the result this backward. The math is
``silu_backward`` in float32, rounded once, as Inductor's kernel; ``backward_reference`` is the same in torch,
used on a CPU and checked against the kernel on a GPU (tests/fastpath/test_swiglu_backward.py).

API: ``usable(gate_up) -> bool``, ``apply(gate_up, forward) -> Tensor``, ``backward(gate_up, grad) -> Tensor``,
``backward_reference(gate_up, grad) -> Tensor``.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch

from .triton_support import triton_available

log = logging.getLogger(__name__)

# Elements of one half a program handles (8,192-wide halves: 4 programs a token). H200, 8,192 tokens, bf16:
# 0.169 ms a call (3.98 TB/s of the bytes that must move) against Inductor's 0.293 ms (docs/benchmarks.md,
# "2026-12-02 (session 2)"); ~4 ms of a step over 32 layers.
_BLOCK = 2048
# Off: Inductor's backward runs (scripts/bench.py's lora-inductor-swiglu row, the A/B of this kernel in the recipe).
ENABLED = True
_FAILED = False  # the kernel failed to build or launch once (e.g. no C compiler for Triton): the reference runs


def usable(gate_up: torch.Tensor) -> bool:
    """Whether the kernel's backward applies: a CUDA tensor with Triton, bf16/fp16/fp32, an even last dim."""
    return (ENABLED and not _FAILED and gate_up.is_cuda
            and gate_up.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and gate_up.shape[-1] % 2 == 0 and triton_available())  # fmt: skip


def backward_reference(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``d [gate | up]`` of ``up * silu(gate)`` given the output's gradient, in float32 (or float64) rounded once."""
    compute = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(compute).chunk(2, dim=-1)
    g = grad.to(compute)
    sig = torch.sigmoid(gate)
    d_gate = g * up * sig * (1 + gate * (1 - sig))
    d_up = g * gate * sig
    return torch.cat([d_gate, d_up], dim=-1).to(gate_up.dtype)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_backward_kernel(gu_ptr, g_ptr, out_ptr, half, gu_stride, g_stride, out_stride,
                               BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < half
        gate = tl.load(gu_ptr + row * gu_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * gu_stride + half + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
        d_up = g * gate * sig
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * out_stride + cols, d_gate.to(out_ty), mask=mask)
        tl.store(out_ptr + row * out_stride + half + cols, d_up.to(out_ty), mask=mask)

    return triton, swiglu_backward_kernel


def _kernel_backward(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    half = gate_up.shape[-1] // 2
    gu2d = gate_up.reshape(-1, 2 * half)
    g2d = grad.reshape(-1, half)
    if gu2d.stride(-1) != 1:
        gu2d = gu2d.contiguous()
    if g2d.stride(-1) != 1 or g2d.dtype != gate_up.dtype:
        g2d = g2d.to(gate_up.dtype).contiguous()
    out = torch.empty(gu2d.shape, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        triton, kernel = _kernel()
        grid = (gu2d.shape[0], triton.cdiv(half, _BLOCK))
        with torch.cuda.device(gate_up.device):
            kernel[grid](gu2d, g2d, out, half, gu2d.stride(0), g2d.stride(0), out.stride(0), BLOCK=_BLOCK,
                         num_warps=8)
    return out.view(gate_up.shape)


def backward(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The kernel where ``usable``, else ``backward_reference``; a kernel that fails to build or launch is warned
    about once and the reference runs from then on (training goes on, as with a failed ``torch.compile``)."""
    global _FAILED
    if not usable(gate_up):
        return backward_reference(gate_up, grad)
    try:
        return _kernel_backward(gate_up, grad)
    except torch.OutOfMemoryError:
        raise  # not a kernel failure: the recipe's OOM handling (exit 3, hints) takes it
    except Exception as exc:  # noqa: BLE001 - any build/launch failure: the reference is the same math
        _FAILED = True
        log.warning("fast path: the SwiGLU backward kernel failed (%s: %s); using the torch reference",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
        return backward_reference(gate_up, grad)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        return forward(gate_up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the torch reference, whose result autograd can differentiate
            return backward_reference(gate_up, grad), None
        return backward(gate_up, grad), None


def apply(gate_up: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``forward(gate_up)`` (a SwiGLU: same value as ``up * silu(gate)``) with this module's backward."""
    return _SwiGLU.apply(gate_up, forward)
