"""Static-shape batches for CUDA graphs: trl's padding-free packed micro-batches padded to one shape.

A graph replays fixed shapes. ``pad_batch`` pads every packed micro-batch to the plan's token budget with pad samples
(labels -100, positions from 0, at most ``max_length`` tokens each, so attention never mixes them with real tokens
and the kernel's ``max_length`` holds), ``cu_seq_lens`` to a fixed count with empty segments, and fixes
``max_length`` at the packing row length. The loss, its normalisation (``num_items_in_batch`` counts labels) and
trl's metrics over labelled tokens are unchanged; the pad-token count rides in the batch under ``PADDING_KEY`` and
``Phi3Trainer.compute_loss`` takes it out before the model sees the batch, and out of trl's token count.

Public API: ``PADDING_KEY``, ``StaticShape``, ``segment_capacity``, ``pad_batch``, ``StaticBatchCollator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

# Batch key the collator adds: pad tokens it appended (the trainer pops it before the model sees the batch).
PADDING_KEY = "phi3tune_padding_tokens"


@dataclass(frozen=True)
class StaticShape:
    """The one shape every graphed micro-batch has.

    Attributes:
        tokens: Tokens a micro-batch is padded to (packed rows x row length: the token budget).
        segments: Samples a micro-batch may hold (``cu_seq_lens`` has one more entry).
        max_length: The longest sample (the packing row length).
    """

    tokens: int
    segments: int
    max_length: int


def segment_capacity(seq_lengths: Iterable[Sequence[int]], rows: int, shape_tokens: int, max_length: int) -> int:
    """Samples the fullest micro-batch of ``rows`` packed rows can hold, plus the pad segments it may need.

    ``seq_lengths`` is trl's packed ``seq_lengths`` column (one list of sample lengths per packed row). Batches
    are drawn in any order, so the bound is the ``rows`` rows with the most samples.
    """
    counts = sorted((len(s) for s in seq_lengths), reverse=True)
    return sum(counts[:rows]) + math.ceil(shape_tokens / max_length)


def pad_batch(batch: dict[str, Any], shape: StaticShape, pad_token_id: int) -> dict[str, Any]:
    """``batch`` (trl's padding-free collator output) padded to ``shape``; unchanged where it does not fit.

    The pad tokens form samples of their own of at most ``max_length`` tokens each (positions from 0, labels -100),
    so attention never mixes them with real tokens and the kernel's ``max_length`` holds. The remaining
    ``cu_seq_lens`` entries repeat the total: empty samples.
    """
    ids = batch.get("input_ids")
    cu = batch.get("cu_seq_lens_q")
    if ids is None or cu is None or ids.dim() != 2 or ids.shape[0] != 1 or "position_ids" not in batch:
        return batch
    real = ids.shape[1]
    missing = shape.tokens - real
    longest = batch.get("max_length_q", 0)
    chunks = [shape.max_length] * (missing // shape.max_length) + ([missing % shape.max_length]
                                                                     if missing % shape.max_length else [])
    if missing < 0 or longest > shape.max_length or cu.numel() - 1 + len(chunks) > shape.segments:
        return batch
    out = dict(batch)
    out["input_ids"] = torch.cat([ids, ids.new_full((1, missing), pad_token_id)], dim=1)
    out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, missing), -100)], dim=1)
    pad_positions = [torch.arange(n, dtype=batch["position_ids"].dtype) for n in chunks]
    out["position_ids"] = torch.cat([batch["position_ids"], *(p[None] for p in pad_positions)], dim=1)
    ends = (real + torch.tensor(chunks, dtype=torch.int64).cumsum(0)).to(cu.dtype)
    empty = shape.segments + 1 - cu.numel() - len(chunks)
    cu_padded = torch.cat([cu, ends, cu.new_full((empty,), shape.tokens)])
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu_padded
    out["max_length_q"] = out["max_length_k"] = shape.max_length
    if "seq_idx" in batch:
        first = cu.numel() - 1
        pad_idx = torch.repeat_interleave(torch.arange(first, first + len(chunks), dtype=batch["seq_idx"].dtype),
                                          torch.tensor(chunks, dtype=torch.int64))
        out["seq_idx"] = torch.cat([batch["seq_idx"], pad_idx[None]], dim=1)
    out[PADDING_KEY] = missing
    return out


@dataclass
class StaticBatchCollator:
    """trl's padding-free collator, then ``pad_batch``. A module-level dataclass: dataloader workers pickle it."""

    inner: Any
    shape: StaticShape
    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return pad_batch(self.inner(examples), self.shape, self.pad_token_id)
