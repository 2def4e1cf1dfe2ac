"""Resolve what ``eval``, ``merge-adapter`` and ``chat`` were pointed at, and load it for inference.

A target is one of: a run's output directory (its ``adapter/`` is used), an adapter directory, a
merged (or any full) model directory, or a hub id. For an adapter we also find its base model: the
adapter config's ``base_model_name_or_path``, or, when that absolute path no longer exists (a
random_init run that was moved or copied), the run's own ``base_model/`` next to the adapter.

A target that does not exist is a hub id only where nothing says it was meant as a local path
(``target_names``): a mistyped ``runs/s11`` is "no such folder", never a download of a stranger's
repository. Folders phi3tune did not finish writing (an interrupted merge, a cut-off ``base_model/``, an
adapter without weights, a staging folder) are refused before any weights are read (``artefacts``).

Pickled weights (``adapter_model.bin``, ``pytorch_model.bin``) can run code when loaded, so they are
refused unless the user opts in with ``PHI3TUNE_ALLOW_PICKLE=1``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from phi3tune.model import loading
from phi3tune.model.artefacts import (
    MERGE_INCOMPLETE,
    check_adapter_dir,
    check_model_dir,
    is_staging_folder,
    quoted,
    staging_left_beside,
)
from phi3tune.errors import UsageError
from phi3tune.training.layout import ADAPTER_DIR, BASE_MODEL_DIR, RUN_CONFIG
from phi3tune.model.target_names import could_be_hub_id

ADAPTER_CONFIG = "adapter_config.json"
ALLOW_PICKLE_ENV = "PHI3TUNE_ALLOW_PICKLE"


@dataclass
class Target:
    """A resolved RUN_OR_ADAPTER_OR_MODEL argument.

    Attributes:
        kind: ``"adapter"`` (a LoRA adapter on top of ``base``) or ``"model"`` (a full model).
        path: The adapter directory, the model directory, or the hub id.
        run_dir: The run's output directory when the adapter belongs to one, else None.
        base: For adapters, the base model's hub id or directory.
        run_config: The run's ``run_config.yaml`` as a dict (empty when there is no run).
    """

    kind: str
    path: str
    run_dir: Path | None = None
    base: str | None = None
    run_config: dict[str, Any] = field(default_factory=dict)

    @property
    def quantization(self) -> str | None:
        """The run's ``model.quantization`` (``4bit``/``8bit``) or None."""
        return (self.run_config.get("model") or {}).get("quantization")

    @property
    def base_revision(self) -> str | None:
        return (self.run_config.get("model") or {}).get("revision")


def pickle_allowed() -> bool:
    """Whether the user opted in to loading pickled weights."""
    return os.environ.get(ALLOW_PICKLE_ENV, "") not in ("", "0", "false")


def _refuse_pickle(directory: Path, safe_name: str, pickle_name: str) -> None:
    if (directory / pickle_name).is_file() and not any(directory.glob(safe_name)) and not pickle_allowed():
        raise UsageError(
            f"{directory / pickle_name} is a pickle file, which can run arbitrary code when loaded.",
            hint=f"convert it to safetensors, or set {ALLOW_PICKLE_ENV}=1 if you trust its source.",
        )


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``run_config.yaml`` as a dict, or ``{}`` when absent or unreadable."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _adapter_base(adapter_dir: Path) -> str:
    """The base model the adapter was trained on, with the moved-run fallback (see module docstring)."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    sibling = adapter_dir.resolve().parent / BASE_MODEL_DIR
    if base and Path(base).is_absolute() and not Path(base).exists():
        if sibling.is_dir():
            return str(sibling)
        _refuse_staged_base(sibling)
        raise UsageError(
            f"the adapter's base model {base} no longer exists and there is no base_model/ next to the adapter.",
            hint="copy the run's base_model/ folder next to adapter/, or fix base_model_name_or_path in "
            f"{quoted(adapter_dir / ADAPTER_CONFIG)}.",
        )
    if not base:
        if sibling.is_dir():
            return str(sibling)
        _refuse_staged_base(sibling)
        raise UsageError(f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path.")
    if Path(base).is_absolute() and Path(base).name == BASE_MODEL_DIR:
        _refuse_staged_base(Path(base))
    return base


def _refuse_staged_base(base_dir: Path) -> None:
    """A run's base_model/ that was still being written (only its staging folder is there)."""
    if not base_dir.exists() and staging_left_beside(base_dir) is not None:
        raise UsageError(
            f"the run's base model {base_dir} was still being written when the run stopped "
            f"({staging_left_beside(base_dir).name} is there instead).",
            hint=f"resume the run to finish it (phi3tune train CONFIG --output-dir {quoted(base_dir.parent)} --resume).",
        )


def _missing_target(target: str, *, hub_ok: bool) -> UsageError:
    """The error for a target that is not a local folder and is not taken as a hub id."""
    parent = Path(target).expanduser().parent
    look = f" (see ls {quoted(parent)})" if str(parent) not in ("", ".") and parent.is_dir() else ""
    accepted = "a run folder, an adapter folder, a model folder or a hub id" if hub_ok else "a run folder or an adapter folder"
    return UsageError(f"{target}: no such folder.", hint=f"check the path{look}; give {accepted}.")


def resolve_target(target: str | Path, *, allow_model: bool = True, allow_hub: bool = True) -> Target:
    """Work out what a RUN_OR_ADAPTER(_OR_MODEL) argument points at.

    Args:
        target: A run dir, adapter dir, model dir or hub id.
        allow_model: Accept full models (dirs or hub ids); False where only adapters make sense.
        allow_hub: Accept a hub id; False where only local folders make sense (eval).

    Returns:
        The resolved target.

    Raises:
        UsageError: Nothing usable is there (a missing path, an incomplete merge, adapter or base model), a
            pickle would be loaded, or a model was given where an adapter is required.
    """
    path = Path(target).expanduser()
    if path.is_dir():
        if (path / MERGE_INCOMPLETE).exists() or (is_staging_folder(path) and not (path / ADAPTER_CONFIG).is_file()):
            check_model_dir(path)
        if (path / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
            run_dir, adapter_dir = path, path / ADAPTER_DIR
        elif (path / ADAPTER_CONFIG).is_file():
            run_dir, adapter_dir = (path.parent if (path.parent / RUN_CONFIG).is_file() else None), path
        elif (path / "config.json").is_file():
            if not allow_model:
                raise UsageError(f"{path} is a full model, not a LoRA adapter or a run directory.")
            _refuse_pickle(path, "*.safetensors", "pytorch_model.bin")
            check_model_dir(path)
            return Target("model", str(path))
        elif (path / RUN_CONFIG).is_file():
            staged = staging_left_beside(path / ADAPTER_DIR)
            why = "its adapter was still being saved when it stopped" if staged else "it did not finish"
            raise UsageError(
                f"{path} is a run without an adapter/ ({why}).",
                hint=f"resume it with `phi3tune train CONFIG --output-dir {quoted(path)} --resume`.",
            )
        else:
            raise UsageError(f"{path} holds no adapter (adapter_config.json), run (adapter/) or model (config.json).")
        _refuse_pickle(adapter_dir, "adapter_model.safetensors", "adapter_model.bin")
        check_adapter_dir(adapter_dir)
        base = _adapter_base(adapter_dir)
        if Path(base).is_dir():
            _refuse_pickle(Path(base), "*.safetensors", "pytorch_model.bin")
            check_model_dir(Path(base), role="base model")
        return Target(
            "adapter",
            str(adapter_dir),
            run_dir=run_dir,
            base=base,
            run_config=read_run_config(run_dir) if run_dir else {},
        )
    if path.exists():
        raise UsageError(f"{path} is a file; give a run directory, an adapter directory or a model.")
    hub_ok = allow_model and allow_hub
    if not (hub_ok and could_be_hub_id(str(target))):
        raise _missing_target(str(target), hub_ok=hub_ok)
    return Target("model", str(target))


def tokenizer_source(target: Target) -> str:
    """Where to load the tokenizer from: the adapter folder (phi3tune saves it there), else the base."""
    if target.kind == "adapter" and not any((Path(target.path) / name).is_file()
                                            for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return str(target.base)
    return target.path


def inference_dtype(target: Target, device: str) -> torch.dtype:
    """The dtype to run a target in: the run's training dtype where known, bf16 on GPU, fp32 on CPU."""
    trained = (target.run_config.get("resolved") or {}).get("dtype")
    if trained in ("bfloat16", "float16", "float32"):
        if device == "cpu" and trained == "float16":
            return torch.float32  # fp16 matmuls are slow or missing on CPU
        return getattr(torch, trained)
    return loading.resolve_dtype("auto", device)


def load_full_model(name_or_path: str, *, dtype: torch.dtype, device: str, revision: str | None = None,
                    quantization: str | None = None):
    """Load a full causal LM (base or merged) for inference, safetensors only unless pickles are allowed.

    Args:
        name_or_path: Hub id or model directory.
        dtype: Weight dtype (the compute dtype for quantized loads).
        device: ``cuda`` or ``cpu``.
        revision: Hub revision.
        quantization: ``4bit``/``8bit`` to load through bitsandbytes (GPU only), else None.

    Returns:
        The model in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "revision": revision}
    if not pickle_allowed():
        kwargs["use_safetensors"] = True
    if quantization:
        kwargs["quantization_config"] = loading.quantization_config(quantization)
        kwargs["device_map"] = {"": 0}
    with loading._hub_errors("weights", name_or_path):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if not quantization:
        model = model.to(device)
    return model.eval()


def load_for_inference(target: Target, *, device: str, quantize: bool = True):
    """Load a target as ``(model, tokenizer)``: base + adapter (a PeftModel) or a full model.

    Args:
        target: A resolved target.
        device: ``cuda`` or ``cpu``.
        quantize: Load a QLoRA run's base in 4-bit as it was trained (only where a GPU is present).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    dtype = inference_dtype(target, device)
    quantization = target.quantization if (quantize and device == "cuda") else None
    if target.kind == "model":
        tokenizer = loading.load_tokenizer(target.path)
        return load_full_model(target.path, dtype=dtype, device=device), tokenizer
    from peft import PeftModel

    tokenizer = loading.load_tokenizer(tokenizer_source(target))
    revision = target.base_revision if not Path(target.base).is_dir() else None
    base = load_full_model(target.base, dtype=dtype, device=device, revision=revision, quantization=quantization)
    model = PeftModel.from_pretrained(base, target.path, is_trainable=False)
    return model.eval(), tokenizer
