"""Generated answers, scored: the ``generation`` section of eval_metrics.json, the rows of
eval_generations.jsonl, the printed table and the samples where adapter and base differ most."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from phi3tune.evaluation.metrics import TEXT_SCORES, difference, sample_scores, summarise
from phi3tune.model.generation import GenerationRun, prompt_and_reference

SUMMARY_KEYS = (*TEXT_SCORES, "stopped_rate", "mean_new_tokens", "tokens_per_second")
N_SHOWN = 3


@dataclass
class Prompts:
    """The generation prompts of an eval set: each sample's conversation up to its last assistant turn."""

    indices: list[int]  # the sample's position in the eval set
    prompts: list[list[int]]
    references: list[list[int]]


def prompts_of(dataset, assistant_id: int, limit: int | None = None) -> Prompts:
    """Prompts and references from tokenised samples (skipping those with no assistant turn left)."""
    found = Prompts([], [], [])
    for index, ids in enumerate(dataset["input_ids"]):
        if limit is not None and len(found.indices) >= limit:
            break
        split = prompt_and_reference(ids, assistant_id)
        if split is None:
            continue
        found.indices.append(index)
        found.prompts.append(split[0])
        found.references.append(split[1])
    return found


def _target_summary(run: GenerationRun, scores: list[dict[str, Any]]) -> dict[str, Any]:
    summary = summarise(scores, [a.stopped for a in run.answers], [a.new_tokens for a in run.answers])
    summary["tokens_per_second"] = run.tokens_per_second
    summary["seconds"] = round(run.seconds, 3)
    summary["batch_size"] = run.batch_size
    return summary


def score_answers(prompts: Prompts, tokenizer, adapter: GenerationRun, base: GenerationRun | None,
                  pattern: re.Pattern[str] | None) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Score every answer; return the per-target summaries (``adapter``, ``base``, ``difference``) and the rows."""
    rows: list[dict[str, Any]] = []
    targets: list[tuple[str, GenerationRun]] = [("", adapter)] + ([("base_", base)] if base is not None else [])
    per_target: dict[str, list[dict[str, Any]]] = {prefix: [] for prefix, _ in targets}
    for i, index in enumerate(prompts.indices):
        reference = tokenizer.decode(prompts.references[i], skip_special_tokens=True)
        row: dict[str, Any] = {"index": index, "prompt": tokenizer.decode(prompts.prompts[i], skip_special_tokens=False),
                               "reference": reference}
        for prefix, run in targets:
            answer = run.answers[i]
            text = tokenizer.decode(answer.ids, skip_special_tokens=True)
            scores = sample_scores(text, reference, pattern)
            per_target[prefix].append(scores)
            row.update({f"{prefix}answer": text, f"{prefix}stopped": answer.stopped,
                        f"{prefix}new_tokens": answer.new_tokens, f"{prefix}scores": scores})
        rows.append(row)
    section = {"adapter": _target_summary(adapter, per_target[""])}
    if base is not None:
        section["base"] = _target_summary(base, per_target["base_"])
        section["difference"] = difference(section["adapter"], section["base"], SUMMARY_KEYS)
    return section, rows


def _gap(row: dict[str, Any]) -> tuple[float, float]:
    """How far the adapter's and the base's answer to one sample are apart in score (primary, then chrF)."""
    mine, theirs = row["scores"], row["base_scores"]
    key = "answer_match" if mine.get("answer_match") is not None else "chrf"
    return abs((mine.get(key) or 0.0) - (theirs.get(key) or 0.0)), abs(mine["chrf"] - theirs["chrf"])


def most_different(rows: Sequence[dict[str, Any]], n: int = N_SHOWN) -> list[dict[str, Any]]:
    """The ``n`` samples whose adapter and base scores differ most (none without base answers)."""
    compared = [row for row in rows if "base_scores" in row and row["answer"] != row["base_answer"]]
    return sorted(compared, key=_gap, reverse=True)[:n]


_COUNTS = ("mean_new_tokens", "tokens_per_second")


def _fmt(key: str, value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    digits = ",.1f" if key in _COUNTS else ".4f"
    return format(value, ("+" if signed else "") + digits)


def print_generation(section: dict[str, Any], max_new_tokens: int, console: Console, adapter_label: str = "adapter") -> None:
    """The generation table: one row per metric, adapter / base / difference columns."""
    adapter = section["adapter"]
    has_base = "base" in section
    table = Table(title=f"generation: {adapter['n_samples']} samples, greedy, up to {max_new_tokens} new tokens, "
                        f"batch {adapter['batch_size']}", title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column(adapter_label, justify="right")
    if has_base:
        table.add_column("base", justify="right")
        table.add_column("difference", justify="right")
    for key in SUMMARY_KEYS:
        if key not in adapter:
            continue
        name = f"{key} ({adapter['answer_match_samples']} scorable)" if key == "answer_match" else key
        cells = [_fmt(key, adapter.get(key))]
        if has_base:
            cells += [_fmt(key, section["base"].get(key)), _fmt(key, section["difference"].get(key), signed=True)]
        table.add_row(name, *cells)
    console.print(table)


def _short(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def print_differences(rows: Sequence[dict[str, Any]], console: Console) -> None:
    """The samples where adapter and base differ most: reference, both answers, their scores."""
    shown = most_different(rows)
    if not shown:
        return
    console.print(f"[bold]{len(shown)} samples where adapter and base differ most[/] (eval_generations.jsonl has all):")
    for row in shown:
        key = "answer_match" if row["scores"].get("answer_match") is not None else "chrf"
        console.print(f"  #{row['index']}  reference: {_short(row['reference'])}", highlight=False, soft_wrap=True)
        console.print(f"      adapter ({key} {row['scores'][key]:.2f}): {_short(row['answer'])}", highlight=False, soft_wrap=True)
        console.print(f"      base    ({key} {row['base_scores'][key]:.2f}): {_short(row['base_answer'])}",
                      highlight=False, soft_wrap=True)
