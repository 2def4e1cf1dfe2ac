"""The run's deliverable: ``adapter/`` (peft safetensors, tokenizer with chat template, a generation config
stopping at ``<|end|>``), and the final eval metrics beside it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from phi3tune.model import loading
from phi3tune.training.atomic import atomic_write_json, staged_folder
from phi3tune.training.layout import EVAL_METRICS


def save_adapter(trainer: Any, tokenizer: Any, adapter_dir: Path, base_model_path: str | None,
                 state_dict: dict[str, Any] | None = None) -> None:
    """Write the adapter as a whole (staged and renamed): a crash mid-save never leaves half an adapter that loads.

    Args:
        trainer: The trainer holding the PeftModel.
        tokenizer: Saved beside the adapter, with Phi-3's chat template.
        adapter_dir: ``RUN/adapter``.
        base_model_path: A random_init run's ``base_model/``, recorded as the adapter's base; None keeps the hub id.
        state_dict: Under FSDP2, ``trainer.adapter_state_dict()`` (gathered by every rank beforehand: the model's
            own weights are shards); None saves the model's weights.
    """
    model = trainer.model
    if base_model_path is not None:
        for peft_cfg in model.peft_config.values():
            peft_cfg.base_model_name_or_path = base_model_path
    with staged_folder(adapter_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        loading.phi3_generation_config(model.config).save_pretrained(staging)


def final_eval_metrics(output_dir: Path, trainer: Any, eval_dataset: Any) -> dict[str, Any]:
    """Eval loss, perplexity and token accuracy on the eval split at the end of training, into eval_metrics.json."""
    if eval_dataset is None:
        return {}
    # The trainer may have just evaluated at the final step; a second pass over a large eval set costs minutes.
    last = trainer.state.log_history[-2:] if trainer.state.log_history else []
    raw = next((row for row in last if "eval_loss" in row and row.get("step") == trainer.state.global_step), None)
    raw = raw or trainer.evaluate()
    loss = raw.get("eval_loss")
    eval_metrics = {
        "eval_loss": loss,
        "perplexity": math.exp(loss) if loss is not None and loss < 50 else None,
        "token_accuracy": raw.get("eval_mean_token_accuracy"),
        "n_samples": len(eval_dataset),
        "n_tokens": int(sum(sum(1 for t in row if t != -100) for row in eval_dataset["labels"])),
    }
    if trainer.is_world_process_zero():  # under torchrun every rank evaluated its shard; one writes
        atomic_write_json(output_dir / EVAL_METRICS, eval_metrics)
    return eval_metrics
