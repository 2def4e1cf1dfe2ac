"""``data check`` report: exit codes, problems with row numbers, histogram, highlighted samples."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from conftest import REPO_ROOT
from phi3tune.model.chat_template import render_conversation
from phi3tune.data_check import _render_sample, run_data_check

SAMPLE = REPO_ROOT / "phi3tune" / "sample_data" / "sample_chat.jsonl"


def data_cfg(path: Path, **kw) -> SimpleNamespace:
    base = dict(eval=None, eval_fraction=None, format="auto", system_prompt=None, on_invalid="error",
                on_overlength="truncate", loss_on="assistant")  # fmt: skip
    base.update(kw)
    train = SimpleNamespace(path=str(path), hub=None, split=None, name=None, revision=None)
    return SimpleNamespace(train=train, **base)


def check(path: Path, tokenizer, max_length: int = 64, **kw) -> tuple[int, str]:
    console = Console(width=200, record=True, force_terminal=False)
    with console.capture() as captured:
        code = run_data_check(path, tokenizer, data_cfg(path, **kw), max_length, console)
    return code, captured.get()


def broken_file(tmp_path: Path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ]
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sample_dataset_passes(phi3_tokenizer) -> None:
    code, out = check(SAMPLE, phi3_tokenizer)
    assert code == 0
    assert "format: messages" in out and "rows: 400   valid: 400" in out
    assert "token lengths (max_length=64)" in out and "█" in out
    assert "trained (21.1%, loss_on: assistant)" in out
    assert out.count("sample line ") == 3 and "Reverse these words:" in out
    assert "data check passed" in out and "exceed" not in out


def test_broken_file_fails_with_problems_named(tmp_path: Path, phi3_tokenizer) -> None:
    code, out = check(broken_file(tmp_path), phi3_tokenizer)
    assert code == 2
    assert "rows: 4   valid: 1" in out
    for problem, line in (("empty content", 2), ("unknown role", 3), ("no assistant turn", 4)):
        row = next(r for r in out.splitlines() if problem in r)
        assert f"│ 1    │ {line} " in row, row
    assert "'robot'" in out and "training would stop (on_invalid: error)" in out
    assert "data check failed" in out


def test_skip_policy_exits_zero(tmp_path: Path, phi3_tokenizer) -> None:
    code, out = check(broken_file(tmp_path), phi3_tokenizer, on_invalid="skip")
    assert code == 0 and "they will be skipped" in out


def test_overlength_reported_against_max_length(phi3_tokenizer) -> None:
    code, out = check(SAMPLE, phi3_tokenizer, max_length=20)
    assert code == 0
    assert "91 rows exceed max_length=20: would be truncated" in out  # the 91 rows with a system turn
    assert ">20" in out
    code, out = check(SAMPLE, phi3_tokenizer, max_length=20, on_overlength="error")
    assert code == 2 and "rejected" in out


def test_sample_render_highlights_exactly_the_trained_tokens(phi3_tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Reverse these words: apple river stone"},
        {"role": "assistant", "content": "stone river apple"},
    ]
    text = _render_sample(phi3_tokenizer, *render_conversation(phi3_tokenizer, messages))
    trained = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == "bold green")
    assert trained.strip() == "stone river apple<|end|>"
    assert "Reverse these words" in text.plain and "<|endoftext|>" in text.plain
