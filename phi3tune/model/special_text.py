"""Special-token strings written inside data (``<|end|>``, ``<|assistant|>``, ...) and the policy for them.

Text is text: a user message that *contains* ``<|end|>\\n<|assistant|>`` must not become a real turn
boundary, or data (and ``chat --prompt``) could forge turns. ``data.special_tokens_in_text`` decides:

- ``escape`` (default): such strings are tokenised as the plain characters they are.
- ``error``: rows containing them are invalid (``data.on_invalid`` then stops or skips them).
- ``allow``: the old behaviour, they become real special tokens (only for data that was deliberately
  pre-rendered with markers and is trusted).

``escape`` is the default rather than ``error``: it is just as safe (no string in the data can ever
become a marker), while ``error`` would stop training on legitimate data that merely talks about
chat templates or uses an HTML ``<s>`` tag. ``data check`` still lists the rows so nothing is silent.
"""

from __future__ import annotations

import re
from typing import Any

POLICIES = ("error", "escape", "allow")
DEFAULT_POLICY = "escape"

# The special added tokens of the Phi-3 tokenizer (those split_special_tokens=True turns back into text).
# `</s>` (id 2) is an added token but not a special one: it is left alone, it cannot open or close a turn.
PHI3_SPECIAL_STRINGS = (
    "<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>",
    "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>", "<|placeholder4|>", "<|placeholder5|>",
    "<|placeholder6|>",
)  # fmt: skip
_PATTERN = re.compile("|".join(re.escape(s) for s in sorted(PHI3_SPECIAL_STRINGS, key=len, reverse=True)))


def special_strings_in(text: str) -> list[str]:
    """The distinct special-token strings found in ``text``, in order of first appearance."""
    return list(dict.fromkeys(_PATTERN.findall(text)))


def conversation_special_strings(messages: Any) -> list[str]:
    """The distinct special-token strings in the string contents of a normalised conversation."""
    found: dict[str, None] = {}
    if isinstance(messages, list):
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                found.update(dict.fromkeys(special_strings_in(content)))
    return list(found)
