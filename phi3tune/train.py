"""The training recipe, top to bottom.

    output dir -> seed -> tokenizer -> LoRA targets (checked before weights load) -> data ->
    model -> SFTTrainer -> train (or resume) -> adapter -> eval metrics -> report -> summary

Features: LoRA and QLoRA (nf4) through peft, trl's SFTTrainer as the loop, pre-tokenised Phi-3 chat data
with assistant-only labels, atomic resumable checkpoints, metrics.jsonl, run_config.yaml.
Limits: one process (multi-GPU launch through accelerate is not wired yet); random_init runs are for
demos and tests.
"""

from __future__ import annotations

import json
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

from phi3tune.model import loading
from phi3tune.errors import ResourceError, TrainingInterrupted, UsageError
from phi3tune.report import read_metrics, write_report
from phi3tune.fastpath import apply_patches, resolve_attn_implementation
from phi3tune.model.kbit import prepare_kbit_model
from phi3tune.training.arguments import build_training_args
from phi3tune.training.callbacks import MetricsFileCallback, ProgressCallback, TrainBeganCallback
from phi3tune.training.checkpoints import (
    CHECKPOINTS_DIR,
    atomic_write_json,
    atomic_write_text,
    settle_tree,
    latest_complete_checkpoint,
    resume_changes,
)
from phi3tune.training.integrity import folder_problem
from phi3tune.training.resume import ResumePlan, plan_resume
from phi3tune.training.run_folder import StagedRunFolder, check_output_dir, leftover_old_runs, write_marker
from phi3tune.training.run_lock import folder_lock
from phi3tune.training.signals import StopOnSignalCallback, graceful_stop, interrupted_error, stop_at_once

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
BASE_MODEL_DIR = "base_model"
# What a saved random_init base needs to load (a kill or full disk while the old non-atomic save ran left
# a 0-byte config.json).
BASE_MODEL_REQUIRED = ("config.json", "model*.safetensors", "tokenizer_config.json", "generation_config.json")


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
    already_finished: bool = False


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
    # Written beside, flushed and renamed into place: a crash mid-save never leaves a half adapter that loads.
    staging = adapter_dir.with_name(f".tmp-{adapter_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    loading.phi3_generation_config(model.config).save_pretrained(staging)
    settle_tree(staging)
    if adapter_dir.exists():
        old = adapter_dir.with_name(f".old-{adapter_dir.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(adapter_dir, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(staging, adapter_dir)


def _local_data_paths(cfg) -> list[Path]:
    """The run's local data files (resolved by the config loader); hub datasets have none."""
    paths = []
    for source in (cfg.data.train, cfg.data.eval):
        path = getattr(source, "path", None) if source is not None else None
        if path and "://" not in str(path):
            paths.append(Path(path))
    return paths


def run_training(cfg, *, resume: bool = False, overwrite: bool = False, console: Console | None = None) -> TrainSummary:
    """Train a LoRA/QLoRA adapter as described by ``cfg`` (a validated RunConfig).

    The output folder is checked before anything loads and locked for the whole run, so a second
    ``phi3tune train`` into it exits 2 naming this process.
    """
    console = console or Console(stderr=True)
    policy = dict(resume=resume, overwrite=overwrite, config_path=cfg.source, data_paths=_local_data_paths(cfg))
    output_dir = check_output_dir(cfg.output_dir, **policy)
    with folder_lock(output_dir, "train"):
        check_output_dir(output_dir, **policy)  # again under the lock: another process may have written it meanwhile
        for old in leftover_old_runs(output_dir):
            console.print(f"[yellow]warning:[/] {old} holds a run that an interrupted --overwrite moved aside; "
                          f"move it back over {output_dir} or delete it.", highlight=False)
        try:
            return _train_locked(cfg, output_dir, resume=resume, overwrite=overwrite, console=console)
        except PermissionError as exc:
            raise UsageError(
                f"permission denied: {exc.filename or output_dir} ({exc.strerror or exc}).",
                hint=f"fix the permissions, or choose an --output-dir you can write to (now {output_dir}).",
            ) from exc


def _already_finished(output_dir: Path, plan: ResumePlan, console: Console, started: float) -> TrainSummary:
    """--resume of a finished run: say so and leave every file as it is."""
    console.print(f"nothing to resume in {output_dir}: {plan.finished}. No file was changed.", highlight=False)
    console.print("to train further: --resume --set training_config.max_steps=N (more steps than now); to train "
                  "again from scratch: --overwrite", highlight=False)
    metrics = read_metrics(output_dir / "metrics.jsonl")
    eval_metrics: dict[str, Any] = {}
    eval_file = output_dir / "eval_metrics.json"
    if eval_file.is_file():
        try:
            eval_metrics = json.loads(eval_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            eval_metrics = {}
    return TrainSummary(
        output_dir=output_dir,
        adapter_dir=output_dir / ADAPTER_DIR,
        steps=plan.step or (metrics.loss[-1][0] if metrics.loss else 0),
        first_loss=metrics.loss[0][1] if metrics.loss else None,
        final_loss=metrics.loss[-1][1] if metrics.loss else None,
        eval_metrics=eval_metrics if isinstance(eval_metrics, dict) else {},
        seconds=time.perf_counter() - started,
        already_finished=True,
    )


def _ensure_base_model(model, tokenizer, base_dir: Path, console: Console) -> None:
    """Save a random_init run's base, or write it again when a kill or full disk left it damaged.

    The base is rebuilt from the seed, so a damaged copy is replaced by the same weights, before training:
    a resume must never train to the end and then fail to point the adapter at a base.
    """
    problem = folder_problem(base_dir, BASE_MODEL_REQUIRED) if base_dir.exists() else "missing"
    if problem is None:
        return
    if base_dir.exists():
        console.print(f"[yellow]warning:[/] {base_dir} is incomplete ({problem}); writing it again", highlight=False)
    loading.save_base_model(model, tokenizer, base_dir)


def _train_locked(cfg, output_dir: Path, *, resume: bool, overwrite: bool, console: Console) -> TrainSummary:
    from transformers import set_seed

    from phi3tune.data.prepare import prepare_datasets

    started = time.perf_counter()
    from transformers.utils import logging as hf_logging

    import datasets

    hf_logging.disable_progress_bar()  # our own progress display is the only one
    datasets.disable_progress_bars()
    # peft looks for the base's config on the hub to detect vocabulary changes at every save; the vocabulary
    # is fixed here, and saying so at each checkpoint of an offline run is noise.
    warnings.filterwarnings("ignore", message="Could not find a config file", module="peft")

    # 1. Output directory (checked and locked by the caller). What --resume continues from is decided now,
    #    before anything loads; nothing is written until data and model have loaded.
    checkpoints_root = output_dir / CHECKPOINTS_DIR
    plan = plan_resume(output_dir, cfg.training_config) if resume else None
    if plan is not None and plan.finished:
        return _already_finished(output_dir, plan, console, started)

    # 2. Device, dtype, attention, seed.
    device = loading.device_type()
    dtype = loading.resolve_dtype(cfg.model.dtype, device, cfg.model.quantization)
    if cfg.model.quantization and device != "cuda":
        raise ResourceError(
            f"model.quantization: {cfg.model.quantization} (QLoRA) needs a CUDA GPU and none is visible.",
            hint="run on a GPU machine, or --set model.quantization=null to train LoRA in bf16/fp32.",
        )
    attn = resolve_attn_implementation(cfg.model.attn_implementation, device)
    seed = int(cfg.training_config.get("seed", 42))
    set_seed(seed)

    # 3. Tokenizer and LoRA targets, checked against the real module names before any weights load.
    tokenizer = loading.load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.token)
    model_config = loading.load_model_config(cfg.model)
    lora_config = loading.build_lora_config(cfg.peft_config, loading.leaf_module_names(model_config))

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
    model = loading.load_model(cfg.model, dtype=dtype, attn_implementation=attn, device=device, seed=seed)

    # 6. The run folder: a new run's is staged (an --overwrite's old run moved aside) until trl has accepted
    #    the settings and training begins; any failure before that puts everything back as it was.
    staged = StagedRunFolder(output_dir, replace=overwrite) if plan is None else None
    if staged is not None:
        staged.create()
    else:
        write_marker(output_dir)  # a run made before the marker existed gets it now
    try:
        trainer, stop, base_model_path = _start_training(cfg, output_dir, plan, staged, model, tokenizer, lora_config,
                                                         data, args_dict, device=device, attn=attn, dtype=dtype,
                                                         console=console)
    except BaseException:
        if staged is not None and staged.rollback():
            console.print(f"[yellow]the previous run in {output_dir} was put back unchanged", highlight=False)
        raise
    if stop.requested:
        raise interrupted_error(trainer, stop, cfg.source, checkpoints_root)
    return _finish(cfg, output_dir, trainer, tokenizer, data, base_model_path, console, started)


def _start_training(cfg, output_dir: Path, plan: ResumePlan | None, staged: StagedRunFolder | None, model, tokenizer,
                    lora_config, data, args_dict: dict[str, Any], *, device: str, attn: str, dtype: torch.dtype,
                    console: Console):
    """Everything from the first write into the run folder to the end of ``trainer.train()``.

    Returns:
        ``(trainer, stop request, base model path or None)``.
    """
    from transformers import PrinterCallback
    from trl import SFTConfig

    from phi3tune.training.trainer import Phi3Trainer

    resume_from = None
    if plan is not None:
        plan.apply(console)
        resume_from = plan.checkpoint
        console.print(f"resuming from {resume_from}" if resume_from else "[yellow]no complete checkpoint: starting over")
    base_model_path = None
    if cfg.model.random_init is not None:
        base_dir = output_dir / BASE_MODEL_DIR
        _ensure_base_model(model, tokenizer, base_dir, console)
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

    # The loop: trl's SFTTrainer with our checkpointing, metrics file and progress display.
    if resume_from:
        data_fingerprint = data.report.to_dict().get("fingerprint")
        for change in resume_changes(output_dir / "run_config.yaml", cfg.to_dict(redact_secrets=True), data_fingerprint):
            console.print(f"[yellow]warning:[/] resuming with a changed setting: {change}", highlight=False)
    write_run_config(cfg, output_dir, device=device, attn=attn, dtype=dtype, data_info=data.report.to_dict())
    began = TrainBeganCallback(staged.commit if staged is not None else (lambda: None))
    try:
        trainer = Phi3Trainer(
            model=model,
            args=SFTConfig(**args_dict),
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=tokenizer,
            peft_config=lora_config,
            callbacks=[MetricsFileCallback(output_dir / "metrics.jsonl"), ProgressCallback(console), began],
        )
    except ValueError as exc:  # trl/transformers/peft reject a value our schema let through
        raise UsageError(f"training_config / peft_config: {exc}") from exc
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback shows them instead
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    console.print(f"trainable LoRA parameters: {trainable:,}")
    with graceful_stop() as stop:
        trainer.add_callback(StopOnSignalCallback(stop, console))
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except (TypeError, ValueError) as exc:
            if began.began:
                raise
            # Before the first step only the settings can be at fault (the optimizer or scheduler rejected one).
            raise UsageError(f"training_config: {exc}", hint="check optim, lr_scheduler_type and their *_kwargs.") from exc
    return trainer, stop, base_model_path


def _finish(cfg, output_dir: Path, trainer, tokenizer, data, base_model_path, console: Console,
            started: float) -> TrainSummary:
    """Adapter (never with non-finite weights), eval metrics, report; a signal here says what was kept."""
    adapter_dir = output_dir / ADAPTER_DIR
    step = trainer.state.global_step
    trainer.check_finite_weights()
    final = latest_complete_checkpoint(output_dir / CHECKPOINTS_DIR)
    if final is not None and final.name == f"checkpoint-{step}":
        lost_hint = (f"the final checkpoint {final.name} is complete: phi3tune train {cfg.source or 'CONFIG'} "
                     f"--output-dir {output_dir} --resume writes the adapter without training again.")
    else:
        lost_hint = "no checkpoint holds the final step; run the training again (--resume continues from the newest checkpoint)."
    # The save takes seconds: a first signal lets it finish, a second abandons it (the old adapter, if any, stays).
    with graceful_stop(aborted=f"stopped during the final save: training had finished at step {step}, and the "
                       f"adapter was not saved to {adapter_dir}.", hint=lost_hint) as stop:
        save_adapter(trainer, tokenizer, adapter_dir, base_model_path)
    next_steps = (f"phi3tune eval {output_dir} computes the eval metrics; phi3tune report {output_dir} draws the "
                  "report.")
    if stop.requested:
        raise TrainingInterrupted(
            f"{stop.name} during the final save: training finished at step {step} and the adapter was saved to "
            f"{adapter_dir}; the final evaluation and the report were skipped.",
            exit_code=stop.exit_code, hint=next_steps,
        )
    with stop_at_once(f"stopped after training: the adapter is saved to {adapter_dir} (step {step}); the final "
                      "evaluation and the report were not written.", hint=next_steps):
        eval_metrics = _final_eval(output_dir, trainer, data)
        write_report(output_dir)

    metrics = read_metrics(output_dir / "metrics.jsonl")
    rates = sorted(metrics.tokens_per_second)
    return TrainSummary(
        output_dir=output_dir,
        adapter_dir=adapter_dir,
        steps=step,
        first_loss=metrics.loss[0][1] if metrics.loss else None,
        final_loss=metrics.loss[-1][1] if metrics.loss else None,
        eval_metrics=eval_metrics,
        seconds=time.perf_counter() - started,
        tokens_per_second=rates[len(rates) // 2] if rates else None,
    )


def _final_eval(output_dir: Path, trainer, data) -> dict[str, Any]:
    if data.eval is None:
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
        "n_samples": len(data.eval),
        "n_tokens": int(sum(sum(1 for t in row if t != -100) for row in data.eval["labels"])),
    }
    atomic_write_json(output_dir / "eval_metrics.json", eval_metrics)
    return eval_metrics
