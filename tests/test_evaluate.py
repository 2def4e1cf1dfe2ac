"""`phi3tune eval` on the shared tiny trained run: assistant-only metrics, base comparison, generations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import needs_hf_home
from helpers import cli

pytestmark = [needs_hf_home, pytest.mark.slow]


def _eval(*args: str):
    return cli(["eval", *map(str, args)])


@pytest.fixture(scope="module")
def compared(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One `eval --compare-base` run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("eval") / "eval_metrics.json"
    result = _eval(trained_run, "--compare-base", "--max-samples", "8", "--output", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_compare_base_shows_the_adapter_beats_the_base(compared: tuple[Path, str]) -> None:
    out, output = compared
    metrics = json.loads(out.read_text())
    adapter, base, diff = metrics["adapter"], metrics["base"], metrics["difference"]
    assert adapter["eval_loss"] < base["eval_loss"] - 0.5, (adapter, base)
    assert diff["eval_loss"] == pytest.approx(adapter["eval_loss"] - base["eval_loss"])
    assert adapter["n_samples"] == base["n_samples"] == 8
    assert adapter["n_tokens"] == base["n_tokens"] > 0
    # The top level keeps the training-time flat schema (the adapter's numbers).
    for key in ("eval_loss", "perplexity", "token_accuracy", "n_samples", "n_tokens"):
        assert metrics[key] == adapter[key]
    assert "base" in output and "difference" in output


def test_generations_hold_prompt_reference_and_answers(compared: tuple[Path, str]) -> None:
    out, _ = compared
    rows = [json.loads(line) for line in (out.parent / "eval_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        assert row["prompt"].rstrip().endswith("<|assistant|>"), row["prompt"]
        assert "Reverse these words" in row["prompt"]
        assert row["reference"] and "<|end|>" not in row["reference"]
        assert {"answer", "base_answer"} <= set(row)


def test_eval_loss_matches_the_trainers_masking(trained_run: Path, tmp_path: Path) -> None:
    """Same labels as training: on the run's eval split our loss equals the trainer's eval_loss.

    Every sample of the bundled eval set trains the same number of tokens, so the trainer's mean of
    batch means and our token-weighted mean coincide.
    """
    trainer_metrics = json.loads((trained_run / "eval_metrics.json").read_text())
    training_time = trainer_metrics.get("training_eval", trainer_metrics)
    out = tmp_path / "m.json"
    assert _eval(trained_run, "--output", out).exit_code == 0
    ours = json.loads(out.read_text())
    assert ours["n_samples"] == training_time["n_samples"]
    assert ours["n_tokens"] == training_time["n_tokens"]
    assert ours["eval_loss"] == pytest.approx(training_time["eval_loss"], rel=1e-4)


def test_default_output_keeps_the_training_time_metrics(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    before = json.loads((run / "eval_metrics.json").read_text())
    assert _eval(run, "--max-samples", "4").exit_code == 0
    after = json.loads((run / "eval_metrics.json").read_text())
    assert after["training_eval"] == before
    assert after["n_samples"] == 4
    # A second eval does not nest: the training-time section is carried over as it was.
    assert _eval(run, "--max-samples", "2").exit_code == 0
    assert json.loads((run / "eval_metrics.json").read_text())["training_eval"] == before
    assert (run / "eval_generations.jsonl").is_file()


def test_data_file_in_another_format(trained_run: Path, tmp_path: Path) -> None:
    data = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": "Reverse these words: cat dog sun", "input": "", "output": "sun dog cat"},
            {"instruction": "Reverse these words: red blue green", "input": "", "output": "green blue red"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "alpaca_metrics.json"
    result = _eval(trained_run / "adapter", "--data", data, "--output", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["n_samples"] == 2 and "alpaca" in metrics["data"]
    assert (tmp_path / "alpaca_metrics.generations.jsonl").is_file()


def test_usage_errors_exit_2(trained_run: Path, tmp_path: Path) -> None:
    assert _eval(tmp_path / "missing").exit_code == 2
    assert _eval(trained_run, "--data", tmp_path / "missing.jsonl", "--output", tmp_path / "x.json").exit_code == 2
    # A full model has no adapter to disable.
    result = _eval(trained_run / "base_model", "--compare-base", "--output", tmp_path / "y.json")
    assert result.exit_code == 2 and "adapter" in result.output
