"""The samples ``phi3tune eval`` scores, tokenised exactly as training tokenised them.

Sources, in order of precedence: ``--data FILE``, ``--config``'s eval data, the run's own eval data
from ``run_config.yaml`` (``data.eval``, or the ``eval_fraction`` split rebuilt with the run's seed).
The run's ``max_length``, ``loss_on``, ``format`` and ``system_prompt`` apply in every case, so a
``--data`` file is masked and truncated the way the run's own data was.

``eval --set KEY=VALUE`` changes those policies as ``train --set`` would (same parsing): ``data.*`` keys
apply to the run's recorded data section (or to ``--config``), ``training_config.max_length`` and
``seed`` to the tokenisation and split. Other keys change nothing eval does, so they are refused.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from pydantic import ValidationError

from phi3tune.config.parse import apply_override, pydantic_problems
from phi3tune.errors import ConfigError, UsageError
from phi3tune.config.schema import max_length_of
from phi3tune.model.targets import Target
from phi3tune.training.layout import RUN_CONFIG

DEFAULT_SEED = 42


def _training_value(run_config: dict[str, Any], key: str, default: Any) -> Any:
    value = (run_config.get("training_config") or {}).get(key)
    return default if value is None else value


EVAL_SET_KEYS = ("training_config.max_length", "training_config.seed")
_PLACEHOLDER_TRAIN = {"path": "-"}  # --data needs only the policies; DataConfig requires a train source


def _validated_data(data: dict[str, Any]):
    from phi3tune.config.schema import DataConfig

    try:
        return DataConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(pydantic_problems(exc, "data", DataConfig), f"{RUN_CONFIG}'s data section with --set") from None


def apply_eval_overrides(run_config: dict[str, Any], overrides: Sequence[str], *, with_config: bool = False) -> dict[str, Any]:
    """The run's recorded config with ``eval --set`` items applied (a copy; checked before any model loads).

    Args:
        run_config: The run's run_config.yaml as a dict (may be empty).
        overrides: ``KEY=VALUE`` items.
        with_config: ``--config`` is given: the items go to it (``load_config``), so only their keys are
            checked here and ``run_config`` is returned unchanged.

    Raises:
        ConfigError: Every malformed item, every key eval does not use, and invalid data values, together.
    """
    if not overrides:
        return run_config
    problems: list[str] = []
    doc = copy.deepcopy(run_config)
    for item in overrides:
        key = apply_override(doc, item, problems)
        if key is not None and not (key.startswith("data.") or key in EVAL_SET_KEYS):
            problems.append(f"--set {key}: eval uses only data.* keys and {', '.join(EVAL_SET_KEYS)}")
    if with_config:
        if problems:
            raise ConfigError(problems, "eval --set")
        return run_config
    from phi3tune.config.schema import DataConfig

    data = doc.get("data") or {}
    try:
        DataConfig.model_validate({**data, "train": data.get("train") or _PLACEHOLDER_TRAIN})
    except ValidationError as exc:
        problems += pydantic_problems(exc, "data", DataConfig)
    if problems:
        raise ConfigError(problems, "eval --set")
    return doc


def _data_policies(run_config: dict[str, Any]):
    """The run's data policies (format, on_invalid, ...) for a --data file; defaults where none are recorded."""
    data = run_config.get("data") or {}
    return _validated_data({**data, "train": data.get("train") or _PLACEHOLDER_TRAIN, "eval": None,
                            "eval_fraction": None})


def _data_config_from_run(run_config: dict[str, Any]):
    """The run's data config, as recorded in run_config.yaml's ``data`` section."""
    data = run_config.get("data") or {}
    if not data.get("eval") and not data.get("eval_fraction"):
        raise UsageError("the run has no eval data recorded in run_config.yaml.",
                         hint="pass --data FILE or --config CONFIG with data.eval.")
    return _validated_data(data)


def _tokenise_file(path: Path, data_cfg: Any, tokenizer, max_length: int):
    """Read, validate and tokenise one data file with the run's data policies."""
    from phi3tune.data.prepare import read_source, tokenise_conversations
    from phi3tune.data.report import SourceReport

    if not path.is_file():
        raise UsageError(f"--data {path}: no such file.")
    source = read_source(SimpleNamespace(path=str(path.resolve()), hub=None), data_cfg)
    if getattr(data_cfg, "on_invalid", "error") == "error":
        source.validation.raise_if_invalid(source.loaded.source)
    report = SourceReport(source=source.loaded.source, format=source.format)
    dataset = tokenise_conversations(
        source.valid_conversations(), source.valid_numbers(), tokenizer, max_length,
        getattr(data_cfg, "loss_on", "assistant") or "assistant",
        getattr(data_cfg, "on_overlength", "truncate") or "truncate", report, source.loaded.unit,
    )
    return dataset, f"{source.loaded.source} ({source.format}, {len(dataset)} samples)"


def load_eval_dataset(target: Target, tokenizer, *, config: Path | None = None, data: Path | None = None,
                      overrides: Sequence[str] = ()):
    """Tokenised eval samples (``input_ids``/``labels``) and a description of where they came from.

    Args:
        target: The resolved run/adapter/model.
        config: A config file whose eval data to use.
        data: A data file to use.
        overrides: ``--set`` items, passed to ``load_config`` with ``config`` (the run's own config comes
            with them applied already: ``apply_eval_overrides``).

    Returns:
        ``(dataset, source_description)``.

    Raises:
        UsageError: No eval data can be found.
    """
    from phi3tune.data.prepare import prepare_datasets

    run_config = target.run_config
    max_length = max_length_of(run_config.get("training_config") or {})
    seed = int(_training_value(run_config, "seed", DEFAULT_SEED))
    if data is not None:
        return _tokenise_file(Path(data), _data_policies(run_config), tokenizer, max_length)
    if config is not None:
        from phi3tune.config.load import load_config

        cfg = load_config(config, list(overrides))
        max_length = int(cfg.training_config.get("max_length") or max_length)
        seed = int(cfg.training_config.get("seed", seed))
        data_cfg, base_dir, where = cfg.data, cfg.base_dir, str(config)
    elif run_config:
        data_cfg, base_dir, where = _data_config_from_run(run_config), target.run_dir, "the run's eval split"
    else:
        raise UsageError(f"{target.path} has no run_config.yaml to take eval data from.",
                         hint="pass --data FILE (or --config CONFIG).")
    if data_cfg.eval is None and not data_cfg.eval_fraction:
        raise UsageError(f"{where} defines no eval data (data.eval or data.eval_fraction).",
                         hint="pass --data FILE.")
    prepared = prepare_datasets(data_cfg, tokenizer, max_length=max_length, seed=seed, base_dir=base_dir)
    eval_report = prepared.report.eval
    return prepared.eval, f"{where}: {eval_report.source if eval_report else '?'} ({len(prepared.eval)} samples)"
