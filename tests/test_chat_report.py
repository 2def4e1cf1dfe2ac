"""`phi3tune chat` (one-shot and interactive, through the CLI) and `phi3tune report`."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from conftest import needs_hf_home
from helpers import cli
from phi3tune.training.metrics import read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _direct_reply(trained_run: Path, prompt: str, max_new_tokens: int) -> str:
    from phi3tune.chat import generate_reply
    from phi3tune.model.targets import load_for_inference, resolve_target

    model, tokenizer = load_for_inference(resolve_target(trained_run), device="cpu")
    return generate_reply(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens)


@needs_hf_home
@pytest.mark.slow
def test_chat_prompt_answers_through_the_cli(trained_run: Path) -> None:
    prompt = "Reverse these words: star house bear"
    result = cli(["chat", str(trained_run), "--prompt", prompt, "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    expected = _direct_reply(trained_run, prompt, 12)
    assert result.stdout.strip() == expected
    # A full model folder (the run's random base) streams text too: the answer is never empty.
    result = cli(["chat", str(trained_run / "base_model"), "--prompt", "hi", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


@needs_hf_home
@pytest.mark.slow
def test_interactive_chat_is_multi_turn_and_resets(trained_run: Path) -> None:
    from rich.console import Console

    from phi3tune.chat import chat_loop
    from phi3tune.model.targets import load_for_inference, resolve_target

    model, tokenizer = load_for_inference(resolve_target(trained_run / "base_model"), device="cpu")
    seen: list[int] = []
    real_generate = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return real_generate(*args, **kwargs)

    model.generate = spy
    lines = iter(["Reverse these words: a b c", "and again", "/reset", "Reverse these words: a b c", "/exit"])
    out = io.StringIO()
    turns = chat_loop(model, tokenizer, system="Be brief.", max_new_tokens=3, console=Console(file=io.StringIO()),
                      read_line=lambda: next(lines), out=out)
    assert turns == 3
    # The second prompt carries the first exchange; after /reset the prompt is as short as the first.
    assert seen[1] > seen[0] and seen[2] == seen[0]
    assert out.getvalue().strip()


@needs_hf_home
@pytest.mark.slow
def test_report_for_a_finished_run(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", "base_model"))
    (run / "train_report.png").unlink(missing_ok=True)
    result = cli(["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "train_report.png").read_bytes().startswith(PNG_MAGIC)
    assert "finished" in result.output and "train loss" in result.output


@needs_hf_home
@pytest.mark.slow
def test_train_writes_its_report(trained_run: Path) -> None:
    assert (trained_run / "train_report.png").read_bytes().startswith(PNG_MAGIC)


def test_report_for_an_interrupted_run_with_a_truncated_metrics_file(tmp_path: Path) -> None:
    rows = [
        {"step": 5, "epoch": 0.1, "loss": 9.7, "learning_rate": 0.003, "tokens": 700},
        {"step": 10, "epoch": 0.2, "loss": None, "learning_rate": 0.0025, "nonfinite": ["loss"]},
        {"step": 10, "epoch": 0.2, "eval_loss": 8.1},
        {"step": 15, "epoch": 0.3, "loss": 7.5, "learning_rate": 0.002, "tokens": 2100, "tokens_per_second": 40.0},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 20, "epoch": 0.4, "lo'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert metrics.loss == [(5, 9.7), (15, 7.5)]
    assert metrics.eval_loss == [(10, 8.1)] and metrics.nonfinite_steps == [10] and metrics.skipped_lines == 1

    result = cli(["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "train_report.png").read_bytes().startswith(PNG_MAGIC)
    assert "not finished" in result.output and "skipped 1" in result.output


def test_report_for_a_run_that_logged_nothing_yet(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    assert cli(["report", str(tmp_path)]).exit_code == 0
    assert (tmp_path / "train_report.png").is_file()
    assert cli(["report", str(tmp_path / "nope")]).exit_code == 2


def test_write_report_never_fails_a_finished_training(tmp_path: Path, monkeypatch, caplog) -> None:
    """Training calls write_report last: a plotting error must be a warning, not a failed run."""
    from phi3tune import report

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report, "plot_report", broken)
    assert report.write_report(tmp_path) == tmp_path / "train_report.png"
    assert "disk full" in caplog.text
