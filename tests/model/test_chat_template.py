"""Phi-3 rendering: token parity with apply_chat_template and exact assistant loss masks."""

from __future__ import annotations

import json

import pytest

from phi3tune.model import chat_template
from phi3tune.model.chat_template import IGNORE_INDEX, render_conversation, render_conversations, render_prompt
from phi3tune.data.formats import detect_format, normalise_rows
from phi3tune.data.load import load_local
from phi3tune.data.validate import validate_conversations
from conftest import SHARED_DATASETS, needs_shared_datasets

U, A, S = "user", "assistant", "system"


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


VARIED = {
    "single_turn": conv((U, "Hi"), (A, "Hello!")),
    "system": conv((S, "You are a pirate."), (U, "Greet me."), (A, "Ahoy, matey!")),
    "multi_turn": conv((U, "2+2?"), (A, "4"), (U, "times 3?"), (A, "12"), (U, "minus 1?"), (A, "11")),
    "unicode": conv((U, "Übersetze: naïve café, 東京, Ελλάδα"), (A, "Naive Kaffee — 東京 (Tokyo), Greece")),
    "code_block": conv((U, "Write hello world in Python"), (A, "```python\ndef main():\n    print('hi')\n```\n")),
    "leading_trailing_ws": conv((S, "  sys  "), (U, "\n\n  spaced  \n"), (A, "  answer with spaces \n\n")),
    "numbers": conv((U, "12345 + 67890 = ?"), (A, "80235; 3.14159e-10; -42")),
    "emoji": conv((U, "Mood? 🙂🚀"), (A, "🎉 great 👍🏽")),
    "trailing_user": conv((U, "first"), (A, "reply"), (U, "second, unanswered")),
    "tabs_and_crlf": conv((U, "a\tb\r\nc"), (A, "\tindented\r\n")),
    "special_looking_text": conv((U, "What is <|end|> in Phi-3?"), (A, "A marker: <s> and </s> are not.")),
    "single_char": conv((U, "a"), (A, "b")),
}


def reference(tokenizer, messages: list[dict], **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def trained_runs(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of labelled token ids."""
    runs: list[list[int]] = []
    prev = False
    for x in labels:
        if x != IGNORE_INDEX:
            if not prev:
                runs.append([])
            runs[-1].append(x)
        prev = x != IGNORE_INDEX
    return runs


def test_known_token_ids(phi3_tokenizer) -> None:
    """Pinned ids of the July 2024 template: no BOS, newlines after markers swallowed, <|endoftext|> last."""
    ids, labels = render_conversation(phi3_tokenizer, conv((S, "Be nice."), (U, "Hello there"), (A, " Hi!\n")))
    assert ids == [32006, 1522, 7575, 29889, 32007, 32010, 15043, 727, 32007, 32001, 6324, 29991, 13, 32007, 32000]
    assert labels == [IGNORE_INDEX] * 10 + [6324, 29991, 13, 32007, IGNORE_INDEX]


@pytest.mark.parametrize("name", sorted(VARIED))
def test_parity_varied(phi3_tokenizer, name: str) -> None:
    messages = VARIED[name]
    # The template reads "<|end|>" typed in content as the real token; only `allow` reproduces that.
    policy = "allow" if name == "special_looking_text" else "escape"
    ids, labels = render_conversation(phi3_tokenizer, messages, special_tokens=policy)
    assert ids == reference(phi3_tokenizer, messages)
    assert len(labels) == len(ids)


@needs_shared_datasets
@pytest.mark.parametrize(
    "filename",
    [
        "gsm8k_chat.messages.jsonl",
        "oasst_en100.messages.jsonl",
        "alpaca_libre_v3.alpaca.jsonl",
        "glaive_toolcall_demo.sharegpt.json",
    ],
)
def test_parity_shared_datasets(phi3_tokenizer, filename: str) -> None:
    """Every valid row of each shared dataset renders identically to apply_chat_template."""
    loaded = load_local(SHARED_DATASETS / filename)
    convs = normalise_rows(loaded.rows, detect_format(loaded.rows))
    valid = [convs[i] for i in validate_conversations(convs).valid]
    assert len(valid) > 90
    for messages, (ids, labels) in zip(valid, render_conversations(phi3_tokenizer, valid)):
        assert ids == reference(phi3_tokenizer, messages)
        assert len(trained_runs(labels)) == sum(m["role"] == A for m in messages)


@pytest.mark.parametrize("name", sorted(VARIED))
def test_trained_spans_are_assistant_contents_and_end(phi3_tokenizer, name: str) -> None:
    messages = VARIED[name]
    # `expected` below tokenises "<s>" in content as the real token; only `allow` does that.
    policy = "allow" if name == "special_looking_text" else "escape"
    ids, labels = render_conversation(phi3_tokenizer, messages, special_tokens=policy)
    runs = trained_runs(labels)
    assistants = [m["content"] for m in messages if m["role"] == A]
    assert len(runs) == len(assistants)
    for run, content in zip(runs, assistants):
        assert run[-1] == 32007  # the closing <|end|> is trained: the model must learn to stop
        assert 32001 not in run  # the <|assistant|> marker is context
        # The marker swallows leading whitespace of the content (template behaviour); the rest is exact.
        expected = phi3_tokenizer("<|assistant|>\n" + content + "<|end|>", add_special_tokens=False)["input_ids"][1:]
        assert run == expected
        assert phi3_tokenizer.decode(run[:-1]) == phi3_tokenizer.decode(expected[:-1])
    for i, (tok, lab) in enumerate(zip(ids, labels)):
        assert lab in (IGNORE_INDEX, tok)
    if messages[-1]["role"] == A:
        assert ids[-1] == 32000 and labels[-1] == IGNORE_INDEX  # trailing <|endoftext|> not trained


def test_decoded_span_matches_content(phi3_tokenizer) -> None:
    messages = VARIED["system"]
    _, labels = render_conversation(phi3_tokenizer, messages)
    (run,) = trained_runs(labels)
    assert phi3_tokenizer.decode(run) == "Ahoy, matey!<|end|>"


def test_user_and_system_tokens_untrained(phi3_tokenizer) -> None:
    ids, labels = render_conversation(phi3_tokenizer, VARIED["multi_turn"])
    first_assistant = ids.index(32001)
    assert all(x == IGNORE_INDEX for x in labels[: first_assistant + 1])
    for i, tok in enumerate(ids):
        if tok in (32001, 32010, 32006):
            assert labels[i] == IGNORE_INDEX


def test_loss_on_all_labels_everything(phi3_tokenizer) -> None:
    ids, labels = render_conversation(phi3_tokenizer, VARIED["system"], loss_on="all")
    assert labels == ids


def test_bad_loss_on(phi3_tokenizer) -> None:
    with pytest.raises(ValueError, match="loss_on"):
        render_conversation(phi3_tokenizer, VARIED["single_turn"], loss_on="completion")


@pytest.mark.parametrize("name", ["system", "unicode", "leading_trailing_ws", "emoji"])
def test_render_prompt_parity(phi3_tokenizer, name: str) -> None:
    prompt = VARIED[name][:-1] if VARIED[name][-1]["role"] == A else VARIED[name]
    ids = render_prompt(phi3_tokenizer, prompt)
    assert ids == reference(phi3_tokenizer, prompt, add_generation_prompt=True)
    assert ids[-1] == 32001


def test_generic_path_agrees_with_fast_path(phi3_tokenizer, monkeypatch) -> None:
    """The template-agnostic fallback (prefix diffing) yields the same ids and labels."""
    fast = render_conversations(phi3_tokenizer, list(VARIED.values()), special_tokens="allow")
    monkeypatch.setattr(chat_template, "fast_path_ok", lambda tok: False)
    slow = render_conversations(phi3_tokenizer, list(VARIED.values()), special_tokens="allow")
    assert slow == fast
    assert render_prompt(phi3_tokenizer, VARIED["system"][:2]) == reference(
        phi3_tokenizer, VARIED["system"][:2], add_generation_prompt=True
    )


def test_fast_path_probe_passes_for_phi3(phi3_tokenizer) -> None:
    assert chat_template.fast_path_ok(phi3_tokenizer)


def test_batch_equals_single(phi3_tokenizer) -> None:
    batch = render_conversations(phi3_tokenizer, list(VARIED.values()))
    assert batch == [render_conversation(phi3_tokenizer, m) for m in VARIED.values()]
    assert json.dumps(batch)  # plain ints, serialisable
