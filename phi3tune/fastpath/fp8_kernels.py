"""Triton kernels for ``model.base_precision: fp8``: per-row e4m3 quantisation and the 1-byte weight transpose.

Both are memory-bound passes that sit between the FP8 GEMMs; written here because they measured faster than the
library versions on an H200 (issue 16, ``scripts/bench_fp8.py gemm``, 8,192 tokens, one decoder layer, GPU time
of calls back to back; docs/benchmarks.md "2026-12-01 (night)"):

* per-row quantisation: ``fp8_quantise.quantise_rows`` compiled by ``torch.compile`` 0.39 ms for the four inputs
  and 0.76 ms for the four output gradients; these kernels 0.26 and 0.61 ms, and 48 us of CPU a call against the
  compiled function's 84 (the fp8 step is bound by the CPU). One program a row reads the row once into
  registers (rows are at most 16,384 wide here), takes its amax and writes e4m3 and the scale in the same pass.
* ``w.t().contiguous()`` on an e4m3 weight: 0.69 ms a layer; the tiled transpose here 0.17 ms.

Same numbers as the torch reference (``fp8_quantise.quantise_rows``): ``scale = max(amax, 1e-12) * (1 / 448)``
and ``clamp(x / scale)`` rounded to e4m3, so a kernel and its fallback agree bit for bit (tests/fastpath/
test_fp8_base.py on a GPU). Used only on a CUDA device with Triton (``available()``); elsewhere
``fp8_quantise`` runs its torch functions.
"""

from __future__ import annotations

import functools

import torch

from .triton_support import triton_available

# One program holds a whole row in registers: wider rows take the torch path.
MAX_ROW = 32768


available = triton_available  # the kernels below need a CUDA device and an importable Triton


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def quantise_rows_kernel(x_ptr, col_scale_ptr, q_ptr, scale_ptr, n_cols, x_stride, q_stride,
                             HAS_COL_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_COL_SCALE:
            x = x * tl.load(col_scale_ptr + cols, mask=mask, other=0.0)
        amax = tl.max(tl.abs(x), axis=0)
        # fp8_quantise's float32 arithmetic exactly: a value one ulp off can round to the neighbouring e4m3
        # number. Its scale is amax times the float32 reciprocal of 448; x / scale is an IEEE division (div_rn:
        # Triton's "/" is approximate). Triton's max / maximum / minimum drop NaN where torch's keep it, so NaN is
        # put back: a row holding one gets a NaN scale (+ 0.0 otherwise, exact) and NaN values, as the reference.
        scale = tl.maximum(amax, 1e-12) * (1.0 / 448.0) + tl.sum(tl.where(x != x, x, 0.0), axis=0)
        ratio = tl.math.div_rn(x, scale)
        q = tl.where(ratio != ratio, ratio, tl.minimum(tl.maximum(ratio, -448.0), 448.0))
        tl.store(q_ptr + row * q_stride + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def transpose_kernel(src_ptr, dst_ptr, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        tile = tl.load(src_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask)
        tl.store(dst_ptr + cols[:, None] * n_rows + rows[None, :], tl.trans(tile), mask=tl.trans(mask))

    return quantise_rows_kernel, transpose_kernel


def quantise_rows(x: torch.Tensor, column_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8_quantise.quantise_rows(x * column_scale)`` in one pass: e4m3 ``(rows, cols)`` and float32 ``(rows, 1)``."""
    import triton

    rows, cols = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if column_scale is not None:
        column_scale = column_scale.contiguous()
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows == 0:
        return q, scale
    block = triton.next_power_of_2(cols)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    quantise_kernel, _ = _kernels()
    col = column_scale if column_scale is not None else scale  # an unused pointer when there is none
    quantise_kernel[(rows,)](x, col, q, scale, cols, x.stride(0), q.stride(0),
                             HAS_COL_SCALE=column_scale is not None, BLOCK=block, num_warps=warps)
    return q, scale


def transpose(w: torch.Tensor) -> torch.Tensor:
    """``w.t().contiguous()`` for a 2-d tensor of 1-byte elements (an e4m3 weight)."""
    w = w.contiguous()  # the kernel reads rows of n_cols bytes
    rows, cols = w.shape
    src = w.view(torch.uint8)
    out = torch.empty(cols, rows, dtype=torch.uint8, device=w.device)
    _, transpose_kernel = _kernels()
    block = 64
    grid = ((rows + block - 1) // block, (cols + block - 1) // block)
    transpose_kernel[grid](src, out, rows, cols, BLOCK_R=block, BLOCK_C=block, num_warps=4)
    return out.view(w.dtype)
