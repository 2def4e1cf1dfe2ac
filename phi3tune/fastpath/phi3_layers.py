"""Phi-3's decoder layer, attention and MLP forwards for the fast path: the same math in fewer full-size passes.

transformers' ``Phi3Attention.forward`` takes query, key and value out of the fused ``qkv_proj`` output
with three slices. In backward every slice allocates a zero tensor of the whole ``[tokens, 9216]`` output,
copies its part in, and autograd adds the three together: ~200 KB a token a layer of memory traffic for
what one concatenation (36 KB) does. ``Phi3MLP.forward`` (or Liger's Phi-3 SwiGLU, which first copies
both halves of ``gate_up_proj``'s output to contiguous tensors and concatenates their gradients again)
likewise moves ~256 KB a token a layer where reading ``gate_up`` and writing the product needs 128 KB.

The residual adds and RMSNorms of ``Phi3DecoderLayer.forward`` (Liger's RMSNorm costs ~135 us of CPU a call,
4x its GPU time) become one normalisation and one add + normalisation a layer.

Here the split + RoPE, the SwiGLU and the norms are small pure functions -- transformers' own ``apply_rotary_pos_emb``
and ``silu(gate) * up`` on the fused tensors -- compiled with ``torch.compile`` so that each is one fused
kernel forward and one backward that writes the fused gradient directly. Measured on an H100
(docs/benchmarks.md): 23,480 -> 25,612 tokens/s (x1.09) over the fused LoRA linears with Liger's kernels,
and with both the recipe goes from 21,201 to 25,919 tokens/s, same call. On a CPU, or where compiling
fails (no Triton/C compiler), the same functions run eagerly (one warning), still with the cheap split.

API: ``patch() -> bool``, ``unpatch()``, ``is_patched() -> bool``, like every module of ``phi3tune/fastpath/``. Process-wide,
reversible class-level patches of ``Phi3DecoderLayer.forward``, ``Phi3Attention.forward`` and
``Phi3MLP.forward``. They make Liger's Phi-3 kernels redundant; Liger patches instances, so
``phi3tune/fastpath/policy.py`` leaves Liger off while they are on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import swiglu_backward

log = logging.getLogger(__name__)

_ORIGINAL: dict[str, Any] = {}  # what patch() replaced, and transformers' Phi-3 module while patched


def _rope_reference() -> Callable:
    """transformers' own Phi-3 RoPE; the original even if Liger has since patched the module attribute."""
    if "rope" in _ORIGINAL:
        return _ORIGINAL["rope"]
    from transformers.models.phi3 import modeling_phi3

    return modeling_phi3.apply_rotary_pos_emb


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_size: int, kv_size: int, head_dim: int):
    """Query, key (rotated) and value as contiguous token-major ``(batch, seq, heads, head_dim)`` tensors.

    RoPE runs in the token-major layout (``unsqueeze_dim=2``), so flattening tokens for the varlen kernel is
    free; transformers' head-major RoPE hands it tensors that must be copied (3 copies a layer, ~7 ms a step on
    the H100). The value gets its own buffer too: a view would keep the whole qkv output alive for backward
    (18 KB a token a layer). The caller transposes to transformers' ``(batch, heads, seq, head_dim)``: returned
    from the compiled function, those transposed views made its backward copy each incoming gradient to a
    contiguous one first (3 copies of ~68 us a layer, ~6.5 ms of a ~281 ms H200 step, docs/benchmarks.md).
    """
    query, key, value = qkv.split([q_size, kv_size, kv_size], dim=-1)
    shape = (*qkv.shape[:-1], -1, head_dim)
    query, key = _rope_reference()(query.view(shape), key.view(shape), cos, sin, unsqueeze_dim=2)
    value = value.reshape(shape).clone(memory_format=torch.contiguous_format)
    return query, key, value


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Phi-3's MLP activation on the fused ``gate_up_proj`` output: ``up * silu(gate)``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def rmsnorm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``Phi3RMSNorm.forward``'s expression (float32 statistics, output in the weight/input dtype promotion)."""
    input_dtype = hidden_states.dtype
    x = hidden_states.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(input_dtype)


def add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add and the next RMSNorm in one pass: ``(residual + delta, rmsnorm(residual + delta))``."""
    hidden_states = residual + delta
    return hidden_states, rmsnorm(hidden_states, weight, eps)


class CompiledOnce:
    """``torch.compile(fn)`` on CUDA, eager elsewhere; a compile error falls back to eager, with one warning."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        first = args[0]
        if self.failed or first.device.type != "cuda" or torch.compiler.is_compiling():
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn)
        try:
            return self.compiled(*args)
        except torch.OutOfMemoryError:
            raise  # not a compiler failure: the recipe's OOM handling (exit 3, hints) takes it
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager function is the same math
            self.failed = True
            log.warning("fast path: torch.compile of %s failed (%s: %s); running it eagerly", self.fn.__name__,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
            return self.fn(*args)


_qkv_rope = CompiledOnce(qkv_rope)
_swiglu = CompiledOnce(swiglu)
_rmsnorm = CompiledOnce(rmsnorm)
_add_rmsnorm = CompiledOnce(add_rmsnorm)
# Replacements for the three above with the same results, set by an fp8 run (``fp8_quantise.quantise_in_kernels``):
# they also quantise their output for the FP8 linear that reads it, inside the same compiled kernel.
_REPLACED: dict[str, Callable] = {}
_ON_UNPATCH: list[Callable[[], None]] = []


def replace_kernels(on_unpatch: Callable[[], None] | None = None, **kernels: Callable) -> None:
    """Use other functions for ``rmsnorm`` / ``add_rmsnorm`` / ``swiglu`` (same arguments and results) until
    ``unpatch()``, which then also calls ``on_unpatch``."""
    unknown = set(kernels) - {"rmsnorm", "add_rmsnorm", "swiglu"}
    if unknown:
        raise ValueError(f"no such kernel: {sorted(unknown)}")
    _REPLACED.update(kernels)
    if on_unpatch is not None:
        _ON_UNPATCH.append(on_unpatch)


def _plain_norm(module: Any) -> bool:
    return hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), torch.Tensor)


def decoder_layer_forward(
    self: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Any = None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``Phi3DecoderLayer.forward`` with each residual add fused into the RMSNorm that follows it."""
    dropout = self.training and (self.resid_attn_dropout.p > 0 or self.resid_mlp_dropout.p > 0)
    if dropout or not (_plain_norm(self.input_layernorm) and _plain_norm(self.post_attention_layernorm)):
        return _ORIGINAL["decoder"](self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                    past_key_values=past_key_values, use_cache=use_cache,
                                    position_embeddings=position_embeddings, **kwargs)  # fmt: skip
    norm = self.input_layernorm
    residual = hidden_states
    hidden_states = _REPLACED.get("rmsnorm", _rmsnorm)(hidden_states, norm.weight, norm.variance_epsilon)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    norm = self.post_attention_layernorm
    add_norm = _REPLACED.get("add_rmsnorm", _add_rmsnorm)
    residual, hidden_states = add_norm(residual, hidden_states, norm.weight, norm.variance_epsilon)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


def attention_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    past_key_values: Any = None,
    **kwargs: Any,
):
    """``Phi3Attention.forward`` (transformers 5.17) with one split + RoPE function in place of three slices."""
    modeling_phi3 = _ORIGINAL["module"]
    input_shape = hidden_states.shape[:-1]
    qkv = self.qkv_proj(hidden_states)
    q_size = self.config.num_attention_heads * self.head_dim
    kv_size = self.num_key_value_heads * self.head_dim
    cos, sin = position_embeddings
    query_states, key_states, value_states = (
        t.transpose(1, 2) for t in _qkv_rope(qkv, cos, sin, q_size, kv_size, self.head_dim)
    )

    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

    attention_interface = modeling_phi3.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling_phi3.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=getattr(self.config, "sliding_window", None),
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def mlp_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Phi3MLP.forward`` with the SwiGLU as one function of the fused ``gate_up_proj`` output."""
    if self.config.hidden_act not in ("silu", "swish"):
        return _ORIGINAL["mlp"](self, hidden_states)
    gate_up = self.gate_up_proj(hidden_states)
    activation = _REPLACED.get("swiglu", _swiglu)
    if gate_up.requires_grad and swiglu_backward.usable(gate_up):
        return self.down_proj(swiglu_backward.apply(gate_up, activation))  # one-pass backward kernel
    return self.down_proj(activation(gate_up))


def is_patched() -> bool:
    return bool(_ORIGINAL)


def patch() -> bool:
    """Install the forwards above on transformers' Phi-3 classes (idempotent). False where Phi-3 is missing."""
    if _ORIGINAL:
        return True
    try:
        from transformers.models.phi3 import modeling_phi3
    except Exception:  # pragma: no cover - transformers without Phi-3
        return False
    _ORIGINAL.update(
        decoder=modeling_phi3.Phi3DecoderLayer.forward,
        attention=modeling_phi3.Phi3Attention.forward,
        mlp=modeling_phi3.Phi3MLP.forward,
        rope=modeling_phi3.apply_rotary_pos_emb,
        module=modeling_phi3,
    )
    modeling_phi3.Phi3DecoderLayer.forward = decoder_layer_forward
    modeling_phi3.Phi3Attention.forward = attention_forward
    modeling_phi3.Phi3MLP.forward = mlp_forward
    return True


def unpatch() -> None:
    _REPLACED.clear()
    while _ON_UNPATCH:
        _ON_UNPATCH.pop()()
    if not _ORIGINAL:
        return
    from transformers.models.phi3 import modeling_phi3

    modeling_phi3.Phi3DecoderLayer.forward = _ORIGINAL["decoder"]
    modeling_phi3.Phi3Attention.forward = _ORIGINAL["attention"]
    modeling_phi3.Phi3MLP.forward = _ORIGINAL["mlp"]
    _ORIGINAL.clear()
