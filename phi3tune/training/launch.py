"""``phi3tune train CONFIG --nproc N``: start N ranks on this machine through torchrun's own Python API.

The same as ``torchrun --standalone --nproc_per_node N -m phi3tune train CONFIG ...``: torch's elastic agent
starts, watches and stops the workers (a worker that fails ends the others; a SIGTERM/SIGINT to this process
is passed on to every rank, which save one checkpoint and stop). This module only turns the outcome into
phi3tune's exit codes and one message naming the failing rank.
"""

from __future__ import annotations

import os
import signal
from typing import Sequence

import torch

from phi3tune.errors import Phi3TuneError, TrainingInterrupted, UsageError


class WorkerFailed(Phi3TuneError):
    """A rank ended with an error; its own message was printed above. Exit code: that rank's."""

    def __init__(self, message: str, exit_code: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


def resolve_nproc(value: str) -> int:
    """``auto`` = the visible GPUs (1 without any); else a positive integer, at most one per visible GPU.

    Raises:
        UsageError: Neither ``auto`` nor a positive integer, or more processes than visible GPUs (NCCL runs one
            rank per GPU; on a machine without GPUs the ranks are CPU processes and any number works).
    """
    gpus = torch.cuda.device_count()
    if value.strip().lower() == "auto":
        return max(1, gpus)
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"--nproc {value!r}: expected a positive number of processes or 'auto'.",
                         hint="e.g. --nproc 2, or --nproc auto for one process per visible GPU.")
    if gpus and n > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UsageError(f"--nproc {n}: only {gpus} GPU{'s' if gpus > 1 else ''} visible"
                         + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                         + "; each rank needs a GPU of its own.",
                         hint=f"--nproc {gpus} (or --nproc auto), or make more GPUs visible.")
    return n


def in_launched_worker() -> bool:
    """True inside a rank that torchrun / accelerate launch started (it must not launch again)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_workers(nproc: int, argv: Sequence[str]) -> None:
    """Run ``python -m phi3tune ARGV`` as ``nproc`` ranks under torchrun (standalone rendezvous) and wait.

    Raises:
        TrainingInterrupted: This launcher got SIGINT/SIGTERM (exit 130/143) after the ranks stopped.
        WorkerFailed: A rank failed; exit code = that rank's (2 usage, 3 resources, 1 internal).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # On a CPU each rank would otherwise use every core, and N ranks fight over them.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = parse_args(["--standalone", "--nproc_per_node", str(nproc), "--max_restarts", "0",
                       "-m", "phi3tune", *argv])
    try:
        run(args)
    except SignalException as exc:
        signum = int(exc.sigval)
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name}: all {nproc} ranks were asked to stop (each saves a checkpoint at "
            "the same step first; see their messages above).",
            exit_code=128 + signum, hint="resume with the same command and --resume") from exc
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        code = 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signal number
        raise WorkerFailed(f"rank {rank} of {nproc} failed (exit {code}); the other ranks were stopped.",
                           exit_code=code if code in (2, 3, 130, 143) else 1,
                           hint=f"its message is above, prefixed 'rank {rank}:'.") from exc
