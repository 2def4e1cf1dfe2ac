"""The phi3tune command line: thin commands that map verbs to functions, and errors to exit codes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from phi3tune.errors import Phi3TuneError, TrainingInterrupted, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune Microsoft Phi-3 Mini with LoRA or QLoRA from one YAML file.",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate training data.")
app.add_typer(data_app, name="data")
export_app = typer.Typer(no_args_is_help=True, help="Export a fine-tune for other runtimes.")
app.add_typer(export_app, name="export")

console = Console(stderr=True)
T = TypeVar("T")


def _debug() -> bool:
    return os.environ.get("PHI3TUNE_DEBUG", "") not in ("", "0", "false")


def _rank_prefix() -> str:
    """Under torchrun each rank's messages say which rank speaks (the launcher names the failing one)."""
    return f"rank {os.environ.get('RANK', '0')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _other_rank() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


def _fail(exc: Phi3TuneError) -> typer.Exit:
    if isinstance(exc, TrainingInterrupted) and _other_rank():
        return typer.Exit(exc.exit_code)  # every rank stopped at the same step; rank 0 says so once
    # Messages are plain text: escaped, so "pip install 'phi3tune[onnx]'" is not read as rich markup.
    console.print(f"[bold red]{_rank_prefix()}error:[/] {escape(exc.message)}", highlight=False)
    if exc.hint:
        console.print(f"[yellow]hint:[/] {escape(exc.hint)}", highlight=False)
    return typer.Exit(exc.exit_code)


def _run(action: Callable[[], T]) -> T:
    """Run a command body: user errors become one message and their exit code; no traceback unless --debug."""
    import logging

    from phi3tune.training.resources import translate_resource_error

    logging.basicConfig(level=logging.DEBUG if _debug() else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars clutter the output; our commands report progress
    try:
        return action()
    except Phi3TuneError as exc:
        raise _fail(exc)
    except KeyboardInterrupt:
        console.print("[red]interrupted")
        raise typer.Exit(130)
    except (typer.Exit, SystemExit):
        raise
    except Exception as exc:  # the last line of defence: exit 1, traceback only on request
        translated = translate_resource_error(exc)
        if translated is not None:
            raise _fail(translated)
        if _debug():
            console.print_exception()
        else:
            console.print(f"[bold red]{_rank_prefix()}internal error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False)
            console.print("rerun with --debug (or PHI3TUNE_DEBUG=1) for the traceback.")
        raise typer.Exit(1)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for internal errors.")) -> None:
    if debug:
        os.environ["PHI3TUNE_DEBUG"] = "1"


@app.command()
def train(
    config: Path = typer.Argument(..., help="The run's YAML file (model, data, training_config, peft_config)."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Overrides training_config.output_dir."),
    set_: List[str] = typer.Option([], "--set", help="Override a key: --set training_config.max_steps=5 (YAML value)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, print the plan and its peak GPU memory; loads no weights."),
    gpu_memory: Optional[float] = typer.Option(
        None, "--gpu-memory", min=1, help="With --dry-run: plan for a GPU of this many GiB (default: the visible GPU, else 80)."),
    nproc: Optional[str] = typer.Option(
        None, "--nproc", help="Train on N processes of this machine through torchrun (DDP); auto = one per visible GPU."),
) -> None:
    """Fine-tune Phi-3 with LoRA/QLoRA as the config says."""
    from phi3tune.config.load import load_config

    def body() -> None:
        if gpu_memory is not None and not dry_run:
            raise UsageError("--gpu-memory plans a dry run; it changes nothing in a real run.",
                             hint="add --dry-run, or leave out --gpu-memory (a run uses the GPU it finds).")
        cfg = load_config(config, set_, output_dir=output_dir, require_output_dir=not dry_run)
        if not _other_rank():  # under torchrun, rank 0 speaks for all
            for warning in cfg.warnings:
                console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        if dry_run:
            from phi3tune.plan import print_plan

            print_plan(cfg, console, gpu_memory_gib=gpu_memory)
            return
        from phi3tune.training import launch

        workers = launch.resolve_nproc(nproc) if nproc is not None and not launch.in_launched_worker() else 1
        if workers > 1:
            # Validated once here, before any worker starts; the ranks re-read the same files.
            from phi3tune.training.run_folder import check_output_dir

            run_dir = check_output_dir(cfg.output_dir, resume=resume, overwrite=overwrite, config_path=cfg.source)
            argv = ["train", str(Path(config).resolve()), "--output-dir", str(run_dir)]
            argv += [a for item in set_ for a in ("--set", item)]
            argv += ["--resume"] * resume + ["--overwrite"] * overwrite
            launch.launch_workers(workers, argv)
            return
        from phi3tune.training.resources import oom_guard
        from phi3tune.report import print_summary
        from phi3tune.train import run_training

        with oom_guard(cfg):
            summary = run_training(cfg, resume=resume, overwrite=overwrite, console=console)
        title = "phi3tune: run already finished (nothing resumed)" if summary.already_finished \
            else "phi3tune: training finished"
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun one summary, from rank 0
            print_summary(summary, console, title=title)

    _run(body)


@app.command("eval")
def eval_(
    run_or_adapter: str = typer.Argument(..., help="A run's output dir (its adapter/ is used) or an adapter dir."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config whose data.eval to use (default: the run's)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluate on this data file instead."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Evaluate at most N samples."),
    compare_base: bool = typer.Option(False, "--compare-base", help="Also evaluate the base model, side by side."),
    output: Optional[Path] = typer.Option(
        None, "--output", help="Metrics JSON file (default: RUN/eval_metrics.json); a new file or an earlier eval's."
    ),
    set_: List[str] = typer.Option([], "--set", help="Override a data key: --set data.on_invalid=skip (YAML value)."),
    generate: bool = typer.Option(False, "--generate", help="Answer every sample (greedy, batched) and score the answers."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="With --generate: tokens per answer (256)."),
    answer_pattern: Optional[str] = typer.Option(
        None, "--answer-pattern", help="With --generate: regex whose first group is the answer, e.g. '####\\s*(-?[\\d,\\.]+)'."
    ),
    batch_size: str = typer.Option("auto", "--batch-size", help="Sequences per generation batch: auto (from free memory) or N."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval tasks (names or task YAML files), comma-separated."),
    limit: Optional[float] = typer.Option(None, "--limit", help="With --tasks: at most N documents per task (or a fraction < 1)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help="With --tasks: few-shot examples per prompt."),
) -> None:
    """Loss on assistant tokens; with --generate, answers scored against references; with --tasks, lm-eval suites."""
    from phi3tune.evaluate import run_eval
    from phi3tune.evaluation.options import check_options

    def body() -> None:
        options = check_options(generate=generate, max_new_tokens=max_new_tokens, answer_pattern=answer_pattern,
                                batch_size=batch_size, tasks=tasks, limit=limit, num_fewshot=num_fewshot)
        run_eval(run_or_adapter, config=config, data=data, max_samples=max_samples, compare_base=compare_base,
                 output=output, overrides=set_, options=options, console=console)

    _run(body)


@app.command("merge-adapter")
def merge_adapter(
    adapter_dir: Path = typer.Argument(..., help="An adapter dir or a run's output dir."),
    output_dir: Path = typer.Argument(..., help="Where to write the merged model (must not exist or be empty)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check merged logits equal base + adapter."),
) -> None:
    """Merge a LoRA adapter into its base and save a model plain transformers loads."""
    from phi3tune.merge import merge_and_save

    _run(lambda: merge_and_save(adapter_dir, output_dir, verify=verify, console=console))


@export_app.command("onnx")
def export_onnx(
    source: Path = typer.Argument(..., help="A run dir, an adapter dir or a merged model dir."),
    output_dir: Path = typer.Argument(..., help="Where to write the ONNX Runtime GenAI folder (new or empty)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="int4|fp16|bf16|fp32 (default: int4 on cpu, fp16 on cuda)."),
    device: str = typer.Option("cpu", "--device", help="cpu|cuda: the execution provider to build for."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare the export's greedy tokens with the merged model's."),
) -> None:
    """Export to ONNX Runtime GenAI (int4 CPU, fp16 GPU), verified against the merged model. Needs phi3tune[onnx]."""
    from phi3tune.export import export_onnx as run_export

    _run(lambda: run_export(source, output_dir, precision=precision, device=device, verify=verify, console=console))


@app.command()
def chat(
    target: str = typer.Argument(..., help="A run dir, an adapter dir, a merged model dir, an ONNX export or a hub id."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One-shot: answer this and exit."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    tools: Optional[Path] = typer.Option(None, "--tools", help="JSON file of function schemas, announced as in training."),
) -> None:
    """Talk to a fine-tuned model (streaming, stops at <|end|>)."""
    from phi3tune.chat import run_chat

    _run(lambda: run_chat(target, prompt=prompt, system=system, max_new_tokens=max_new_tokens, console=console,
                          tools=tools))


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run's output directory (finished or interrupted).")) -> None:
    """Regenerate train_report.png and print a short summary of a run."""
    from phi3tune.report import run_report

    _run(lambda: run_report(run_dir, console=console))


@data_app.command("check")
def data_check(
    target: Path = typer.Argument(..., help="A config YAML (its data.train/eval) or a data file."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key."),
) -> None:
    """Validate every row, show length statistics and render samples with the trained tokens highlighted."""
    from phi3tune.data_check import check_target

    code = _run(lambda: check_target(target, set_, console=console))
    raise typer.Exit(code or 0)


if __name__ == "__main__":
    app()
