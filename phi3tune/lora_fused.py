"""Fused LoRA epilogue: an opt-in patch of peft's ``lora.Linear.forward`` (issue 5, lever #1; NOT measured yet).

peft 0.21.2 computes a LoRA linear as ``result = base(x); result = result + lora_B(lora_A(x)) * scaling``:
after the base GEMM, three more full-size passes over the ``[tokens, out_features]`` output in forward
(lora_B's GEMM writes a new tensor, ``* scaling`` reads and writes it, ``+`` reads two and writes one) and a
full-size ``* scaling`` in backward. With 128 LoRA layers at 8k tokens a step that is ~40 ms of a ~405 ms
H100 step (docs/benchmarks.md, "Where the time goes").

Here the base output is updated in place by one GEMM whose epilogue does the scale and the add
(``result.addmm_(h, B^T, alpha=scaling)``: cuBLAS reads and writes C once), and the backward is written by
hand so that ``scaling`` is applied to the rank-r tensors only. Numbers: in float32 equal to peft's to
rounding (tests/test_lora_fused.py); under bf16 autocast the sum is rounded once instead of three times.

Only the common case is fused; everything else runs peft's own forward unchanged:
single active adapter, vanilla LoRA (no DoRA or other variant), not merged, adapters enabled, no
``adapter_names``/extra kwargs, ``lora_dropout`` an identity (p=0, or the layer in eval mode), no LoRA bias,
the base an exact ``torch.nn.Linear`` (its output is a fresh tensor nothing saved for backward: F.linear saves
its inputs, not its output, so writing into it is safe), and the LoRA math in the output's dtype (bf16
autocast with a bf16 base, or all weights in one dtype). QLoRA's ``peft.tuners.lora.bnb.Linear4bit`` is a
separate class whose forward is not patched: QLoRA keeps peft's path.

API: ``patch_lora_fused_epilogue() -> bool``, ``unpatch_lora_fused_epilogue()``, ``is_patched() -> bool``.
Process-wide and reversible. Off by default: ``phi3tune train`` applies it only when the environment sets
``PHI3TUNE_LORA_FUSED=1`` on the fast path (``phi3tune/speed.py``), and ``scripts/bench.py`` row
``abl-fast-fused`` turns it on, until an H100 measurement says it pays.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ENV_VAR = "PHI3TUNE_LORA_FUSED"

_ORIGINAL_FORWARD: Any = None  # peft's Linear.forward while the patch is in place


class _LoraEpilogue(torch.autograd.Function):
    """``out = result + scaling * (h @ B^T)``, written into ``result`` when that is safe.

    ``result``: the base layer's output ``[..., out]``; ``h = lora_A(x)`` ``[..., r]``; ``weight_b``: lora_B's
    weight ``[out, r]``, all three in one dtype. Backward: ``d result = g``, ``d h = scaling * g @ B``,
    ``d B = scaling * g^T @ h`` — the scale lands on rank-r tensors, never on a full-size one.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, h: torch.Tensor, weight_b: torch.Tensor, scaling: float, inplace: bool):
        out_features, rank = weight_b.shape
        h2d = h.reshape(-1, rank)
        if inplace:
            # result is contiguous and not a view (checked by the caller): a 2-D view of it shares storage,
            # so one GEMM with beta=1 accumulates straight into the base output.
            result.view(-1, out_features).addmm_(h2d, weight_b.t(), alpha=scaling)
            ctx.mark_dirty(result)
            out = result
        else:
            out = torch.addmm(result.reshape(-1, out_features), h2d, weight_b.t(), alpha=scaling).view(result.shape)
        ctx.save_for_backward(h, weight_b)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight_b = ctx.saved_tensors
        out_features, rank = weight_b.shape
        g2d = grad.reshape(-1, out_features)
        grad_h = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_h = torch.mm(g2d, weight_b).mul_(ctx.scaling).view(h.shape)
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(g2d.t(), h.reshape(-1, rank)).mul_(ctx.scaling)
        grad_result = grad if ctx.needs_input_grad[0] else None
        return grad_result, grad_h, grad_b, None, None


def _single_vanilla_adapter(layer: Any) -> str | None:
    """The one active adapter when this layer can take the fused path, else None (peft's forward runs)."""
    if layer.disable_adapters or layer.merged:
        return None
    active = list(layer.active_adapters)
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in layer.lora_variant:  # DoRA and other variants have their own math
        return None
    if layer.lora_bias.get(name, False):
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_b.bias is not None:
        return None
    if lora_a._forward_hooks or lora_b._forward_hooks or lora_a._forward_pre_hooks or lora_b._forward_pre_hooks:
        return None  # hooks on the adapter modules would be skipped by the fused path
    dropout = layer.lora_dropout[name]
    if not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training))):
        return None
    base = layer.base_layer
    # Exactly nn.Linear: its output is fresh and not saved for backward, so it may be written in place.
    # Hooks could keep a reference to that output; keep peft's path then.
    if type(base) is not nn.Linear or base._forward_hooks:
        return None
    return name


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's ``lora.Linear.forward`` with the scale-and-add folded into one in-place GEMM (see module doc)."""
    name = None if (args or kwargs) else _single_vanilla_adapter(self)
    if name is None:
        return _ORIGINAL_FORWARD(self, x, *args, **kwargs)

    result = self.base_layer(x)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    scaling = self.scaling[name]
    # Same cast as peft (and as patch_peft_input_cast, if that is on): the numbers match peft's forward.
    h = lora_a(self._cast_input_dtype(x, lora_a.weight.dtype))
    weight_b = lora_b.weight
    if h.dtype != result.dtype:
        # LoRA math in a wider dtype than the base output (e.g. float32 adapters on a bf16 base without
        # autocast): peft adds in the wide dtype and rounds once; keep its expression exactly.
        return (result + lora_b(h) * scaling).to(result.dtype)
    if weight_b.dtype != result.dtype:
        if not torch.is_autocast_enabled(result.device.type):
            return (result + lora_b(h) * scaling).to(result.dtype)  # peft's path (its dtype rules, its errors)
        # Under autocast lora_B's F.linear would cast its weight the same way; the cast's backward returns
        # the gradient to B in B's own dtype (float32), as autocast does.
        weight_b = weight_b.to(result.dtype)
    # Eager: write into the base output when it is a plain tensor of its own (F.linear with a bias returns a
    # view for 3-D inputs; autograd would then copy the whole output in backward). Under torch.compile the
    # graph is functional anyway (inductor plans the buffers), and _is_view() would break the graph.
    inplace = (
        not torch.compiler.is_compiling()
        and result.is_contiguous()
        and not result._is_view()
        and not (result.is_leaf and result.requires_grad)
    )
    return _LoraEpilogue.apply(result, h, weight_b, float(scaling), inplace)


def is_patched() -> bool:
    """Whether peft's ``lora.Linear.forward`` is currently phi3tune's fused one."""
    return _ORIGINAL_FORWARD is not None


def patch_lora_fused_epilogue() -> bool:
    """Install the fused forward on ``peft.tuners.lora.layer.Linear`` (process-wide, idempotent).

    Returns True once it is in place, False where peft cannot be imported.
    """
    global _ORIGINAL_FORWARD
    if _ORIGINAL_FORWARD is not None:
        return True
    try:
        from peft.tuners.lora.layer import Linear
    except Exception:  # pragma: no cover - peft missing
        return False
    _ORIGINAL_FORWARD = Linear.forward
    Linear.forward = _fused_forward
    log.info("lora: fused epilogue on (one in-place addmm per LoRA linear; peft's forward for other cases)")
    return True


def unpatch_lora_fused_epilogue() -> None:
    """Put peft's own ``lora.Linear.forward`` back (for tests, and A/B runs in one process)."""
    global _ORIGINAL_FORWARD
    if _ORIGINAL_FORWARD is None:
        return
    from peft.tuners.lora.layer import Linear

    Linear.forward = _ORIGINAL_FORWARD
    _ORIGINAL_FORWARD = None
