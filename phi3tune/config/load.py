"""Load, override, translate and validate a phi3tune config file (README, "The config file").

``load_config`` is the only entry point: it reads the YAML, applies ``--set`` overrides and ``--output-dir``,
translates legacy recipe keys (``config_legacy``), validates ``model``/``data`` with pydantic
(``config_schema``) and ``training_config``/``peft_config`` against the installed trl/peft classes
(``config_fields``), and raises one ``ConfigError`` listing every problem found.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from phi3tune.config.fields import check_against_dataclass, dataclass_field_types, did_you_mean
from phi3tune.config.fsdp import check_fsdp_with, take_fsdp
from phi3tune.config.legacy import translate_legacy
from phi3tune.config.parse import SECTIONS, apply_override, pydantic_problems, read_yaml
from phi3tune.config.schema import EVAL_CONFLICT, DataConfig, DataSource, ModelConfig, resolve_data_path
from phi3tune.errors import ConfigError, UsageError
from phi3tune.model.lora_targets import PHI3_LINEAR_MODULES, PHI3_LORA_MODULES, resolve_target_modules
from phi3tune.model.context import context_warnings

__all__ = [
    "PHI3_LINEAR_MODULES",
    "SECTIONS",
    "DataConfig",
    "DataSource",
    "ModelConfig",
    "RunConfig",
    "load_config",
    "redact",
    "resolve_data_path",
    "resolve_target_modules",
]

_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_key|apikey|access_key)$", re.IGNORECASE)
_NOT_SECRET = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}
_HF_TOKEN_VALUE = re.compile(r"^hf_[A-Za-z0-9]{20,}$")
REDACTED = "***"
# training_config values that must be positive when set; zero or less fails deep inside the trainer.
_POSITIVE = (
    "learning_rate",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "logging_steps",
    "save_steps",
    "eval_steps",
)
# Values that must also be finite: YAML's .inf/.nan (or the strings "inf"/"nan") pass a `> 0` check.
_FINITE = (*_POSITIVE, "num_train_epochs", "weight_decay", "warmup_ratio", "adam_beta1", "adam_beta2", "adam_epsilon")
# LoRA learning rates live around 1e-5..1e-3 (the shipped configs use 2e-4; the random-weight demo 3e-3).
# Above 1e-2 is 10x past the usual top: warn. Above 1 no optimizer transformers ships trains an LLM (1e10 turned
# the model into noise without any error): refuse.
LR_WARN = 1e-2
LR_MAX = 1.0


@dataclasses.dataclass
class RunConfig:
    """A validated run configuration.

    Attributes:
        model: The ``model`` section.
        data: The ``data`` section; local paths are absolute.
        training_config: Kwargs for ``trl.SFTConfig`` (translated and type-checked); pass through
            ``phi3tune.training.arguments.build_training_args`` before use.
        peft_config: Kwargs for ``peft.LoraConfig``; ``target_modules`` resolved to Phi-3 names.
        output_dir: From ``--output-dir`` or ``training_config.output_dir``; None when neither is given.
        source: The config file, or None when built from overrides only.
        base_dir: Directory that relative data paths were resolved against.
        warnings: One line per translated legacy key or resolved target name.
    """

    model: ModelConfig
    data: DataConfig
    training_config: dict[str, Any]
    peft_config: dict[str, Any]
    output_dir: Path | None
    source: Path | None
    base_dir: Path
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def seed(self) -> int:
        """The run's seed (trl's default when unset)."""
        return int(self.training_config.get("seed", 42))

    def local_data_files(self) -> list[tuple[str, Path]]:
        """``(key, path)`` of the run's local data files (resolved paths); hub datasets have none."""
        found = []
        for key, source in (("data.train", self.data.train), ("data.eval", self.data.eval)):
            path = getattr(source, "path", None) if source is not None else None
            if path and "://" not in str(path):
                found.append((key, Path(path)))
        return found

    def to_dict(self, redact_secrets: bool = True) -> dict[str, Any]:
        """Return the resolved config as plain YAML-able data (for ``run_config.yaml``).

        Args:
            redact_secrets: Replace tokens, passwords and API keys by ``"***"``.
        """
        out = {
            "model": self.model.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json", exclude_none=True),
            "training_config": copy.deepcopy(self.training_config),
            "peft_config": copy.deepcopy(self.peft_config),
        }
        return redact(out) if redact_secrets else out


def redact(value: Any) -> Any:
    """Return a copy of ``value`` with secret-looking keys and Hugging Face token values replaced."""
    if isinstance(value, dict):
        return {
            k: REDACTED
            if isinstance(k, str) and _SECRET_KEY.search(k) and k not in _NOT_SECRET and v not in (None, False, True)
            else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str) and _HF_TOKEN_VALUE.match(value):
        return REDACTED
    return value


def _sft_config_cls() -> type:
    from trl import SFTConfig  # deferred: importing trl takes seconds and most commands need it anyway later

    return SFTConfig


def _lora_config_cls() -> type:
    from peft import LoraConfig

    return LoraConfig


def _check_values(tc: dict[str, Any], peft: dict[str, Any], problems: list[str], warnings: list[str]) -> None:
    """Cross-field and range checks that the field types alone cannot express."""
    for key, value in tc.items():
        if (isinstance(value, float) and math.isnan(value)) or (key in _FINITE and value in (math.inf, -math.inf)):
            problems.append(f"training_config.{key}: must be a finite number, got {value!r}")
    for key in _POSITIVE:
        value = tc.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            problems.append(f"training_config.{key}: must be > 0, got {value!r}")
    _check_length(tc, problems)
    lr = tc.get("learning_rate")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr):
        if lr > LR_MAX:
            problems.append(
                f"training_config.learning_rate: {lr!r} is far too large (above {LR_MAX:g}) and would wreck the "
                "model; LoRA uses about 1e-5 to 1e-3, e.g. 2.0e-4"
            )
        elif lr > LR_WARN:
            warnings.append(
                f"training_config.learning_rate={lr:g} is very high for LoRA (usually 1e-5 to 1e-3); "
                "watch the loss for divergence"
            )
    for key in ("r", "lora_alpha"):
        value = peft.get(key)
        if isinstance(value, int) and value <= 0:
            problems.append(f"peft_config.{key}: must be > 0, got {value!r}")
    dropout = peft.get("lora_dropout")
    if isinstance(dropout, float) and not 0 <= dropout < 1:
        problems.append(f"peft_config.lora_dropout: must be in [0, 1), got {dropout!r}")
    if "target_modules" in peft:
        try:
            peft["target_modules"], found = resolve_target_modules(peft["target_modules"], set(PHI3_LORA_MODULES))
            warnings.extend(found)
        except UsageError as exc:
            problems.append(str(exc).replace("\n  hint: ", "; "))


def _check_length(tc: dict[str, Any], problems: list[str]) -> None:
    """Refuse a run that would take zero optimizer steps (it would "finish" with an untrained adapter)."""
    max_steps = tc.get("max_steps")
    epochs = tc.get("num_train_epochs")
    numeric = isinstance(max_steps, int) and not isinstance(max_steps, bool)
    if numeric and max_steps == 0:
        problems.append(
            "training_config.max_steps: 0 trains nothing; give a positive number of steps, "
            "or -1 to train for num_train_epochs"
        )
    elif (max_steps is None or numeric and max_steps < 0) and isinstance(epochs, (int, float)) and (
        not isinstance(epochs, bool) and epochs <= 0
    ):
        # transformers uses num_train_epochs only while max_steps is not positive.
        problems.append(
            f"training_config.num_train_epochs: {epochs!r} trains nothing (max_steps is not set); give a positive "
            "number of epochs, or set max_steps"
        )


def load_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    output_dir: str | None = None,
    *,
    require_output_dir: bool = False,
) -> RunConfig:
    """Read and validate a config file.

    Args:
        path: The YAML file; None builds the config from ``overrides`` alone (relative paths then resolve
            against the current directory).
        overrides: ``--set KEY=VALUE`` items; dotted keys into the YAML, values parsed as YAML.
        output_dir: ``--output-dir``; takes precedence over ``training_config.output_dir``.
        require_output_dir: Report a missing output dir as a problem (``train`` needs one; ``data check`` not).

    Returns:
        The validated ``RunConfig``; ``warnings`` lists translated legacy keys.

    Raises:
        ConfigError: Every problem found in the file and overrides, together.
    """
    source = Path(path).expanduser() if path is not None else None
    where = str(source) if source else "--set overrides"
    base_dir = source.resolve().parent if source else Path.cwd()
    problems: list[str] = []
    doc = read_yaml(source, problems) if source else {}
    if doc is None:
        raise ConfigError(["the file is empty; it needs at least a data section with data.train"], where)
    if not isinstance(doc, dict):
        raise ConfigError(
            [f"expected a mapping of sections ({', '.join(SECTIONS)}), got a {type(doc).__name__}"], where
        )

    for key in [k for k in doc if k not in SECTIONS]:
        problems.append(f"{key}: unknown section{did_you_mean(str(key), SECTIONS)}")
        doc.pop(key)
    for name in SECTIONS:
        if name in doc and doc[name] is not None and not isinstance(doc[name], dict):
            problems.append(f"{name}: expected a mapping, got {type(doc[name]).__name__} {doc[name]!r}")
            doc.pop(name)
        elif name in doc and doc[name] is None:
            doc[name] = {}
    cli_keys = [k for k in (apply_override(doc, item, problems) for item in overrides) if k]
    has_data = "data" in doc

    sft_fields = dataclass_field_types(_sft_config_cls())
    warnings, legacy_problems = translate_legacy(doc, set(sft_fields))
    problems.extend(legacy_problems)

    model = data = None
    try:
        model = ModelConfig.model_validate(doc.get("model") or {})
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc, "model", ModelConfig))
    if not has_data:
        problems.append("data: missing section; give at least data.train (a file path or {hub: ..., split: ...})")
    else:
        if doc["data"].get("eval") is not None and doc["data"].get("eval_fraction") is not None:
            problems.append(EVAL_CONFLICT)  # the one check of it: reported with the section's other problems
        try:
            data = DataConfig.model_validate(doc["data"])
        except ValidationError as exc:
            problems.extend(pydantic_problems(exc, "data", DataConfig))

    raw_tc = dict(doc.get("training_config") or {})
    sharding = take_fsdp(raw_tc, base_dir, problems, warnings)  # typed loosely by transformers: checked there
    tc, tc_problems = check_against_dataclass(raw_tc, _sft_config_cls(), "training_config")
    tc.update(sharding)
    peft, peft_problems = check_against_dataclass(doc.get("peft_config") or {}, _lora_config_cls(), "peft_config")
    problems += tc_problems + peft_problems
    _check_values(tc, peft, problems, warnings)
    check_fsdp_with(tc, model.quantization if model is not None else None, problems, warnings)
    peft.setdefault("task_type", "CAUSAL_LM")

    out_dir = output_dir if output_dir is not None else tc.get("output_dir")
    if out_dir is None and require_output_dir:
        problems.append("training_config.output_dir: missing; set it in the config or pass --output-dir")
    if model is not None:
        warnings.extend(context_warnings(tc, model))
    if model is not None and model.quantization and model.dtype == "float32":
        warnings.append("model: quantization with dtype float32 computes in float32 (slow); QLoRA uses bfloat16")
    if model is not None and model.base_precision == "fp8":
        if peft.get("use_dora"):
            problems.append("peft_config.use_dora: DoRA reads the full-precision base weight, which "
                            "model.base_precision: fp8 stores as e4m3; set use_dora: false, or "
                            "model.base_precision: bf16")
        for key in ("fsdp", "deepspeed"):
            if tc.get(key):
                problems.append(f"training_config.{key}: sharding cannot take the e4m3 base of model.base_precision: "
                                f"fp8 (one GPU or --nproc DDP can); remove {key}, or set model.base_precision: bf16")

    if data is not None:
        for field in ("train", "eval"):
            src = getattr(data, field)
            if src is not None and src.path is not None:
                # Paths typed on the command line mean the current directory, not the config's.
                from_cli = any(k in (f"data.{field}", f"data.{field}.path") for k in cli_keys)
                try:
                    src.path = str(resolve_data_path(src.path, Path.cwd() if from_cli else base_dir))
                except UsageError as exc:
                    problems.append(f"data.{field}.path: {exc.message}")
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)), where)
    if out_dir is not None:
        tc["output_dir"] = str(Path(str(out_dir)).expanduser())
    return RunConfig(
        model=model,
        data=data,
        training_config=tc,
        peft_config=peft,
        output_dir=Path(tc["output_dir"]) if out_dir is not None else None,
        source=source.resolve() if source else None,
        base_dir=base_dir,
        warnings=warnings,
    )

