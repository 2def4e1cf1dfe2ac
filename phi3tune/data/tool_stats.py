"""Tool-use statistics of raw rows, for ``data check``: rows with tools, calls, results, weighted-out turns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phi3tune.data.tools import RESULT_ROLES, parsed, tools_text


@dataclass
class ToolUsage:
    """What one row holds of tool use: rows with tools, calls, results and weighted-out turns."""

    rows_with_tools: int = 0
    calls: int = 0
    results: int = 0
    weighted_out: int = 0

    def add(self, other: ToolUsage) -> None:
        """Sum ``other`` into this one."""
        for key in vars(self):
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def any(self) -> bool:
        """Whether anything here is non-zero."""
        return any(vars(self).values())


def tool_usage(row: Any, fmt: str) -> ToolUsage:
    """Count the tool use of one raw row of format ``fmt`` (``messages`` or ``sharegpt``; others have none)."""
    usage = ToolUsage()
    if not isinstance(row, dict) or fmt not in ("messages", "sharegpt"):
        return usage
    tools = row.get("tools") or (row.get("functions") if fmt == "messages" else None)
    usage.rows_with_tools = int(isinstance(tools_text(tools), str))
    turns = parsed(row.get("conversations", row.get("messages")) if fmt == "sharegpt" else row.get("messages"))
    for m in turns if isinstance(turns, list) else []:
        if not isinstance(m, dict):
            continue
        if fmt == "sharegpt":
            source = m.get("from", m.get("role"))
            if source == "function_call":
                value = parsed(m.get("value", m.get("content")))
                usage.calls += len(value) if isinstance(value, list) else 1
            usage.results += source in ("observation", "tool", "function")
            continue
        calls = m.get("tool_calls")
        usage.calls += len(calls) if isinstance(calls, list) else int(bool(m.get("function_call")))
        usage.results += m.get("role") in RESULT_ROLES
        usage.weighted_out += m.get("role") == "assistant" and m.get("weight") == 0
    return usage
