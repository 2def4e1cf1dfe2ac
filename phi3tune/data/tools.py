"""Tool use (function calling) in chat data: ONE rendering convention for every source format.

Phi-3's chat template has no tool syntax (it silently drops ``tool`` messages), so phi3tune writes tool use
as plain text in the three Phi-3 roles, keeping user/assistant alternation:

- the function schemas go in the system turn (created when the row has none), after ``TOOLS_HEADER``, as a
  JSON list of ``{"name", "description", "parameters"}`` objects;
- the calls of an assistant turn are its text: one call is the JSON object ``{"name": ..., "arguments":
  {...}}``, parallel calls a JSON list of such objects; text written beside the calls comes first, then a
  blank line. Calls are assistant text, so they are trained (unless the turn has ``weight: 0``);
- each tool result is ``TOOL_RESULT_PREFIX`` + its content in a user turn (context, never trained); the
  results of parallel calls share one user turn, separated by a blank line.

The ShareGPT form (``function_call`` / ``observation`` turns, a ``tools`` field) and the OpenAI / Azure form
(row ``tools`` or legacy ``functions``, assistant ``tool_calls`` or legacy ``function_call``, ``tool`` or
legacy ``function`` messages) both render through the functions here, so the same conversation gives the
same tokens in either form. JSON is written by ``json.dumps(..., ensure_ascii=False)`` with its default
separators; a ShareGPT ``tools`` string or ``function_call`` value is kept as written.

:func:`to_phi3_messages` is the public face: it turns an OpenAI-style conversation (and tools) into the
Phi-3 messages training saw, for serving a fine-tuned model in the format it learned.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from phi3tune.data.validate import (
    INVALID_WEIGHT, MALFORMED_CALL, MALFORMED_TOOLS, UNMATCHED_RESULT, RowProblem,
)  # fmt: skip
from phi3tune.errors import DataError

TOOL_RESULT_PREFIX = "Tool result:\n"
TOOLS_HEADER = "You can call these functions; reply with a JSON object naming the function and its arguments:\n"
BLOCK_SEPARATOR = "\n\n"
RESULT_ROLES = ("tool", "function")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def parsed(value: Any) -> Any:
    """A JSON list/object stored as a string (CSV/Parquet exports) as the value it holds; else unchanged."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


def function_schemas(tools: Any) -> list | RowProblem | None:
    """The function schemas of a ``tools`` (or ``functions``) value, unwrapped from ``{type, function}``.

    Returns:
        The list of schema objects, None when there are none, or a ``RowProblem`` saying what is wrong.
    """
    tools = parsed(tools)
    if tools in (None, "", [], {}) or (isinstance(tools, str) and not tools.strip()):
        return None
    if isinstance(tools, dict):
        tools = [tools]  # one tool written without its list
    if not isinstance(tools, list):
        return RowProblem(MALFORMED_TOOLS, f"tools is {type(tools).__name__}, not a list of function schemas")
    out = []
    for k, tool in enumerate(tools, start=1):
        schema = tool.get("function") if isinstance(tool, dict) and "function" in tool else tool
        kind = tool.get("type", "function") if isinstance(tool, dict) else None
        if kind != "function" or not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            return RowProblem(MALFORMED_TOOLS, f"tool {k} is not a function schema "
                              "({\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}})")
        out.append(schema)
    return out


def schemas_text(tools: Any) -> str | RowProblem | None:
    """The system-turn text announcing ``tools``: ``TOOLS_HEADER`` + the schemas as a JSON list (None when none)."""
    schemas = function_schemas(tools)
    return schemas if schemas is None or isinstance(schemas, RowProblem) else TOOLS_HEADER + _dumps(schemas)


def tools_text(tools: Any) -> str | RowProblem | None:
    """:func:`schemas_text`, but a string (ShareGPT exports store the schemas as one) is kept as written:
    re-serialising it would change the tokens of data phi3tune already trained on. ``"[]"`` means none."""
    if isinstance(tools, str):
        return TOOLS_HEADER + tools if tools.strip() and parsed(tools) not in ([], {}) else None
    return schemas_text(tools)


def attach_tools(messages: list, text: str | None) -> None:
    """Append the tools text to the leading system turn, or insert one holding it."""
    if not text:
        return
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system" and isinstance(first.get("content"), str):
        messages[0] = {**first, "content": first["content"].rstrip() + BLOCK_SEPARATOR + text}
    else:
        messages.insert(0, {"role": "system", "content": text})


def calls_text(calls: Sequence[dict]) -> str:
    """One call as a JSON object, parallel calls as a JSON list of them."""
    return _dumps(calls[0] if len(calls) == 1 else list(calls))


def with_text(text: Any, calls: str) -> str:
    """Calls written after the assistant's own text (when it has any), a blank line between."""
    if isinstance(text, str) and text.strip():
        return text.rstrip() + BLOCK_SEPARATOR + calls
    return calls


def result_text(content: str) -> str:
    """One tool result as user-turn text."""
    return TOOL_RESULT_PREFIX + content


def add_result(out: list, text: str, merge: bool) -> None:
    """Append a result as a user turn, or to the previous one (results of parallel calls share a turn)."""
    if merge and out and isinstance(out[-1], dict) and isinstance(out[-1].get("content"), str):
        out[-1] = {**out[-1], "content": out[-1]["content"] + BLOCK_SEPARATOR + text}
    else:
        out.append({"role": "user", "content": text})


def _call(raw: Any, where: str) -> tuple[dict, Any] | RowProblem:
    """``({"name", "arguments"}, id)`` of one OpenAI tool call (or legacy function_call)."""
    fn = raw.get("function") if isinstance(raw, dict) and "function" in raw else raw
    if not isinstance(raw, dict) or raw.get("type", "function") != "function" or not isinstance(fn, dict):
        return RowProblem(MALFORMED_CALL, f"{where} is not a function call ({{\"type\": \"function\", "
                          "\"function\": {\"name\", \"arguments\"}})")
    name, args = fn.get("name"), fn.get("arguments")
    if not isinstance(name, str) or not name.strip():
        return RowProblem(MALFORMED_CALL, f"{where} has no function name")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, RecursionError) as e:
            msg = getattr(e, "msg", "nested too deeply")
            return RowProblem(MALFORMED_CALL, f"{where} ({name}): arguments are not valid JSON ({msg})")
    if not isinstance(args, dict):
        return RowProblem(MALFORMED_CALL, f"{where} ({name}): arguments must be a JSON object, not "
                          f"{'missing' if args is None else type(args).__name__}")
    return {"name": name, "arguments": args}, raw.get("id")


def _weighted(turn: dict, m: dict, i: int, role: Any) -> dict | RowProblem:
    """The turn with ``weight: 0`` kept (a context turn); weight 1 is the default and leaves no trace."""
    if "weight" not in m:
        return turn
    weight = m["weight"]
    if role != "assistant":
        return RowProblem(INVALID_WEIGHT, f"message {i} ({role}) has a weight; only assistant messages take one")
    if isinstance(weight, bool) or weight not in (0, 1):
        return RowProblem(INVALID_WEIGHT, f"message {i} (assistant) has weight {weight!r}; it must be 0 or 1")
    return {**turn, "weight": 0} if weight == 0 else turn


def openai_messages(row: dict) -> list | RowProblem | None:
    """Normalise an OpenAI / Azure chat row (tools, tool calls, tool results, weights) to Phi-3 turns.

    Rows without any of these give exactly ``[{"role", "content"}, ...]`` as they are. Junk (an odd role, a
    missing content) is carried through for validation; tool structure that cannot be rendered is
    returned as a ``RowProblem`` naming the message (1-based, as in the file).
    """
    turns = parsed(row.get("messages"))
    if not isinstance(turns, list):
        return None
    tools = row.get("tools") if row.get("tools") not in (None, "", []) else row.get("functions")
    announced = schemas_text(tools)
    if isinstance(announced, RowProblem):
        return announced
    out: list = []
    call_ids: set = set()
    previous = None  # "call" or "result": what the last raw message was, for placing results
    for i, m in enumerate(turns, start=1):
        if not isinstance(m, dict):
            out.append(m)
            previous = None
            continue
        role, content = m.get("role"), m.get("content")
        raw_calls = m.get("tool_calls") or ([m["function_call"]] if m.get("function_call") else None)
        if role == "assistant" and raw_calls:
            if not isinstance(raw_calls, list):
                return RowProblem(MALFORMED_CALL, f"message {i} (assistant) tool_calls is not a list")
            calls = []
            for k, raw in enumerate(raw_calls, start=1):
                legacy = "tool_calls" not in m
                found = _call({"function": raw} if legacy else raw, f"message {i} (assistant) call {k}")
                if isinstance(found, RowProblem):
                    return found
                calls.append(found[0])
                if isinstance(found[1], str):
                    call_ids.add(found[1])
            turn = _weighted({"role": "assistant", "content": with_text(content, calls_text(calls))}, m, i, role)
            previous = "call"
        elif role in RESULT_ROLES:
            if previous is None:
                return RowProblem(UNMATCHED_RESULT, f"message {i} ({role}) answers no call: no assistant message "
                                  "with tool_calls comes right before it")
            call_id = m.get("tool_call_id")
            if call_id is not None and call_id not in call_ids:
                known = ", ".join(sorted(map(str, call_ids))) or "none"
                return RowProblem(UNMATCHED_RESULT, f"message {i} ({role}) has tool_call_id {call_id!r}, which "
                                  f"matches no call (ids called: {known})")
            if not isinstance(content, str):
                what = "missing" if content is None else f"a {type(content).__name__}"
                return RowProblem(UNMATCHED_RESULT, f"message {i} ({role}) content is {what}, not a string")
            if "weight" in m:
                return RowProblem(INVALID_WEIGHT, f"message {i} ({role}) has a weight; only assistant messages take one")
            add_result(out, result_text(content), merge=previous == "result")
            previous = "result"
            continue
        else:
            turn = _weighted({"role": role, "content": content}, m, i, role)
            previous = None
        if isinstance(turn, RowProblem):
            return turn
        out.append(turn)
    attach_tools(out, announced)
    return out


def to_phi3_messages(messages: Sequence[dict], tools: Any = None) -> list[dict]:
    """Render an OpenAI-style conversation the way phi3tune's training rendered it.

    Use it to serve a model fine-tuned on tool-calling data: pass the result to
    ``phi3tune.model.chat_template.render_prompt`` (or ``tokenizer.apply_chat_template(...,
    add_generation_prompt=True)``), then parse the reply as a JSON call object (or list of them).

    Args:
        messages: ``{"role", "content"}`` dicts; assistant messages may carry ``tool_calls``, and ``tool``
            messages answer them (the conversation may end with a user or tool turn).
        tools: The function schemas: OpenAI ``[{"type": "function", "function": {...}}]`` or bare
            ``[{"name", "description", "parameters"}]``.

    Returns:
        Phi-3 messages with roles system/user/assistant.

    Raises:
        DataError: The tools or the tool turns cannot be rendered (the message says which and why).
    """
    rendered = openai_messages({"messages": list(messages), "tools": tools})
    if isinstance(rendered, RowProblem):
        raise DataError(f"{rendered.problem}: {rendered.reason}",
                        hint="see the tool-use format in the README (Data formats: tool calls)")
    return rendered or []
