"""The names of what a run folder holds, in one place (README, "Outputs", shows the tree)."""

from __future__ import annotations

MARKER = ".phi3tune-run"  # written at creation: only folders carrying it are phi3tune's to resume or overwrite
RUN_CONFIG = "run_config.yaml"
METRICS = "metrics.jsonl"
EVAL_METRICS = "eval_metrics.json"
REPORT = "train_report.png"
ADAPTER_DIR = "adapter"
BASE_MODEL_DIR = "base_model"
CHECKPOINTS_DIR = "checkpoints"
