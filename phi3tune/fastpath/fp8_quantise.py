"""Per-token e4m3 quantisation for ``model.base_precision: fp8``: the reference functions, the fast versions the
FP8 linears call, and quantisation inside the kernels that write those linears' inputs.

* ``quantise_rows`` / ``quantise_rows_scaled``: the reference (pure torch): ``scale = max(amax(row), 1e-12) *
  (1 / 448)`` of shape ``(rows, 1)``, values ``clamp(x / scale)`` rounded to e4m3.
* What ``fp8_base`` calls: on CUDA the Triton kernels of ``fp8_kernels.py`` (one pass, the same numbers bit for
  bit); where those fail to build (one warning), the reference through ``torch.compile``; on a CPU the reference.
* ``quantise_in_kernels()``: phi3_layers' compiled RMSNorm and SwiGLU also quantise their output in the same
  kernel, and hand it to the FP8 linear that reads it next (qkv_proj, gate_up_proj, down_proj), which then skips
  its own quantisation. Inductor keeps the norm's output in float32 for that quantisation and divides
  approximately, so a scale or an e4m3 value can differ from quantising the bf16 output by one rounding step
  (on a CPU, eagerly, they are equal). Measured on an H200 (issue 16, 8,192 tokens): RMSNorm 0.087 ms, with the
  quantisation fused 0.092 ms, followed by a separate pass 0.194 ms (two norms and a SwiGLU: 0.334 against
  0.554 ms a layer); and one launch fewer each, where the fp8 step is bound by the CPU launching kernels.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch

from phi3tune.fastpath import phi3_layers
from phi3tune.fastpath.phi3_layers import CompiledOnce

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# A row of zeros gets this scale (its quantised values are 0 either way) instead of a division by zero.
MIN_AMAX = 1e-12
# scale = amax * (1 / 448), not amax / 448: PyTorch's CUDA division by a Python number multiplies by its
# reciprocal, so this spelling gives the same float32 scale on every device and in the Triton kernel.
INV_E4M3_MAX = 1.0 / E4M3_MAX


def quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation: ``x ~= xq * scale`` with ``scale = amax(row) * (1 / 448)`` of shape ``(rows, 1)``."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) * INV_E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), scale


def quantise_rows_scaled(x: torch.Tensor, column_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantise_rows(x * column_scale)``: the weight's per-output-channel scale folded into ``dY``, in one pass."""
    return quantise_rows(x.float() * column_scale)


_compiled_rows = CompiledOnce(quantise_rows)
_compiled_rows_scaled = CompiledOnce(quantise_rows_scaled)


_TRITON_FAILED: list[str] = []  # why the Triton kernels could not run here, once they have failed


def _triton(x: torch.Tensor) -> Any:
    """``fp8_kernels`` where its Triton kernels can take ``x`` (CUDA, Triton importable, not failed), else None."""
    if x.device.type != "cuda" or _TRITON_FAILED:
        return None
    from phi3tune.fastpath import fp8_kernels

    return fp8_kernels if fp8_kernels.available() else None


def _kernel_or(fallback: Callable, kernel: Callable, *args: Any) -> Any:
    """``kernel(*args)``; if it fails to build or run (not for lack of memory), ``fallback(*args)`` from then on."""
    try:
        return kernel(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a Triton build or launch error: the torch function is the same math
        _TRITON_FAILED.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        log.warning("fp8 base: Triton kernel %s failed (%s); using torch's from now on", kernel.__name__,
                    _TRITON_FAILED[-1])
        return fallback(*args)


def rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantise_rows(x)`` by the fastest path this device has."""
    kernels = _triton(x)
    if kernels and x.shape[-1] <= kernels.MAX_ROW:
        return _kernel_or(_compiled_rows, kernels.quantise_rows, x)
    return _compiled_rows(x)


def rows_scaled(x: torch.Tensor, column_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantise_rows_scaled(x, column_scale)`` by the fastest path this device has."""
    kernels = _triton(x)
    if kernels and x.shape[-1] <= kernels.MAX_ROW:
        return _kernel_or(_compiled_rows_scaled, kernels.quantise_rows, x, column_scale)
    return _compiled_rows_scaled(x, column_scale)


def transposed(weight: torch.Tensor) -> torch.Tensor:
    """``weight.t().contiguous()`` (the tiled Triton transpose on CUDA: torch's copy took 0.69 ms a layer, the
    kernel 0.17, on an H200)."""
    kernels = _triton(weight)
    if kernels:
        return _kernel_or(lambda w: w.t().contiguous(), kernels.transpose, weight)
    return weight.t().contiguous()


# ------------------------------------------------------------------ inputs quantised by the kernels that write them
# [output, e4m3, scales] of the last such kernel until its linear takes it; per thread (nn.DataParallel runs its
# replicas' forwards in threads).
_LOCAL = threading.local()


def _ready() -> list[torch.Tensor]:
    if not hasattr(_LOCAL, "ready"):
        _LOCAL.ready = []
    return _LOCAL.ready


def _quantised_rows_of(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantise_rows(y.detach().reshape(-1, y.shape[-1]))


def rmsnorm_quantised(hidden_states: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``phi3_layers.rmsnorm`` and its output quantised per token: ``(y, y_e4m3, scales)``."""
    y = phi3_layers.rmsnorm(hidden_states, weight, eps)
    return (y, *_quantised_rows_of(y))


def add_rmsnorm_quantised(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``phi3_layers.add_rmsnorm`` and the norm's output quantised per token: ``(sum, y, y_e4m3, scales)``."""
    hidden_states, y = phi3_layers.add_rmsnorm(residual, delta, weight, eps)
    return (hidden_states, y, *_quantised_rows_of(y))


def swiglu_quantised(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``phi3_layers.swiglu`` and its output quantised per token: ``(y, y_e4m3, scales)``."""
    y = phi3_layers.swiglu(gate_up)
    return (y, *_quantised_rows_of(y))


_compiled_rmsnorm = CompiledOnce(rmsnorm_quantised)
_compiled_add_rmsnorm = CompiledOnce(add_rmsnorm_quantised)
_compiled_swiglu = CompiledOnce(swiglu_quantised)


def _offer(y: torch.Tensor, quantised: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    _ready()[:] = [y, quantised, scales]
    return y


def _rmsnorm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _offer(*_compiled_rmsnorm(hidden_states, weight, eps))


def _add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    hidden_states, *normed = _compiled_add_rmsnorm(residual, delta, weight, eps)
    return hidden_states, _offer(*normed)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    return _offer(*_compiled_swiglu(gate_up))


def quantise_in_kernels(qkv_proj: bool = True, gate_up_proj: bool = True, down_proj: bool = True) -> None:
    """From now until phi3_layers is unpatched, its norms and SwiGLU hand the next FP8 linear its quantised input:
    the input norm for qkv_proj, the post-attention norm for gate_up_proj, the SwiGLU for down_proj (only those
    whose linear is FP8: an offer no linear takes is wasted work and memory)."""
    kernels = {"rmsnorm": _rmsnorm, "add_rmsnorm": _add_rmsnorm, "swiglu": _swiglu}
    wanted = {"rmsnorm": qkv_proj, "add_rmsnorm": gate_up_proj, "swiglu": down_proj}
    chosen = {name: fn for name, fn in kernels.items() if wanted[name]}
    if chosen:
        phi3_layers.replace_kernels(on_unpatch=forget_inputs, **chosen)


def input_rows(x: torch.Tensor, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2d`` (``x`` as rows) quantised per token: what a kernel made with ``x`` if it did, else made here."""
    ready = _ready()
    if ready and ready[0] is x:
        _, quantised, scales = ready
        ready.clear()
        if quantised.shape == x2d.shape:
            return quantised, scales
    return rows(x2d)


def forget_inputs() -> None:
    """Drop a handed-over input no linear took (this thread's)."""
    _ready().clear()
