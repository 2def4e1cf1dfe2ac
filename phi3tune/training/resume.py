"""What ``--resume`` continues from, decided before any data or weights load.

- The newest complete checkpoint that is whole; a damaged newer one is set aside with a warning (or, with
  no whole one left, exit 2 naming what to delete).
- Never a checkpoint holding pickle files unless the user opted in (``PHI3TUNE_ALLOW_PICKLE=1``): phi3tune
  writes none, so they come from elsewhere and ``torch.load`` could run their code.
- A run that already finished (adapter saved, last step reached) is left untouched: nothing to resume.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from phi3tune.training.checkpoints import (
    complete_checkpoints,
    incomplete_checkpoints,
    read_previous_run_config,
)
from phi3tune.errors import UsageError
from phi3tune.training.layout import ADAPTER_DIR, CHECKPOINTS_DIR, RUN_CONFIG
from phi3tune.model.artefacts import folder_problem
from phi3tune.model.targets import ALLOW_PICKLE_ENV, pickle_allowed

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
# What a phi3tune checkpoint cannot resume without (the weights may be a pickle only with the opt-in).
CHECKPOINT_REQUIRED = ("trainer_state.json", "adapter_config.json", "adapter_model.*", "optimizer.*", "scheduler.*")
CORRUPT_PREFIX = "corrupt-"


@dataclass
class ResumePlan:
    """The outcome of looking at a run folder before resuming it.

    Attributes:
        checkpoint: The checkpoint to resume from; None to start over.
        incomplete: Half-written checkpoints, removed by ``apply``.
        corrupt: Complete-but-damaged checkpoints newer than ``checkpoint`` with what is wrong, set aside by
            ``apply``.
        finished: Why there is nothing to resume (the run already finished), else None.
        step: The checkpoint's global step (0 without one).
    """

    checkpoint: Path | None
    incomplete: list[Path] = field(default_factory=list)
    corrupt: list[tuple[Path, str]] = field(default_factory=list)
    finished: str | None = None
    step: int = 0

    def apply(self, console: Console) -> None:
        """Remove the incomplete checkpoints and set the damaged ones aside (kept, under a name resume skips)."""
        for path in self.incomplete:
            shutil.rmtree(path, ignore_errors=True)
            console.print(f"[yellow]removed incomplete checkpoint {path.name}", highlight=False)
        for path, problem in self.corrupt:
            aside = path.with_name(CORRUPT_PREFIX + path.name)
            os.replace(path, aside)
            console.print(f"[yellow]warning:[/] {path.name} is damaged ({problem}); moved it to {aside.name} and "
                          f"resuming from the previous complete checkpoint", highlight=False)


def _refuse_pickles(checkpoint: Path) -> None:
    pickles = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickles and not pickle_allowed():
        raise UsageError(
            f"--resume: {pickles[0]} is a pickle file (phi3tune's checkpoints hold none; loading it can run "
            "arbitrary code).",
            hint=f"set {ALLOW_PICKLE_ENV}=1 if you trust where it came from, or delete {checkpoint} to resume "
            "from the previous checkpoint.",
        )


def _planned_end(checkpoint_state: dict[str, Any], training_config: dict[str, Any]) -> int:
    """The step this run ends at: max_steps when set, else the plan the checkpoint recorded (epoch-based)."""
    max_steps = int(training_config.get("max_steps", -1) or -1)
    return max_steps if max_steps > 0 else int(checkpoint_state.get("max_steps") or 0)


def plan_resume(output_dir: Path, training_config: dict[str, Any]) -> ResumePlan:
    """Look at ``output_dir`` (a phi3tune run) and decide what ``--resume`` does; changes nothing.

    Raises:
        UsageError: run_config.yaml is damaged, the checkpoint to resume holds pickles without the opt-in, or
            every complete checkpoint is damaged.
    """
    read_previous_run_config(output_dir / RUN_CONFIG)  # damaged: exit 2 now, not after the model loads
    root = output_dir / CHECKPOINTS_DIR
    plan = ResumePlan(checkpoint=None, incomplete=incomplete_checkpoints(root))
    for checkpoint in reversed(complete_checkpoints(root)):
        _refuse_pickles(checkpoint)
        problem = folder_problem(checkpoint, CHECKPOINT_REQUIRED)
        if problem is None:
            plan.checkpoint = checkpoint
            break
        plan.corrupt.append((checkpoint, problem))
    if plan.corrupt and plan.checkpoint is None:
        listed = "; ".join(f"{path} ({problem})" for path, problem in plan.corrupt)
        raise UsageError(
            f"--resume: no complete checkpoint is intact: {listed}.",
            hint="delete the damaged checkpoint folder(s) named above and --resume again to start the run over, "
            "or train into another --output-dir.",
        )
    adapter = output_dir / ADAPTER_DIR
    adapter_saved = (adapter / "adapter_config.json").is_file() and any(adapter.glob("adapter_model.*"))
    if plan.checkpoint is not None:
        state = json.loads((plan.checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        plan.step = int(state.get("global_step") or 0)
        end = _planned_end(state, training_config)
        if adapter_saved and end and plan.step >= end:
            plan.finished = f"it finished at step {plan.step}/{end} and its adapter/ is saved"
    elif adapter_saved:
        plan.finished = "it finished (its adapter/ is saved) and kept no checkpoint to continue from"
    return plan
