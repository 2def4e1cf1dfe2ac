"""OpenAI / Azure tool-calling chats (issue 14): tools, tool_calls, tool results, weights, legacy functions;
one rendering convention shared with ShareGPT; data check, chat --tools and a real tiny training run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from rich.console import Console

from conftest import needs_hf_home
from helpers import cli, train_args
from phi3tune.chat import read_tools_file, system_with_tools
from phi3tune.data import to_phi3_messages
from phi3tune.data.formats import detect_format, normalise_rows
from phi3tune.data.prepare import read_source
from phi3tune.data.tools import TOOL_RESULT_PREFIX, TOOLS_HEADER
from phi3tune.data.validate import validate_conversations
from phi3tune.data_check import run_data_check
from phi3tune.errors import DataError, UsageError
from phi3tune.model.chat_template import IGNORE_INDEX, render_conversation, render_conversations, render_prompt

SCHEMA = {"name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": SCHEMA}]
SYSTEM = "You are a helpful assistant."


def call(city: str, call_id: str = "call_1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


def sharegpt_call(*cities: str) -> str:
    calls = [{"name": "get_weather", "arguments": {"city": c}} for c in cities]
    return json.dumps(calls[0] if len(calls) == 1 else calls)


# The same two conversations in both source forms.
OPENAI_SINGLE = {"tools": TOOLS, "messages": [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [call("Paris")]},  # no content key at all
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temp_c": 18}'},
    {"role": "assistant", "content": "It is 18 °C in Paris."},
]}  # fmt: skip
SHAREGPT_SINGLE = {"system": SYSTEM, "tools": json.dumps([SCHEMA]), "conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": sharegpt_call("Paris")},
    {"from": "observation", "value": '{"temp_c": 18}'},
    {"from": "gpt", "value": "It is 18 °C in Paris."},
]}  # fmt: skip
OPENAI_PARALLEL = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Paris or Rome, which is warmer?"},
    {"role": "assistant", "content": "Let me check both.", "tool_calls": [call("Paris", "a"), call("Rome", "b")]},
    {"role": "tool", "tool_call_id": "a", "content": '{"temp_c": 18}'},
    {"role": "tool", "tool_call_id": "b", "content": '{"temp_c": 24}'},
    {"role": "assistant", "content": "Rome, at 24 °C."},
]}  # fmt: skip
SHAREGPT_PARALLEL = {"tools": [SCHEMA], "conversations": [
    {"from": "human", "value": "Paris or Rome, which is warmer?"},
    {"from": "gpt", "value": "Let me check both."},
    {"from": "function_call", "value": sharegpt_call("Paris", "Rome")},
    {"from": "observation", "value": '{"temp_c": 18}'},
    {"from": "observation", "value": '{"temp_c": 24}'},
    {"from": "gpt", "value": "Rome, at 24 °C."},
]}  # fmt: skip


def normalised(row: dict) -> list:
    fmt = detect_format([row])
    return normalise_rows([row], fmt)[0]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def data_cfg(path: Path, **kw) -> SimpleNamespace:
    base = dict(eval=None, eval_fraction=None, format="auto", system_prompt=None, on_invalid="error",
                on_overlength="truncate", loss_on="assistant", special_tokens_in_text="escape")  # fmt: skip
    base.update(kw)
    return SimpleNamespace(train=SimpleNamespace(path=str(path), hub=None, split=None, name=None, revision=None), **base)


# --- normalisation -------------------------------------------------------------------------------------


def test_openai_tool_row_renders_with_the_convention() -> None:
    assert detect_format([OPENAI_SINGLE]) == "messages"
    out = normalised(OPENAI_SINGLE)
    assert out == [
        {"role": "system", "content": SYSTEM + "\n\n" + TOOLS_HEADER + json.dumps([SCHEMA])},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"role": "user", "content": TOOL_RESULT_PREFIX + '{"temp_c": 18}'},
        {"role": "assistant", "content": "It is 18 °C in Paris."},
    ]
    assert validate_conversations([out]).n_invalid == 0


def test_parallel_calls_text_beside_calls_and_null_content() -> None:
    out = normalised(OPENAI_PARALLEL)
    calls = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]'
    assert out[0]["role"] == "system" and out[0]["content"].startswith(TOOLS_HEADER)  # created for the tools
    assert out[2] == {"role": "assistant", "content": "Let me check both.\n\n" + calls}
    assert out[3] == {"role": "user", "content": f'{TOOL_RESULT_PREFIX}{{"temp_c": 18}}\n\n{TOOL_RESULT_PREFIX}{{"temp_c": 24}}'}
    null_content = json.loads(json.dumps(OPENAI_PARALLEL))
    null_content["messages"][1]["content"] = None
    assert normalised(null_content)[2] == {"role": "assistant", "content": calls}
    assert validate_conversations([out, normalised(null_content)]).n_invalid == 0


def test_legacy_functions_and_function_role() -> None:
    row = {"functions": [SCHEMA], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"role": "function", "name": "get_weather", "content": '{"temp_c": 18}'},
        {"role": "assistant", "content": "18 °C."},
    ]}  # fmt: skip
    out = normalised(row)
    assert out[0] == {"role": "system", "content": TOOLS_HEADER + json.dumps([SCHEMA])}
    assert out[2]["content"] == '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert out[3]["content"] == TOOL_RESULT_PREFIX + '{"temp_c": 18}'
    assert validate_conversations([out]).n_invalid == 0


def test_plain_rows_normalise_exactly_as_before() -> None:
    row = {"messages": [{"role": "user", "content": "Q", "name": "x"}, {"role": "assistant", "content": "A"}]}
    assert normalised(row) == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize(("openai", "sharegpt"), [(OPENAI_SINGLE, SHAREGPT_SINGLE), (OPENAI_PARALLEL, SHAREGPT_PARALLEL)])
def test_same_conversation_same_ids_and_labels_in_both_forms(openai, sharegpt, phi3_tokenizer) -> None:
    a, b = normalised(openai), normalised(sharegpt)
    assert a == b
    (ids_a, labels_a), (ids_b, labels_b) = render_conversations(phi3_tokenizer, [a, b])
    assert ids_a == ids_b and labels_a == labels_b
    trained = phi3_tokenizer.decode([t for t in labels_a if t != IGNORE_INDEX])
    assert '"name": "get_weather"' in trained and "Tool result" not in trained and "temp_c" not in trained


def test_weight_zero_turn_has_no_trained_tokens(phi3_tokenizer) -> None:
    row = {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bad old answer.", "weight": 0},
        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Good answer.", "weight": 1},
    ]}  # fmt: skip
    out = normalised(row)
    assert out[1] == {"role": "assistant", "content": "Bad old answer.", "weight": 0} and "weight" not in out[3]
    for loss_on in ("assistant", "all"):
        ids, labels = render_conversation(phi3_tokenizer, out, loss_on)
        assert ids == render_conversation(phi3_tokenizer, [{k: m[k] for k in ("role", "content")} for m in out])[0]
        trained = phi3_tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert "Good answer." in trained and "Bad old" not in trained, loss_on
    only_context = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", "weight": 0}]}
    assert all(t == IGNORE_INDEX for t in render_conversation(phi3_tokenizer, normalised(only_context))[1])


def test_tool_text_follows_the_special_token_policy(tmp_path: Path, phi3_tokenizer) -> None:
    row = json.loads(json.dumps(OPENAI_SINGLE))
    row["messages"][2]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "<|end|><|user|>"})
    ids, _ = render_conversation(phi3_tokenizer, normalised(row))
    end_id = phi3_tokenizer.convert_tokens_to_ids("<|end|>")
    assert ids.count(end_id) == 5  # one per turn: the text in the arguments stays text
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    data = read_source(data_cfg(path).train, data_cfg(path, special_tokens_in_text="error"))
    assert list(data.validation.problems) == ["special-token text"]


# --- strict validation -----------------------------------------------------------------------------------


BAD_TOOL_ROWS = [
    ("unmatched tool result", "message 2 (tool) answers no call",
     {"messages": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "A"}]}),
    ("unmatched tool result", "tool_call_id 'nope', which matches no call (ids called: call_1)",
     {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [call("Paris")]},
                   {"role": "tool", "tool_call_id": "nope", "content": "r"}, {"role": "assistant", "content": "A"}]}),
    ("malformed tool call", "message 2 (assistant) call 1 (get_weather): arguments are not valid JSON",
     {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [
         {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": '}}]}]}),
    ("unknown role", "message 1 has role 'robot'",
     {"messages": [{"role": "robot", "content": "Q"}, {"role": "assistant", "content": "A"}]}),
    ("invalid weight", "weight 0.5; it must be 0 or 1",
     {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 0.5}]}),
    ("invalid weight", "message 1 (user) has a weight",
     {"messages": [{"role": "user", "content": "Q", "weight": 0}, {"role": "assistant", "content": "A"}]}),
    ("malformed tools", "tool 1 is not a function schema",
     {"tools": [{"type": "retrieval"}], "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}),
]  # fmt: skip


def test_wrong_tool_rows_are_problems_with_their_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [OPENAI_SINGLE, *(row for _, _, row in BAD_TOOL_ROWS)])
    data = read_source(data_cfg(path).train, data_cfg(path))
    assert data.validation.valid == [0]
    found = [(problem, line, reason) for problem, hits in data.validation.problems.items() for line, reason in hits]
    for line, (problem, reason, _) in enumerate(BAD_TOOL_ROWS, start=2):
        assert any(p == problem and n == line and reason in r for p, n, r in found), (line, problem, found)


def test_to_phi3_messages_is_the_training_rendering() -> None:
    assert to_phi3_messages(OPENAI_SINGLE["messages"], TOOLS) == normalised(OPENAI_SINGLE)
    prompt = to_phi3_messages(OPENAI_SINGLE["messages"][:4], TOOLS)  # ends with the tool result: a generation prompt
    assert prompt == normalised(OPENAI_SINGLE)[:4]
    with pytest.raises(DataError, match="unmatched tool result: message 1 \\(tool\\) answers no call"):
        to_phi3_messages([{"role": "tool", "content": "x"}])


# --- data check ------------------------------------------------------------------------------------------


def test_data_check_counts_tool_use_and_shows_a_call_trained(tmp_path: Path, phi3_tokenizer) -> None:
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    weighted = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 0},
                             {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}]}
    path = write_jsonl(tmp_path / "tools.jsonl", [plain, plain, OPENAI_PARALLEL, plain, weighted, plain, plain])
    console = Console(width=300, record=True, force_terminal=False)
    with console.capture() as captured:
        code = run_data_check(path, phi3_tokenizer, data_cfg(path), 1024, console)
    out = captured.get()
    assert code == 0, out
    assert "tool use (valid rows): 1 rows with tools, 2 calls (trained), 2 results (context), 1 assistant turns " \
           "with weight 0 (context)" in out
    assert "sample line 3 " in out and "Tool result:" in out  # the row with calls is among the samples
    sample = _highlighted(phi3_tokenizer, normalised(OPENAI_PARALLEL))
    assert '"name": "get_weather"' in sample["trained"] and "Tool result" in sample["context"]


def _highlighted(tokenizer, messages: list) -> dict[str, str]:
    from phi3tune.data_check import _render_sample

    text = _render_sample(tokenizer, *render_conversation(tokenizer, messages))
    spans = {"trained": "", "context": ""}
    for s in text.spans:
        spans["trained" if s.style == "bold green" else "context"] += text.plain[s.start : s.end]
    return spans


# --- chat --tools ------------------------------------------------------------------------------------------


def test_tools_file_forms_and_errors(tmp_path: Path) -> None:
    for i, content in enumerate((TOOLS, {"tools": TOOLS}, [SCHEMA], TOOLS[0], {"functions": [SCHEMA]})):
        (tmp_path / f"t{i}.json").write_text(json.dumps(content))
        tools = read_tools_file(tmp_path / f"t{i}.json")
        assert system_with_tools(SYSTEM, tools) == normalised(OPENAI_SINGLE)[0]["content"], content
    assert system_with_tools(None, TOOLS) == TOOLS_HEADER + json.dumps([SCHEMA])
    (tmp_path / "bad.json").write_text('[{"type": "retrieval"}]')
    with pytest.raises(UsageError, match="--tools .*bad.json: tool 1 is not a function schema"):
        read_tools_file(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(UsageError, match="not valid JSON"):
        read_tools_file(tmp_path / "broken.json")
    with pytest.raises(UsageError, match="cannot read"):
        read_tools_file(tmp_path / "missing.json")


@needs_hf_home
def test_openai_tools_file_trains_and_chat_renders_tools_as_training_did(tmp_path: Path, monkeypatch) -> None:
    # Acceptance 3 (and 2's skip half): an OpenAI tools file with two broken lines trains under on_invalid: skip.
    rows = [OPENAI_SINGLE, OPENAI_PARALLEL] * 4
    lines = [json.dumps(r) for r in rows[:3]] + ['{"messages": [oops'] + [json.dumps(r) for r in rows[3:]] + ["}"]
    train_file = tmp_path / "tools_train.jsonl"
    train_file.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    args = train_args(train_file, run, "--set", "training_config.max_steps=2", "--set", "training_config.max_length=512")
    result = cli(args)
    assert result.exit_code == 0, result.output
    assert "skipped 2 invalid (invalid JSON): lines 4, 10" in result.output
    report = yaml.safe_load((run / "run_config.yaml").read_text())["data_report"]["train"]
    assert report["invalid"] == {"invalid JSON": 2} and report["rows_used"] == 8

    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    import phi3tune.chat as chat_mod

    seen: list[list[int]] = []
    real = chat_mod.generate_reply

    def spy(model, tokenizer, messages, **kw):
        seen.append(render_prompt(tokenizer, messages))
        return real(model, tokenizer, messages, **kw)

    monkeypatch.setattr(chat_mod, "generate_reply", spy)
    result = cli(["chat", str(run), "--tools", str(tmp_path / "tools.json"), "--system", SYSTEM,
                  "--prompt", "Weather in Paris?", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("microsoft/Phi-3-mini-4k-instruct")
    trained_ids, _ = render_conversation(tokenizer, normalised(OPENAI_SINGLE))
    assert seen[0] == trained_ids[: len(seen[0])]  # the chat prompt is the start of the trained row, token for token
    assert tokenizer.decode(seen[0][-1:]) == "<|assistant|>"
