"""SFTTrainer with phi3tune's checkpoint guarantees: atomic, pickle-free, finite, exactly resumable.

- Checkpoints are written to a staging folder, flushed, renamed into place and only then marked complete.
- Optimizer, scheduler, grad-scaler and RNG states are safetensors + JSON (``phi3tune.training.safe_state``), not the
  ``torch.save`` pickles transformers writes; ``training_args.bin`` becomes ``training_args.json``.
- A non-finite loss or gradient norm stops the run at that step (``NonFiniteLossError``), and no checkpoint
  is written while any trainable weight or optimizer moment is non-finite.
- The cumulative token count (trl resets it on every ``train()``) is saved and restored with the checkpoint,
  so metrics.jsonl reads as one run across resumes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from trl import SFTTrainer

from phi3tune.fastpath.static_batches import PADDING_KEY
from phi3tune.training import distributed, sharded
from phi3tune.training.atomic import STAGING_PREFIX, atomic_write_text, publish_folder
from phi3tune.training.checkpoints import complete_checkpoints, mark_complete
from phi3tune.training.finite_watch import FiniteWatch
from phi3tune.errors import NonFiniteLossError
from phi3tune.training.resources import nonfinite_hints
from phi3tune.training.safe_state import has_state, load_state, save_state

OPTIMIZER_STATE = "optimizer"
SCHEDULER_STATE = "scheduler"
SCALER_STATE = "scaler"
RUN_STATE_FILE = "phi3tune_state.json"


class Phi3Trainer(SFTTrainer):
    """trl's SFTTrainer, with checkpoints that are atomic, pickle-free, finite and exactly resumable.

    A crash or kill in the middle of a save leaves at most a ``.tmp-*`` folder, which resume ignores and
    removes; the previous complete checkpoint is untouched. Under torchrun every rank writes its own RNG state
    and rank 0 publishes the checkpoint after a barrier. Under FSDP2 the adapter and optimizer state are gathered
    from the ranks' shards first (``training.sharded``), so the files are the same as DDP's. DeepSpeed's state
    format is not rewritten: that path falls back to transformers' own files.
    """

    _flops_parameter_count: int | None = None

    def floating_point_ops(self, inputs) -> int:
        """transformers' estimate (6 x tokens x non-embedding parameters), with the parameter count cached.

        The stock method recounts the parameters after every micro-batch, walking all ~700 tensors of a
        PEFT-wrapped Phi-3-mini: 2.6 ms on a CPU core here, a 7.8 ms GPU-idle gap a step in the H100 profile
        (docs/benchmarks.md). The count cannot change during training.
        """
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flops_parameter_count is None:
            self._flops_parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flops_parameter_count

    # Set by CUDA graphs (fastpath/cuda_graphs.py): the collator of the training dataloader only.
    train_collator = None

    def get_train_dataloader(self):
        if self.train_collator is None:
            return super().get_train_dataloader()
        shared, self.data_collator = self.data_collator, self.train_collator
        try:
            return super().get_train_dataloader()  # the DataLoader keeps the collator it was built with
        finally:
            self.data_collator = shared

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """trl's loss; pad tokens the CUDA-graph collator appended are kept out of the model and the token count."""
        padding = inputs.pop(PADDING_KEY, 0)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if padding and model.training:
            # trl counted the padded row, in its total and in the metric it logs (one process: graphs' condition)
            self._total_train_tokens -= padding
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result

    # ---- resume -------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """Train, restoring phi3tune's own run state (the cumulative token count) when resuming."""
        if resume_from_checkpoint:
            run_state = Path(resume_from_checkpoint) / RUN_STATE_FILE
            if run_state.is_file():
                self._total_train_tokens = int(json.loads(run_state.read_text())["total_train_tokens"])
        self.finite_watch = FiniteWatch()  # nothing left over from an earlier train() on this trainer
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self._raise_if_nonfinite(wait=True)  # a last step's verdict that no save or log waited for
        return result

    def _run_epoch(self, *args, **kwargs):
        # max_steps is a hard stop. transformers only checks it after a step, and a run resumed at (or past) its
        # last step still enters the epoch that step ended in: max_steps 4 with 3 steps an epoch trained step 5.
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    # ---- non-finite guard ---------------------------------------------------------------------------------

    finite_watch: FiniteWatch  # set by train(): a fresh one each call

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.finite_watch.add_loss(loss)  # read back later, without stalling the GPU (training.finite_watch)
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, *args, **kwargs) -> None:
        # Called after every optimizer step (and again at an epoch's end), before logging and saving: the
        # earliest point to stop cleanly. A verdict is waited for only where something is about to be written.
        watch, control = self.finite_watch, self.control
        if watch.last_step != self.state.global_step:
            watch.end_step(self.state.global_step, grad_norm, self.accelerator.optimizer_step_was_skipped)
        writes = control.should_log or control.should_save or control.should_evaluate
        self._raise_if_nonfinite(wait=writes or control.should_training_stop)
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kwargs)

    def _raise_if_nonfinite(self, *, wait: bool) -> None:
        problem = self.finite_watch.first_problem(wait=wait)
        if problem is not None:
            what, step = problem
            raise self._nonfinite_error(f"{what} became non-finite at step {step}")

    def _nonfinite_error(self, what: str) -> NonFiniteLossError:
        hints = nonfinite_hints(self.args)
        saved = complete_checkpoints(Path(self.args.output_dir))
        text = f"training diverged: {what}; stopped without saving it."
        text += "\n  try one of:\n" + "\n".join(f"    - {h}" for h in hints)
        hint = (f"the newest complete checkpoint ({saved[-1].name}) predates the divergence; --resume continues "
                "from it." if saved else "no checkpoint was saved before the divergence; start the run again.")
        return NonFiniteLossError(text, hint=hint)

    def check_finite_weights(self) -> None:
        """Raise NonFiniteLossError if any trainable weight or optimizer moment is NaN/inf (before any save).

        Under FSDP2 each rank sees only its shards: the ranks agree on the first problem, so all raise together.
        """
        problem = self._first_nonfinite()
        if sharded.is_fsdp2(self):
            problem = distributed.first_over_ranks(problem)
        if problem:
            raise self._nonfinite_error(f"{problem} at step {self.state.global_step}")

    def _first_nonfinite(self) -> str | None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and not bool(torch.isfinite(sharded.local(param.detach())).all()):
                return f"weight {name} holds NaN/inf"
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for key, value in state.items():
                    if torch.is_tensor(value) and value.is_floating_point() and not bool(
                            torch.isfinite(sharded.local(value)).all()):
                        return f"optimizer state {key} holds NaN/inf"
        return None

    # ---- atomic checkpoints -------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        self.check_finite_weights()
        root = Path(self.args.output_dir)
        step = self.state.global_step
        staging = root / f"{STAGING_PREFIX}checkpoint-{step}"
        writer = self.is_world_process_zero()
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier()  # no rank writes its part into a staging folder rank 0 is still clearing
        final = root / f"checkpoint-{step}"
        limit = self.args.save_total_limit
        self.args.output_dir, self.args.save_total_limit = str(staging), None
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its own rng_state_<rank>
        finally:
            self.args.output_dir, self.args.save_total_limit = str(root), limit
        # Complete only when every rank's part is on disk: rank 0 publishes after all have written.
        distributed.barrier()
        if writer:
            written = staging / f"checkpoint-{step}"
            atomic_write_text(written / RUN_STATE_FILE,
                              json.dumps({"total_train_tokens": int(self._total_train_tokens)}))
            publish_folder(written, final)  # the same step saved twice (a stop request on a save step) replaces it
            shutil.rmtree(staging, ignore_errors=True)
            mark_complete(final, step)
        if self.state.best_model_checkpoint and str(staging) in self.state.best_model_checkpoint:
            self.state.best_model_checkpoint = str(final)
        if writer:
            self._rotate_complete_checkpoints(root, limit)
        distributed.barrier()  # every rank sees the published checkpoint before going on

    def _rotate_complete_checkpoints(self, root: Path, limit: int | None) -> None:
        if not limit or limit <= 0:
            return
        keep = complete_checkpoints(root)
        best = self.state.best_model_checkpoint
        removable = [p for p in keep if str(p) != best]
        for path in removable[: max(0, len(keep) - limit)]:
            shutil.rmtree(path, ignore_errors=True)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP2: the adapter gathered from the shards (transformers would gather the whole base, or
        with SHARDED_STATE_DICT save no model at all), written by rank 0 like a one-process run's."""
        if not sharded.is_fsdp2(self):
            return super().save_model(output_dir, _internal_call)
        state_dict = self.adapter_state_dict()
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)
        return None

    def adapter_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The trainable weights in full for ``save_pretrained(state_dict=...)`` under FSDP2 (a collective: every
        rank calls it; rank 0 gets the tensors); None otherwise (the model's own weights are whole)."""
        return sharded.trainable_state_dict(self.model) if sharded.is_fsdp2(self) else None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not sharded.is_fsdp2(self):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        sharded.load_adapter_weights(model if model is not None else self.model, Path(resume_from_checkpoint))
        return None

    def _load_best_model(self) -> None:
        if not sharded.is_fsdp2(self):
            return super()._load_best_model()
        sharded.load_adapter_weights(self.model, Path(self.state.best_model_checkpoint))
        return None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Model (safetensors) and tokenizer, and the training arguments as JSON instead of a pickle."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        atomic_write_text(Path(output_dir) / "training_args.json", self.args.to_json_string())

    # ---- pickle-free optimizer / scheduler / scaler / RNG state ------------------------------------------

    def _uses_foreign_state(self) -> bool:
        # DeepSpeed (and FSDP1, which the config refuses) write their own sharded formats; FSDP2's is gathered.
        return bool(self.is_deepspeed_enabled or (self.is_fsdp_enabled and not sharded.is_fsdp2(self)))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._uses_foreign_state():
            return super()._save_optimizer_and_scheduler(output_dir)
        gathered = sharded.optimizer_state_dict(self.model, self.optimizer) if sharded.is_fsdp2(self) else None
        if self.args.should_save:
            save_state(gathered if gathered is not None else self.optimizer.state_dict(), output_dir, OPTIMIZER_STATE)
            save_state(self.lr_scheduler.state_dict(), output_dir, SCHEDULER_STATE)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or self._uses_foreign_state() or not has_state(checkpoint, OPTIMIZER_STATE):
            return super()._load_optimizer_and_scheduler(checkpoint)
        state = load_state(checkpoint, OPTIMIZER_STATE)
        if sharded.is_fsdp2(self):
            sharded.load_optimizer_state(self.model, self.optimizer, state)
        else:
            self.optimizer.load_state_dict(state)
        self.lr_scheduler.load_state_dict(load_state(checkpoint, SCHEDULER_STATE))

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            save_state(scaler.state_dict(), output_dir, SCALER_STATE)

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is None or scaler is None or not has_state(checkpoint, SCALER_STATE):
            return super()._load_scaler(checkpoint)
        scaler.load_state_dict(load_state(checkpoint, SCALER_STATE))

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _save_rng_state(self, output_dir: str) -> None:
        states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.random.get_rng_state()
        save_state(states, output_dir, self._rng_name())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not has_state(checkpoint, self._rng_name()):
            return super()._load_rng_state(checkpoint)
        states = load_state(checkpoint, self._rng_name())
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.random.set_rng_state(states["cuda"])

