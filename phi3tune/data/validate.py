"""Validation of normalised conversations, with a reason and a user-facing row number for each bad row.

A valid conversation is: an optional system turn first, then user and assistant turns alternating,
starting with user and ending with assistant. A trailing user turn is invalid for training (nothing
after it is learned, and it usually means a truncated export); ``allow_trailing_user`` accepts it
for prompts used in generation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from phi3tune.errors import DataError
from phi3tune.model.special_text import DEFAULT_POLICY, special_strings_in

ROLES = ("system", "user", "assistant")

NO_MESSAGES = "no messages"
MALFORMED_MESSAGE = "malformed message"
UNKNOWN_ROLE = "unknown role"
NON_STRING_CONTENT = "non-string content"
EMPTY_CONTENT = "empty content"
NO_ASSISTANT = "no assistant turn"
WRONG_ORDER = "wrong turn order"
INVALID_UNICODE = "invalid unicode"
SPECIAL_TOKEN_TEXT = "special-token text"
INVALID_JSON = "invalid JSON"
MALFORMED_TOOLS = "malformed tools"
MALFORMED_CALL = "malformed tool call"
UNMATCHED_RESULT = "unmatched tool result"
INVALID_WEIGHT = "invalid weight"
# JSON's "\ud800" escape yields a lone surrogate: a str Python holds but no tokenizer or UTF-8 writer accepts.
_SURROGATE = re.compile("[\ud800-\udfff]")
FIRST_ROWS_SHOWN = 5
# Broken lines are listed further: users fix them by hand, by line number, all in one go.
_SHOWN = {INVALID_JSON: 10}


def rows_shown(problem: str) -> int:
    """How many row numbers messages list for ``problem`` (then "…" and the total)."""
    return _SHOWN.get(problem, FIRST_ROWS_SHOWN)


@dataclass(frozen=True)
class RowProblem:
    """A row found wrong before validation (a broken JSON line, a malformed tool call), carried through
    normalisation in place of its message list so validation reports it with the row's number."""

    problem: str
    reason: str


@dataclass
class ValidationResult:
    """Outcome of validating one source.

    Attributes:
        valid: 0-based indices of the valid rows, in order.
        problems: Problem name → list of ``(row_number, reason)`` for every bad row (first problem only).
        unit: ``"line"`` or ``"row"``, how row numbers are counted (1-based).
    """

    valid: list[int] = field(default_factory=list)
    problems: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    unit: str = "row"

    @property
    def n_invalid(self) -> int:
        """Number of rows with a problem."""
        return sum(len(v) for v in self.problems.values())

    def counts(self) -> dict[str, int]:
        """Problem name → number of rows."""
        return {k: len(v) for k, v in self.problems.items()}

    def summary_lines(self, limit: int | None = None) -> list[str]:
        """One line per problem: count, the first few row numbers (``rows_shown``) and one example reason."""
        lines = []
        for name, hits in self.problems.items():
            shown = rows_shown(name) if limit is None else limit
            nums = ", ".join(str(n) for n, _ in hits[:shown]) + (", …" if len(hits) > shown else "")
            lines.append(f"{name}: {len(hits)} ({self.unit}s {nums}; e.g. {self.unit} {hits[0][0]}: {hits[0][1]})")
        return lines

    def raise_if_invalid(self, source: str) -> None:
        """Raise a DataError describing every problem kind, when there is any.

        Args:
            source: The file or dataset name to put in the message.
        """
        if not self.problems:
            return
        head = f"{source}: {self.n_invalid} invalid {self.unit}{'s' if self.n_invalid != 1 else ''} ({self.unit} numbers are 1-based)"
        raise DataError(
            "\n".join([head, *(f"  - {line}" for line in self.summary_lines())]),
            hint="fix these rows, or set data.on_invalid: skip to drop them (the count is logged)",
        )


def check_conversation(
    messages: Any, allow_trailing_user: bool = False, special_tokens: str = DEFAULT_POLICY
) -> tuple[str, str] | None:
    """Find the first problem of one normalised conversation.

    Args:
        messages: The normalised message list (or None).
        allow_trailing_user: Accept a conversation ending with a user turn (generation prompts).
        special_tokens: ``data.special_tokens_in_text``; ``"error"`` makes special-token strings a problem.

    Returns:
        ``(problem, reason)`` or None when the conversation is valid.
    """
    if isinstance(messages, RowProblem):
        return messages.problem, messages.reason
    if not isinstance(messages, list) or not messages:
        what = "an empty message list" if isinstance(messages, list) else "no message list"
        return NO_MESSAGES, f"{what} (after format normalisation)"
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            return MALFORMED_MESSAGE, f"message {i} is a {type(m).__name__}, not an object with role and content"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return UNKNOWN_ROLE, f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            what = "missing" if content is None else f"a {type(content).__name__}"
            return NON_STRING_CONTENT, f"message {i} ({role}) content is {what}, not a string"
        if not content.strip():
            return EMPTY_CONTENT, f"message {i} ({role}) content is empty or whitespace only"
        bad = _SURROGATE.search(content)
        if bad:
            return INVALID_UNICODE, (
                f"message {i} ({role}) content holds a lone surrogate \\u{ord(bad.group()):04x} at character "
                f"{bad.start() + 1} (an unpaired \\uD800-\\uDFFF escape in the JSON): not valid Unicode text"
            )
        if special_tokens == "error":
            found = special_strings_in(content)
            if found:
                return SPECIAL_TOKEN_TEXT, (
                    f"message {i} ({role}) content contains special-token text {', '.join(found)} "
                    "(data.special_tokens_in_text: error)"
                )
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return NO_ASSISTANT, "no assistant turn to learn from"
    turns = roles[1:] if roles[0] == "system" else roles
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            pos = i + 1 + (len(roles) - len(turns))
            return WRONG_ORDER, (
                f"message {pos} is {role} but {expected} was expected "
                "(optional system first, then user/assistant alternating, starting with user)"
            )
    if turns[-1] != "assistant" and not allow_trailing_user:
        return WRONG_ORDER, "the conversation ends with a user turn; it must end with an assistant turn"
    return None


def validate_conversations(
    conversations: Sequence[Any],
    numbers: Sequence[int] | None = None,
    unit: str = "row",
    allow_trailing_user: bool = False,
    special_tokens: str = DEFAULT_POLICY,
) -> ValidationResult:
    """Validate normalised conversations.

    Args:
        conversations: Normalised message lists (or None for rows without one).
        numbers: The user-facing 1-based number of each row; ``1..n`` when omitted.
        unit: ``"line"`` (JSONL) or ``"row"``.
        allow_trailing_user: Accept conversations ending with a user turn.
        special_tokens: ``data.special_tokens_in_text`` (see :func:`check_conversation`).

    Returns:
        The valid indices and the problems by kind, with row numbers and reasons.
    """
    result = ValidationResult(unit=unit)
    for idx, messages in enumerate(conversations):
        found = check_conversation(messages, allow_trailing_user, special_tokens)
        if found is None:
            result.valid.append(idx)
            continue
        number = numbers[idx] if numbers is not None else idx + 1
        result.problems.setdefault(found[0], []).append((number, found[1]))
    return result
