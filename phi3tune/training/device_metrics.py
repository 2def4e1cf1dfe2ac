"""trl's SFT loss and metrics, with nothing read back to the host in the middle of a step.

trl's ``SFTTrainer.compute_loss`` reads its metrics on the host at every micro-batch (``.item()`` of the entropy and
token accuracy, a host tensor for the token count), and its fused LM head selects the labelled positions with a
boolean index (its size is read back too). Each read makes the CPU wait until the GPU has finished the forward, so
the CPU can never work ahead of the GPU. Then the GPU idles wherever the CPU is slower than it (the forward's
attention and small LoRA kernels, and the step boundary). Here the loss is trl's, step for step, with the metrics
kept on the device until trl logs them, and the LM head scores every position: ~2 ms more GPU work a step on an H200,
and no read. Measured in docs/benchmarks.md, "2026-12-02 (later)".

Public API: ``applies``, ``compute_loss``, ``metrics_to_floats``, ``score_every_position``, ``HOST_SYNCS_ENV``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# Benchmark-only: "1" keeps trl's own loss path, for an A/B row of one recipe in one call.
HOST_SYNCS_ENV = "PHI3TUNE_HOST_SYNCS"


def _host_syncs_asked() -> bool:
    return os.environ.get(HOST_SYNCS_ENV, "0") != "0"


def applies(trainer: Any, model: Any, inputs: dict, return_outputs: bool) -> bool:
    """Whether this micro-batch takes the sync-free path: one process's padding-free training batch, trl's plain
    negative log-likelihood (or DFT) loss. Everything else is left to trl."""
    return (
        model.training
        and not return_outputs
        and not _host_syncs_asked()
        and trainer.accelerator.num_processes == 1
        and trainer.compute_loss_func is None
        and trainer.label_smoother is None
        and not trainer.aux_loss_enabled
        and trainer.args.loss_type in ("nll", "dft")
        and "position_ids" in inputs
        and inputs.get("attention_mask") is None
    )


def compute_loss(trainer: Any, model: Any, inputs: dict, num_items_in_batch: Any, padding: int) -> torch.Tensor:
    """trl 1.16's ``SFTTrainer.compute_loss`` for the batches ``applies`` accepts, its metrics left on the device."""
    inputs["use_cache"] = False
    outputs = model(**inputs, fused_lm_head=True)
    per_token_loss = -outputs.log_probs  # zero on ignored positions
    if trainer.args.loss_type == "dft":
        per_token_loss = per_token_loss * outputs.log_probs.exp().detach()
    num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)

    metrics = trainer._metrics["train"]
    with torch.no_grad():
        # trl logs 0.0 for a batch without a labelled token; both sums are zero there, so /1 gives the same
        num_valid = outputs.label_mask.sum().clamp(min=1)
        metrics["entropy"].append(outputs.entropy.detach().sum() / num_valid)
        metrics["mean_token_accuracy"].append(outputs.is_top1.sum() / num_valid)
    # the token count is known on the host: the flattened row's length, less the CUDA-graph collator's pad tokens
    trainer._total_train_tokens += inputs["position_ids"].size(1) - padding
    metrics["num_tokens"] = [trainer._total_train_tokens]
    return loss


def metrics_to_floats(metrics: dict[str, list]) -> None:
    """The device-side metric values as floats, in place (one read for all of them), before trl averages them."""
    where = [(values, i) for values in metrics.values() for i, value in enumerate(values) if torch.is_tensor(value)]
    if not where:
        return
    floats = torch.stack([values[i].detach().float().reshape(()) for values, i in where]).tolist()
    for (values, i), value in zip(where, floats):
        values[i] = value


def score_every_position() -> bool:
    """Make trl's fused LM head score every position instead of the labelled ones (no boolean index, no read).

    trl picks the compact form with ``trl.trainer.utils._use_triton`` (True on CUDA); the per-position results
    are the same, and the unlabelled positions are masked to zero either way. Returns whether it applied.
    """
    if _host_syncs_asked():
        return False
    from trl.trainer import utils as trl_utils

    if not callable(getattr(trl_utils, "_use_triton", None)):
        return False  # another trl: its head is left as it is
    trl_utils._use_triton = _never_compact
    return True


def _never_compact(device: torch.device) -> bool:
    return False
