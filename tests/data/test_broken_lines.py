"""Broken JSONL lines are all counted and listed (issue 14); a .json file may hold one conversation object."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import needs_hf_home
from helpers import cli
from phi3tune.data.load import load_local
from phi3tune.data.prepare import prepare_datasets, read_source
from phi3tune.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
BROKEN_AT = [3, 5, 8, 9, 12, 15, 17, 20, 21, 24, 26, 28, 29, 30]  # 14 broken lines of 30


def broken_file(tmp_path: Path) -> Path:
    lines = ['{"messages": [{"role": "user", "content": "cut off' if n in BROKEN_AT else json.dumps(GOOD)
             for n in range(1, 31)]  # fmt: skip
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def data_cfg(path: Path, **kw) -> SimpleNamespace:
    base = dict(eval=None, eval_fraction=None, format="auto", system_prompt=None, on_invalid="error",
                on_overlength="truncate", loss_on="assistant")  # fmt: skip
    base.update(kw)
    return SimpleNamespace(train=SimpleNamespace(path=str(path), hub=None, split=None, name=None, revision=None), **base)


FIRST_TEN = ", ".join(map(str, BROKEN_AT[:10]))


def test_every_broken_line_is_counted_and_ten_are_listed(tmp_path: Path) -> None:
    path = broken_file(tmp_path)
    data = read_source(data_cfg(path).train, data_cfg(path))
    assert [n for n, _ in data.validation.problems["invalid JSON"]] == BROKEN_AT
    assert len(data.validation.valid) == 16
    # on_invalid: error stops before any tokenising (no tokenizer is even needed), listing all of them.
    with pytest.raises(DataError) as info:
        prepare_datasets(data_cfg(path), tokenizer=None, max_length=64, seed=0)
    assert "14 invalid lines" in info.value.message
    assert f"invalid JSON: 14 (lines {FIRST_TEN}, …; e.g. line 3: not valid JSON (Unterminated string" in info.value.message


def test_skip_counts_broken_lines_in_the_report(tmp_path: Path, phi3_tokenizer) -> None:
    prepared = prepare_datasets(data_cfg(broken_file(tmp_path), on_invalid="skip"), phi3_tokenizer, 64, 0)
    report = prepared.report
    assert report.train.invalid == {"invalid JSON": 14} and report.train.rows_used == 16
    assert report.to_dict()["train"]["invalid_first_rows"] == {"invalid JSON": BROKEN_AT[:10]}
    assert f"  skipped 14 invalid (invalid JSON): lines {FIRST_TEN}, …" in report.summary_lines()


@needs_hf_home
def test_data_check_lists_them_and_exits_2_under_error(tmp_path: Path) -> None:
    path = broken_file(tmp_path)
    result = cli(["data", "check", str(path)])
    assert result.exit_code == 2, result.output
    assert "invalid JSON │ 14   │ " + FIRST_TEN + ", …" in result.output
    assert "training would stop (on_invalid: error)" in result.output
    result = cli(["data", "check", str(path), "--set", "data.on_invalid=skip"])
    assert result.exit_code == 0, result.output
    assert "14 invalid rows: they will be skipped" in result.output


@needs_hf_home
def test_train_stops_before_loading_the_model(tmp_path: Path, monkeypatch) -> None:
    from phi3tune.model import loading

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded despite broken lines under on_invalid: error")

    monkeypatch.setattr(loading, "load_model", no_model)
    result = cli(["train", "configs/tiny.yaml", "--output-dir", str(tmp_path / "run"),
                  "--set", f"data.train.path={json.dumps(str(broken_file(tmp_path)))}"])
    assert result.exit_code == 2, result.output
    assert "invalid JSON: 14 (lines " + FIRST_TEN in result.output


def test_a_file_of_only_broken_lines_is_not_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "pretty.jsonl"
    path.write_text(json.dumps([GOOD], indent=2))
    with pytest.raises(DataError, match=r"pretty\.jsonl: none of its 14 lines is valid JSON \(line 1: not valid JSON"):
        load_local(path)


def test_json_file_with_one_conversation_object_is_one_row(tmp_path: Path) -> None:
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    (tmp_path / "one.json").write_text(json.dumps(sharegpt, indent=2))
    data = read_source(data_cfg(tmp_path / "one.json").train, data_cfg(tmp_path / "one.json"))
    assert data.format == "sharegpt" and data.validation.valid == [0] and data.loaded.numbers == [1]
    # JSON Lines saved as .json still reads line by line, with its broken lines listed too.
    (tmp_path / "lines.json").write_text(json.dumps(GOOD) + "\n{oops\n" + json.dumps(GOOD) + "\n")
    data = read_source(data_cfg(tmp_path / "lines.json").train, data_cfg(tmp_path / "lines.json"))
    assert data.validation.problems["invalid JSON"][0][0] == 2 and data.validation.valid == [0, 2]
