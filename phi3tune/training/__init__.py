"""The training loop's parts: SFTConfig arguments (one place), the trainer (``training.trainer.Phi3Trainer``),
the run folder (marker, lock, staged overwrite), atomic checkpoints and resume, callbacks, signals, resource
errors. Only the light entry points are imported here, so that ``phi3tune --help`` does not load trl."""

from phi3tune.training.arguments import build_training_args

__all__ = ["build_training_args"]
