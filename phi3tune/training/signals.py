"""Graceful stop on SIGINT / SIGTERM: finish the current step, save a complete checkpoint, then exit 130 / 143.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM and wait a grace period; a Ctrl-C is a SIGINT.
The handler only sets a flag (nothing else is safe inside a signal handler); ``StopOnSignalCallback`` turns
the flag into ``should_save`` + ``should_training_stop`` at the next optimizer-step end. A second signal
aborts at once (``TrainingInterrupted``) — the atomic checkpoint writes keep what was saved before intact.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Iterator

from transformers import TrainerCallback

from phi3tune.training import distributed
from phi3tune.training.checkpoints import latest_complete_checkpoint
from phi3tune.errors import TrainingInterrupted
from phi3tune.model.artefacts import quoted

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The first SIGINT/SIGTERM received while armed (``signum`` is None until then)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        # Whether this process itself got the signal: under torchrun a request can come from another rank first
        # (sync_stop), and this rank's own copy of the same signal must not count as a second one.
        self.received = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        # The shell convention: 128 + signal number (SIGINT 130, SIGTERM 143).
        return 128 + (self.signum or 0)


@contextmanager
def _signal_handler(handle) -> Iterator[None]:
    """Install ``handle`` for SIGINT/SIGTERM within the block (only possible in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in _HANDLED}
    for sig in _HANDLED:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def graceful_stop(
    aborted: str = "stopped at once, without saving the current step.",
    hint: str = "the newest complete checkpoint is intact; --resume continues from it.",
) -> Iterator[StopRequest]:
    """Within the block, the first SIGINT/SIGTERM only records a stop request; a second one aborts.

    Args:
        aborted: What a second signal leaves behind, for its message.
        hint: What to do after a second signal.

    Outside the main thread (signal handlers cannot be installed there) the block runs unguarded.
    """
    request = StopRequest()

    def handle(signum: int, frame: FrameType | None) -> None:
        if request.received:  # the user insists: stop now; atomic saves keep what was saved whole
            raise TrainingInterrupted(f"{signal.Signals(signum).name} again: {aborted}", exit_code=128 + signum,
                                      hint=hint)
        request.received = True
        request.signum = request.signum or signum

    with _signal_handler(handle):
        yield request


@contextmanager
def stop_at_once(message: str, hint: str) -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM stop at once with ``message`` (for work that is safe to cut short)."""

    def handle(signum: int, frame: FrameType | None) -> None:
        raise TrainingInterrupted(f"{signal.Signals(signum).name}: {message}", exit_code=128 + signum, hint=hint)

    with _signal_handler(handle):
        yield


def sync_stop(request: StopRequest) -> None:
    """Under torchrun: make a signal received by any rank a stop request on every rank (a no-op alone)."""
    signum = distributed.max_over_ranks(request.signum or 0)
    if signum and not request.requested:
        request.signum = signum


class EvaluationStopped(Exception):
    """Raised out of an evaluation pass during training when a stop was requested (the pass is abandoned)."""


class StopOnSignalCallback(TrainerCallback):
    """At the end of the step in which a stop was requested, save a checkpoint and end training; during an
    evaluation pass, abandon the pass at the next batch (``EvaluationStopped``) so the save comes in seconds, not
    after the whole pass (a scheduler's grace period is often 30 s; an eval pass over a large set takes minutes)."""

    def __init__(self, request: StopRequest, console=None) -> None:
        self.request = request
        self.console = console
        self._announced = False

    def _announce(self, state) -> None:
        if not self._announced and self.console is not None:
            self.console.print(
                f"[yellow]{self.request.name} received: saving a checkpoint at step {state.global_step} "
                "and stopping (send it again to abort without saving)."
            )
            self._announced = True

    def on_step_end(self, args, state, control, **kwargs):
        sync_stop(self.request)  # every rank stops at the same step, whichever the launcher signalled first
        if self.request.requested:
            self._announce(state)
            control.should_save = True
            control.should_training_stop = True
            # Save first: a scheduler's grace period (often 30 s) is no time for an evaluation pass.
            control.should_evaluate = False
        return control

    def on_prediction_step(self, args, state, control, **kwargs):
        # Every rank leaves the pass at the same batch: one all-reduce a batch, where the eval loop already
        # gathers every batch (so every rank runs as many batches).
        sync_stop(self.request)
        if self.request.requested:
            self._announce(state)
            raise EvaluationStopped(f"{self.request.name} during the evaluation at step {state.global_step}")
        return control


def save_finished_step(trainer, checkpoints_root: Path) -> Path | None:
    """Checkpoint the last finished step unless the newest complete checkpoint is that step; return the newest."""
    step = trainer.state.global_step
    checkpoint = latest_complete_checkpoint(checkpoints_root)
    if step > 0 and (checkpoint is None or checkpoint.name != f"checkpoint-{step}"):
        trainer._save_checkpoint(trainer.model, None)
        checkpoint = latest_complete_checkpoint(checkpoints_root)
    return checkpoint


def interrupted_error(trainer, request: StopRequest, config_path: Path | None, checkpoints_root: Path) -> TrainingInterrupted:
    """After a stop request: make sure the last finished step is checkpointed, and say how to resume.

    Args:
        trainer: The Phi3Trainer whose ``train()`` just returned.
        request: The stop request (its signal decides the exit code).
        config_path: The run's config file, for the resume command.
        checkpoints_root: ``OUTPUT_DIR/checkpoints``.

    Returns:
        The TrainingInterrupted error to raise (exit 130 for SIGINT, 143 for SIGTERM).
    """
    step = trainer.state.global_step
    # A signal after the last step had ended was turned into a save by no step-end callback: saved here.
    checkpoint = save_finished_step(trainer, checkpoints_root)
    where = f"complete checkpoint saved: {checkpoint}" if checkpoint else "no step had finished; nothing to resume"
    output_dir = checkpoints_root.parent
    return TrainingInterrupted(
        f"{request.name}: training stopped at step {step}/{trainer.state.max_steps}; {where}.",
        exit_code=request.exit_code,
        hint=f"resume with: phi3tune train {quoted(config_path or 'CONFIG')} --output-dir {quoted(output_dir)} --resume"
        + (f" --nproc {trainer.args.world_size}" if trainer.args.world_size > 1 else "") + " (and the same --set options)",
    )
