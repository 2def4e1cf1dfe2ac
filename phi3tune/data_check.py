"""``phi3tune data check``: a validation report of the data a config would train on.

It reads every row exactly as training does (``phi3tune.data.prepare.read_source``), reports problems with
row numbers (broken JSON lines among them), rows whose text contains special-token strings (``<|end|>``, ...),
tool use (rows with tools, calls, results, weighted-out turns), a token-length histogram against
``max_length`` and the share of trained tokens, and renders a few samples (one with tool calls, when there
are any) with the trained tokens highlighted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from phi3tune.model.chat_template import IGNORE_INDEX, render_conversations
from phi3tune.config.schema import max_length_of
from phi3tune.data.prepare import SourceData, read_source
from phi3tune.data.tool_stats import ToolUsage, tool_usage
from phi3tune.data.validate import rows_shown
from phi3tune.config.paths import not_a_regular_file
from phi3tune.model.special_text import DEFAULT_POLICY, conversation_special_strings

HIST_BINS = 10
BAR_WIDTH = 40
N_SAMPLES = 3
SAMPLE_MAX_TOKENS = 400
_BATCH = 1000
_OVERLENGTH_EFFECT = {"truncate": "truncated (start kept)", "drop": "dropped", "error": "rejected (training stops)"}
_SPECIAL_EFFECT = {
    "escape": "tokenised as plain text (data.special_tokens_in_text: escape)",
    "error": "invalid rows (data.special_tokens_in_text: error)",
    "allow": "[red]read as REAL special tokens: they can open and close turns[/] (data.special_tokens_in_text: allow)",
}


def _special_rows(console: Console, data: SourceData, policy: str) -> None:
    """Count and list the rows whose text contains special-token strings, and say what happens to them."""
    hits = [(data.loaded.numbers[i], found) for i, conv in enumerate(data.conversations)
            if (found := conversation_special_strings(conv))]  # fmt: skip
    if not hits:
        return
    unit = data.loaded.unit
    first = ", ".join(str(n) for n, _ in hits[:5]) + (", …" if len(hits) > 5 else "")
    console.print(
        f"{len(hits)} {unit}{'s' if len(hits) != 1 else ''} contain special-token strings ({unit}s {first}; "
        f"e.g. {unit} {hits[0][0]}: {', '.join(hits[0][1])}): {_SPECIAL_EFFECT[policy]}",
        highlight=False,
    )


def _tool_rows(console: Console, data: SourceData) -> list[int]:
    """Print the tool use of the source; return the indices of the valid rows that hold tool calls."""
    total = ToolUsage()
    with_calls = []
    for i in data.validation.valid:
        usage = tool_usage(data.loaded.rows[i], data.format)
        total.add(usage)
        if usage.calls:
            with_calls.append(i)
    if total.any():
        console.print(
            f"tool use (valid rows): {total.rows_with_tools} rows with tools, {total.calls} calls (trained), "
            f"{total.results} results (context), {total.weighted_out} assistant turns with weight 0 (context)",
            highlight=False,
        )
    return with_calls


def _lengths(
    tokenizer: Any, data: SourceData, loss_on: str, max_length: int, policy: str
) -> tuple[list[int], int, int, int]:
    """Full token lengths of the valid rows, total/trained tokens, and rows truncation would leave untrained."""
    convs = data.valid_conversations()
    lengths: list[int] = []
    total = trained = emptied = 0
    for start in range(0, len(convs), _BATCH):
        for ids, labels in render_conversations(tokenizer, convs[start : start + _BATCH], loss_on, policy):
            lengths.append(len(ids))
            total += len(ids)
            trained += sum(1 for x in labels if x != IGNORE_INDEX)
            if len(ids) > max_length and all(x == IGNORE_INDEX for x in labels[:max_length]):
                emptied += 1
    return lengths, total, trained, emptied


def _histogram(console: Console, lengths: list[int], max_length: int) -> None:
    """Text bars: HIST_BINS equal bins up to max_length (or the longest row), plus one for overlong rows."""
    top = min(max(lengths), max_length)
    width = max(1, -(-top // HIST_BINS))
    n_bins = -(-top // width)
    counts = [0] * n_bins
    over = 0
    for n in lengths:
        if n > max_length:
            over += 1
        else:
            counts[min((n - 1) // width, n_bins - 1)] += 1
    peak = max(counts + [over]) or 1
    rows = [(f"{b * width + 1:>6}–{min((b + 1) * width, max_length):<6}", c, "green") for b, c in enumerate(counts)]
    if over:
        rows.append((f"{'>' + str(max_length):>13}", over, "red"))
    console.print(f"token lengths (max_length={max_length}):")
    for label, count, style in rows:
        line = Text(f"  {label} {count:>7} ")
        line.append("█" * max(1, round(BAR_WIDTH * count / peak)) if count else "", style=style)
        console.print(line)


def _render_sample(tokenizer: Any, ids: list[int], labels: list[int]) -> Text:
    """Text of one rendered row: trained tokens green and bold, the rest dim."""
    ids, labels = ids[:SAMPLE_MAX_TOKENS], labels[:SAMPLE_MAX_TOKENS]
    # Decode prefixes at the trained/untrained boundaries so sentencepiece spacing stays right.
    cuts = [0] + [i for i in range(1, len(ids)) if (labels[i] == IGNORE_INDEX) != (labels[i - 1] == IGNORE_INDEX)]
    cuts.append(len(ids))
    texts = [tokenizer.decode(ids[:c], skip_special_tokens=False) for c in cuts]
    out = Text()
    for k in range(len(cuts) - 1):
        piece = texts[k + 1][len(texts[k]) :]
        # The template's newline after <|end|> is swallowed by the tokenizer; show it for readability.
        piece = piece.replace("<|end|>", "<|end|>\n")
        out.append(piece, style="bold green" if labels[cuts[k]] != IGNORE_INDEX else "dim")
    return out


def _report_source(
    name: str, data: SourceData, tokenizer: Any, data_cfg: Any, max_length: int, console: Console
) -> bool:
    """Print the report of one source; return True when it would stop training."""
    v = data.validation
    on_invalid = getattr(data_cfg, "on_invalid", "error") or "error"
    on_overlength = getattr(data_cfg, "on_overlength", "truncate") or "truncate"
    loss_on = getattr(data_cfg, "loss_on", "assistant") or "assistant"
    policy = getattr(data_cfg, "special_tokens_in_text", DEFAULT_POLICY) or DEFAULT_POLICY
    console.rule(f"[bold]{name}[/]: {data.loaded.source}")
    console.print(f"format: [bold]{data.format}[/]   rows: {len(data.conversations)}   valid: {len(v.valid)}")
    fatal = False
    if v.problems:
        table = Table(title=f"invalid rows ({v.unit} numbers, 1-based)", title_justify="left")
        for col in ("problem", "rows", f"first {v.unit}s", "example"):
            table.add_column(col)
        for problem, hits in v.problems.items():
            shown = rows_shown(problem)
            first = ", ".join(str(n) for n, _ in hits[:shown]) + (", …" if len(hits) > shown else "")
            table.add_row(problem, str(len(hits)), first, hits[0][1])
        console.print(table)
        fatal = on_invalid == "error"
        verdict = "[red]training would stop (on_invalid: error)[/]" if fatal else "they will be skipped (on_invalid: skip)"
        console.print(f"{v.n_invalid} invalid rows: {verdict}")
    _special_rows(console, data, policy)
    with_calls = _tool_rows(console, data)
    if not v.valid:
        console.print("[red]no valid rows[/]")
        return True
    lengths, total, trained, emptied = _lengths(tokenizer, data, loss_on, max_length, policy)
    _histogram(console, lengths, max_length)
    over = sum(1 for n in lengths if n > max_length)
    if over:
        console.print(f"{over} rows exceed max_length={max_length}: would be {_OVERLENGTH_EFFECT[on_overlength]}")
        if on_overlength == "truncate" and emptied:
            console.print(f"{emptied} of them lose every trained token when truncated and would be dropped")
        fatal = fatal or on_overlength == "error"
    share = trained / total if total else 0.0
    console.print(f"tokens: {total} total, {trained} trained ({share:.1%}, loss_on: {loss_on})")
    convs = data.valid_conversations()
    picks = sorted({0, len(convs) // 2, len(convs) - 1})[:N_SAMPLES]
    calls_at = set(with_calls)
    if calls_at and not any(v.valid[p] in calls_at for p in picks):
        # Show how tool calls render and what of them is trained: the first row with calls replaces the middle.
        picks = sorted({picks[0], v.valid.index(with_calls[0]), picks[-1]})
    rendered = render_conversations(tokenizer, [convs[i] for i in picks], loss_on, policy)
    numbers = data.valid_numbers()
    for i, (ids, labels) in zip(picks, rendered):
        more = f", first {SAMPLE_MAX_TOKENS} shown" if len(ids) > SAMPLE_MAX_TOKENS else ""
        console.print(Text(f"sample {v.unit} {numbers[i]} ({len(ids)} tokens{more}; ", style="bold").append(
            "trained", style="bold green").append(" / ").append("not trained", style="dim").append(")"))
        console.print(_render_sample(tokenizer, ids, labels))
    return fatal


def run_data_check(target: Path, tokenizer: Any, data_cfg: Any, max_length: int, console: Console) -> int:
    """Validate every row of a config's data (or a bare data file) and print a report.

    Args:
        target: The config file or data file the user named; a config's directory is where relative
            data paths resolve first.
        tokenizer: The Phi-3 tokenizer.
        data_cfg: The data config (for a bare data file, a default one whose ``train.path`` is it).
        max_length: The training ``max_length`` the lengths are judged against.
        console: Where the report goes.

    Returns:
        2 when training would stop on this data (invalid rows with ``on_invalid: error``, overlong
        rows with ``on_overlength: error``, or no valid rows), else 0.

    Raises:
        DataError: The data cannot be read at all (missing file, malformed JSON line, unknown format).
        ResourceError: A hub dataset cannot be fetched.
    """
    target = Path(target)
    base_dir = target.parent if target.suffix.lower() in (".yaml", ".yml") else None
    sources = [("train", data_cfg.train)]
    if getattr(data_cfg, "eval", None) is not None:
        sources.append(("eval", data_cfg.eval))
    fatal = False
    for name, source in sources:
        data = read_source(source, data_cfg, base_dir)
        fatal = _report_source(name, data, tokenizer, data_cfg, max_length, console) or fatal
    eval_fraction = getattr(data_cfg, "eval_fraction", None)
    if eval_fraction and len(sources) == 1:
        console.print(f"eval: {eval_fraction:.0%} of the valid training rows (data.eval_fraction)")
    console.rule("[red]data check failed[/]" if fatal else "[green]data check passed[/]")
    return 2 if fatal else 0


def check_target(target: Path, set_: list[str], console: Console) -> int:
    """``phi3tune data check TARGET``: the report for a config's data, or for a bare data file.

    Args:
        target: A config YAML (its ``data`` section and model's tokenizer are used) or a data file (checked
            as ``data.train`` with default settings and the Phi-3 tokenizer).
        set_: ``--set`` overrides, e.g. ``data.on_invalid=skip`` or ``training_config.max_length=512``.
        console: Where the report goes.

    Returns:
        The exit code of ``run_data_check``: 2 when training would stop on this data, else 0.

    Raises:
        ConfigError: The config (or an override) is invalid.
        DataError: The target does not exist or its data cannot be read.
    """
    from phi3tune.config.load import load_config
    from phi3tune.errors import DataError
    from phi3tune.model.loading import load_tokenizer

    target = Path(target)
    why = not_a_regular_file(target)
    if why is not None:
        raise DataError(f"{target}: {why}.", hint="pass a config YAML or a .jsonl/.json/.csv/.parquet file.")
    if target.suffix.lower() in (".yaml", ".yml"):
        cfg = load_config(target, list(set_))
    else:
        # A bare data file is checked as the train data of an otherwise default config.
        cfg = load_config(None, [f"data.train.path={json.dumps(str(target.resolve()))}", *set_])
    for warning in cfg.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    max_length = max_length_of(cfg.training_config)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.token)
    return run_data_check(target, tokenizer, cfg.data, max_length, console)
