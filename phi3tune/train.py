"""``phi3tune train``: the recipe, top to bottom.

    check + lock the run folder -> (resume: what to continue from) -> device -> tokenizer + LoRA targets ->
    SFTConfig arguments and the fast path -> data -> model -> stage the run folder -> trl's SFTTrainer ->
    train -> adapter -> eval metrics -> report -> summary

LoRA and QLoRA (nf4) through peft, trl's SFTTrainer as the loop, pre-tokenised Phi-3 chat data with
assistant-only labels, atomic resumable checkpoints, metrics.jsonl, run_config.yaml.

Under torchrun / accelerate launch (``phi3tune train --nproc N`` starts torchrun) every rank runs this recipe;
rank 0 alone checks, locks and writes the run folder and tokenises the data (``training.distributed``), the
other ranks wait for it at barriers, and transformers' Trainer does DDP (or FSDP/DeepSpeed as configured).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from rich.console import Console
from transformers import PrinterCallback, set_seed
from transformers.utils import logging as hf_logging
from trl import SFTConfig

from phi3tune.config.schema import max_length_of
from phi3tune.errors import TrainingInterrupted, UsageError
from phi3tune.fastpath import FastPathPlan, apply_patches, unpatch_all
from phi3tune.fastpath.memory import shape_of
from phi3tune.model import loading
from phi3tune.model.artefacts import quoted
from phi3tune.model.kbit import prepare_kbit_model
from phi3tune.report import RunSummary, summarize_run, write_report
from phi3tune.training.adapter import final_eval_metrics, save_adapter
from phi3tune.training.arguments import build_training_args
from phi3tune.training.callbacks import MetricsFileCallback, ProgressCallback, TrainBeganCallback
from phi3tune.data.prepare import prepare_datasets
from phi3tune.training.checkpoints import latest_complete_checkpoint, read_previous_run_config, resume_changes
from phi3tune.training import distributed
from phi3tune.training.layout import ADAPTER_DIR, BASE_MODEL_DIR, CHECKPOINTS_DIR, METRICS, RUN_CONFIG
from phi3tune.training.resume import ResumePlan, plan_resume
from phi3tune.training.run_folder import StagedRunFolder, check_output_dir, leftover_old_runs, write_marker
from phi3tune.training.run_lock import folder_lock
from phi3tune.training.run_record import write_run_config
from phi3tune.training.signals import (EvaluationStopped, StopOnSignalCallback, graceful_stop, interrupted_error,
                                       save_finished_step, stop_at_once, sync_stop)
from phi3tune.training.trainer import Phi3Trainer


@dataclass
class Setup:
    """What the steps before the loop resolved: device, dtype, tokenizer, LoRA config and the fast-path plan."""

    device: str
    dtype: torch.dtype
    tokenizer: Any
    lora_config: Any
    fast_path: FastPathPlan


def run_training(cfg, *, resume: bool = False, overwrite: bool = False, console: Console | None = None) -> RunSummary:
    """Train a LoRA/QLoRA adapter as described by ``cfg`` (a validated RunConfig).

    The output folder is checked before anything loads and locked for the whole run, so a second
    ``phi3tune train`` into it exits 2 naming this process. Every fast-path patch is undone at the end.
    """
    console = console or Console(stderr=True)
    distributed.init(loading.device_type())
    if not distributed.is_main():
        # Rank 0 checks and locks the folder; a failure there ends this rank through the launcher.
        console = Console(stderr=True, quiet=True)
        try:
            return _recipe(cfg, Path(cfg.output_dir).expanduser().resolve(), resume=resume, overwrite=overwrite, console=console)
        finally:
            unpatch_all()
    rules = dict(resume=resume, overwrite=overwrite, config_path=cfg.source, data_paths=[path for _, path in cfg.local_data_files()])
    output_dir = check_output_dir(cfg.output_dir, **rules)
    with folder_lock(output_dir, "train"):
        check_output_dir(output_dir, **rules)  # again under the lock: another process may have written it meanwhile
        for old in leftover_old_runs(output_dir):
            console.print(f"[yellow]warning:[/] {old} holds a run that an interrupted --overwrite moved aside; "
                          f"move it back over {output_dir} or delete it.", highlight=False)
        try:
            return _recipe(cfg, output_dir, resume=resume, overwrite=overwrite, console=console)
        except PermissionError as exc:
            raise UsageError(
                f"permission denied: {exc.filename or output_dir} ({exc.strerror or exc}).",
                hint=f"fix the permissions, or choose an --output-dir you can write to (now {output_dir}).",
            ) from exc
        finally:
            unpatch_all()


def _recipe(cfg, output_dir: Path, *, resume: bool, overwrite: bool, console: Console) -> RunSummary:
    started = time.perf_counter()
    _quiet_libraries()
    distributed.barrier()  # rank 0 has checked and locked the run folder

    # 1. What --resume continues from, decided before anything loads (by rank 0); a finished run is left as it is.
    plan = plan_resume(output_dir, cfg.training_config) if resume and distributed.is_main() else None
    plan = distributed.broadcast(plan)
    if plan is not None and plan.finished:
        return _already_finished(output_dir, plan, console, started)

    # 2. Device, tokenizer, LoRA targets (checked against the real module names), SFTConfig arguments.
    setup = _setup(cfg, output_dir)
    apply_patches(setup.fast_path)

    # 3. Data: validated, rendered with the Phi-3 template, assistant-only labels.
    #    Once, by rank 0; the other ranks load its result (the Trainer's sampler gives each rank its shard).
    data = distributed.share_prepared_data(output_dir, lambda: prepare_datasets(
        cfg.data, setup.tokenizer, max_length=int(setup.fast_path.args["max_length"]), seed=cfg.seed,
        base_dir=cfg.base_dir))
    for line in data.report.summary_lines():
        console.print(line)

    # 4. Model.
    console.print(f"model {cfg.model.name_or_path} on {setup.device}, {str(setup.dtype).replace('torch.', '')}, "
                  f"attention {setup.fast_path.attn}")
    for note in setup.fast_path.notes:
        console.print(note)
    model = loading.load_model(cfg.model, dtype=setup.dtype, attn_implementation=setup.fast_path.attn,
                               device=setup.device, seed=cfg.seed, sharded=setup.fast_path.sharded)

    # 5. The run folder: a new run's is staged (an --overwrite's old run moved aside) until trl has accepted
    #    the settings and training begins; any failure before that puts everything back as it was.
    staged = StagedRunFolder(output_dir, replace=overwrite) if plan is None and distributed.is_main() else None
    with distributed.main_does_it() as mine:
        if staged is not None:
            staged.create()
        elif mine:
            write_marker(output_dir)  # a run made before the marker existed gets it now
    try:
        trainer, stop, base_model_path = _train(cfg, output_dir, plan, staged, model, data, setup, console)
    except BaseException:
        if staged is not None and staged.rollback():
            console.print(f"[yellow]the previous run in {output_dir} was put back unchanged", highlight=False)
        raise
    sync_stop(stop)  # a signal after the last step may have reached some ranks only
    if stop.requested:
        raise interrupted_error(trainer, stop, cfg.source, output_dir / CHECKPOINTS_DIR)

    # 6. Adapter, eval metrics, report, summary.
    return _finish(cfg, output_dir, trainer, setup.tokenizer, data, base_model_path, console, started)


def _quiet_libraries() -> None:
    hf_logging.disable_progress_bar()  # our own progress display is the only one
    datasets.disable_progress_bars()
    # peft looks for the base's config on the hub to detect vocabulary changes at every save; the vocabulary
    # is fixed here, and saying so at each checkpoint of an offline run is noise.
    warnings.filterwarnings("ignore", message="Could not find a config file", module="peft")


def _setup(cfg, output_dir: Path) -> Setup:
    device = loading.device_type()
    dtype = loading.resolve_dtype(cfg.model.dtype, device, cfg.model.quantization)
    loading.require_device_for(cfg.model.quantization, device)
    set_seed(cfg.seed)
    tokenizer = loading.load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.token)
    model_config = loading.load_model_config(cfg.model)
    lora_config = loading.build_lora_config(cfg.peft_config, loading.leaf_module_names(model_config))
    trainable, total = loading.estimate_lora_parameters(model_config, lora_config)
    fast_path = build_training_args(cfg, output_dir, device, dtype,
                                    shape=shape_of(model_config, trainable=trainable, total=total))
    return Setup(device, dtype, tokenizer, lora_config, fast_path)


def _already_finished(output_dir: Path, plan: ResumePlan, console: Console, started: float) -> RunSummary:
    """--resume of a finished run: say so and leave every file as it is."""
    console.print(f"nothing to resume in {output_dir}: {plan.finished}. No file was changed.", highlight=False)
    console.print("to train further: --resume --set training_config.max_steps=N (more steps than now); to train "
                  "again from scratch: --overwrite", highlight=False)
    return summarize_run(output_dir, steps=plan.step or None, seconds=time.perf_counter() - started,
                         already_finished=True)


def _train(cfg, output_dir: Path, plan: ResumePlan | None, staged: StagedRunFolder | None, model, data, setup: Setup,
           console: Console):
    """Everything from the first write into the run folder to the end of ``trainer.train()``.

    Returns:
        ``(trainer, stop request, base model path or None)``.
    """
    args = setup.fast_path.args
    resume_from = None
    if plan is not None:
        with distributed.main_does_it() as mine:
            if mine:
                plan.apply(console)
        resume_from = plan.checkpoint
        console.print(f"resuming from {resume_from}" if resume_from else "[yellow]no complete checkpoint: starting over")
    base_model_path = None
    if cfg.model.random_init is not None:
        base_dir = output_dir / BASE_MODEL_DIR
        # Rebuilt from the seed, so a damaged copy is replaced by the same weights before training: a resume
        # must never train to the end and then fail to point the adapter at a base.
        problem = loading.base_model_problem(base_dir)
        if problem not in (None, "missing"):
            console.print(f"[yellow]warning:[/] {base_dir} is incomplete ({problem}); writing it again", highlight=False)
        if problem and distributed.is_main():
            loading.save_base_model(model, setup.tokenizer, base_dir)
        base_model_path = str(base_dir)
    if cfg.model.quantization:
        checkpointing = bool(args.get("gradient_checkpointing"))
        if setup.fast_path.kbit_prepare:
            model = prepare_kbit_model(model, checkpointing, args.get("gradient_checkpointing_kwargs"))
        else:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if resume_from and distributed.is_main():
        data_fingerprint = data.report.to_dict().get("fingerprint")
        for change in resume_changes(output_dir / RUN_CONFIG, cfg.to_dict(redact_secrets=True), data_fingerprint):
            console.print(f"[yellow]warning:[/] resuming with a changed setting: {change}", highlight=False)
    parallel = distributed.layout(args, setup.device)
    if resume_from and distributed.is_main():
        moved = distributed.world_size_change(read_previous_run_config(output_dir / RUN_CONFIG), parallel)
        if moved:
            console.print(f"[yellow]warning:[/] {moved}", highlight=False)
    if distributed.is_main():
        write_run_config(cfg, output_dir, device=setup.device, attn=setup.fast_path.attn, dtype=setup.dtype,
                         data_info=data.report.to_dict(), parallel=parallel)
    note = distributed.strategy_note(args, setup.device)
    if note:
        console.print(f"[yellow]warning:[/] {note}", highlight=False)
    began = TrainBeganCallback(staged.commit if staged is not None else (lambda: None))
    progress = ProgressCallback(console)
    try:
        trainer = Phi3Trainer(
            model=model,
            args=SFTConfig(**distributed.trainer_kwargs(args, setup.device)),
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=setup.tokenizer,
            peft_config=setup.lora_config,
            callbacks=[MetricsFileCallback(output_dir / METRICS), progress, began],
        )
    except ValueError as exc:  # trl/transformers/peft reject a value our schema let through
        raise UsageError(f"training_config / peft_config: {exc}") from exc
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback shows them instead
    if cfg.model.base_precision == "fp8":
        # trl's SFTTrainer wraps the model with peft in its constructor; the optimizer and DDP come in train().
        from phi3tune.fastpath.fp8_base import convert_lora_bases  # imported only for fp8 runs

        console.print(convert_lora_bases(trainer.model).summary(), highlight=False)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    console.print(f"trainable LoRA parameters: {trainable:,}")
    graphs = None
    if setup.fast_path.cuda_graphs:
        from phi3tune.fastpath import cuda_graphs  # imported only where a GPU run plans them

        graphs, line = cuda_graphs.install_for_trainer(trainer, int(args["per_device_train_batch_size"]),
                                                       max_length_of(args))
        console.print(line, highlight=False)
    with graceful_stop() as stop:
        on_signal = StopOnSignalCallback(stop, console)
        trainer.add_callback(on_signal)
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except EvaluationStopped:
            # A signal during an evaluation pass: the step before it is saved here, where a second signal still
            # aborts with a message; the caller then says how to resume.
            save_finished_step(trainer, output_dir / CHECKPOINTS_DIR)
        except (TypeError, ValueError) as exc:
            if began.began:
                raise
            # Before the first step only the settings can be at fault (the optimizer or scheduler rejected one).
            raise UsageError(f"training_config: {exc}", hint="check optim, lr_scheduler_type and their *_kwargs.") from exc
        finally:
            progress.on_train_end(trainer.args, trainer.state, trainer.control)  # also when train() raised
            trainer.remove_callback(on_signal)  # the final evaluation needs no per-batch stop check
            if graphs is not None:
                graphs.release()  # the layers' own forwards again, and the graphs' memory back
                trainer.train_collator = None
                console.print(graphs.summary(), highlight=False)
    return trainer, stop, base_model_path


def _finish(cfg, output_dir: Path, trainer, tokenizer, data, base_model_path, console: Console,
            started: float) -> RunSummary:
    """Adapter (never with non-finite weights), eval metrics, report; a signal here says what was kept."""
    adapter_dir = output_dir / ADAPTER_DIR
    step = trainer.state.global_step
    trainer.check_finite_weights()
    final = latest_complete_checkpoint(output_dir / CHECKPOINTS_DIR)
    if final is not None and final.name == f"checkpoint-{step}":
        lost_hint = (f"the final checkpoint {final.name} is complete: phi3tune train {quoted(cfg.source or 'CONFIG')} "
                     f"--output-dir {quoted(output_dir)} --resume writes the adapter without training again.")
    else:
        lost_hint = "no checkpoint holds the final step; run the training again (--resume continues from the newest checkpoint)."
    # The save takes seconds: a first signal lets it finish, a second abandons it (the old adapter, if any, stays).
    with graceful_stop(aborted=f"stopped during the final save: training had finished at step {step}, and the "
                       f"adapter was not saved to {adapter_dir}.", hint=lost_hint) as stop:
        state_dict = trainer.adapter_state_dict()  # FSDP2: every rank gathers its shards; else None
        with distributed.main_does_it() as mine:
            if mine:
                save_adapter(trainer, tokenizer, adapter_dir, base_model_path, state_dict)
    next_steps = (f"phi3tune eval {quoted(output_dir)} computes the eval metrics; phi3tune report {quoted(output_dir)} draws the "
                  "report.")
    if stop.requested:
        raise TrainingInterrupted(
            f"{stop.name} during the final save: training finished at step {step} and the adapter was saved to "
            f"{adapter_dir}; the final evaluation and the report were skipped.",
            exit_code=stop.exit_code, hint=next_steps,
        )
    with stop_at_once(f"stopped after training: the adapter is saved to {adapter_dir} (step {step}); the final "
                      "evaluation and the report were not written.", hint=next_steps):
        final_eval_metrics(output_dir, trainer, data.eval)  # every rank evaluates its shard; rank 0 writes
        with distributed.main_does_it() as mine:
            if mine:
                write_report(output_dir)
    return summarize_run(output_dir, steps=step, seconds=time.perf_counter() - started)

