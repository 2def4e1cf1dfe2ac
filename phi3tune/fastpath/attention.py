"""phi3tune's fast attention path: padding-free variable-length attention, registered as ``"varlen"``.

``patch()`` adds one implementation, ``VARLEN = "varlen"``, to transformers'
``AttentionInterface`` (the function) and ``AttentionMaskInterface`` (its mask builder). After that,
``from_pretrained(..., attn_implementation="varlen")`` works like any built-in implementation.

How it computes attention
-------------------------
* Training with trl's padding-free collator (``packing: true`` with ``packing_strategy: bfd``, or
  ``padding_free: true``): the batch is one flat row of concatenated samples and carries
  ``position_ids``, ``cu_seq_lens_q/k`` and ``max_length_q/k``. Those true per-sample boundaries go
  straight into PyTorch's own flash-class kernel,
  ``torch.nn.attention.varlen.varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, window_size=...)``
  (causal through ``window_size``; no extra install, CUDA only). No dense or block mask is built:
  the mask builder returns ``None`` for these calls.
* Without ``cu_seq_lens`` (e.g. a custom collator) the boundaries come from ``position_ids``
  (a position that does not follow its predecessor starts a new sample), cached per batch so the
  32 layers share one computation; without either, each batch row is one sample.
* Phi-3 sets ``sliding_window`` (2047 for Phi-3-mini). transformers' sdpa/eager masks let query ``i``
  see keys ``j`` with ``i - sliding_window < j <= i``; the kernel gets the same window,
  ``window_size=(sliding_window - 1, 0)``, applied inside each sample.
* Everything else — a padded batch whose 2D mask has zeros, decoding with a KV cache, attention
  dropout, a CPU without the kernel — takes a path with the same semantics as transformers' sdpa:
  the mask builder then returns exactly what ``sdpa_mask`` returns and the function calls
  ``sdpa_attention_forward``. On a CPU (tests), a packed row runs ``reference_varlen_attention``:
  per-sample ``scaled_dot_product_attention`` with the same window — the reference the CUDA kernel is
  checked against.

Public API
----------
``VARLEN``                          the implementation name ("varlen")
``patch() -> bool`` / ``unpatch()`` / ``is_patched()``  register ``varlen`` (idempotent), like every fastpath module
``varlen_kernel_available(device_type="cuda") -> bool``
``varlen_attention_forward(module, q, k, v, attention_mask, ...)``  the registered function
``reference_varlen_attention(q, k, v, cu_seqlens, scale, window)``  CPU/any-device reference
``segments_from_position_ids(position_ids) -> (cu_seqlens int32, max_len)``
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

VARLEN = "varlen"

_REGISTERED = False
_KERNEL: Any = None  # torch.nn.attention.varlen.varlen_attn, resolved lazily
_KERNEL_STYLE: str | None = None  # "window" (torch >= 2.11) | "is_causal" (torch 2.10) | None (missing)
_KERNEL_GQA = False  # whether the kernel takes enable_gqa (resolved once: inspect per call breaks torch.compile graphs)
_SEGMENT_CACHE: dict[str, Any] = {"key": None, "value": None}
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


def _resolve_kernel() -> tuple[Any, str | None]:
    """Find PyTorch's varlen kernel and which calling convention it has."""
    global _KERNEL, _KERNEL_STYLE, _KERNEL_GQA
    if _KERNEL is not None or _KERNEL_STYLE == "missing":
        return _KERNEL, (None if _KERNEL_STYLE == "missing" else _KERNEL_STYLE)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # pragma: no cover - depends on the torch build
        _KERNEL_STYLE = "missing"
        return None, None
    params = inspect.signature(varlen_attn).parameters
    _KERNEL_GQA = "enable_gqa" in params
    if "window_size" in params:
        _KERNEL, _KERNEL_STYLE = varlen_attn, "window"
    elif "is_causal" in params:  # torch 2.10: causal flag, no window
        _KERNEL, _KERNEL_STYLE = varlen_attn, "is_causal"
    else:  # pragma: no cover
        _KERNEL_STYLE = "missing"
        return None, None
    return _KERNEL, _KERNEL_STYLE


def varlen_kernel_in_torch() -> bool:
    """Whether this torch build has ``varlen_attn`` at all (whatever the device)."""
    return _resolve_kernel()[0] is not None


def varlen_kernel_available(device_type: str = "cuda") -> bool:
    """True where ``varlen_attn`` can run: a CUDA device of compute capability >= 8.0 and the kernel in torch."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    kernel, _ = _resolve_kernel()
    if kernel is None:
        return False
    major, _minor = torch.cuda.get_device_capability()
    return major >= 8


# --------------------------------------------------------------------------------------------- segments


def segments_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sample boundaries of a packed batch: ``cu_seqlens`` (int32, on the ids' device) and the longest sample.

    A token starts a new sample where its position is not its predecessor's plus one, and at the start of
    every batch row. This matches ``transformers.masking_utils.find_packed_sequence_indices``.
    """
    pos = position_ids
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    batch, length = pos.shape
    starts = torch.ones_like(pos, dtype=torch.bool)
    if length > 1:
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    idx = starts.reshape(-1).nonzero().flatten()
    total = torch.tensor([batch * length], device=idx.device, dtype=idx.dtype)
    cu = torch.cat([idx, total]).to(torch.int32)
    max_len = int(cu.diff().max().item())
    return cu, max_len


def _as_int(value: Any) -> Any:
    return value if isinstance(value, (int, torch.SymInt)) else int(value)


def _segments(batch: int, length: int, device: torch.device, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """cu_seqlens (q, k) and max lengths for a flattened (batch * length) token stream."""
    cu_q = kwargs.get("cu_seq_lens_q")
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q = kwargs.get("max_length_q")
        max_k = kwargs.get("max_length_k")
        if cu_q.device != device:
            cu_q = cu_q.to(device, non_blocking=True)
        if cu_k.device != device:
            cu_k = cu_k.to(device, non_blocking=True)
        if cu_q.dtype != torch.int32:
            cu_q = cu_q.to(torch.int32)
        if cu_k.dtype != torch.int32:
            cu_k = cu_k.to(torch.int32)
        if max_q is None or max_k is None:
            max_q = max_k = int(cu_q.diff().max().item())
        # ints (or SymInts under torch.compile) pass through: int() of a SymInt would pin the graph to one length
        return cu_q, cu_k, _as_int(max_q), _as_int(max_k)

    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.shape[-1] == length:
        if position_ids.dim() == 2 and position_ids.shape[0] != batch:
            position_ids = position_ids.expand(batch, -1)
        key = (position_ids.data_ptr(), tuple(position_ids.shape), position_ids._version, str(device))
        if _SEGMENT_CACHE["key"] == key:
            cu, max_len = _SEGMENT_CACHE["value"]
        else:
            cu, max_len = segments_from_position_ids(position_ids.to(device))
            _SEGMENT_CACHE["key"], _SEGMENT_CACHE["value"] = key, (cu, max_len)
        return cu, cu, max_len, max_len

    cu = torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)
    return cu, cu, length, length


# --------------------------------------------------------------------------------------------- kernels


def _window(sliding_window: int | None, max_len: int) -> int:
    """Left window for the kernel (-1 = unlimited) matching transformers' sliding-window mask."""
    if sliding_window is None or sliding_window <= 0:
        return -1
    left = int(sliding_window) - 1
    return -1 if left >= max_len - 1 else left  # no sample is long enough for the window to bite


def reference_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    window_left: int = -1,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Same function as the CUDA kernel, one sample at a time through sdpa: (T, H, D) in, (T, H, D) out.

    ``window_left`` < 0 is plain causal; otherwise query ``i`` sees keys ``i - window_left .. i``.
    """
    out = torch.empty_like(query)
    bounds = cu_seqlens.tolist()
    groups = query.shape[1] // key.shape[1]
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        q = query[start:end].transpose(0, 1)
        k = key[start:end].transpose(0, 1)
        v = value[start:end].transpose(0, 1)
        if groups > 1:
            k = k.repeat_interleave(groups, dim=0)
            v = v.repeat_interleave(groups, dim=0)
        n = end - start
        if window_left >= 0 and n > window_left + 1:
            i = torch.arange(n, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - window_left)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out


def _run_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left):
    kernel, style = _resolve_kernel()
    extra = {}
    if q.shape[1] != k.shape[1]:
        if not _KERNEL_GQA:
            raise NotImplementedError("this torch's varlen_attn has no grouped-query attention")
        extra["enable_gqa"] = True
    if style == "window":
        return kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(window_left, 0), **extra)
    if window_left >= 0:  # torch 2.10 has no window: only exact where no sample reaches it
        raise NotImplementedError("this torch's varlen_attn has no sliding window")
    return kernel(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True, scale=scale)


# --------------------------------------------------------------------------------------------- the interface


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (B, H, S, D) q/k/v in, (B, S, H, D) out."""
    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    simple = attention_mask is None and q_len == kv_len and q_len > 1 and dropout == 0.0
    if not simple:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if dropout and attention_mask is None and q_len == kv_len:
            _warn_once("dropout", "varlen attention: attention dropout set, using the sdpa path")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    device = query.device
    cu_q, cu_k, max_q, max_k = _segments(batch, q_len, device, kwargs)
    window_left = _window(sliding_window, max(max_q, max_k))
    # (B, H, S, D) -> (B*S, H, D); the kernel wants the last dim contiguous.
    q = query.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * kv_len, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * kv_len, value.shape[1], head_dim)

    out = None
    if device.type == "cuda" and varlen_kernel_available("cuda"):
        in_dtype = q.dtype
        if in_dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
            # QLoRA keeps norms/embeddings in fp32; under autocast sdpa would run in the autocast dtype too.
            run_dtype = torch.get_autocast_dtype("cuda")
            q, k, v = q.to(run_dtype), k.to(run_dtype), v.to(run_dtype)
        if q.dtype in (torch.float16, torch.bfloat16):
            try:
                out = _run_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scaling, window_left)
            except NotImplementedError as exc:
                _warn_once("nokernel", f"varlen attention: {exc}; reference path")
        else:
            _warn_once("fp32", "varlen attention: float32 inputs outside autocast; reference path")
    if out is None:
        out = reference_varlen_attention(q, k, v, cu_q, scale=scaling, window_left=window_left)
    return out.view(batch, q_len, heads, head_dim), None


def varlen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
):
    """Mask builder for ``varlen``: ``None`` (no mask at all) for full-length causal calls without padding;
    anything else (padding zeros, a KV cache) gets transformers' own sdpa mask, and the attention function
    then runs the sdpa path on it."""
    from transformers.masking_utils import sdpa_mask

    no_offsets = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == 0 and kv_offset == 0
    if no_offsets and q_length == kv_length:
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] == kv_length and bool(attention_mask.all()):
            return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def patch() -> bool:
    """Register ``varlen`` with transformers' attention and mask interfaces (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(VARLEN, varlen_attention_forward)
        AttentionMaskInterface.register(VARLEN, varlen_mask)
        _REGISTERED = True
    return True


def unpatch() -> None:
    """Remove ``varlen`` from transformers' registries (a model loaded with it then fails to run, as it should)."""
    global _REGISTERED
    if not _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for registry in (AttentionInterface, AttentionMaskInterface):
        registry._global_mapping.pop(VARLEN, None)
    _REGISTERED = False


def is_patched() -> bool:
    return _REGISTERED
