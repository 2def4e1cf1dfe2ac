"""Data loading, format detection and normalisation, validation, tokenisation policies, sample data."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO_ROOT, SHARED_DATASETS, needs_shared_datasets
from phi3tune.model.chat_template import IGNORE_INDEX
from phi3tune.data.prepare import detect_format, load_rows, normalise_rows, prepare_datasets, validate_conversations
from phi3tune.data.formats import TOOL_RESULT_PREFIX, TOOLS_HEADER
from phi3tune.errors import DataError, ResourceError

SAMPLE_DIR = REPO_ROOT / "phi3tune" / "sample_data"


def source(path: str | Path | None = None, hub: str | None = None, **kw) -> SimpleNamespace:
    return SimpleNamespace(path=str(path) if path else None, hub=hub, split=kw.get("split"), name=None, revision=None)


def data_cfg(train, **kw) -> SimpleNamespace:
    base = dict(eval=None, eval_fraction=None, format="auto", system_prompt=None, on_invalid="error",
                on_overlength="truncate", loss_on="assistant")  # fmt: skip
    base.update(kw)
    return SimpleNamespace(train=train if isinstance(train, SimpleNamespace) else source(train), **base)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str = "hi", assistant: str = "hello") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# --- format detection and normalisation ---------------------------------------------------------------


@needs_shared_datasets
@pytest.mark.parametrize(
    ("filename", "fmt"),
    [
        ("gsm8k_chat.messages.jsonl", "messages"),
        ("oasst_en100.messages.jsonl", "messages"),
        ("alpaca_libre_v3.alpaca.jsonl", "alpaca"),
        ("glaive_toolcall_demo.sharegpt.json", "sharegpt"),
    ],
)
def test_detect_shared_formats(filename: str, fmt: str) -> None:
    loaded = load_rows(source(SHARED_DATASETS / filename))
    assert detect_format(loaded.rows) == fmt
    convs = normalise_rows(loaded.rows, fmt)
    assert all(m["role"] in ("system", "user", "assistant") for c in convs for m in c)


@needs_shared_datasets
def test_sharegpt_tool_turns_and_tools_field() -> None:
    loaded = load_rows(source(SHARED_DATASETS / "glaive_toolcall_demo.sharegpt.json"))
    first = normalise_rows(loaded.rows[:1], "sharegpt")[0]
    raw = loaded.rows[0]["conversations"]
    assert [m["role"] for m in first] == ["system"] + ["user", "assistant"] * 4
    assert first[0]["content"].startswith(TOOLS_HEADER) and "search_recipes" in first[0]["content"]
    assert first[4]["content"] == raw[3]["value"]  # function_call → assistant, verbatim
    assert first[5]["content"] == TOOL_RESULT_PREFIX + raw[4]["value"]  # observation → user, prefixed
    assert validate_conversations(normalise_rows(loaded.rows, "sharegpt")).n_invalid == 0
    no_tools = next(r for r in loaded.rows if r["tools"] == "[]")
    assert normalise_rows([no_tools], "sharegpt")[0][0]["role"] == "user"  # "[]" adds no system turn


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        ({"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca",
         [("user", "Add\n\n2 and 3"), ("assistant", "5")]),
        ({"instruction": "Say hi", "input": "", "output": "hi", "system": "Be brief."}, "alpaca",
         [("system", "Be brief."), ("user", "Say hi"), ("assistant", "hi")]),
        ({"prompt": "Q?", "completion": "A."}, "prompt_completion", [("user", "Q?"), ("assistant", "A.")]),
        ({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
          "completion": [{"role": "assistant", "content": "A"}]}, "prompt_completion",
         [("system", "S"), ("user", "Q"), ("assistant", "A")]),
        ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                            {"from": "gpt", "value": "A"}]}, "sharegpt",
         [("system", "S"), ("user", "Q"), ("assistant", "A")]),
        ({"messages": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "sharegpt",
         [("user", "Q"), ("assistant", "A")]),
        ({"messages": json.dumps([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])},
         "messages", [("user", "Q"), ("assistant", "A")]),
    ],
)  # fmt: skip
def test_inline_formats(row: dict, fmt: str, expected: list) -> None:
    assert detect_format([row]) == fmt
    assert normalise_rows([row], fmt) == [[{"role": r, "content": c} for r, c in expected]]


def test_unknown_format_is_clear() -> None:
    with pytest.raises(DataError, match="cannot tell the data format; fields found: question, text"):
        detect_format([{"text": "x", "question": "y"}], "f.jsonl")


def test_system_prompt_added_only_where_missing() -> None:
    rows = [chat(), {"messages": [{"role": "system", "content": "own"}, *chat()["messages"]]}]
    out = normalise_rows(rows, "messages", system_prompt="default")
    assert out[0][0] == {"role": "system", "content": "default"} and len(out[0]) == 3
    assert out[1][0]["content"] == "own" and len(out[1]) == 3


# --- loading -------------------------------------------------------------------------------------------


def test_malformed_jsonl_names_line(tmp_path: Path) -> None:
    # A broken line is an invalid row (issue 14: all of them are listed, on_invalid decides), named by its line.
    path = write_jsonl(tmp_path / "d.jsonl", [chat(), "", '{"messages": [oops]}'])
    with pytest.raises(DataError, match=r"(?s)d\.jsonl: 1 invalid line.*invalid JSON: 1 \(lines 3; e\.g\. line 3: not valid"):
        prepare_datasets(data_cfg(path), tokenizer=None, max_length=64, seed=0)


def test_json_csv_parquet(tmp_path: Path) -> None:
    rows = [{"instruction": "I", "input": "", "output": "O"}] * 2
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
    with (tmp_path / "a.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.json", "a.csv", "a.parquet"):
        assert load_rows(source(tmp_path / name)).rows == rows, name
    (tmp_path / "bad.json").write_text('"x"')
    with pytest.raises(DataError, match="expected a JSON list of rows, one row object .*found a string"):
        load_rows(source(tmp_path / "bad.json"))


def test_relative_path_resolves_against_base_dir_then_cwd(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cfgdir").mkdir()
    write_jsonl(tmp_path / "cfgdir" / "d.jsonl", [chat()])
    assert len(load_rows(source("d.jsonl"), tmp_path / "cfgdir").rows) == 1
    monkeypatch.chdir(tmp_path / "cfgdir")
    assert len(load_rows(source("d.jsonl"), tmp_path / "elsewhere").rows) == 1
    with pytest.raises(DataError, match="data file not found: missing.jsonl"):
        load_rows(source("missing.jsonl"), tmp_path)


def test_hub_offline_is_a_clear_resource_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ResourceError, match=r"cannot load hub:HuggingFaceH4/ultrachat_200k\[train_sft\]") as info:
        load_rows(source(hub="HuggingFaceH4/ultrachat_200k", split="train_sft"))
    assert "offline" in (info.value.hint or "")


# --- validation ----------------------------------------------------------------------------------------

BAD_ROWS = {
    "no messages": {"messages": []},
    "unknown role": {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    "empty content": chat(assistant="   \n"),
    "non-string content": chat(assistant=None),
    "no assistant turn": {"messages": [{"role": "user", "content": "x"}]},
    "wrong turn order": {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
    "malformed message": {"messages": ["just text", {"role": "assistant", "content": "y"}]},
}


def test_each_bad_row_reported_with_line_number(tmp_path: Path, phi3_tokenizer) -> None:
    # Line 1 good, a blank line 2, then one bad row per kind from line 3 on.
    path = write_jsonl(tmp_path / "bad.jsonl", [chat(), "", *BAD_ROWS.values()])
    with pytest.raises(DataError) as info:
        prepare_datasets(data_cfg(path), phi3_tokenizer, 128, 0)
    text = str(info.value)
    assert "7 invalid lines" in text and "1-based" in text
    for line, problem in enumerate(BAD_ROWS, start=3):
        assert f"{problem}: 1 (lines {line};" in text, problem


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
         "ends with a user turn"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
         "message 2 is system but assistant was expected"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
         "message 2 is user but assistant was expected"),
    ],
)  # fmt: skip
def test_order_rules(messages: list, reason: str) -> None:
    result = validate_conversations([messages])
    assert result.counts() == {"wrong turn order": 1}
    assert reason in result.problems["wrong turn order"][0][1]
    if "ends with a user" in reason:
        assert validate_conversations([messages], allow_trailing_user=True).valid == [0]


def test_skip_counts_and_keeps_good_rows(tmp_path: Path, phi3_tokenizer) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [chat(), *BAD_ROWS.values(), chat("a", "b")])
    prepared = prepare_datasets(data_cfg(path, on_invalid="skip"), phi3_tokenizer, 128, 0)
    assert len(prepared.train) == 2
    assert prepared.report.train.invalid == {k: 1 for k in BAD_ROWS}
    assert prepared.report.train.invalid_first_rows["no messages"] == [2]


@needs_shared_datasets
def test_alpaca_empty_outputs_skipped(phi3_tokenizer) -> None:
    cfg = data_cfg(SHARED_DATASETS / "alpaca_libre_v3.alpaca.jsonl", on_invalid="skip")
    report = prepare_datasets(cfg, phi3_tokenizer, 1024, 0).report
    assert report.train.invalid == {"empty content": 6} and report.train.format == "alpaca"
    assert report.train.rows_used == 1205 - 6


# --- tokenisation --------------------------------------------------------------------------------------


def test_prepared_columns_and_labels(tmp_path: Path, phi3_tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat("Reverse: a b", "b a")])
    prepared = prepare_datasets(data_cfg(path), phi3_tokenizer, 128, 0)
    assert prepared.train.column_names == ["input_ids", "labels"]
    row = prepared.train[0]
    assert row["input_ids"] == phi3_tokenizer.apply_chat_template(chat("Reverse: a b", "b a")["messages"])["input_ids"]
    trained = [x for x in row["labels"] if x != IGNORE_INDEX]
    assert phi3_tokenizer.decode(trained) == "b a<|end|>"
    report = prepared.report.train
    assert report.tokens == len(row["input_ids"]) and report.trained_tokens == len(trained)
    everything = prepare_datasets(data_cfg(path, loss_on="all"), phi3_tokenizer, 128, 0).train[0]
    assert everything["labels"] == everything["input_ids"]


def test_overlength_policies(tmp_path: Path, phi3_tokenizer) -> None:
    long_answer = chat("q", " ".join(["word"] * 100))
    long_prompt = chat(" ".join(["word"] * 100), "short")  # truncation would cut every trained token
    path = write_jsonl(tmp_path / "d.jsonl", [chat(), long_answer, long_prompt])
    truncated = prepare_datasets(data_cfg(path), phi3_tokenizer, 50, 0)
    assert len(truncated.train) == 2 and max(len(r) for r in truncated.train["input_ids"]) == 50
    assert (truncated.report.train.truncated, truncated.report.train.dropped_no_labels) == (2, 1)
    dropped = prepare_datasets(data_cfg(path, on_overlength="drop"), phi3_tokenizer, 50, 0)
    assert len(dropped.train) == 1 and dropped.report.train.dropped_overlength == 2
    with pytest.raises(DataError, match=r"2 lines longer than max_length=50: line 2 \(\d+ tokens\), line 3"):
        prepare_datasets(data_cfg(path, on_overlength="error"), phi3_tokenizer, 50, 0)


def test_eval_fraction_is_deterministic(tmp_path: Path, phi3_tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(50)])
    a = prepare_datasets(data_cfg(path, eval_fraction=0.2), phi3_tokenizer, 64, seed=7)
    b = prepare_datasets(data_cfg(path, eval_fraction=0.2), phi3_tokenizer, 64, seed=7)
    c = prepare_datasets(data_cfg(path, eval_fraction=0.2), phi3_tokenizer, 64, seed=8)
    assert (len(a.train), len(a.eval)) == (40, 10)
    assert a.eval["input_ids"] == b.eval["input_ids"] and a.train["input_ids"] == b.train["input_ids"]
    assert a.eval["input_ids"] != c.eval["input_ids"]
    assert not {tuple(x) for x in a.eval["input_ids"]} & {tuple(x) for x in a.train["input_ids"]}
    assert a.report.fingerprint == c.report.fingerprint  # the data, not the split


def test_fingerprint_tracks_content(tmp_path: Path, phi3_tokenizer) -> None:
    one = write_jsonl(tmp_path / "1.jsonl", [chat("x", "y")])
    two = write_jsonl(tmp_path / "2.jsonl", [chat("x", "z")])
    f1 = prepare_datasets(data_cfg(one), phi3_tokenizer, 64, 0).report.fingerprint
    assert f1 == prepare_datasets(data_cfg(one), phi3_tokenizer, 64, 0).report.fingerprint
    assert f1 != prepare_datasets(data_cfg(two), phi3_tokenizer, 64, 0).report.fingerprint
    assert len(f1) == 64


def test_trl_collator_accepts_prepared_rows(tmp_path: Path, phi3_tokenizer) -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    path = write_jsonl(tmp_path / "d.jsonl", [chat(), chat("longer question here", "and a longer answer")])
    train = prepare_datasets(data_cfg(path), phi3_tokenizer, 64, 0).train
    batch = DataCollatorForLanguageModeling(pad_token_id=32000)([train[0], train[1]])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][0, len(train[0]["labels"]) :] == IGNORE_INDEX).all()  # padding carries no labels


# --- bundled sample data -------------------------------------------------------------------------------


def test_sample_data_valid_small_disjoint(phi3_tokenizer) -> None:
    train = load_rows(source(SAMPLE_DIR / "sample_chat.jsonl"))
    evals = load_rows(source("pkg://phi3tune/sample_data/sample_chat_eval.jsonl"))
    assert len(train.rows) == 400 and len(evals.rows) == 40
    for loaded in (train, evals):
        convs = normalise_rows(loaded.rows, detect_format(loaded.rows))
        assert validate_conversations(convs).n_invalid == 0
    key = lambda r: r["messages"][-2]["content"]  # noqa: E731
    assert not {key(r) for r in train.rows} & {key(r) for r in evals.rows}
    assert sum(p.stat().st_size for p in SAMPLE_DIR.glob("*.jsonl")) < 100_000
    assert any(r["messages"][0]["role"] == "system" for r in train.rows)
    row = train.rows[0]["messages"]
    assert row[-1]["content"].split() == row[-2]["content"].split(": ", 1)[1].split()[::-1]


def test_sample_data_regenerates_identically(tmp_path: Path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO_ROOT / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT_DIR", tmp_path)
    module.main()
    for name in ("sample_chat.jsonl", "sample_chat_eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), name
