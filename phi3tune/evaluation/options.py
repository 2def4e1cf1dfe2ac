"""``phi3tune eval``'s ``--generate`` and ``--tasks`` options, checked together before any weights load."""

from __future__ import annotations

import dataclasses
import re

from phi3tune.errors import UsageError
from phi3tune.evaluation import harness
from phi3tune.evaluation.metrics import compile_answer_pattern

DEFAULT_MAX_NEW_TOKENS = 256


@dataclasses.dataclass
class GenerationOptions:
    """The ``--generate`` and ``--tasks`` options, checked before any weights load."""

    generate: bool = False
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    answer_pattern: re.Pattern[str] | None = None
    batch_size: int | None = None  # None: chosen from free memory
    tasks: harness.TaskPlan | None = None
    limit: float | None = None
    num_fewshot: int | None = None


def parse_batch_size(text: str | int | None) -> int | None:
    """``--batch-size``: ``auto`` (None) or a positive integer."""
    if text is None or str(text).strip().lower() == "auto":
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"--batch-size {text!r}: give `auto` or a positive whole number.", hint="e.g. --batch-size 32")
    return value


def check_options(*, generate: bool = False, max_new_tokens: int | None = None, answer_pattern: str | None = None,
                  batch_size: str | int | None = None, tasks: str | None = None, limit: float | None = None,
                  num_fewshot: int | None = None) -> GenerationOptions:
    """Validate the generation and task options together (exit 2 before loading anything)."""
    if not generate and (max_new_tokens is not None or answer_pattern is not None):
        given = "--max-new-tokens" if max_new_tokens is not None else "--answer-pattern"
        raise UsageError(f"{given} applies to generated answers; it needs --generate.", hint="add --generate")
    if tasks is None and (limit is not None or num_fewshot is not None):
        given = "--limit" if limit is not None else "--num-fewshot"
        raise UsageError(f"{given} applies to lm-eval tasks; it needs --tasks.", hint="e.g. --tasks gsm8k --limit 100")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: give a positive number.")
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit {limit}: give a positive number (a count, or a fraction below 1).")
    return GenerationOptions(
        generate=generate, max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        answer_pattern=compile_answer_pattern(answer_pattern), batch_size=parse_batch_size(batch_size),
        tasks=harness.plan_tasks(tasks) if tasks is not None else None,
        limit=int(limit) if limit is not None and limit >= 1 else limit, num_fewshot=num_fewshot,
    )
