"""``phi3tune eval``: loss, perplexity and token accuracy on assistant tokens, plus greedy generations.

The samples are tokenised exactly as for training (``phi3tune.data.prepare``: same chat template, same
assistant-only labels, same ``max_length`` and overlength policy), from the run's eval split by
default — ``data.eval`` or the ``eval_fraction`` split rebuilt with the run's seed — or from
``--config``'s eval data or a ``--data`` file.

``eval_loss`` is the token-weighted mean cross-entropy over every labelled token of every sample
(the trainer's logged eval loss averages per-batch means, so the two can differ slightly when
samples differ in length). With ``--compare-base`` the same model is run with its adapter disabled
on the same samples.

Output: ``eval_metrics.json`` (default: in the run dir). Its top-level keys stay the schema of
README's output layout (eval_loss, perplexity, token_accuracy, n_samples, n_tokens) for the adapter, so tools
reading the training-time file keep working; ``adapter``/``base``/``difference`` sections are added,
and a training-time file that was there is kept under ``training_eval`` rather than overwritten.
``eval_generations.jsonl`` beside it holds prompt / reference / answer (and base_answer).

Nothing else is ever overwritten: ``--output`` must be a new file, an earlier eval's output (its
``written_by`` marker) or a run's training-time ``eval_metrics.json``, and the generations file beside it
new or an earlier eval's; a folder or any other file is exit 2 (``check_output``). Both are written
atomically, and while eval writes into a run folder it holds the run's lock (``run_lock``), so a train,
resume or second eval cannot write the same files at the same time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from phi3tune.model import loading
from phi3tune.model.artefacts import quoted
from phi3tune.training.atomic import atomic_write_json, atomic_write_text
from phi3tune.errors import DataError, UsageError
from phi3tune.data.evaluation import apply_eval_overrides, load_eval_dataset
from phi3tune.model.targets import Target, load_for_inference, resolve_target
from phi3tune.training.layout import EVAL_METRICS, RUN_CONFIG
from phi3tune.training.run_lock import folder_lock

IGNORE_INDEX = -100
BATCH_SIZE = 4
N_GENERATIONS = 5
MAX_GENERATION_TOKENS = 256
METRIC_KEYS = ("eval_loss", "perplexity", "token_accuracy")
TRAINING_METRIC_KEYS = {*METRIC_KEYS, "n_samples", "n_tokens"}
WRITTEN_BY = "phi3tune eval"  # the marker that makes an existing --output file ours to replace


@torch.no_grad()
def score(model, dataset, *, progress: Progress | None = None, label: str = "eval") -> dict[str, Any]:
    """Token-weighted loss and accuracy of ``model`` over the labelled tokens of ``dataset``.

    Args:
        model: A causal LM in eval mode.
        dataset: Rows with ``input_ids`` and ``labels`` (-100 where not trained).
        progress: A rich progress display to advance, or None.
        label: The progress task's name.

    Returns:
        eval_loss, perplexity, token_accuracy, n_samples, n_tokens.
    """
    device = next(model.parameters()).device
    task = progress.add_task(label, total=len(dataset)) if progress is not None else None
    total_loss, correct, n_tokens = 0.0, 0, 0
    for start in range(0, len(dataset), BATCH_SIZE):
        rows = dataset[start : start + BATCH_SIZE]
        width = max(len(ids) for ids in rows["input_ids"])
        ids = torch.full((len(rows["input_ids"]), width), loading.PHI3_EOS_ID, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for i, (row_ids, row_labels) in enumerate(zip(rows["input_ids"], rows["labels"])):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            labels[i, : len(row_labels)] = torch.tensor(row_labels)
            mask[i, : len(row_ids)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        # Position t predicts token t+1, as in training.
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        total_loss += float(
            torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                                              ignore_index=IGNORE_INDEX, reduction="sum")
        )
        trained = shift_labels != IGNORE_INDEX
        correct += int((shift_logits.argmax(-1)[trained] == shift_labels[trained]).sum())
        n_tokens += int(trained.sum())
        if progress is not None:
            progress.advance(task, len(rows["input_ids"]))
    loss = total_loss / n_tokens if n_tokens else float("nan")
    return {
        "eval_loss": loss,
        # exp overflows past ~700; a perplexity that large says nothing anyway.
        "perplexity": math.exp(loss) if n_tokens and loss < 50 else None,
        "token_accuracy": correct / n_tokens if n_tokens else None,
        "n_samples": len(dataset),
        "n_tokens": n_tokens,
    }


def _split_prompt(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    """Prompt (up to the last trained span) and reference ids (that span, without its closing <|end|>)."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained:
        return None
    end = trained[-1] + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    reference = [t for t in ids[start:end] if t not in loading.PHI3_STOP_IDS]
    return ids[:start], reference


@torch.no_grad()
def _greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    device = next(model.parameters()).device
    tensor = torch.tensor([prompt], device=device)
    out = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=list(loading.PHI3_STOP_IDS),
                         pad_token_id=loading.PHI3_EOS_ID)
    return out[0, len(prompt) :].tolist()


def generations(model, tokenizer, dataset, *, compare_base: bool) -> list[dict[str, str]]:
    """Greedy answers (stopping at <|end|>) for the first few samples: prompt / reference / answer."""
    found = []
    for ids, labels in zip(dataset["input_ids"][:N_GENERATIONS], dataset["labels"][:N_GENERATIONS]):
        split = _split_prompt(list(ids), list(labels))
        if split is None:
            continue
        prompt, reference = split
        # Twice the reference's length (plus slack) shows whether an answer stops or runs on, without
        # paying for hundreds of tokens of a base model that never stops.
        budget = min(MAX_GENERATION_TOKENS, 2 * len(reference) + 32)
        row = {
            "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
            "reference": tokenizer.decode(reference, skip_special_tokens=True),
            "answer": tokenizer.decode(_greedy(model, prompt, budget), skip_special_tokens=True),
        }
        if compare_base:
            with model.disable_adapter():
                row["base_answer"] = tokenizer.decode(_greedy(model, prompt, budget), skip_special_tokens=True)
        found.append(row)
    return found


def _difference(adapter: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """adapter minus base for each metric (negative eval_loss = the adapter is better)."""
    return {k: (adapter[k] - base[k] if adapter.get(k) is not None and base.get(k) is not None else None)
            for k in METRIC_KEYS}


def _default_output(target: Target) -> Path:
    if target.run_dir is not None:
        return target.run_dir / EVAL_METRICS
    if Path(target.path).is_dir():
        return Path(target.path) / EVAL_METRICS
    raise UsageError(f"{target.path} is a hub id: there is no run folder to write metrics to.",
                     hint="pass --output FILE.json")


def _generations_path(output: Path) -> Path:
    if output.name == EVAL_METRICS:
        return output.with_name("eval_generations.jsonl")
    return output.with_name(f"{output.stem}.generations.jsonl")


def _read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _is_training_time_metrics(path: Path, loaded: dict[str, Any] | None) -> bool:
    """The eval_metrics.json ``phi3tune train`` writes into a run: only the metric keys, in a run folder."""
    return (path.name == EVAL_METRICS and loaded is not None and bool(loaded)
            and set(loaded) <= TRAINING_METRIC_KEYS and (path.parent / RUN_CONFIG).is_file())


def _is_generations_file(path: Path) -> bool:
    """An eval_generations file an earlier eval wrote: JSON lines with prompt and answer, or empty."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [json.loads(line) for line in lines]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return all(isinstance(row, dict) and {"prompt", "answer"} <= set(row) for row in rows)


def check_output(output: Path) -> Path:
    """Refuse an ``--output`` that would overwrite something that is not an earlier eval's output.

    Accepted: a new file; a JSON file an earlier ``phi3tune eval`` wrote (``written_by``); a run's
    training-time ``eval_metrics.json`` (kept under ``training_eval``). The generations file written beside
    it must likewise be new or an earlier eval's.

    Raises:
        UsageError: ``output`` is a folder or something else, or an existing file eval did not write.
    """
    output = Path(output).expanduser()
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; --output names the metrics file.",
                         hint=f"e.g. --output {quoted(output / EVAL_METRICS)}")
    if output.exists() and not output.is_file():
        raise UsageError(f"--output {output} is not a regular file.", hint="give a new .json file path.")
    if output.is_file():
        loaded = _read_json_object(output)
        ours = loaded is not None and loaded.get("written_by") == WRITTEN_BY
        if not (ours or _is_training_time_metrics(output, loaded)):
            raise UsageError(
                f"--output {output} already exists and was not written by phi3tune eval; it will not be overwritten.",
                hint=f"give a new file, e.g. --output {quoted(output.with_name(output.stem + '.eval.json'))}",
            )
    generations = _generations_path(output)
    if generations.exists() and not (generations.is_file() and _is_generations_file(generations)):
        raise UsageError(
            f"{generations} (where eval writes its sample generations) exists and was not written by phi3tune "
            "eval; it will not be overwritten.",
            hint="choose another --output name.",
        )
    return output


def _run_folder_holding(output: Path, target: Target) -> Path | None:
    """The run folder ``output`` is written into (to be locked), if any."""
    parent = output.expanduser().resolve().parent
    if target.run_dir is not None and parent == Path(target.run_dir).resolve():
        return parent
    return parent if (parent / RUN_CONFIG).is_file() else None


def _previous_training_eval(output: Path) -> dict[str, Any] | None:
    """The training-time metrics found at ``output`` (kept, not clobbered), if any."""
    if not output.is_file():
        return None
    previous = _read_json_object(output)
    if previous is None:
        return None
    if previous.get("written_by") == WRITTEN_BY:
        return previous.get("training_eval")  # an earlier eval: carry its preserved training section on
    return previous


def print_table(result: dict[str, Any], console: Console) -> None:
    """The on-screen comparison: adapter, base and difference per metric."""
    has_base = "base" in result
    table = Table(title=f"phi3tune eval: {result['n_samples']} samples, {result['n_tokens']} assistant tokens",
                  title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("adapter" if result["target_kind"] == "adapter" else "model", justify="right")
    if has_base:
        table.add_column("base", justify="right")
        table.add_column("difference", justify="right")
    for key in METRIC_KEYS:
        cells = [_fmt(result["adapter"].get(key))]
        if has_base:
            cells += [_fmt(result["base"].get(key)), _fmt(result["difference"].get(key), signed=True)]
        table.add_row(key, *cells)
    console.print(table)


def _fmt(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def run_eval(run_or_adapter: str | Path, *, config: Path | None = None, data: Path | None = None,
             max_samples: int | None = None, compare_base: bool = False, output: Path | None = None,
             overrides: list[str] | None = None, console: Console | None = None) -> None:
    """``phi3tune eval``: score a run's adapter (and optionally its base) and write the results.

    Args:
        run_or_adapter: A run dir, an adapter dir or a model dir (never a hub id: there is nothing to
            compare or write into).
        config: A config whose eval data to use instead of the run's.
        data: A data file to evaluate on instead (any supported format).
        max_samples: Use only the first N samples.
        compare_base: Also score the base model (adapter disabled) on the same samples.
        output: Metrics JSON path (default: RUN/eval_metrics.json); new, or an earlier eval's output.
        overrides: ``--set KEY=VALUE`` items for the run's ``data.*`` (and ``training_config.max_length``/``seed``).
        console: Where the table and progress go.

    Raises:
        UsageError: Bad target, no eval data, --compare-base for a full model, an --output that is not ours
            to overwrite, or the run folder in use by another phi3tune process.
    """
    console = console or Console(stderr=True)
    if config is not None and data is not None:
        raise UsageError("--config and --data both choose the eval data; give one.")
    target = resolve_target(run_or_adapter, allow_hub=False)
    if compare_base and target.kind != "adapter":
        raise UsageError(f"--compare-base needs an adapter; {target.path} is a full model.")
    target = dataclasses.replace(target, run_config=apply_eval_overrides(target.run_config, overrides or [],
                                                                         with_config=config is not None))
    output = Path(output).expanduser() if output is not None else _default_output(target)
    run_folder = _run_folder_holding(output, target)
    # Writing into a run: no train, resume or second eval may write it meanwhile.
    with folder_lock(run_folder, "eval") if run_folder is not None else contextlib.nullcontext():
        check_output(output)
        _evaluate(target, output, config=config, data=data, overrides=overrides or [], max_samples=max_samples,
                  compare_base=compare_base, console=console)


def _evaluate(target: Target, output: Path, *, config: Path | None, data: Path | None, overrides: list[str],
              max_samples: int | None, compare_base: bool, console: Console) -> None:
    device = loading.device_type()
    model, tokenizer = load_for_inference(target, device=device)
    if target.quantization and device != "cuda":
        console.print("[yellow]warning:[/] QLoRA adapter evaluated on the unquantized base (no GPU): "
                      "numbers differ slightly from the 4-bit base it was trained on.")
    try:
        dataset, source = load_eval_dataset(target, tokenizer, config=config, data=data, overrides=overrides)
    except DataError as exc:
        if exc.hint and "on_invalid" in exc.hint:  # the data module's hint names the config key; eval has --set
            exc.hint = "fix these rows, or pass --set data.on_invalid=skip to leave them out (the count is shown)."
        raise
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    if len(dataset) == 0:
        raise UsageError(f"no usable eval samples in {source}.")

    started = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        adapter_metrics = score(model, dataset, progress=progress, label=target.kind)
        base_metrics = None
        if compare_base:
            with model.disable_adapter():
                base_metrics = score(model, dataset, progress=progress, label="base")
    samples = generations(model, tokenizer, dataset, compare_base=compare_base)

    result: dict[str, Any] = {**adapter_metrics, "written_by": WRITTEN_BY, "target": target.path,
                              "target_kind": target.kind, "base_model": target.base, "data": source,
                              "adapter": adapter_metrics}
    if base_metrics is not None:
        result["base"] = base_metrics
        result["difference"] = _difference(adapter_metrics, base_metrics)
    result["seconds"] = round(time.perf_counter() - started, 2)
    previous = _previous_training_eval(output)
    if previous is not None:
        result["training_eval"] = previous
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output, result)
    gen_path = _generations_path(output)
    atomic_write_text(gen_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in samples))

    print_table(result, console)
    kept = " (training-time metrics kept under 'training_eval')" if previous is not None else ""
    console.print(f"data: {source}", highlight=False, soft_wrap=True)
    console.print(f"wrote {output}{kept} and {gen_path.name} ({len(samples)} generations)",
                  highlight=False, soft_wrap=True)
