"""Format detection and normalisation of raw rows to ``{"messages": [{"role", "content"}, ...]}``.

Supported formats:

- ``messages``: OpenAI / Azure chat, ``{"messages": [{"role": ..., "content": ...}]}``, with tool use
  (row ``tools``/``functions``, assistant ``tool_calls``/``function_call``, ``tool``/``function``
  results) and per-message ``weight`` (0: an assistant turn that is context, not trained).
- ``sharegpt``: ``{"conversations": [{"from": ..., "value": ...}]}`` (also under ``messages``), with an
  optional ``system`` string and ``tools`` field. ``human``/``user`` → user, ``gpt``/``assistant`` →
  assistant, ``system`` → system. Tool turns: ``function_call`` becomes an assistant turn holding the
  call verbatim (the model learns to emit it; after a ``gpt`` turn it joins that turn),
  ``observation``/``tool``/``function`` a user turn of tool results (context, not trained).

Tool use renders one way for both (``phi3tune.data.tools``): schemas in the system turn, calls as JSON
in assistant turns, results as user turns, so the same conversation gives the same tokens in either form.
- ``alpaca``: ``instruction`` / optional ``input`` / ``output`` / optional ``system``; the user turn is
  the instruction, then a blank line and the input when there is one.
- ``prompt_completion``: ``prompt``/``completion`` strings (user/assistant turns), or conversational
  lists of messages (prompt turns, then completion turns).

Normalisation never fails on junk: it carries odd values through (``None`` content, unknown roles)
so that validation can report them with row numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from phi3tune.data.tools import (
    TOOL_RESULT_PREFIX, TOOLS_HEADER, add_result, attach_tools, openai_messages, result_text, tools_text, with_text,
)  # fmt: skip
from phi3tune.data.validate import RowProblem
from phi3tune.errors import DataError

__all__ = ["FORMATS", "TOOLS_HEADER", "TOOL_RESULT_PREFIX", "detect_format", "normalise_row", "normalise_rows"]
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "user", "tool": "user", "function": "user",
}  # fmt: skip
_TOOL_RESULT_SOURCES = {"observation", "tool", "function"}
_DETECT_SAMPLE = 50


def _format_of(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    for key in ("messages", "conversations"):
        turns = row.get(key)
        if isinstance(turns, str) and turns.lstrip().startswith("["):  # a JSON column in CSV/Parquet
            try:
                turns = json.loads(turns)
            except (json.JSONDecodeError, RecursionError):
                pass
        if isinstance(turns, list):
            first = next((t for t in turns if isinstance(t, dict)), {})
            if "from" in first or "value" in first or key == "conversations" and "role" not in first:
                return "sharegpt"
            return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


_JSON_KINDS = {list: "a JSON array", str: "a JSON string", int: "a JSON number", float: "a JSON number",
               bool: "true/false", type(None): "null"}  # fmt: skip


def detect_format(
    rows: Sequence[Any], source: str = "data", numbers: Sequence[int] | None = None, unit: str = "row"
) -> str:
    """Detect a source's format from its first rows.

    Args:
        rows: Raw rows.
        source: Name used in the error message.
        numbers: User-facing 1-based numbers of the rows (``1..n`` when omitted), for the error message.
        unit: ``"line"`` or ``"row"``, for the error message.

    Returns:
        One of ``FORMATS``.

    Raises:
        DataError: No row looks like a known format, or rows disagree.
    """
    seen: dict[str, int] = {}
    keys: set[str] = set()
    not_objects: list[tuple[int, Any]] = []
    for i, row in enumerate(rows):
        if i >= _DETECT_SAMPLE:
            break
        if isinstance(row, RowProblem):
            continue  # a broken line: reported by validation, says nothing of the format
        fmt = _format_of(row)
        if fmt:
            seen[fmt] = seen.get(fmt, 0) + 1
        elif isinstance(row, dict):
            keys.update(row)
        else:
            not_objects.append((i, row))
    if not seen:
        if keys:
            found = f"fields found: {', '.join(sorted(map(str, keys))[:12])}"
        elif not_objects:
            i, row = not_objects[0]
            what = _JSON_KINDS.get(type(row), f"a {type(row).__name__}")
            found = f"{unit} {numbers[i] if numbers else i + 1} holds {what}, not an object with fields"
        else:
            found = "it holds 0 rows"
        raise DataError(
            f"{source}: cannot tell the data format; {found}",
            hint="rows need 'messages' (role/content), 'conversations' (from/value), "
            "'instruction'+'output' (Alpaca) or 'prompt'+'completion'; or set data.format",
        )
    # The majority wins; stray rows of another shape are then reported by validation.
    return max(seen, key=seen.__getitem__)


def _as_list(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # a string cell nested past the recursion limit
            return value
    return value


def _turn(role: Any, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


def _from_sharegpt(row: dict) -> list | RowProblem | None:
    turns = _as_list(row.get("conversations", row.get("messages")))
    if not isinstance(turns, list):
        return None
    out: list = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        out.append(_turn("system", row["system"]))
    previous = None  # the kind of the last turn: a call may join a gpt turn, results of parallel calls join
    for t in turns:
        if not isinstance(t, dict):
            out.append(t)
            previous = None
            continue
        source = t.get("from", t.get("role"))
        value = t.get("value", t.get("content"))
        key = source.lower() if isinstance(source, str) else source
        role = SHAREGPT_ROLES.get(key, source)
        if source in _TOOL_RESULT_SOURCES and isinstance(value, str):
            add_result(out, result_text(value), merge=previous == "result")
            previous = "result"
            continue
        if key == "function_call" and previous == "text" and isinstance(value, str):
            out[-1] = _turn("assistant", with_text(out[-1]["content"], value))
        else:
            out.append(_turn(role, value))
        previous = "text" if role == "assistant" and key != "function_call" and isinstance(value, str) else None
    tools = tools_text(row.get("tools"))
    if isinstance(tools, RowProblem):
        return tools
    attach_tools(out, tools)
    return out


def _from_alpaca(row: dict) -> list:
    instruction, extra = row.get("instruction"), row.get("input")
    user = instruction
    if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
        user = f"{instruction}\n\n{extra}"
    out = [_turn("user", user), _turn("assistant", row.get("output"))]
    if isinstance(row.get("system"), str) and row["system"].strip():
        out.insert(0, _turn("system", row["system"]))
    return out


def _from_prompt_completion(row: dict) -> list:
    prompt, completion = _as_list(row.get("prompt")), _as_list(row.get("completion"))
    out: list = []
    for value, role in ((prompt, "user"), (completion, "assistant")):
        if isinstance(value, list):  # conversational prompt/completion
            out.extend(_turn(t.get("role"), t.get("content")) if isinstance(t, dict) else t for t in value)
        else:
            out.append(_turn(role, value))
    return out


_NORMALISERS = {
    "messages": openai_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}


def normalise_row(row: Any, fmt: str, system_prompt: str | None = None) -> list | RowProblem | None:
    """Normalise one raw row to a message list (``None`` when it holds no message list at all).

    A row already known to be wrong (a broken JSON line), or whose tool use cannot be rendered, comes back
    as a ``RowProblem`` for validation to report.

    Args:
        row: The raw row.
        fmt: One of ``FORMATS``.
        system_prompt: Default system turn, added when the row has none.

    Returns:
        The list of ``{"role", "content"}`` turns (``"weight": 0`` on weighted-out assistant turns),
        unvalidated; a ``RowProblem``; or None.
    """
    if isinstance(row, RowProblem):
        return row
    if not isinstance(row, dict):
        return None
    messages = _NORMALISERS[fmt](row)
    if system_prompt and isinstance(messages, list) and messages:
        first = messages[0]
        if not (isinstance(first, dict) and first.get("role") == "system"):
            messages.insert(0, _turn("system", system_prompt))
    return messages


def normalise_rows(rows: Iterable[Any], fmt: str, system_prompt: str | None = None) -> list[list | RowProblem | None]:
    """Normalise every row of a source (see :func:`normalise_row`).

    Args:
        rows: Raw rows.
        fmt: One of ``FORMATS``.
        system_prompt: Default system turn for rows without one.

    Returns:
        One message list (or None) per row, in order.
    """
    if fmt not in _NORMALISERS:
        raise DataError(f"unknown data format {fmt!r}", hint=f"data.format must be auto or one of {', '.join(FORMATS)}")
    return [normalise_row(row, fmt, system_prompt) for row in rows]
