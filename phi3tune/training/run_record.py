"""``run_config.yaml``: what a run was, for humans and for ``--resume``, ``eval`` and ``chat``.

The resolved config (secrets redacted), what phi3tune resolved at run time (device, dtype, attention), the
library versions and the data report with its fingerprint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from phi3tune.training.atomic import atomic_write_text
from phi3tune.training.layout import RUN_CONFIG


def library_versions() -> dict[str, str]:
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


def write_run_config(cfg: Any, output_dir: Path, *, device: str, attn: str, dtype: torch.dtype,
                     data_info: dict[str, Any], parallel: dict[str, Any] | None = None) -> None:
    """Write ``RUN/run_config.yaml`` atomically."""
    resolved = cfg.to_dict(redact_secrets=True)
    resolved["resolved"] = {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": attn,
        "output_dir": str(output_dir),
        **(parallel or {}),  # world_size, strategy, per-rank and global batch (training.distributed.layout)
    }
    resolved["versions"] = library_versions()
    resolved["data_report"] = data_info
    atomic_write_text(output_dir / RUN_CONFIG, yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
