"""The memory model: predicted peak GPU memory of a LoRA/QLoRA step on Phi-3-mini, from a few measured constants.

The peak is base weights + a fixed part (LoRA weights, their gradients and Adam state, allocator slack) +
activation bytes per micro-batch token, the last depending on how much activation checkpointing recomputes.
Constants were fitted to ``torch.cuda.max_memory_allocated`` on an H100 (docs/benchmarks.md, "Memory
model"); the planner (``phi3tune train --dry-run``) and the fast path's checkpointing choice both use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know of a model: its size, depth and width, and the LoRA size."""

    params: float
    unquantized_params: float  # embeddings and lm_head, which stay bf16 under QLoRA
    layers: int
    hidden_size: int
    trainable: float


PHI3_MINI = ModelShape(params=3.82e9, unquantized_params=2 * 32064 * 3072, layers=32, hidden_size=3072,
                       trainable=25_165_824)
# nf4 + double quantization: ~4.127 bits a weight.
NF4_BYTES_PER_PARAM = 0.516

# Activation bytes kept for backward, per token of a packed micro-batch (bf16, varlen attention, LoRA r=16
# all-linear). With the fused LoRA linears and compiled Phi-3 layers on, the recipe peaked at 32.09 GiB at
# 8,192 tokens; with either off at 34.96-35.09 GiB.
ACT_BYTES_PER_TOKEN = {"fused": 3.2e6, "plain": 3.55e6}
# With every layer checkpointed only the layer inputs and one layer's working set remain.
ACT_BYTES_PER_TOKEN_FULL_CKPT = 0.32e6
# LoRA weights, gradients and Adam moments in float32 (16 bytes a trainable parameter) and allocator slack.
TRAINABLE_BYTES_PER_PARAM = 16
SLACK_BYTES = 0.2e9

CHECKPOINTING_MODES = ("none", "every_n:4", "every_n:3", "every_n:2", "full")


@dataclass(frozen=True)
class MemoryEstimate:
    """A predicted peak, split into its parts (bytes)."""

    weights: float
    fixed: float  # LoRA weights and optimizer state, allocator slack
    activations: float
    checkpointing: str

    @property
    def peak(self) -> float:
        return self.weights + self.fixed + self.activations


def weight_bytes(quantized: bool, shape: ModelShape = PHI3_MINI, *, fp8: bool = False) -> float:
    """Base weight bytes: bf16; nf4 (QLoRA); or e4m3, 1 byte a parameter, for the decoder linears that
    ``model.base_precision: fp8`` converts (all of them with all-linear LoRA; their float32 scales, ~4 MB on
    Phi-3-mini, are left out)."""
    if quantized:
        return (shape.params - shape.unquantized_params) * NF4_BYTES_PER_PARAM + shape.unquantized_params * 2
    if fp8:
        return (shape.params - shape.unquantized_params) * 1 + shape.unquantized_params * 2
    return shape.params * 2


def activation_bytes_per_token(checkpointing: str = "none", fused: bool = True, shape: ModelShape = PHI3_MINI) -> float:
    """Activation memory per micro-batch token; ``checkpointing`` is ``none``, ``full`` or ``every_n:N``.

    Measured on Phi-3-mini; another shape scales with layers x hidden size (what a layer keeps is a few
    hidden- and intermediate-sized tensors a token).
    """
    scale = (shape.layers * shape.hidden_size) / (PHI3_MINI.layers * PHI3_MINI.hidden_size)
    kept_all = ACT_BYTES_PER_TOKEN["fused" if fused else "plain"]
    if checkpointing == "full":
        return ACT_BYTES_PER_TOKEN_FULL_CKPT * scale
    if checkpointing.startswith("every_n:"):
        n = int(checkpointing.split(":", 1)[1])
        kept = 1.0 - 1.0 / n
        return (ACT_BYTES_PER_TOKEN_FULL_CKPT + kept * (kept_all - ACT_BYTES_PER_TOKEN_FULL_CKPT)) * scale
    return kept_all * scale


def checkpointing_of(training_args: Mapping[str, Any]) -> str:
    """The checkpointing mode the ``gradient_checkpointing`` keys select, in memory-model terms (unset: on, as in
    trl's SFTConfig)."""
    if not training_args.get("gradient_checkpointing", True):
        return "none"
    every_n = int((training_args.get("gradient_checkpointing_kwargs") or {}).get("every_n_layers", 1) or 1)
    return "full" if every_n <= 1 else f"every_n:{every_n}"


def cuda_graph_bytes(tokens: int, shape: ModelShape = PHI3_MINI) -> float:
    """What CUDA graphs over the decoder layers add: each layer's static bf16 input buffer (the activations live
    in the graphs' pool instead of the allocator, the same bytes). Measured +1.29 GiB at 8,192 tokens on
    Phi-3-mini (30.01 against 28.72 GiB, docs/benchmarks.md "2026-12-02"); this counts 1.5."""
    return shape.layers * tokens * shape.hidden_size * 2


def estimate(tokens: int, *, quantized: bool, checkpointing: str, fused: bool = True,
             shape: ModelShape = PHI3_MINI, fp8: bool = False) -> MemoryEstimate:
    """Predicted peak for a micro-batch of ``tokens`` tokens (``fp8``: the base linears stored in e4m3)."""
    return MemoryEstimate(
        weights=weight_bytes(quantized, shape, fp8=fp8),
        fixed=shape.trainable * TRAINABLE_BYTES_PER_PARAM + SLACK_BYTES,
        activations=tokens * activation_bytes_per_token(checkpointing, fused, shape),
        checkpointing=checkpointing,
    )


def least_recompute(tokens: int, *, quantized: bool, budget_bytes: float, fused: bool = True,
                    shape: ModelShape = PHI3_MINI, fp8: bool = False) -> MemoryEstimate:
    """The checkpointing mode with the least recompute whose peak fits ``budget_bytes`` (else ``full``)."""
    for mode in CHECKPOINTING_MODES:
        found = estimate(tokens, quantized=quantized, checkpointing=mode, fused=fused, shape=shape, fp8=fp8)
        if found.peak <= budget_bytes:
            return found
    return estimate(tokens, quantized=quantized, checkpointing="full", fused=fused, shape=shape, fp8=fp8)


def shape_of(model_config: Any, *, trainable: float, total: float) -> ModelShape:
    """The memory model's view of a transformers config and a LoRA size (``total`` counts base parameters)."""
    embeddings = model_config.vocab_size * model_config.hidden_size
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    return ModelShape(params=total, unquantized_params=embeddings * (1 if tied else 2),
                      layers=model_config.num_hidden_layers, hidden_size=model_config.hidden_size, trainable=trainable)
