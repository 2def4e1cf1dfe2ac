"""CUDA graphs over Phi-3's decoder layers: each layer's forward and backward replayed from one graph.

Why: with the fast path's fused kernels a training step launches ~2,900 kernels through Python. With the fp8 base
the GPU then waits on the CPU (52% busy under the profiler, ~215 ms of kernels in a ~342 ms step on an H200;
docs/benchmarks.md "2026-12-01 (night)"). A graph replays a layer's ~45 forward or ~45 backward kernels with one
launch. Measured (docs/benchmarks.md "2026-12-02", H200): the decoder stack alone (``scripts/bench_graphs.py``) fp8
295 -> 257 ms a step; in the recipe on a host whose CPU keeps up, fp8 1.01x and bf16 0.96x, because the padding
below costs ~3.5% without graphs. Hence opt-in (``model.fast_path.cuda_graphs``): for hosts where the GPU waits
on launches.

How
---
The batches get one shape first (``static_batches.StaticBatchCollator``, for the training dataloader only).
``DecoderGraphs`` then routes each ``Phi3DecoderLayer``'s forward: on the first training micro-batch of that shape
it captures all layers together with ``torch.cuda.make_graphed_callables`` (one memory pool, forward graphs in
order, backward graphs in reverse), and later micro-batches replay them. Anything else -- evaluation, no grad,
another shape, a mask, a KV cache, other autocast settings -- runs the layer's own forward. A capture that fails
turns the graphs off for the run with one warning; training continues eagerly.

Rules it keeps (each checked where it could break):
* The parameters' gradients: ``make_graphed_callables`` hands autograd its static gradient buffers. Where a
  parameter has no ``.grad`` yet, autograd would keep that buffer itself as ``.grad``, and the next replay would
  overwrite it -- gradient accumulation would add a micro-batch to itself. A hook gives autograd a copy then.
* Autocast: captured under ``cache_enabled=False`` (a cached cast would be freed while the graph still reads it).
* The static inputs shared by all layers (RoPE cos/sin, positions, segment offsets) are copied in once a
  micro-batch, at layer 0; a layer's input hidden state is copied into its own static buffer (one copy a layer).
* Off (policy.py) with gradient checkpointing, QLoRA, several processes, or unpacked batches.

Public API: ``DecoderGraphs``, ``install_for_trainer``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence

import torch

from phi3tune.errors import Phi3TuneError
from phi3tune.fastpath.static_batches import StaticBatchCollator, StaticShape, segment_capacity

log = logging.getLogger(__name__)

# Keyword arguments a packed batch brings to each decoder layer that the graph either takes or may ignore.
_SEGMENT_KWARGS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
_IGNORED_KWARGS = {"seq_idx"}  # linear-attention layers' per-token sample index: Phi-3 does not read it
_FALSE_KWARGS = {"output_attentions", "output_hidden_states"}  # transformers passes them down; only False replays


class _LayerCall(torch.nn.Module):
    """One decoder layer as a module of tensor arguments only (what ``make_graphed_callables`` takes).

    Not registered in the model: the layer's parameter names and the adapter's keys stay as they are.
    """

    def __init__(self, layer: torch.nn.Module, max_length: int):
        super().__init__()
        self.layer = layer
        self.max_length = max_length

    def forward(self, hidden_states, cos, sin, position_ids, cu_q, cu_k):
        # The class's forward at call time: phi3_layers' fused forward where it is patched.
        return type(self.layer).forward(
            self.layer, hidden_states, attention_mask=None, position_ids=position_ids,
            position_embeddings=(cos, sin), cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k,
            max_length_q=self.max_length, max_length_k=self.max_length,
        )


class DecoderGraphs:
    """Routes each decoder layer's forward through CUDA graphs where the call has the static shape.

    ``install()`` sets each layer's ``forward`` (an instance attribute); ``release()`` removes it, the gradient
    hooks and the graphs (their memory pool). ``replayed`` / ``eager`` count micro-batches; ``failure`` says why
    the graphs were turned off, if they were.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], shape: StaticShape):
        self.layers = list(layers)
        self.shape = shape
        self.graphed: list[torch.nn.Module] | None = None
        self.failure: str | None = None
        self.replayed = 0
        self.eager = 0
        self._statics: tuple[torch.Tensor, ...] | None = None  # cos, sin, positions, cu_q, cu_k shared by all layers
        self._input_grad: bool | None = None  # whether layer 0's input required grad at capture
        self._autocast: tuple[bool, torch.dtype] | None = None
        self._active = False  # this forward pass replays (decided at layer 0)
        self._hooks: list[Any] = []
        self._warned_eager = False
        self.last_eager_reason: str | None = None

    # ---- install / release ------------------------------------------------------------------------------------

    def install(self) -> "DecoderGraphs":
        for index, layer in enumerate(self.layers):
            layer.forward = self._router(index)
        return self

    def release(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.graphed = None
        self._statics = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def summary(self) -> str:
        if self.failure:
            return f"CUDA graphs: off ({self.failure})"
        eager = f" (the last because of {self.last_eager_reason})" if self.eager else ""
        return (f"CUDA graphs: {self.replayed} training micro-batches replayed, {self.eager} run eagerly{eager}; "
                f"{self.shape.tokens} tokens, up to {self.shape.segments} samples a micro-batch")

    # ---- routing ------------------------------------------------------------------------------------------------

    def _router(self, index: int):
        layer = self.layers[index]

        def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                    position_embeddings=None, **kwargs):
            if index == 0:
                self._active = self._start(hidden_states, attention_mask, position_ids, past_key_values, use_cache,
                                           position_embeddings, kwargs)
            if self._active:
                return self.graphed[index](hidden_states, *self._statics)
            return type(layer).forward(layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                       past_key_values=past_key_values, use_cache=use_cache,
                                       position_embeddings=position_embeddings, **kwargs)

        return forward

    def _why_eager(self, hidden, attention_mask, position_ids, past_key_values, use_cache, position_embeddings,
                   kwargs) -> str | None:
        """Why this call cannot replay the graphs, or None where it can."""
        shape = self.shape
        if self.failure:
            return self.failure
        if not (self.layers[0].training and torch.is_grad_enabled()):
            return "not training"
        if attention_mask is not None or past_key_values is not None or use_cache or position_embeddings is None:
            return "a mask, a KV cache or no RoPE tensors"
        unknown = set(kwargs) - _SEGMENT_KWARGS - _IGNORED_KWARGS - _FALSE_KWARGS
        if unknown or not _SEGMENT_KWARGS <= set(kwargs) or any(kwargs.get(k) for k in _FALSE_KWARGS):
            return f"layer arguments {sorted(kwargs)}"
        cos, _sin = position_embeddings
        if not (hidden.shape[:2] == (1, shape.tokens) and position_ids is not None
                and position_ids.shape == (1, shape.tokens) and cos.shape[:2] == (1, shape.tokens)):
            return f"{tuple(hidden.shape[:2])} tokens, not (1, {shape.tokens})"
        if not (kwargs["cu_seq_lens_q"].numel() == kwargs["cu_seq_lens_k"].numel() == shape.segments + 1
                and kwargs["max_length_q"] == kwargs["max_length_k"] == shape.max_length):
            return f"{kwargs['cu_seq_lens_q'].numel() - 1} segments / max_length {kwargs['max_length_q']}"
        if not hidden.is_cuda:  # last: a CPU test of every check above ends here
            return "not on a CUDA device"
        return None

    def _start(self, hidden, attention_mask, position_ids, past_key_values, use_cache, position_embeddings,
               kwargs) -> bool:
        """At layer 0: whether this forward pass replays (capturing first if needed)."""
        why = self._why_eager(hidden, attention_mask, position_ids, past_key_values, use_cache, position_embeddings,
                              kwargs)
        inputs = (*position_embeddings, position_ids, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]) if not why else ()
        if why is None and self.graphed is None and not self._capture(hidden, inputs):
            why = self.failure
        if why is None:
            autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
            if autocast != self._autocast:
                why = f"autocast {autocast}, captured under {self._autocast}"
            elif hidden.requires_grad != self._input_grad:
                why = "the first layer's input requires grad now and did not at capture (or the reverse)"
        if why is not None:
            if why != "not training":
                self.eager += 1
                self.last_eager_reason = why
                if self.graphed is not None and not self._warned_eager:
                    self._warned_eager = True
                    log.warning("CUDA graphs: a training micro-batch ran eagerly (%s); its activations come on top "
                                "of the graphs' memory", why)
            return False
        for static, given in zip(self._statics, inputs):
            if static.data_ptr() != given.data_ptr():
                static.copy_(given)
        self.replayed += 1
        return True

    # ---- capture ------------------------------------------------------------------------------------------------

    def _capture(self, hidden: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> bool:
        dtype = torch.get_autocast_dtype("cuda")
        autocast_on = torch.is_autocast_enabled("cuda")
        statics = tuple(t.detach().clone() for t in inputs)
        first = hidden.detach().clone().requires_grad_(hidden.requires_grad)
        samples = [(first, *statics)] + [(hidden.detach().clone().requires_grad_(True), *statics)
                                         for _ in self.layers[1:]]
        calls = [_LayerCall(layer, self.shape.max_length) for layer in self.layers]
        context = (torch.autocast("cuda", dtype=dtype, cache_enabled=False) if autocast_on
                   else contextlib.nullcontext())
        try:
            with context:
                graphed = torch.cuda.make_graphed_callables(tuple(calls), tuple(samples), num_warmup_iters=3)
        except Phi3TuneError:
            # phi3tune's own errors are not capture failures: a second stop signal during the capture
            # (TrainingInterrupted) stops the run as anywhere else
            raise
        except Exception as exc:  # noqa: BLE001 - any capture failure leaves training on the eager path
            self.failure = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            log.warning("CUDA graphs off for this run, the layers run eagerly: %s", self.failure)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            return False
        self.graphed, self._statics = list(graphed), statics  # the calls themselves, their forwards replaced
        self._input_grad = hidden.requires_grad
        self._autocast = (autocast_on, dtype)
        for call in calls:
            for p in call.parameters():
                if p.requires_grad:
                    self._hooks.append(p.register_hook(_own_gradient(p)))
        return True


def _own_gradient(param: torch.Tensor):
    """A tensor hook: where ``param`` has no gradient yet, autograd gets a copy of the graph's static buffer."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.clone() if param.grad is None else grad

    return hook


def install_for_trainer(trainer: Any, rows: int, max_length: int) -> tuple[DecoderGraphs | None, str]:
    """Pad ``trainer``'s training batches to ``rows`` packed rows of ``max_length`` tokens and route its decoder
    layers through graphs.

    Returns the graphs (``None`` where they cannot apply) and a line for the console.
    """
    from phi3tune.training import distributed

    if distributed.world_size() > 1:
        return None, "CUDA graphs: off (several processes: the gradient all-reduce hooks are not checked in a graph)"
    if not torch.cuda.is_available():
        return None, "CUDA graphs: off (no CUDA GPU)"
    dataset = trainer.train_dataset
    if dataset is None or "seq_lengths" not in getattr(dataset, "column_names", ()):
        return None, "CUDA graphs: off (the training set is not packed with bfd)"
    pad_token_id = getattr(trainer.data_collator, "pad_token_id", None)
    if pad_token_id is None:
        return None, "CUDA graphs: off (the collator is not trl's padding-free collator)"
    tokens = rows * max_length
    shape = StaticShape(tokens, segment_capacity(dataset["seq_lengths"], rows, tokens, max_length), max_length)
    # the training dataloader only: evaluation never replays, so padding its batches would only cost compute
    trainer.train_collator = StaticBatchCollator(trainer.data_collator, shape, pad_token_id)
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    graphs = DecoderGraphs(base.model.layers, shape).install()
    return graphs, (f"CUDA graphs: decoder layers captured at the first step; micro-batches padded to {tokens} "
                    f"tokens, up to {shape.segments} samples")
