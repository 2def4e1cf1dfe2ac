"""Issue 13: answer scores (answer_match, exact_match, rougeL, chrF, stopped_rate) and the eval options' checks.

Pure functions, no model: hand-made predictions with the answers worked out by hand.
"""

from __future__ import annotations

import sys

import pytest

from helpers import cli
from phi3tune.errors import UsageError
from phi3tune.evaluation.answers import most_different
from phi3tune.evaluation.metrics import (answer_match, compile_answer_pattern, parse_number, sample_scores,
                                         summarise)
from phi3tune.evaluation.options import check_options, parse_batch_size

GSM8K = compile_answer_pattern(r"####\s*(-?[\d,\.]+)")


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("so 1234 in total.\n#### 1,234", "#### 1234", 1.0),  # thousands separator
        ("#### 1,234.50", "#### 1234.5", 1.0),  # numerically equal, written differently
        ("#### 72 clips, as asked.", "Natalia sold 72 clips.\n#### 72", 1.0),  # trailing text after the answer
        ("#### 72.", "#### 72", 1.0),  # a full stop ending the sentence is not a decimal point
        ("#### -5", "#### -5", 1.0),
        ("#### 5", "#### -5", 0.0),
        ("#### 71", "#### 72", 0.0),
        ("The answer is 72.", "#### 72", 0.0),  # no match in the answer: wrong, not unscorable
        ("#### 10 ... wait, recount\n#### 12", "#### 12", 1.0),  # the last match is the final answer
        ("#### 12", "no pattern in this reference", None),  # the reference has no answer: not scorable
        ("", "#### 3", 0.0),
    ],
)
def test_answer_match_on_hand_made_predictions(answer: str, reference: str, expected: float | None) -> None:
    assert answer_match(answer, reference, GSM8K) == expected


def test_answer_match_text_answers_and_patterns_without_a_group() -> None:
    letter = compile_answer_pattern(r"answer is \(?([A-D])\)?")
    assert answer_match("I think the answer is (b)", "the answer is B", letter) == 0.0  # "b" is not [A-D]: no match
    assert answer_match("the answer is B.", "the answer is B", letter) == 1.0
    whole = compile_answer_pattern(r"\d+")  # no group: the whole (last) match
    assert answer_match("3 apples and 4 pears", "4", whole) == 1.0


def test_parse_number() -> None:
    assert parse_number("1,234") == parse_number("1234.0") == 1234
    assert parse_number("$5") == 5 and parse_number("-0.5") == parse_number("-.5")
    assert parse_number("12 apples") is None and parse_number("") is None and parse_number("1.2.3") is None


def test_text_scores() -> None:
    same = sample_scores("Bear  House star", "bear house star", None)
    assert same == {"exact_match": 1.0, "rougeL": 1.0, "chrf": 1.0}
    apart = sample_scores("zzz", "bear house star", GSM8K)
    assert apart["exact_match"] == 0.0 and apart["rougeL"] == 0.0 and apart["chrf"] < 0.1
    assert apart["answer_match"] is None
    partial = sample_scores("bear house", "bear house star", None)
    assert partial["rougeL"] == pytest.approx(0.8)  # P 2/2, R 2/3
    assert 0.3 < partial["chrf"] < 1.0
    assert sample_scores("", "", None)["chrf"] == 1.0  # sacrebleu says 0 for two empty strings


def test_summary_counts_stopped_answers_and_scorable_samples() -> None:
    scores = [{"exact_match": 1.0, "answer_match": 1.0}, {"exact_match": 0.0, "answer_match": 0.0},
              {"exact_match": 0.0, "answer_match": None}, {"exact_match": 1.0, "answer_match": 1.0}]
    summary = summarise(scores, stopped=[True, False, True, True], new_tokens=[3, 256, 5, 8])
    assert summary["stopped_rate"] == 0.75
    assert summary["mean_new_tokens"] == pytest.approx(68.0)
    assert summary["exact_match"] == 0.5
    assert summary["answer_match"] == pytest.approx(2 / 3) and summary["answer_match_samples"] == 3
    assert summary["n_samples"] == 4
    assert summarise([{"exact_match": 0.0}], [False], [9])["stopped_rate"] == 0.0
    assert "answer_match" not in summarise([{"exact_match": 0.0}], [False], [9])


def test_most_different_ranks_by_the_score_gap() -> None:
    def row(i: int, mine: float, theirs: float) -> dict:
        return {"index": i, "answer": f"a{i}", "base_answer": f"b{i}", "scores": {"chrf": mine},
                "base_scores": {"chrf": theirs}}

    rows = [row(0, 0.5, 0.5), row(1, 0.9, 0.1), row(2, 0.1, 0.6), row(3, 0.4, 0.3)]
    assert [r["index"] for r in most_different(rows)] == [1, 2, 3]
    assert most_different([{**rows[1], "base_answer": "a1"}]) == []  # same answer: nothing to show
    assert most_different([{"index": 0, "answer": "a", "scores": {"chrf": 1.0}}]) == []  # no base


def test_option_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="needs --generate"):
        check_options(answer_pattern="x")
    with pytest.raises(UsageError, match="needs --tasks"):
        check_options(limit=5)
    with pytest.raises(UsageError, match="not a valid regular expression"):
        check_options(generate=True, answer_pattern="####(")
    with pytest.raises(UsageError, match="--batch-size"):
        parse_batch_size("lots")
    with pytest.raises(UsageError, match="--batch-size"):
        parse_batch_size("0")
    assert parse_batch_size("auto") is None and parse_batch_size("12") == 12
    options = check_options(generate=True, max_new_tokens=64, answer_pattern=r"#### (\d+)", batch_size="8")
    assert (options.max_new_tokens, options.batch_size, options.answer_pattern.groups) == (64, 8, 1)


def test_cli_option_errors_exit_2_before_loading(tmp_path) -> None:
    result = cli(["eval", str(tmp_path / "nowhere"), "--answer-pattern", "####("])
    assert result.exit_code == 2 and "--generate" in result.output, result.output
    result = cli(["eval", str(tmp_path / "nowhere"), "--generate", "--answer-pattern", "####("])
    assert result.exit_code == 2 and "not a valid regular expression" in result.output, result.output


def test_tasks_without_lm_eval_name_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    result = cli(["eval", str(tmp_path / "nowhere"), "--tasks", "gsm8k"])
    assert result.exit_code == 2, result.output
    assert "pip install 'phi3tune[harness]'" in " ".join(result.output.split())
