"""Training data: read sources, normalise and validate rows, tokenise with Phi-3 loss masks.

``prepare_datasets`` is the one entry point for training; ``read_source`` (and the re-exported
``load_rows``, ``detect_format``, ``normalise_rows``, ``validate_conversations``) serve ``data check``
and evaluation. Data config objects are duck-typed (see ``prepare_datasets``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3tune.model.chat_template import render_conversations
from phi3tune.data.formats import FORMATS, detect_format, normalise_rows
from phi3tune.data.load import LoadedRows, load_source
from phi3tune.data.report import DataReport, SourceReport
from phi3tune.data.validate import RowProblem, ValidationResult, rows_shown, validate_conversations
from phi3tune.errors import DataError
from phi3tune.model.special_text import DEFAULT_POLICY

__all__ = [
    "DataReport", "PreparedData", "SourceData", "SourceReport", "detect_format", "load_rows",
    "normalise_rows", "prepare_datasets", "read_source", "tokenise_conversations", "validate_conversations",
]  # fmt: skip

load_rows = load_source
_BATCH = 1000


@dataclass
class SourceData:
    """One source read, normalised and validated (rows not yet dropped)."""

    loaded: LoadedRows
    format: str
    conversations: list[list | RowProblem | None]
    validation: ValidationResult

    def valid_conversations(self) -> list[list[dict]]:
        """The valid conversations, in file order."""
        return [self.conversations[i] for i in self.validation.valid]  # type: ignore[misc]

    def valid_numbers(self) -> list[int]:
        """User-facing numbers of the valid rows."""
        return [self.loaded.numbers[i] for i in self.validation.valid]


@dataclass
class PreparedData:
    """Tokenised splits ready for trl's SFTTrainer (columns ``input_ids`` and ``labels``)."""

    train: Any
    eval: Any | None
    report: DataReport


def read_source(source: Any, data_cfg: Any, base_dir: Path | None = None, allow_trailing_user: bool = False) -> SourceData:
    """Load one source, detect its format, normalise and validate every row.

    Args:
        source: A config data source (``.path`` or ``.hub`` …).
        data_cfg: The data config (``format``, ``system_prompt``, ``special_tokens_in_text`` used here).
        base_dir: Directory relative paths resolve against first.
        allow_trailing_user: Accept conversations ending with a user turn (prompts for generation).

    Returns:
        The rows, their detected format, normalised conversations and validation result.

    Raises:
        DataError: The source holds no rows, or its format cannot be told.
    """
    loaded = load_source(source, base_dir)
    if len(loaded.rows) == 0:
        raise DataError(
            f"{loaded.source}: holds 0 rows (an empty file, or a CSV with only its header line)",
            hint="point data.*.path at the file that holds the conversations",
        )
    fmt = getattr(data_cfg, "format", "auto") or "auto"
    if fmt == "auto":
        fmt = detect_format(loaded.rows, loaded.source, loaded.numbers, loaded.unit)
    elif fmt not in FORMATS:
        raise DataError(f"unknown data.format {fmt!r}", hint=f"use auto or one of {', '.join(FORMATS)}")
    conversations = normalise_rows(loaded.rows, fmt, getattr(data_cfg, "system_prompt", None))
    policy = getattr(data_cfg, "special_tokens_in_text", DEFAULT_POLICY) or DEFAULT_POLICY
    validation = validate_conversations(conversations, loaded.numbers, loaded.unit, allow_trailing_user, policy)
    return SourceData(loaded, fmt, conversations, validation)


def _new_report(data: SourceData) -> SourceReport:
    v = data.validation
    return SourceReport(
        source=data.loaded.source,
        format=data.format,
        unit=data.loaded.unit,
        rows_read=len(data.conversations),
        invalid=v.counts(),
        invalid_first_rows={k: [n for n, _ in hits[: rows_shown(k)]] for k, hits in v.problems.items()},
    )


def tokenise_conversations(
    conversations: Sequence[list[dict]],
    numbers: Sequence[int],
    tokenizer: Any,
    max_length: int,
    loss_on: str,
    on_overlength: str,
    report: SourceReport,
    unit: str = "row",
    special_tokens: str = DEFAULT_POLICY,
) -> Any:
    """Tokenise valid conversations into a ``datasets.Dataset`` and apply the length policy.

    Args:
        conversations: Valid normalised conversations.
        numbers: Their user-facing row numbers (for error messages).
        tokenizer: The Phi-3 tokenizer.
        max_length: Maximum tokens per row.
        loss_on: ``"assistant"`` or ``"all"``.
        on_overlength: ``"truncate"`` (keep the start), ``"drop"`` or ``"error"``.
        report: Filled in with counts and token totals.
        unit: ``"line"`` or ``"row"`` for messages.
        special_tokens: ``data.special_tokens_in_text``; by default special-token strings in text stay text.

    Returns:
        A ``datasets.Dataset`` with ``input_ids`` and ``labels``.

    Raises:
        DataError: ``on_overlength="error"`` and some rows are too long.
    """
    import datasets

    if on_overlength not in ("truncate", "drop", "error"):
        raise DataError(f"unknown data.on_overlength {on_overlength!r}", hint="use truncate, drop or error")
    features = datasets.Features(
        {"input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32"))}
    )
    # Each batch goes to Arrow (int32) at once: Python int lists of a 200k-row corpus would need tens of GB.
    chunks = []
    overlong: list[tuple[int, int]] = []
    for start in range(0, len(conversations), _BATCH):
        ids_col: list[list[int]] = []
        labels_col: list[list[int]] = []
        rendered = render_conversations(tokenizer, conversations[start : start + _BATCH], loss_on, special_tokens)
        for offset, (ids, labels) in enumerate(rendered):
            if len(ids) > max_length:
                if on_overlength != "truncate":
                    overlong.append((numbers[start + offset], len(ids)))
                    continue
                ids, labels = ids[:max_length], labels[:max_length]
                report.truncated += 1
            n_trained = sum(1 for x in labels if x != -100)
            if n_trained == 0:
                # Truncation cut every assistant token, or the row has none to train on.
                report.dropped_no_labels += 1
                continue
            report.tokens += len(ids)
            report.trained_tokens += n_trained
            ids_col.append(ids)
            labels_col.append(labels)
        chunks.append(datasets.Dataset.from_dict({"input_ids": ids_col, "labels": labels_col}, features=features))
    if overlong and on_overlength == "error":
        shown = ", ".join(f"{unit} {n} ({length} tokens)" for n, length in overlong[:5])
        raise DataError(
            f"{report.source}: {len(overlong)} {unit}s longer than max_length={max_length}: {shown}"
            + (", …" if len(overlong) > 5 else ""),
            hint="raise training_config.max_length, or set data.on_overlength: truncate or drop",
        )
    report.dropped_overlength = len(overlong)
    if not chunks:
        return datasets.Dataset.from_dict({"input_ids": [], "labels": []}, features=features)
    dataset = datasets.concatenate_datasets(chunks) if len(chunks) > 1 else chunks[0]
    report.rows_used = len(dataset)
    return dataset


def _fingerprint(parts: Sequence[tuple[str, Sequence[list[dict]]]]) -> str:
    h = hashlib.sha256()
    for name, conversations in parts:
        h.update(f"#{name}\n".encode())
        for conv in conversations:
            h.update(json.dumps(conv, ensure_ascii=False, sort_keys=True).encode("utf-8"))
            h.update(b"\n")
    return h.hexdigest()


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0 < fraction < 1:
        raise DataError(f"data.eval_fraction must be between 0 and 1, got {fraction}", hint="e.g. eval_fraction: 0.02")
    if n < 2:
        raise DataError(
            f"data.eval_fraction: only {n} valid training row{'s' if n != 1 else ''}: too few to split into train "
            "and eval",
            hint="add more rows, give a separate eval file (data.eval), or remove data.eval_fraction",
        )
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DataError(f"eval_fraction {fraction} leaves no training rows out of {n}", hint="use a smaller eval_fraction")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def prepare_datasets(
    data_cfg: Any, tokenizer: Any, max_length: int, seed: int, base_dir: Path | None = None
) -> PreparedData:
    """Read, validate and tokenise the train (and eval) data of a config.

    Args:
        data_cfg: Data config with ``train``/``eval`` sources (``.path``/``.hub``/``.split``/``.name``/
            ``.revision``), ``eval_fraction``, ``format``, ``system_prompt``, ``on_invalid``,
            ``on_overlength``, ``loss_on`` and ``special_tokens_in_text``.
        tokenizer: The Phi-3 tokenizer.
        max_length: Maximum tokens per row.
        seed: Seed for the ``eval_fraction`` split.
        base_dir: The config file's directory; relative paths resolve against it, then the cwd.

    Returns:
        The tokenised splits and a report (counts, tokens, trained share, fingerprint).

    Raises:
        DataError: Invalid rows with ``on_invalid: error``, overlong rows with ``on_overlength: error``,
            unreadable files, or no usable rows.
        ResourceError: A hub dataset cannot be fetched.
    """
    on_invalid = getattr(data_cfg, "on_invalid", "error") or "error"
    loss_on = getattr(data_cfg, "loss_on", "assistant") or "assistant"
    on_overlength = getattr(data_cfg, "on_overlength", "truncate") or "truncate"
    special_tokens = getattr(data_cfg, "special_tokens_in_text", DEFAULT_POLICY) or DEFAULT_POLICY
    eval_fraction = getattr(data_cfg, "eval_fraction", None)
    eval_source = getattr(data_cfg, "eval", None)  # never both: the config loader refuses that (EVAL_CONFLICT)

    sources = {"train": read_source(data_cfg.train, data_cfg, base_dir)}
    if eval_source is not None:
        sources["eval"] = read_source(eval_source, data_cfg, base_dir)
    for data in sources.values():
        if on_invalid == "error":
            data.validation.raise_if_invalid(data.loaded.source)
    train_data = sources["train"]
    reports = {name: _new_report(data) for name, data in sources.items()}
    splits = {name: (data.valid_conversations(), data.valid_numbers()) for name, data in sources.items()}
    fingerprint = _fingerprint([(name, convs) for name, (convs, _) in splits.items()])

    if eval_fraction and eval_source is None:
        convs, numbers = splits["train"]
        train_idx, eval_idx = _split(len(convs), float(eval_fraction), seed)
        splits["train"] = ([convs[i] for i in train_idx], [numbers[i] for i in train_idx])
        splits["eval"] = ([convs[i] for i in eval_idx], [numbers[i] for i in eval_idx])
        reports["eval"] = SourceReport(source=f"{train_data.loaded.source} (eval_fraction {eval_fraction})",
                                       format=train_data.format, unit=train_data.loaded.unit,
                                       rows_read=len(eval_idx))  # fmt: skip

    tokenised = {}
    for name, (convs, numbers) in splits.items():
        tokenised[name] = tokenise_conversations(
            convs, numbers, tokenizer, max_length, loss_on, on_overlength, reports[name], reports[name].unit,
            special_tokens,
        )
    if len(tokenised["train"]) == 0:
        raise DataError(
            f"{train_data.loaded.source}: no usable training rows remain",
            hint="see the data report (`phi3tune data check`) for why rows were dropped",
        )
    report = DataReport(reports["train"], reports.get("eval"), fingerprint)
    return PreparedData(tokenised["train"], tokenised.get("eval"), report)
