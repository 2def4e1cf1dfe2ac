"""``phi3tune eval --tasks``: benchmark suites through EleutherAI's lm-evaluation-harness (extra ``[harness]``).

The model is the one eval already loaded (base + adapter, 4-bit for QLoRA on a GPU), handed to lm-eval's
``HFLM`` as a pre-initialised model, which lm-eval supports for exactly this: no second load, the same
weights the other numbers come from. The base's scores come from the same object with peft's
``disable_adapter()``. lm-eval's own prompt formats apply (no chat template), as in its published numbers.

``--tasks`` items are lm-eval task or group names (``gsm8k``, ``arc_easy``, ...) or paths to task YAML files
of your own (their folder is added to lm-eval's ``include_path``). Public tasks download their data from the
Hugging Face hub on first use; a local task whose ``dataset_kwargs.data_files`` point at local files needs
no network. Task names are checked before any weights load.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterator

import yaml
from rich.console import Console
from rich.table import Table

from phi3tune.errors import UsageError

INSTALL_HINT = "pip install 'phi3tune[harness]'"
_TASK_FILE = (".yaml", ".yml")


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UsageError(f"--tasks needs EleutherAI's lm-evaluation-harness, which is not installed ({exc}).",
                         hint=f"{INSTALL_HINT}, or leave out --tasks") from None
    return evaluator, HFLM, TaskManager


@dataclass
class TaskPlan:
    """Checked ``--tasks``: the names to run, the folders holding local task files, and lm-eval's manager."""

    names: list[str]
    include_paths: list[str] = field(default_factory=list)
    manager: Any = None


class _TolerantLoader(yaml.SafeLoader):
    """Reads lm-eval task files that use tags such as ``!function utils.process_docs`` (their value is unused)."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _task_name_in(path: Path) -> str:
    """The ``task:`` name a local task YAML defines."""
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"--tasks {path}: cannot read this task file ({exc}).") from None
    name = loaded.get("task") if isinstance(loaded, dict) else None
    if not isinstance(name, str) or not name:
        raise UsageError(f"--tasks {path}: the file has no `task:` name.",
                         hint="an lm-eval task file starts with `task: my_task` (see lm-eval's task guide)")
    return name


def plan_tasks(spec: str) -> TaskPlan:
    """Parse and check ``--tasks`` (before any weights load).

    Raises:
        UsageError: lm-eval is not installed, an item is empty, a task file is unreadable, or a name is unknown.
    """
    _, _, TaskManager = _lm_eval()
    items = [item.strip() for item in spec.split(",")]
    if not items or any(not item for item in items):
        raise UsageError(f"--tasks {spec!r}: give comma-separated task names or task YAML files, without empty items.",
                         hint="e.g. --tasks gsm8k,arc_easy or --tasks ./my_task.yaml")
    plan = TaskPlan(names=[])
    for item in items:
        path = Path(item).expanduser()
        if item.endswith(_TASK_FILE):
            if not path.is_file():
                raise UsageError(f"--tasks {item}: no such task file.")
            plan.names.append(_task_name_in(path))
            if str(path.resolve().parent) not in plan.include_paths:
                plan.include_paths.append(str(path.resolve().parent))
        else:
            plan.names.append(item)
    local_only = all(item.endswith(_TASK_FILE) for item in items)
    with _quiet(logging.ERROR):
        # Indexing lm-eval's ~15k built-in tasks takes seconds; files of your own alone skip it.
        plan.manager = TaskManager(include_path=plan.include_paths or None, include_defaults=not local_only)
    known = set(plan.manager.all_tasks)
    unknown = [name for name in plan.names if name not in known]
    if unknown:
        raise UsageError(f"--tasks: lm-eval knows no task or group named {', '.join(map(repr, unknown))}.",
                         hint="`lm-eval ls tasks` lists them; a task of your own is given as the path of its YAML file")
    return plan


@contextlib.contextmanager
def _quiet(level: int) -> Iterator[None]:
    """lm-eval logs every step at INFO and warns that a pre-initialised model ignores its loading options."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _numbers(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``metric,filter`` numbers for one task (stderr included, aliases and N/A left out)."""
    return {key: float(value) for key, value in task_results.items()
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)}


def run_tasks(model, tokenizer, plan: TaskPlan, *, limit: float | None, num_fewshot: int | None,
              batch_size: int | str) -> dict[str, dict[str, float]]:
    """Run the planned tasks on ``model`` as it is (adapter merged, unmerged or disabled by the caller).

    Returns:
        ``{task: {"acc,none": 0.61, "acc_stderr,none": 0.02, ...}}`` for every task and group lm-eval reports.
    """
    evaluator, HFLM, _ = _lm_eval()
    with _quiet(logging.ERROR):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = evaluator.simple_evaluate(model=lm, tasks=list(plan.names), task_manager=plan.manager,
                                            limit=limit, num_fewshot=num_fewshot, log_samples=False,
                                            bootstrap_iters=1000)
    if not results:
        return {}
    found = {**results.get("groups", {}), **results.get("results", {})}
    return {task: _numbers(values) for task, values in found.items()}


def tasks_section(adapter: dict[str, dict[str, float]], base: dict[str, dict[str, float]] | None,
                  settings: dict[str, Any]) -> dict[str, Any]:
    """The ``tasks`` section of eval_metrics.json: adapter, base, difference (adapter − base) and the settings."""
    section: dict[str, Any] = {"adapter": adapter}
    if base is not None:
        section["base"] = base
        section["difference"] = {
            task: {key: value - base[task][key] for key, value in metrics.items()
                   if "_stderr" not in key and key in base.get(task, {})}
            for task, metrics in adapter.items()
        }
    section["settings"] = settings
    return section


def lm_eval_version() -> str | None:
    try:
        return version("lm_eval")
    except PackageNotFoundError:  # a source checkout without metadata: the version is informative only
        return None


def print_tasks(section: dict[str, Any], console: Console, adapter_label: str = "adapter") -> None:
    """One row per task and metric (stderr left out): adapter / base / difference."""
    has_base = "base" in section
    settings = section.get("settings", {})
    table = Table(title=f"lm-eval tasks (limit {settings.get('limit') or 'none'}, "
                        f"few-shot {settings.get('num_fewshot') if settings.get('num_fewshot') is not None else 'task default'})",
                  title_justify="left")
    for name in ("task", "metric", adapter_label, *(("base", "difference") if has_base else ())):
        table.add_column(name, style="bold" if name == "task" else None, justify="left" if name in ("task", "metric") else "right")
    for task, metrics in section["adapter"].items():
        for key, value in metrics.items():
            if "_stderr" in key:
                continue
            stderr = metrics.get(key.replace(",", "_stderr,", 1))
            cells = [task, key.removesuffix(",none"), f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr else "")]
            if has_base:
                base = section["base"].get(task, {}).get(key)
                diff = section["difference"].get(task, {}).get(key)
                cells += ["-" if base is None else f"{base:.4f}", "-" if diff is None else f"{diff:+.4f}"]
            table.add_row(*cells)
    console.print(table)
