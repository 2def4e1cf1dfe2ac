"""Phi-3 chat rendering with exact assistant loss masks.

The Phi-3 template renders each turn as ``<|role|>\\n{content}<|end|>\\n`` and, without a generation
prompt, appends ``<|endoftext|>``. Every role marker and ``<|end|>`` is an added token with
``rstrip=True``, so the newline after it (and any leading whitespace of the content) is swallowed and
never becomes a token; text between special tokens is tokenised as an independent segment. Hence
each turn can be tokenised on its own and the pieces concatenated: the result equals
``tokenizer.apply_chat_template(messages, tokenize=True)`` token for token, and the assistant spans
are known exactly. Whether a tokenizer really behaves like this is checked once per tokenizer
against ``apply_chat_template`` on probe conversations; if not (another template, another tokenizer
setup), a slower generic path renders prefixes with ``apply_chat_template`` and diffs them.

Labels (``loss_on="assistant"``): the content tokens of every assistant turn and its closing
``<|end|>`` are trained, so the model learns to stop. The ``<|assistant|>`` marker, the newline
after ``<|end|>`` (it produces no token) and the final ``<|endoftext|>`` are not: generation stops
at ``<|end|>`` (it is in Phi-3's ``eos_token_id`` list) and ``<|endoftext|>`` is template padding
after a turn that is already closed. ``loss_on="all"`` labels every token. An assistant turn carrying
``"weight": 0`` (OpenAI's per-message weight) is context: none of its tokens is trained, whatever ``loss_on``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from phi3tune.errors import DataError
from phi3tune.model.special_text import DEFAULT_POLICY, POLICIES

IGNORE_INDEX = -100
PHI3_ROLES = ("system", "user", "assistant")

# Varied conversations covering the boundary cases that could break segment-wise tokenisation.
_PROBES: list[list[dict[str, str]]] = [
    [
        {"role": "system", "content": " You are terse.\n"},
        {"role": "user", "content": "\nHello  there 42 🙂"},
        {"role": "assistant", "content": " Hi!\n"},
        {"role": "user", "content": "```py\nprint('x')\n```"},
        {"role": "assistant", "content": "Grüße, 世界 "},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]

# Cache of the parity probe per (tokenizer object, template) pair.
_FAST_PATH_OK: dict[tuple[int, str], bool] = {}
_SPECIAL_PATTERNS: dict[int, re.Pattern[str] | None] = {}
# What an added token's rstrip=True swallows: Unicode White_Space, as Rust's char::is_whitespace (not str.isspace).
_RUST_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)


def _piece_text(role: str, content: str) -> str:
    return f"<|{role}|>\n{content}<|end|>\n"


def _template_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    # transformers 5 returns a BatchEncoding; older versions a plain list.
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _end_ids(tokenizer: Any) -> list[int]:
    return tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def _special_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching this tokenizer's special added tokens (the ones ``split_special_tokens`` splits)."""
    key = id(tokenizer)
    if key not in _SPECIAL_PATTERNS:
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        names = [t.content for t in decoder.values() if getattr(t, "special", False)]
        names = names or list(getattr(tokenizer, "all_special_tokens", []) or [])
        names.sort(key=len, reverse=True)
        _SPECIAL_PATTERNS[key] = re.compile("|".join(map(re.escape, names))) if names else None
    return _SPECIAL_PATTERNS[key]


def special_strings_in_text(tokenizer: Any, text: str) -> list[str]:
    """The distinct strings in ``text`` that this tokenizer would otherwise read as special tokens."""
    pattern = _special_pattern(tokenizer)
    return list(dict.fromkeys(pattern.findall(text))) if pattern is not None else []


def _escaping(policy: str) -> bool:
    if policy not in POLICIES:
        raise ValueError(f"special_tokens must be one of {', '.join(POLICIES)}, not {policy!r}")
    # `error` rows were rejected by validation; anything that still gets here is escaped, never trusted.
    return policy != "allow"


def _message_pieces(tokenizer: Any, messages: Sequence[dict], escape: Callable[[str], bool]) -> list[list[int]]:
    """Token ids of ``<|role|>\\n{content}<|end|>\\n`` for each message, in one batched tokenizer call.

    Messages whose content ``escape`` selects are tokenised as marker ids + content tokenised on its own with
    ``split_special_tokens=True`` + ``<|end|>``: special-token strings in the content stay plain text while the
    template's markers stay real. The marker's ``rstrip`` swallows the content's leading whitespace, so that
    is stripped the same way (Rust ``char::is_whitespace``); the probe in ``fast_path_ok`` checks the result
    equals the template for ordinary text.
    """
    plain = [i for i, m in enumerate(messages) if not escape(m["content"])]
    escaped = [i for i, m in enumerate(messages) if escape(m["content"])]
    out: list[list[int]] = [[] for _ in messages]
    if plain:
        texts = [_piece_text(messages[i]["role"], messages[i]["content"]) for i in plain]
        # verbose=False: long rows are expected here; the length policy is applied by the caller.
        for i, ids in zip(plain, tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]):
            out[i] = ids
    if escaped:
        contents = [messages[i]["content"].lstrip(_RUST_WHITESPACE) for i in escaped]
        split = tokenizer(contents, add_special_tokens=False, verbose=False, split_special_tokens=True)["input_ids"]
        end = tokenizer("<|end|>\n", add_special_tokens=False)["input_ids"]
        for i, ids in zip(escaped, split):
            marker = tokenizer(f"<|{messages[i]['role']}|>\n", add_special_tokens=False)["input_ids"]
            out[i] = [*marker, *ids, *end]
    return out


def _fast_batch(
    tokenizer: Any, conversations: Sequence[list[dict]], loss_on: str, escape: Callable[[str], bool] | None = None
) -> list[tuple[list[int], list[int]]]:
    """Tokenise every turn of every conversation in one tokenizer call and stitch them together."""
    flat = [m for conv in conversations for m in conv]
    pieces = _message_pieces(tokenizer, flat, escape or _never)
    eos = _end_ids(tokenizer)
    results: list[tuple[list[int], list[int]]] = []
    k = 0
    for conv in conversations:
        ids: list[int] = []
        labels: list[int] = []
        for m in conv:
            piece = pieces[k]
            k += 1
            ids.extend(piece)
            if _weighted_out(m):
                labels.extend([IGNORE_INDEX] * len(piece))
            elif loss_on == "all":
                labels.extend(piece)
            elif m["role"] == "assistant":
                # The role marker is the piece's first token; content + <|end|> follow it.
                labels.append(IGNORE_INDEX)
                labels.extend(piece[1:])
            else:
                labels.extend([IGNORE_INDEX] * len(piece))
        ids.extend(eos)
        labels.extend(eos if loss_on == "all" else [IGNORE_INDEX] * len(eos))
        results.append((ids, labels))
    return results


def _weighted_out(message: dict) -> bool:
    return message.get("weight", 1) == 0


def _never(_: str) -> bool:
    return False


def _always(_: str) -> bool:
    return True


def _escape_test(tokenizer: Any, policy: str) -> Callable[[str], bool]:
    """Which contents need the escaped path under ``policy`` (only those holding special-token strings)."""
    pattern = _special_pattern(tokenizer) if _escaping(policy) else None
    return (lambda text: pattern.search(text) is not None) if pattern is not None else _never


def _refuse_unescapable(tokenizer: Any, conversations: Sequence[list[dict]], policy: str) -> None:
    """The generic path renders through ``apply_chat_template`` text and cannot keep content strings plain."""
    escape = _escape_test(tokenizer, policy)
    for conv in conversations:
        for m in conv:
            if escape(m["content"]):
                found = ", ".join(special_strings_in_text(tokenizer, m["content"]))
                raise DataError(
                    f"a {m['role']} message contains special-token text ({found}) and this tokenizer's chat "
                    "template cannot keep it plain text",
                    hint="remove those strings, or set data.special_tokens_in_text: error (reject such rows) "
                    "or allow (trust them as real tokens)",
                )


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _generic(tokenizer: Any, messages: list[dict], loss_on: str) -> tuple[list[int], list[int]]:
    """Template-agnostic path: O(turns²) re-rendering of prefixes; used only when the fast path fails its probe."""
    full = _template_ids(tokenizer, messages)
    labels = list(full) if loss_on == "all" else [IGNORE_INDEX] * len(full)
    eos_id = tokenizer.eos_token_id
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (loss_on == "all" and not _weighted_out(m)):
            continue
        prompt = _template_ids(tokenizer, messages[:i], add_generation_prompt=True)
        start = _common_prefix_len(full, prompt)
        if start != len(prompt):
            raise ValueError(f"chat template breaks the prefix property at turn {i + 1}; cannot mask it")
        end = _common_prefix_len(full, _template_ids(tokenizer, messages[: i + 1]))
        if end == len(full) and full and full[-1] == eos_id:
            end -= 1  # the closing <|endoftext|> of the whole conversation is not trained (module docstring)
        labels[start:end] = [IGNORE_INDEX] * (end - start) if _weighted_out(m) else full[start:end]
    return full, labels


def fast_path_ok(tokenizer: Any) -> bool:
    """Whether segment-wise rendering reproduces ``apply_chat_template`` for this tokenizer.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.

    Returns:
        True when the probe conversations render identically both ways (checked once, then cached).
    """
    key = (id(tokenizer), str(getattr(tokenizer, "chat_template", "")))
    if key not in _FAST_PATH_OK:
        ok = all(tokenizer.convert_tokens_to_ids(f"<|{r}|>") != tokenizer.unk_token_id for r in PHI3_ROLES)
        if ok:
            fast = _fast_batch(tokenizer, _PROBES, "assistant")
            ok = all(ids == _template_ids(tokenizer, conv) for (ids, _), conv in zip(fast, _PROBES))
            # The escaped path (content tokenised on its own) must agree on text without special strings.
            escaped = _fast_batch(tokenizer, _PROBES, "assistant", _always)
            ok = ok and all(ids == _template_ids(tokenizer, conv) for (ids, _), conv in zip(escaped, _PROBES))
            ok = ok and render_prompt_ids_fast(tokenizer, _PROBES[0][:2]) == _template_ids(
                tokenizer, _PROBES[0][:2], add_generation_prompt=True
            )
        _FAST_PATH_OK[key] = ok
    return _FAST_PATH_OK[key]


def render_conversations(
    tokenizer: Any,
    conversations: Sequence[list[dict]],
    loss_on: str = "assistant",
    special_tokens: str = DEFAULT_POLICY,
) -> list[tuple[list[int], list[int]]]:
    """Render many conversations at once (one batched tokenizer call on the fast path).

    Args:
        tokenizer: The Phi-3 tokenizer.
        conversations: Lists of ``{"role", "content"}`` messages with roles system/user/assistant.
        loss_on: ``"assistant"`` (assistant contents + their ``<|end|>``) or ``"all"``.
        special_tokens: ``data.special_tokens_in_text``: ``"escape"``/``"error"`` keep special-token strings in
            contents plain text; ``"allow"`` lets them become real special tokens.

    Returns:
        One ``(input_ids, labels)`` pair per conversation; labels are -100 where not trained.

    Raises:
        DataError: Special-token text must be escaped but the tokenizer needs the generic path.
    """
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', not {loss_on!r}")
    if fast_path_ok(tokenizer):
        return _fast_batch(tokenizer, conversations, loss_on, _escape_test(tokenizer, special_tokens))
    _refuse_unescapable(tokenizer, conversations, special_tokens)
    return [_generic(tokenizer, list(conv), loss_on) for conv in conversations]


def render_conversation(
    tokenizer: Any, messages: list[dict], loss_on: str = "assistant", special_tokens: str = DEFAULT_POLICY
) -> tuple[list[int], list[int]]:
    """Render one conversation exactly as the Phi-3 chat template does, with its loss labels.

    Args:
        tokenizer: The Phi-3 tokenizer.
        messages: ``{"role", "content"}`` dicts, roles system/user/assistant.
        loss_on: ``"assistant"`` or ``"all"`` (see the module docstring for what is labelled).
        special_tokens: See :func:`render_conversations`.

    Returns:
        ``(input_ids, labels)``: ``input_ids`` equal ``apply_chat_template(messages, tokenize=True)`` (for
        contents without special-token strings); ``labels`` copy the trained ids and hold -100 elsewhere.
    """
    return render_conversations(tokenizer, [messages], loss_on, special_tokens)[0]


def render_prompt_ids_fast(
    tokenizer: Any, messages: list[dict], escape: Callable[[str], bool] | None = None
) -> list[int]:
    """Segment-wise prompt rendering (no probe check); prefer :func:`render_prompt`."""
    ids: list[int] = []
    for piece in _message_pieces(tokenizer, messages, escape or _never):
        ids.extend(piece)
    return ids + tokenizer("<|assistant|>\n", add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer: Any, messages: list[dict], special_tokens: str = DEFAULT_POLICY) -> list[int]:
    """Encode a conversation for generation: its turns, then the ``<|assistant|>`` marker.

    This is the one way phi3tune builds generation prompts (``chat``, merge verification), under the same
    special-token rule as training data: by default a prompt containing ``<|end|>\\n<|assistant|>`` is
    plain text and cannot forge turns.

    Args:
        tokenizer: The Phi-3 tokenizer.
        messages: The conversation so far, normally ending with a user turn.
        special_tokens: ``data.special_tokens_in_text`` policy; ``"allow"`` trusts special-token strings.

    Returns:
        Token ids equal to ``apply_chat_template(messages, add_generation_prompt=True)`` for contents
        without special-token strings.

    Raises:
        DataError: Special-token text must be escaped but the tokenizer needs the generic path.
    """
    if fast_path_ok(tokenizer):
        return render_prompt_ids_fast(tokenizer, messages, _escape_test(tokenizer, special_tokens))
    _refuse_unescapable(tokenizer, [messages], special_tokens)
    return _template_ids(tokenizer, messages, add_generation_prompt=True)
