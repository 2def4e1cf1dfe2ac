"""The training recipe, top to bottom.

    output dir -> seed -> tokenizer -> LoRA targets (checked before weights load) -> data ->
    model -> SFTTrainer -> train (or resume) -> adapter -> eval metrics -> report -> summary

Features: LoRA and QLoRA (nf4) through peft, trl's SFTTrainer as the loop, pre-tokenised Phi-3 chat data
with assistant-only labels, atomic resumable checkpoints, metrics.jsonl, run_config.yaml.
Limits: one process (multi-GPU launch through accelerate is not wired yet); random_init runs are for
demos and tests.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from phi3tune import modeling
from phi3tune.errors import ResourceError, UsageError
from phi3tune.report import read_metrics, write_report
from phi3tune.fastpath import apply_patches, resolve_attn_implementation
from phi3tune.model.kbit import prepare_kbit_model
from phi3tune.training.arguments import build_training_args
from phi3tune.callbacks import MetricsFileCallback, ProgressCallback
from phi3tune.checkpoints import (
    CHECKPOINTS_DIR,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    create_output_dir,
    latest_complete_checkpoint,
    remove_incomplete_checkpoints,
    resume_changes,
)
from phi3tune.signals import StopOnSignalCallback, graceful_stop, interrupted_error

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
BASE_MODEL_DIR = "base_model"


@dataclass
class TrainSummary:
    """What the user sees at the end of a run."""

    output_dir: Path
    adapter_dir: Path
    steps: int
    first_loss: float | None
    final_loss: float | None
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_second: float | None = None


def _library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import peft
    import transformers
    import trl

    return {
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
    }


def write_run_config(cfg, output_dir: Path, *, device: str, attn: str, dtype: torch.dtype, data_info: dict) -> None:
    """run_config.yaml: the resolved config (secrets redacted), library versions, device, data fingerprint."""
    resolved = cfg.to_dict(redact_secrets=True)
    resolved["resolved"] = {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": attn,
        "output_dir": str(output_dir),
    }
    resolved["versions"] = _library_versions()
    resolved["data_report"] = data_info
    atomic_write_text(output_dir / "run_config.yaml", yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))


def save_adapter(trainer, tokenizer, adapter_dir: Path, base_model_path: str | None) -> None:
    """Adapter (safetensors), tokenizer with chat template, and a generation config stopping at <|end|>."""
    model = trainer.model
    if base_model_path is not None:
        for peft_cfg in model.peft_config.values():
            peft_cfg.base_model_name_or_path = base_model_path
    # Written beside and renamed into place: a crash mid-save never leaves a half adapter that loads.
    staging = adapter_dir.with_name(f".tmp-{adapter_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    modeling.phi3_generation_config(model.config).save_pretrained(staging)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    os.replace(staging, adapter_dir)


def run_training(cfg, *, resume: bool = False, overwrite: bool = False, console: Console | None = None) -> TrainSummary:
    """Train a LoRA/QLoRA adapter as described by ``cfg`` (a validated RunConfig)."""
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig

    from phi3tune.data import prepare_datasets
    from phi3tune.trainer import Phi3Trainer

    console = console or Console(stderr=True)
    started = time.perf_counter()
    from transformers.utils import logging as hf_logging

    import datasets

    hf_logging.disable_progress_bar()  # our own progress display is the only one
    datasets.disable_progress_bars()
    # peft looks for the base's config on the hub to detect vocabulary changes at every save; the vocabulary
    # is fixed here, and saying so at each checkpoint of an offline run is noise.
    warnings.filterwarnings("ignore", message="Could not find a config file", module="peft")

    # 1. Output directory: refuse to clobber anything. Checked now, created (or emptied) only once data and
    #    model have loaded, so a run that fails validation leaves the directory as it was.
    output_dir = check_output_dir(cfg.output_dir, resume=resume, overwrite=overwrite, config_path=cfg.source)
    checkpoints_root = output_dir / CHECKPOINTS_DIR

    # 2. Device, dtype, attention, seed.
    device = modeling.device_type()
    dtype = modeling.resolve_dtype(cfg.model.dtype, device, cfg.model.quantization)
    if cfg.model.quantization and device != "cuda":
        raise ResourceError(
            f"model.quantization: {cfg.model.quantization} (QLoRA) needs a CUDA GPU and none is visible.",
            hint="run on a GPU machine, or --set model.quantization=null to train LoRA in bf16/fp32.",
        )
    attn = resolve_attn_implementation(cfg.model.attn_implementation, device)
    seed = int(cfg.training_config.get("seed", 42))
    set_seed(seed)

    # 3. Tokenizer and LoRA targets, checked against the real module names before any weights load.
    tokenizer = modeling.load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.token)
    model_config = modeling.load_model_config(cfg.model)
    lora_config = modeling.build_lora_config(cfg.peft_config, modeling.leaf_module_names(model_config))

    # 4. Data: validated, rendered with the Phi-3 template, assistant-only labels.
    fast_path = build_training_args(cfg, output_dir, device, dtype)
    args_dict, speed_notes = fast_path.args, fast_path.notes
    apply_patches(fast_path)
    max_length = int(args_dict.get("max_length") or 1024)
    data = prepare_datasets(cfg.data, tokenizer, max_length=max_length, seed=seed, base_dir=cfg.base_dir)
    for line in data.report.summary_lines():
        console.print(line)

    # 5. Model.
    console.print(f"model {cfg.model.name_or_path} on {device}, {str(dtype).replace('torch.', '')}, attention {attn}")
    for note in speed_notes:
        console.print(note)
    model = modeling.load_model(cfg.model, dtype=dtype, attn_implementation=attn, device=device, seed=seed)
    create_output_dir(output_dir, overwrite=overwrite)
    resume_from = None
    if resume:
        for path in remove_incomplete_checkpoints(checkpoints_root):
            console.print(f"[yellow]removed incomplete checkpoint {path.name}")
        resume_from = latest_complete_checkpoint(checkpoints_root)
        console.print(f"resuming from {resume_from}" if resume_from else "[yellow]no complete checkpoint: starting over")
    base_model_path = None
    if cfg.model.random_init is not None:
        base_dir = output_dir / BASE_MODEL_DIR
        if not (base_dir / "config.json").is_file():
            modeling.save_base_model(model, tokenizer, base_dir)
        base_model_path = str(base_dir)
    if cfg.model.quantization:
        checkpointing = bool(args_dict.get("gradient_checkpointing"))
        if attn == "varlen":
            # Keeps norms/embeddings in bf16 instead of peft's float32 upcast: 9.6k -> 14.5k tokens/s and
            # 7.8 -> 5.1 GiB on an H100, per-step losses within 0.012% (docs/benchmarks.md).
            model = prepare_kbit_model(model, checkpointing, args_dict.get("gradient_checkpointing_kwargs"))
        else:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)

    # 6. The loop: trl's SFTTrainer with our checkpointing, metrics file and progress display.
    if resume_from:
        data_fingerprint = data.report.to_dict().get("fingerprint")
        for change in resume_changes(output_dir / "run_config.yaml", cfg.to_dict(redact_secrets=True), data_fingerprint):
            console.print(f"[yellow]warning:[/] resuming with a changed setting: {change}", highlight=False)
    write_run_config(cfg, output_dir, device=device, attn=attn, dtype=dtype, data_info=data.report.to_dict())
    metrics_path = output_dir / "metrics.jsonl"
    try:
        trainer = Phi3Trainer(
            model=model,
            args=SFTConfig(**args_dict),
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=tokenizer,
            peft_config=lora_config,
            callbacks=[MetricsFileCallback(metrics_path), ProgressCallback(console)],
        )
    except ValueError as exc:  # trl/transformers/peft reject a value our schema let through
        raise UsageError(f"training_config / peft_config: {exc}") from exc
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback shows them instead
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    console.print(f"trainable LoRA parameters: {trainable:,}")
    with graceful_stop() as stop:
        trainer.add_callback(StopOnSignalCallback(stop, console))
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stop.requested:
        raise interrupted_error(trainer, stop, cfg.source, output_dir / CHECKPOINTS_DIR)

    # 7. Adapter (never with non-finite weights), eval metrics, report.
    adapter_dir = output_dir / ADAPTER_DIR
    trainer.check_finite_weights()
    save_adapter(trainer, tokenizer, adapter_dir, base_model_path)
    eval_metrics: dict[str, Any] = {}
    if data.eval is not None:
        # The trainer may have just evaluated at the final step; a second pass over a large eval set costs minutes.
        last = trainer.state.log_history[-2:] if trainer.state.log_history else []
        raw = next((row for row in last if "eval_loss" in row and row.get("step") == trainer.state.global_step), None)
        raw = raw or trainer.evaluate()
        loss = raw.get("eval_loss")
        eval_metrics = {
            "eval_loss": loss,
            "perplexity": math.exp(loss) if loss is not None and loss < 50 else None,
            "token_accuracy": raw.get("eval_mean_token_accuracy"),
            "n_samples": len(data.eval),
            "n_tokens": int(sum(sum(1 for t in row if t != -100) for row in data.eval["labels"])),
        }
        atomic_write_json(output_dir / "eval_metrics.json", eval_metrics)
    write_report(output_dir)

    metrics = read_metrics(metrics_path)
    rates = sorted(metrics.tokens_per_second)
    return TrainSummary(
        output_dir=output_dir,
        adapter_dir=adapter_dir,
        steps=trainer.state.global_step,
        first_loss=metrics.loss[0][1] if metrics.loss else None,
        final_loss=metrics.loss[-1][1] if metrics.loss else None,
        eval_metrics=eval_metrics,
        seconds=time.perf_counter() - started,
        tokens_per_second=rates[len(rates) // 2] if rates else None,
    )
