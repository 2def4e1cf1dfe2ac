"""The training loop's parts: SFTConfig arguments (one place), the trainer, the run folder (layout, marker,
lock, staged overwrite), atomic writes, checkpoints and resume, callbacks, signals, resource errors.
"""

from phi3tune import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "build_training_args": "phi3tune.training.arguments",
    "Phi3Trainer": "phi3tune.training.trainer",
    "folder_lock": "phi3tune.training.run_lock",
    "atomic_write_json": "phi3tune.training.atomic",
    "atomic_write_text": "phi3tune.training.atomic",
})
