"""``model.base_precision: fp8``: the frozen LoRA base linears stored and multiplied in FP8 (e4m3) on Hopper.

After peft has wrapped the model, each LoRA-wrapped frozen ``nn.Linear`` of the decoder (qkv_proj, o_proj,
gate_up_proj, down_proj) is replaced, once, by a ``Float8FrozenLinear``: its weight ``W (N, K)`` as e4m3,
row-major, with one float32 scale per output channel (``amax / 448``), the bf16 weight freed (base weight
memory halved). Only the two GEMMs a frozen base needs change:

* forward ``Y = X W^T``: ``X`` quantised per token (row amax / 448), ``torch._scaled_mm`` with rowwise scales
  ``scale_a (M, 1)`` and ``scale_b (1, N)``, bf16 out;
* input gradient ``dX = dY W``: the weight's per-output-channel scale lies on the contracted axis, where a
  rowwise-scaled GEMM cannot apply it, so it is folded into ``dY`` before ``dY`` is quantised per token.

The LoRA branch (float32 weights, bf16 compute under autocast), norms, embeddings and lm_head are unchanged.
One FP8 GEMM's per-element relative error is ~3.7% against ~0.2% for bf16 (issue 16): a numerics change,
opt-in, measured by loss curves (``scripts/bench_fp8.py parity``). The quantisers and the weight transpose
are in ``fp8_quantise.py`` (Triton kernels on CUDA); the inputs of qkv_proj, gate_up_proj and down_proj arrive
quantised by the compiled norm / SwiGLU kernels that write them (``fp8_quantise.quantise_in_kernels``).

This module is imported only when a config asks for fp8 (the plan's device check, the conversion); the
fused LoRA linear (``lora_fused.py``) finds ``Float8FrozenLinear`` through ``sys.modules`` for the same reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from phi3tune.errors import UsageError
from phi3tune.fastpath import fp8_quantise
from phi3tune.fastpath.fp8_quantise import FP8, quantise_rows, quantise_rows_scaled  # noqa: F401 - re-exported
from phi3tune.fastpath.lora_fused import compute_dtype

log = logging.getLogger(__name__)

# FP8 GEMMs on Hopper: K and N multiples of 16, else the layer stays bf16.
ALIGN = 16
MIN_CAPABILITY = (9, 0)
# Rowwise-scaled _scaled_mm on CUDA writes bf16 only; other compute dtypes get a cast of that output.
GEMM_OUT = torch.bfloat16


def fp8_unavailable_reason() -> str | None:
    """Why this machine cannot run ``base_precision: fp8`` (None when it can: a CUDA GPU of sm90 or newer)."""
    if not hasattr(torch, "_scaled_mm"):
        return f"this PyTorch ({torch.__version__}) has no torch._scaled_mm"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < MIN_CAPABILITY:
        return f"the GPU ({torch.cuda.get_device_name()}) has compute capability {major}.{minor}"
    return None


def require_fp8_gpu() -> None:
    """Raise a UsageError (exit 2) unless this machine has an FP8-capable (Hopper or newer) GPU."""
    why = fp8_unavailable_reason()
    if why:
        raise UsageError(
            f"model.base_precision: fp8 needs a CUDA GPU of compute capability 9.0 or newer (Hopper: H100, H200); "
            f"{why}.",
            hint="set model.base_precision: bf16 (or --set model.base_precision=bf16), or run on a Hopper GPU.",
        )


_ONES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _unit_scale(n: int, device: torch.device) -> torch.Tensor:
    """A ``(1, n)`` float32 tensor of ones (the input-gradient GEMM's unit column scale), made once a shape."""
    key = (n, device)
    if key not in _ONES:
        _ONES[key] = torch.ones(1, n, dtype=torch.float32, device=device)
    return _ONES[key]


def fp8_matmul(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               quantised: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x2d @ W^T`` (bf16) from the e4m3 weight ``(N, K)`` and its ``(N,)`` scales, ``x2d`` quantised per token
    (here, or ``quantised`` already)."""
    xq, x_scale = quantised if quantised is not None else fp8_quantise.rows(x2d)
    # weight.t() is (K, N) column-major: both operands K-major, as Hopper's FP8 GEMMs need.
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=GEMM_OUT)


def fp8_input_grad(grad2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``dY @ W`` (bf16): ``dY * scale_w`` quantised per token against the e4m3 weight."""
    gq, g_scale = fp8_quantise.rows_scaled(grad2d, weight_scale)
    # The second operand must be W as (N, K) column-major, i.e. W^T stored row-major: transposed here, each
    # backward (1 byte a parameter), rather than kept as a second stored copy (the memory fp8 saves).
    weight_t = fp8_quantise.transposed(weight).t()
    return torch._scaled_mm(gq, weight_t, scale_a=g_scale, scale_b=_unit_scale(weight.shape[1], weight.device),
                            out_dtype=GEMM_OUT)


class _Float8Linear(torch.autograd.Function):
    """``y = x W^T (+ bias)`` for the frozen e4m3 weight; backward computes the input gradient only."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, out_dtype: torch.dtype):
        x2d = x.reshape(-1, x.shape[-1])
        y = fp8_matmul(x2d, weight, weight_scale, fp8_quantise.input_rows(x, x2d)).to(out_dtype)
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(weight, weight_scale)  # not x: the frozen weight needs no weight gradient
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad2d = grad.reshape(-1, weight.shape[0])
            grad_x = fp8_input_grad(grad2d, weight, weight_scale).to(ctx.x_dtype).view(ctx.x_shape)
        return grad_x, None, None, None, None


class _Float8LoraLinear(torch.autograd.Function):
    """``y = x W^T + scaling (x A^T) B^T`` with the e4m3 base: lora_fused's fused linear for a Float8FrozenLinear.

    Forward: the FP8 base GEMM writes ``y``, then the rank-r product accumulates into it (``addmm_``, beta=1):
    ``_scaled_mm`` has no accumulate-into-output, so the base goes first here. Backward: ``grad_x`` from the FP8
    input-gradient GEMM, ``gh @ A`` accumulated into it; the LoRA gradients as in ``lora_fused`` (bf16).
    """

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, weight_a, weight_b, scaling: float):
        x2d = x.reshape(-1, x.shape[-1])
        y = fp8_matmul(x2d, weight, weight_scale, fp8_quantise.input_rows(x, x2d)).to(x.dtype)
        if bias is not None:
            y.add_(bias)
        h = torch.mm(x2d, weight_a.t())
        y.addmm_(h, weight_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, weight_scale, weight_a, weight_b, h)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight, weight_scale, weight_a, weight_b, h = ctx.saved_tensors
        need_x, _, _, _, need_a, need_b, _ = ctx.needs_input_grad
        g2d = grad.reshape(-1, weight.shape[0])
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = torch.mm(g2d.t(), h).mul_(ctx.scaling)
        if need_x or need_a:
            gh = torch.mm(g2d, weight_b).mul_(ctx.scaling)  # rank-r
            if need_a:
                grad_a = torch.mm(gh.t(), x.reshape(-1, x.shape[-1]))
            if need_x:
                grad_x = fp8_input_grad(g2d, weight, weight_scale).to(x.dtype)
                grad_x.addmm_(gh, weight_a)
                grad_x = grad_x.view(x.shape)
        return grad_x, None, None, None, grad_a, grad_b, None


class Float8FrozenLinear(nn.Module):
    """A frozen linear layer whose weight is e4m3 ``(out_features, in_features)`` with per-output-channel scales.

    ``weight`` stays a (frozen) parameter so parameter counts and FLOP estimates are the model's; ``weight_scale``
    is a float32 buffer ``(out_features,)``. Its forward works on its own (peft's forward calls it where the
    fused path does not apply).
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype != FP8 or weight.dim() != 2:
            raise ValueError(f"Float8FrozenLinear needs a 2-d {FP8} weight, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.reshape(-1).float())
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8FrozenLinear:
        """The e4m3 copy of a frozen ``nn.Linear`` (its weight row-major, one scale per output row)."""
        with torch.no_grad():
            weight, scale = quantise_rows(linear.weight.detach())
        return cls(weight.contiguous(), scale, linear.bias)

    def dequantised_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W ~= weight * weight_scale`` (for tests and diagnostics)."""
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8Linear.apply(x, self.weight, self.weight_scale, self.bias, compute_dtype(x))

    def fused_lora(self, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                   scaling: float) -> torch.Tensor:
        """Base + LoRA in one autograd function (``lora_fused``); all of x, A, B in the compute dtype."""
        return _Float8LoraLinear.apply(x, self.weight, self.weight_scale, self.bias, weight_a, weight_b, scaling)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3"


# ----------------------------------------------------------------------------------------------- conversion
@dataclass
class Fp8Conversion:
    """What ``convert_lora_bases`` did: layers converted, weight bytes before and after, layers kept as they were."""

    linears: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    kept: list[str] = field(default_factory=list)

    def summary(self) -> str:
        line = f"fp8 base: {self.linears} linears, {_size(self.bytes_before)} -> {_size(self.bytes_after)}"
        if self.kept:
            line += f"; {len(self.kept)} kept in their dtype ({self.kept[0]}{', ...' if len(self.kept) > 1 else ''})"
        return line


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 / 100 else f"{nbytes / 2**20:.2f} MiB"


def _why_not(layer: Any) -> str | None:
    """Why a peft LoRA linear's base cannot become e4m3 (None when it can)."""
    base = layer.base_layer
    if type(base) is not nn.Linear:
        return f"base is {type(base).__name__}, not nn.Linear"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "base trains"
    if layer.lora_variant:
        return "a LoRA variant (DoRA, ...) reads the base weight"
    if base.in_features % ALIGN or base.out_features % ALIGN:
        return f"{base.out_features}x{base.in_features} is not a multiple of {ALIGN}"
    return None


def convert_lora_bases(model: nn.Module) -> Fp8Conversion:
    """Replace the frozen ``nn.Linear`` base of every peft LoRA linear of ``model`` by a ``Float8FrozenLinear``.

    Run once, after peft has wrapped the model and before the optimizer and DDP see it; the bf16 weights are
    released as their layers are replaced. The converted tensors are set aside for DDP: every rank converts the
    same weights, so they need no broadcast (and NCCL need not know e4m3). From here until the fast path is
    unpatched, phi3_layers' norm and SwiGLU kernels also quantise their outputs for these linears.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    done = Fp8Conversion()
    ignored: list[str] = []
    converted: set[str] = set()
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, LoraLinear) or isinstance(layer.base_layer, Float8FrozenLinear):
            continue
        why = _why_not(layer)
        if why:
            done.kept.append(f"{name}: {why}")
            continue
        base = layer.base_layer
        fp8 = Float8FrozenLinear.from_linear(base)
        done.bytes_before += base.weight.numel() * base.weight.element_size()
        done.bytes_after += fp8.weight.numel() + fp8.weight_scale.numel() * 4
        layer.base_layer = fp8  # the last reference to the bf16 Linear: its weight is freed here
        done.linears += 1
        converted.add(name.rsplit(".", 1)[-1])  # qkv_proj, o_proj, ...
        ignored += [f"{name}.base_layer.weight", f"{name}.base_layer.weight_scale"]
    # the fast path's norms and SwiGLU quantise the inputs they write, for these linears (while phi3_layers is on)
    fp8_quantise.quantise_in_kernels(qkv_proj="qkv_proj" in converted, gate_up_proj="gate_up_proj" in converted,
                                     down_proj="down_proj" in converted)
    previous = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, previous + ignored)
    for line in done.kept:
        log.warning("fp8 base: kept %s", line)
    return done
