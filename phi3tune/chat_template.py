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
after a turn that is already closed. ``loss_on="all"`` labels every token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def _piece_text(role: str, content: str) -> str:
    return f"<|{role}|>\n{content}<|end|>\n"


def _template_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    # transformers 5 returns a BatchEncoding; older versions a plain list.
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _end_ids(tokenizer: Any) -> list[int]:
    return tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def _fast_batch(
    tokenizer: Any, conversations: Sequence[list[dict]], loss_on: str
) -> list[tuple[list[int], list[int]]]:
    """Tokenise every turn of every conversation in one tokenizer call and stitch them together."""
    texts = [_piece_text(m["role"], m["content"]) for conv in conversations for m in conv]
    # verbose=False: long rows are expected here; the length policy is applied by the caller.
    pieces = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
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
            if loss_on == "all":
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


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _generic(tokenizer: Any, messages: list[dict], loss_on: str) -> tuple[list[int], list[int]]:
    """Template-agnostic path: O(turns²) re-rendering of prefixes; used only when the fast path fails its probe."""
    full = _template_ids(tokenizer, messages)
    if loss_on == "all":
        return full, list(full)
    labels = [IGNORE_INDEX] * len(full)
    eos_id = tokenizer.eos_token_id
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _template_ids(tokenizer, messages[:i], add_generation_prompt=True)
        start = _common_prefix_len(full, prompt)
        if start != len(prompt):
            raise ValueError(f"chat template breaks the prefix property at turn {i + 1}; cannot mask it")
        end = _common_prefix_len(full, _template_ids(tokenizer, messages[: i + 1]))
        if end == len(full) and full and full[-1] == eos_id:
            end -= 1  # the closing <|endoftext|> of the whole conversation is not trained (module docstring)
        labels[start:end] = full[start:end]
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
            ok = ok and render_prompt_ids_fast(tokenizer, _PROBES[0][:2]) == _template_ids(
                tokenizer, _PROBES[0][:2], add_generation_prompt=True
            )
        _FAST_PATH_OK[key] = ok
    return _FAST_PATH_OK[key]


def render_conversations(
    tokenizer: Any, conversations: Sequence[list[dict]], loss_on: str = "assistant"
) -> list[tuple[list[int], list[int]]]:
    """Render many conversations at once (one batched tokenizer call on the fast path).

    Args:
        tokenizer: The Phi-3 tokenizer.
        conversations: Lists of ``{"role", "content"}`` messages with roles system/user/assistant.
        loss_on: ``"assistant"`` (assistant contents + their ``<|end|>``) or ``"all"``.

    Returns:
        One ``(input_ids, labels)`` pair per conversation; labels are -100 where not trained.
    """
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', not {loss_on!r}")
    if fast_path_ok(tokenizer):
        return _fast_batch(tokenizer, conversations, loss_on)
    return [_generic(tokenizer, list(conv), loss_on) for conv in conversations]


def render_conversation(
    tokenizer: Any, messages: list[dict], loss_on: str = "assistant"
) -> tuple[list[int], list[int]]:
    """Render one conversation exactly as the Phi-3 chat template does, with its loss labels.

    Args:
        tokenizer: The Phi-3 tokenizer.
        messages: ``{"role", "content"}`` dicts, roles system/user/assistant.
        loss_on: ``"assistant"`` or ``"all"`` (see the module docstring for what is labelled).

    Returns:
        ``(input_ids, labels)``: ``input_ids`` equal ``apply_chat_template(messages, tokenize=True)``;
        ``labels`` copy the trained ids and hold -100 elsewhere.
    """
    return render_conversations(tokenizer, [messages], loss_on)[0]


def render_prompt_ids_fast(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Segment-wise prompt rendering (no probe check); prefer :func:`render_prompt`."""
    texts = [_piece_text(m["role"], m["content"]) for m in messages] + ["<|assistant|>\n"]
    ids: list[int] = []
    for piece in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(piece)
    return ids


def render_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Render a prompt for generation, ending with the ``<|assistant|>`` marker.

    Args:
        tokenizer: The Phi-3 tokenizer.
        messages: The conversation so far, normally ending with a user turn.

    Returns:
        Token ids equal to ``apply_chat_template(messages, add_generation_prompt=True)``.
    """
    if fast_path_ok(tokenizer):
        return render_prompt_ids_fast(tokenizer, messages)
    return _template_ids(tokenizer, messages, add_generation_prompt=True)
