"""SFTTrainer with phi3tune's checkpoint guarantees: atomic, marked-complete checkpoints."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from trl import SFTTrainer

from phi3tune.checkpoints import complete_checkpoints, mark_complete


class Phi3Trainer(SFTTrainer):
    """trl's SFTTrainer, with checkpoints written to a staging folder and renamed into place when complete.

    A crash or kill in the middle of a save leaves at most a ``.tmp-*`` folder, which resume ignores and
    removes; the previous complete checkpoint is untouched.
    """

    def _save_checkpoint(self, model, trial) -> None:
        root = Path(self.args.output_dir)
        step = self.state.global_step
        staging = root / f".tmp-checkpoint-{step}"
        shutil.rmtree(staging, ignore_errors=True)
        final = root / f"checkpoint-{step}"
        limit = self.args.save_total_limit
        self.args.output_dir, self.args.save_total_limit = str(staging), None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir, self.args.save_total_limit = str(root), limit
        written = staging / f"checkpoint-{step}"
        _fsync_tree(written)
        if final.exists():
            shutil.rmtree(final)
        os.replace(written, final)
        shutil.rmtree(staging, ignore_errors=True)
        mark_complete(final, step)
        if self.state.best_model_checkpoint and str(staging) in self.state.best_model_checkpoint:
            self.state.best_model_checkpoint = str(final)
        self._rotate_complete_checkpoints(root, limit)

    def _rotate_complete_checkpoints(self, root: Path, limit: int | None) -> None:
        if not limit or limit <= 0:
            return
        keep = complete_checkpoints(root)
        best = self.state.best_model_checkpoint
        removable = [p for p in keep if str(p) != best]
        for path in removable[: max(0, len(keep) - limit)]:
            shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """Flush every file of a checkpoint to disk before it is renamed into place and marked complete."""
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
