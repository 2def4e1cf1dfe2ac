"""``phi3tune eval``: did the fine-tune get better? Loss on assistant tokens, generated answers scored
against the references, and benchmark suites, for the adapter and (``--compare-base``) its base.

1. Loss: the samples are tokenised exactly as for training (``phi3tune.data.prepare``: same chat template,
   same assistant-only labels, same ``max_length`` and overlength policy), from the run's eval split by
   default (``data.eval`` or the ``eval_fraction`` split rebuilt with the run's seed) or from ``--config``'s
   eval data or a ``--data`` file. ``eval_loss`` is the token-weighted mean cross-entropy over every
   labelled token (the trainer's logged eval loss averages per-batch means, so the two can differ slightly
   when samples differ in length).
2. Generation (``--generate``): a greedy answer to every sample, its prompt the conversation up to its last
   assistant turn as training tokenised it, its reference that turn; batched with a KV cache
   (``model.generation``), scored by ``evaluation.metrics``. Without ``--generate`` the first few samples
   are answered as a preview, unscored in eval_metrics.json.
3. Tasks (``--tasks``): lm-evaluation-harness on the same loaded model (``evaluation.harness``).

Every base pass runs before the adapter passes: the adapter is merged into the weights in memory for its
generation and tasks, and unmerging is exact only up to rounding.

Output: ``eval_metrics.json`` (default: in the run dir). Its top-level keys stay the schema of README's
output layout (eval_loss, perplexity, token_accuracy, n_samples, n_tokens) for the adapter, so tools reading the
training-time file keep working; ``adapter``/``base``/``difference``, ``generation`` and ``tasks`` sections
are added, and a training-time file that was there is kept under ``training_eval``. ``eval_generations.jsonl``
beside it holds every answered sample. What may be replaced is ``evaluation.outputs``' policy; both files are
written atomically, and while eval writes into a run folder it holds the run's lock (``run_lock``), so a
train, resume or second eval cannot write the same files at the same time.
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
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from phi3tune.data.evaluation import apply_eval_overrides, load_eval_dataset
from phi3tune.errors import DataError, UsageError
from phi3tune.evaluation import harness
from phi3tune.evaluation.answers import Prompts, print_differences, print_generation, prompts_of, score_answers
from phi3tune.evaluation.metrics import difference
from phi3tune.evaluation.options import GenerationOptions
from phi3tune.evaluation.outputs import (METRIC_KEYS, WRITTEN_BY, check_output, default_output, generations_path,
                                         previous_training_eval, run_folder_holding)
from phi3tune.model import loading
from phi3tune.model.generation import GenerationRun, adapter_merged, generate
from phi3tune.model.targets import Target, load_for_inference, resolve_target
from phi3tune.training.atomic import atomic_write_json, atomic_write_text
from phi3tune.training.run_lock import folder_lock

IGNORE_INDEX = -100
BATCH_SIZE = 4
N_PREVIEW = 5  # samples answered without --generate
PREVIEW_MAX_TOKENS = 256


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
             overrides: list[str] | None = None, options: GenerationOptions | None = None,
             console: Console | None = None) -> None:
    """``phi3tune eval``: score a run's adapter (and optionally its base) and write the results.

    Args:
        run_or_adapter: A run dir, an adapter dir or a model dir (never a hub id: there is nothing to
            compare or write into).
        config: A config whose eval data to use instead of the run's.
        data: A data file to evaluate on instead (any supported format).
        max_samples: Use only the first N samples (for the loss and for generation).
        compare_base: Also score the base model (adapter disabled) on the same samples and tasks.
        output: Metrics JSON path (default: RUN/eval_metrics.json); new, or an earlier eval's output.
        overrides: ``--set KEY=VALUE`` items for the run's ``data.*`` (and ``training_config.max_length``/``seed``).
        options: ``--generate`` / ``--tasks`` and their settings (``check_options``); None: neither.
        console: Where the tables and progress go.

    Raises:
        UsageError: Bad target, no eval data, --compare-base for a full model, an --output that is not ours
            to overwrite, or the run folder in use by another phi3tune process.
    """
    console = console or Console(stderr=True)
    options = options or GenerationOptions()
    if config is not None and data is not None:
        raise UsageError("--config and --data both choose the eval data; give one.")
    target = resolve_target(run_or_adapter, allow_hub=False)
    if compare_base and target.kind != "adapter":
        raise UsageError(f"--compare-base needs an adapter; {target.path} is a full model.")
    target = dataclasses.replace(target, run_config=apply_eval_overrides(target.run_config, overrides or [],
                                                                         with_config=config is not None))
    output = Path(output).expanduser() if output is not None else default_output(target)
    run_folder = run_folder_holding(output, target)
    # Writing into a run: no train, resume or second eval may write it meanwhile.
    with folder_lock(run_folder, "eval") if run_folder is not None else contextlib.nullcontext():
        check_output(output)
        _evaluate(target, output, config=config, data=data, overrides=overrides or [], max_samples=max_samples,
                  compare_base=compare_base, options=options, console=console)


def _eval_samples(target: Target, tokenizer, *, config: Path | None, data: Path | None, overrides: list[str],
                  max_samples: int | None, tasks_only_ok: bool):
    """The eval samples and their description; (None, None) when only --tasks was asked and none exist."""
    try:
        dataset, source = load_eval_dataset(target, tokenizer, config=config, data=data, overrides=overrides)
    except DataError as exc:
        if exc.hint and "on_invalid" in exc.hint:  # the data module's hint names the config key; eval has --set
            exc.hint = "fix these rows, or pass --set data.on_invalid=skip to leave them out (the count is shown)."
        raise
    except UsageError:
        if tasks_only_ok:  # `eval ADAPTER --tasks gsm8k` needs no eval data of its own
            return None, None
        raise
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    if len(dataset) == 0:
        raise UsageError(f"no usable eval samples in {source}.")
    return dataset, source


def _answer(model, prompts: Prompts, max_new_tokens: int, options: GenerationOptions, progress: Progress,
            label: str) -> GenerationRun:
    task = progress.add_task(label, total=len(prompts.prompts))
    return generate(model, prompts.prompts, max_new_tokens=max_new_tokens, batch_size=options.batch_size,
                    advance=lambda n: progress.advance(task, n))


def _tasks(model, tokenizer, options: GenerationOptions, device: str) -> dict[str, dict[str, float]]:
    # lm-eval's own "auto" probes by running out of memory on purpose; on a CPU that is the machine's RAM.
    batch = options.batch_size or ("auto" if device == "cuda" else 8)
    return harness.run_tasks(model, tokenizer, options.tasks, limit=options.limit, num_fewshot=options.num_fewshot,
                             batch_size=batch)


def _evaluate(target: Target, output: Path, *, config: Path | None, data: Path | None, overrides: list[str],
              max_samples: int | None, compare_base: bool, options: GenerationOptions, console: Console) -> None:
    device = loading.device_type()
    model, tokenizer = load_for_inference(target, device=device)
    if target.quantization and device != "cuda":
        console.print("[yellow]warning:[/] QLoRA adapter evaluated on the unquantized base (no GPU): "
                      "numbers differ slightly from the 4-bit base it was trained on.")
    dataset, source = _eval_samples(target, tokenizer, config=config, data=data, overrides=overrides,
                                    max_samples=max_samples,
                                    tasks_only_ok=options.tasks is not None and config is None and data is None
                                    and not options.generate)
    result: dict[str, Any] = {"written_by": WRITTEN_BY, "target": target.path, "target_kind": target.kind,
                              "base_model": target.base, "data": source}
    prompts, budget, answers = None, 0, {}
    started = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal) as progress:
        if dataset is not None:
            adapter_metrics = score(model, dataset, progress=progress, label=target.kind)
            result = {**adapter_metrics, **result, "adapter": adapter_metrics}
            if compare_base:
                with model.disable_adapter():
                    result["base"] = score(model, dataset, progress=progress, label="base")
                result["difference"] = difference(adapter_metrics, result["base"], METRIC_KEYS)
            assistant_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
            prompts = prompts_of(dataset, assistant_id, limit=None if options.generate else N_PREVIEW)
            if options.generate and not prompts.prompts:
                raise UsageError(f"--generate: no sample in {source} has an assistant turn left to answer.",
                                 hint="samples cut off by max_length lose it: --set training_config.max_length=N")
            # The preview's budget: twice the longest reference (plus slack) shows whether answers stop.
            budget = options.max_new_tokens if options.generate else min(
                PREVIEW_MAX_TOKENS, 2 * max((len(r) for r in prompts.references), default=0) + 32)
        tasks: dict[str, Any] = {}
        if compare_base:  # every base pass before the adapter is merged (module docstring)
            with model.disable_adapter():
                if prompts is not None and prompts.prompts:
                    answers["base"] = _answer(model, prompts, budget, options, progress, "base answers")
                if options.tasks is not None:
                    tasks["base"] = _tasks(model, tokenizer, options, device)
        with adapter_merged(model) as merged:
            if prompts is not None and prompts.prompts:
                answers["adapter"] = _answer(model, prompts, budget, options, progress, f"{target.kind} answers")
            if options.tasks is not None:
                tasks["adapter"] = _tasks(model, tokenizer, options, device)
    rows: list[dict[str, Any]] = []
    if "adapter" in answers:
        section, rows = score_answers(prompts, tokenizer, answers["adapter"], answers.get("base"), options.answer_pattern)
        if options.generate:
            result["generation"] = {**section, "settings": {
                "max_new_tokens": budget, "answer_pattern": options.answer_pattern.pattern if options.answer_pattern else None,
                "batch_size": options.batch_size or "auto", "device": device, "adapter_merged": merged}}
    if options.tasks is not None:
        result["tasks"] = harness.tasks_section(tasks["adapter"], tasks.get("base"), {
            "tasks": options.tasks.names, "limit": options.limit, "num_fewshot": options.num_fewshot,
            "lm_eval": harness.lm_eval_version()})
    result["seconds"] = round(time.perf_counter() - started, 2)
    label = "adapter" if target.kind == "adapter" else "model"
    if dataset is not None:
        print_table(result, console)
    if "generation" in result:
        print_generation(result["generation"], budget, console, adapter_label=label)
        print_differences(rows, console)
    if "tasks" in result:
        harness.print_tasks(result["tasks"], console, adapter_label=label)
    if result.get("data"):
        console.print(f"data: {result['data']}", highlight=False, soft_wrap=True)
    # Printed first: a write that fails (a full disk) must not take the results with it.
    console.print(_write(output, result, rows if dataset is not None else None), highlight=False, soft_wrap=True)


def _write(output: Path, result: dict[str, Any], rows: list[dict[str, Any]] | None) -> str:
    """Write the metrics (keeping training-time ones) and the answered samples; say what was written."""
    previous = previous_training_eval(output)
    if previous is not None:
        result["training_eval"] = previous
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output, result)
    written = f"wrote {output}"
    if previous is not None:
        written += " (training-time metrics kept under 'training_eval')"
    if rows is not None:
        gen_path = generations_path(output)
        atomic_write_text(gen_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        written += f" and {gen_path.name} ({len(rows)} answered samples)"
    return written
