"""SFTConfig keyword arguments, built in one place for the run and for the dry run.

    the user's training_config -> mixed precision for the device -> the fast-path policy -> phi3tune's layout
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi3tune.config.schema import max_length_of
from phi3tune.fastpath import FastPathPlan, plan_fast_path
from phi3tune.fastpath.memory import PHI3_MINI, ModelShape
from phi3tune.training import distributed
from phi3tune.training.layout import CHECKPOINTS_DIR



def mixed_precision(training_config: dict[str, Any], *, device_type: str, model_dtype: Any) -> dict[str, Any]:
    """Choose mixed precision for the device the recipe actually runs on.

    trl's ``SFTConfig`` defaults to ``bf16=True``, which raises on a CPU; the config file cannot know the
    device. On CPU, mixed precision is off. On an accelerator, an explicit ``bf16``/``fp16`` is kept;
    otherwise it follows the model dtype (bfloat16 -> bf16, float16 -> fp16, float32 -> full precision).
    """
    args = dict(training_config)
    dtype = str(model_dtype).removeprefix("torch.")
    if device_type == "cpu":
        args["bf16"] = False
        args["fp16"] = False
        return args
    if args.get("bf16") is None and args.get("fp16") in (None, False):
        args["bf16"] = dtype == "bfloat16"
        args["fp16"] = dtype == "float16"
    elif args.get("bf16") is None:
        args["bf16"] = False  # fp16 was chosen explicitly; trl would otherwise turn bf16 on as well
    return args


def build_training_args(cfg: Any, output_dir: Path | None, device: str, dtype: Any, *,
                        gpu_memory: float | None = None, shape: ModelShape = PHI3_MINI) -> FastPathPlan:
    """The fast-path plan whose ``args`` are the SFTConfig kwargs of this run.

    Args:
        cfg: The validated RunConfig.
        output_dir: The run folder (checkpoints go under it); None for the dry run.
        device: ``cuda`` or ``cpu`` (the dry run may plan ``cuda`` for a GPU that is not here).
        dtype: The model's dtype.
        gpu_memory: Card size to plan for (bytes); default: the visible GPU's.
        shape: The model's size, for the memory model.
    """
    args = mixed_precision(dict(cfg.training_config), device_type=device, model_dtype=dtype)
    # FSDP2's limits on the fast path apply only where FSDP2 really runs (several GPU ranks).
    sharded = distributed.strategy(args, device) == "fsdp"
    plan = plan_fast_path(cfg.model, args, device, gpu_memory=gpu_memory, shape=shape, sharded=sharded)
    args = plan.args
    args["max_length"] = max_length_of(args)  # explicit, so SFTConfig and the data path use the same length
    if output_dir is not None:
        args["output_dir"] = str(output_dir / CHECKPOINTS_DIR)
    args.setdefault("report_to", "none")
    args["disable_tqdm"] = True  # phi3tune's ProgressCallback replaces tqdm
    args.setdefault("logging_steps", 10)
    if device == "cpu":
        args["dataloader_pin_memory"] = False
    # Nothing in a step may wait on the GPU, or it idles through the step's boundary while the CPU runs the
    # optimizer, callbacks and the next batch (training/finite_watch.py). transformers' NaN filter reads every
    # micro-batch's loss on the host, and phi3tune's guard stops the run at a non-finite loss anyway.
    args.setdefault("logging_nan_inf_filter", False)
    if device == "cuda":
        accelerator_config = args.get("accelerator_config") or {}
        if isinstance(accelerator_config, dict):  # (a path to a JSON file is the user's whole choice)
            # a blocking copy of the batch waits too
            args["accelerator_config"] = {"non_blocking": True, **accelerator_config}
    # The data arrive tokenised with labels (input_ids + labels), so trl only truncates/packs them.
    args.pop("assistant_only_loss", None)
    args.pop("dataset_text_field", None)
    return plan
