"""Fused LoRA linear: a patch of peft's ``lora.Linear.forward`` for the fast path (issue 5).

peft 0.21.2 computes a LoRA linear as ``result = base(x); result = result + lora_B(lora_A(x)) * scaling``.
Besides the base GEMM that is three more full-size passes over the ``[tokens, out_features]`` output in
forward (lora_B's GEMM writes a new tensor, ``* scaling`` reads and writes it, ``+`` reads two and writes
one), a full-size ``* scaling`` of the gradient in backward, and a full-size add of the two input gradients
(base and lora_A). With 128 LoRA linears at 8k tokens a step that is ~450 KB a token a layer, ~40 ms of a
~405 ms H100 step (docs/benchmarks.md, "Where the time goes").

``_FusedLoraLinear`` computes the base and the adapter in one autograd function for a frozen base: the
adapter's product and the base GEMM meet in one GEMM epilogue (``addmm_``, beta=1), the input gradient
likewise, and ``scaling`` only ever multiplies rank-r tensors. In float32 the numbers equal
peft's to rounding (tests/test_lora_fused.py); under bf16 autocast the sum is rounded once instead of three
times. Measured on an H100 (docs/benchmarks.md): 20,246 -> 22,417 tokens/s (x1.11) in the trl loop, same
call; the GEMM order here (base GEMM last) is another x1.04 over the reverse.

Only the common case is fused; everything else runs peft's own forward unchanged: single active adapter,
vanilla LoRA (no DoRA or other variant), not merged, adapters enabled, no ``adapter_names``/extra kwargs,
``lora_dropout`` an identity (p=0, or the layer in eval mode), no LoRA bias, the base an exact, frozen
``torch.nn.Linear`` without hooks, and input and base weight in the compute dtype (bf16 autocast with a bf16
base, or everything in one dtype). A ``Float8FrozenLinear`` base (``model.base_precision: fp8``) takes the same
fused path with FP8 base GEMMs (``fp8_base._Float8LoraLinear``). QLoRA's ``peft.tuners.lora.bnb.Linear4bit`` is
a separate class whose forward is not patched: QLoRA keeps peft's path.

API: ``patch() -> bool``, ``unpatch()``, ``is_patched() -> bool``, like every module of ``phi3tune/fastpath/``.
Process-wide and reversible; ``phi3tune/fastpath/policy.py`` decides when it is on.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


_ORIGINAL_FORWARD: Any = None  # peft's Linear.forward while the patch is in place
_FP8_MODULE = "phi3tune.fastpath.fp8_base"
# Order of the two GEMMs writing each output: True = rank-r product first, base GEMM accumulating into it
# (the default); False = base GEMM first, rank-r addmm_ into it. Kept switchable for the benchmark's A/B.
BASE_GEMM_LAST = True


class _FusedLoraLinear(torch.autograd.Function):
    """``y = x @ W^T (+ bias) + scaling * (x @ A^T) @ B^T`` for a frozen base weight, in as few passes as possible.

    Forward: ``h = x @ A^T`` is rank-r; ``scaling * h @ B^T`` writes ``y``; the base GEMM then accumulates
    ``x @ W^T`` into ``y`` in its epilogue (``addmm_``, beta=1). Backward: ``gh = scaling * g @ B`` (rank-r),
    ``dB = scaling * g^T @ h``, ``dA = gh^T @ x``, and ``dx = gh @ A`` with ``g @ W`` accumulated into it the
    same way. peft's path instead writes ``lora_B``'s output, scales it, adds it (3 more full-size passes in
    forward), scales the full-size gradient in backward and adds the two input gradients.
    All tensors arrive in one compute dtype (the caller casts the adapters, as autocast would).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_a, weight_b, scaling: float):
        in_features = x.shape[-1]
        out_features, rank = weight_b.shape
        x2d = x.reshape(-1, in_features)
        h = torch.mm(x2d, weight_a.t())
        if BASE_GEMM_LAST:
            # The rank-r product first (it only writes y), then the compute-bound base GEMM accumulates into y
            # in its epilogue, where reading y hides under the math.
            h_scaled = h * scaling
            y = torch.mm(h_scaled, weight_b.t()) if bias is None else torch.addmm(bias, h_scaled, weight_b.t())
            y.addmm_(x2d, weight.t())
        else:
            y = torch.mm(x2d, weight.t()) if bias is None else torch.addmm(bias, x2d, weight.t())
            y.addmm_(h, weight_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, weight_a, weight_b, h)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad):
        x, weight, weight_a, weight_b, h = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        out_features, rank = weight_b.shape
        g2d = grad.reshape(-1, out_features)
        grad_x = grad_bias = grad_a = grad_b = None
        if need_b:
            grad_b = torch.mm(g2d.t(), h).mul_(ctx.scaling)
        if need_x or need_a:
            gh = torch.mm(g2d, weight_b).mul_(ctx.scaling)  # [tokens, r]: the scale lands on rank-r tensors only
            if need_a:
                grad_a = torch.mm(gh.t(), x.reshape(-1, x.shape[-1]))
            if need_x:
                if BASE_GEMM_LAST:
                    grad_x = torch.mm(gh, weight_a)
                    grad_x.addmm_(g2d, weight)
                else:
                    grad_x = torch.mm(g2d, weight)
                    grad_x.addmm_(gh, weight_a)
                grad_x = grad_x.view(x.shape)
        if need_bias:
            grad_bias = g2d.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None


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
    # Exactly nn.Linear (or the fp8 base) without hooks: the fused function computes its product itself, so
    # anything a subclass or a hook adds (quantization, offload) would be skipped.
    if (type(base) is not nn.Linear and not _is_fp8_base(base)) or base._forward_hooks or base._forward_pre_hooks:
        return None
    return name


def _is_fp8_base(base: Any) -> bool:
    """A ``fp8_base.Float8FrozenLinear``; that module is imported only by a model's fp8 conversion."""
    fp8 = sys.modules.get(_FP8_MODULE)
    return fp8 is not None and type(base) is fp8.Float8FrozenLinear


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``x``'s matmuls run in: autocast's where autocast is on, else ``x``'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's ``lora.Linear.forward`` as one fused base + LoRA linear (see module doc)."""
    name = None if (args or kwargs) else _single_vanilla_adapter(self)
    if name is None:
        return _ORIGINAL_FORWARD(self, x, *args, **kwargs)
    base = self.base_layer
    dtype = compute_dtype(x)
    if _is_fp8_base(base):
        if x.dtype != dtype:  # an input autocast would cast: peft's path (its base casts nothing either way)
            return _ORIGINAL_FORWARD(self, x, *args, **kwargs)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        return base.fused_lora(x, lora_a.weight.to(dtype), lora_b.weight.to(dtype), float(self.scaling[name]))
    weight, bias = base.weight, base.bias
    if (
        x.dtype != dtype
        or weight.dtype != dtype
        or weight.requires_grad
        or (bias is not None and (bias.dtype != dtype or bias.requires_grad))
    ):
        # A trainable or differently-typed base, or an input autocast would cast: peft's own path and rules.
        return _ORIGINAL_FORWARD(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    # Under autocast lora_A/lora_B's F.linear would cast their float32 weights the same way; the cast's
    # backward returns each gradient to its parameter in the parameter's own dtype, as autocast does.
    weight_a = lora_a.weight.to(dtype)
    weight_b = lora_b.weight.to(dtype)
    return _FusedLoraLinear.apply(x, weight, bias, weight_a, weight_b, float(self.scaling[name]))


def is_patched() -> bool:
    """Whether peft's ``lora.Linear.forward`` is currently phi3tune's fused one."""
    return _ORIGINAL_FORWARD is not None


def patch() -> bool:
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
    log.info("lora: fused base + adapter linear on (peft's forward for other cases)")
    return True


def unpatch() -> None:
    """Put peft's own ``lora.Linear.forward`` back (for tests, and A/B runs in one process)."""
    global _ORIGINAL_FORWARD
    if _ORIGINAL_FORWARD is None:
        return
    from peft.tuners.lora.layer import Linear

    Linear.forward = _ORIGINAL_FORWARD
    _ORIGINAL_FORWARD = None
