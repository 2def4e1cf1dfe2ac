"""Phi-3's attention and MLP forwards for the fast path: the same math in fewer full-size passes.

transformers' ``Phi3Attention.forward`` takes query, key and value out of the fused ``qkv_proj`` output
with three slices. In backward every slice allocates a zero tensor of the whole ``[tokens, 9216]`` output,
copies its part in, and autograd adds the three together: ~200 KB a token a layer of memory traffic for
what one concatenation (36 KB) does. ``Phi3MLP.forward`` (or Liger's Phi-3 SwiGLU, which first copies
both halves of ``gate_up_proj``'s output to contiguous tensors and concatenates their gradients again)
likewise moves ~256 KB a token a layer where reading ``gate_up`` and writing the product needs 128 KB.

Here the split + RoPE and the SwiGLU are small pure functions -- transformers' own ``apply_rotary_pos_emb``
and ``silu(gate) * up`` on the fused tensors -- compiled with ``torch.compile`` so that each is one fused
kernel forward and one backward that writes the fused gradient directly. On a CPU, or where compiling
fails (no Triton/C compiler), the same functions run eagerly (one warning), still with the cheap split.

API: ``patch_phi3_layers() -> bool``, ``unpatch_phi3_layers()``, ``is_patched() -> bool``. Process-wide,
reversible class-level patches of ``Phi3Attention.forward`` and ``Phi3MLP.forward``; Liger's RoPE and
SwiGLU must be off while they are on (``phi3tune/speed.py`` does that): Liger patches instances.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_ORIGINAL: dict[str, Any] = {}


def _rope_reference() -> Callable:
    """transformers' own Phi-3 RoPE; the original even if Liger has since patched the module attribute."""
    from transformers.models.phi3 import modeling_phi3

    return _ORIGINAL.get("rope") or modeling_phi3.apply_rotary_pos_emb


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_size: int, kv_size: int, head_dim: int):
    """Query, key (rotated) and value in ``(batch, heads, seq, head_dim)`` from the fused qkv output."""
    query, key, value = qkv.split([q_size, kv_size, kv_size], dim=-1)
    shape = (*qkv.shape[:-1], -1, head_dim)
    query = query.view(shape).transpose(1, 2)
    key = key.view(shape).transpose(1, 2)
    value = value.view(shape).transpose(1, 2)
    query, key = _rope_reference()(query, key, cos, sin)
    return query, key, value


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Phi-3's MLP activation on the fused ``gate_up_proj`` output: ``up * silu(gate)``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


class _CompiledOnce:
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
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager function is the same math
            self.failed = True
            log.warning("fast path: torch.compile of %s failed (%s: %s); running it eagerly", self.fn.__name__,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
            return self.fn(*args)


_qkv_rope = _CompiledOnce(qkv_rope)
_swiglu = _CompiledOnce(swiglu)


def attention_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    past_key_values: Any = None,
    **kwargs: Any,
):
    """``Phi3Attention.forward`` (transformers 5.17) with one split + RoPE function in place of three slices."""
    from transformers.models.phi3.modeling_phi3 import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

    input_shape = hidden_states.shape[:-1]
    qkv = self.qkv_proj(hidden_states)
    q_size = self.config.num_attention_heads * self.head_dim
    kv_size = self.num_key_value_heads * self.head_dim
    cos, sin = position_embeddings
    query_states, key_states, value_states = _qkv_rope(qkv, cos, sin, q_size, kv_size, self.head_dim)

    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
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
    return self.down_proj(_swiglu(self.gate_up_proj(hidden_states)))


def is_patched() -> bool:
    return bool(_ORIGINAL)


def patch_phi3_layers() -> bool:
    """Install the forwards above on transformers' Phi-3 classes (idempotent). False where Phi-3 is missing."""
    if _ORIGINAL:
        return True
    try:
        from transformers.models.phi3 import modeling_phi3
    except Exception:  # pragma: no cover - transformers without Phi-3
        return False
    _ORIGINAL.update(
        attention=modeling_phi3.Phi3Attention.forward,
        mlp=modeling_phi3.Phi3MLP.forward,
        rope=modeling_phi3.apply_rotary_pos_emb,
    )
    modeling_phi3.Phi3Attention.forward = attention_forward
    modeling_phi3.Phi3MLP.forward = mlp_forward
    return True


def unpatch_phi3_layers() -> None:
    if not _ORIGINAL:
        return
    from transformers.models.phi3 import modeling_phi3

    modeling_phi3.Phi3Attention.forward = _ORIGINAL["attention"]
    modeling_phi3.Phi3MLP.forward = _ORIGINAL["mlp"]
    _ORIGINAL.clear()
