"""Issue 13: `phi3tune eval --generate` and `--tasks` end to end on the shared tiny trained run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import needs_hf_home
from helpers import cli

pytestmark = [needs_hf_home, pytest.mark.slow]
GSM8K_PATTERN = r"####\s*(-?[\d,\.]+)"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_scores_every_sample_for_adapter_and_base(trained_run: Path, tmp_path: Path) -> None:
    data = tmp_path / "gsm8k_style.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Reverse these words: a{i} b{i} c{i}. Then count them."},
                          {"role": "assistant", "content": f"c{i} b{i} a{i}\n#### {1000 * (i + 1):,}"}]}
            for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gen.json"
    result = cli(["eval", str(trained_run / "adapter"), "--data", str(data), "--compare-base", "--generate",
                  "--max-new-tokens", "10", "--answer-pattern", GSM8K_PATTERN, "--batch-size", "4", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "generation: 6 samples" in result.output and "stopped_rate" in result.output
    metrics = json.loads(out.read_text())
    generation = metrics["generation"]
    assert metrics["n_samples"] == 6  # the loss metrics are still there, unchanged in place
    samples = _rows(tmp_path / "gen.generations.jsonl")
    assert len(samples) == 6
    for row in samples:
        assert row["prompt"].endswith("<|assistant|>") and "Then count them" in row["prompt"]
        assert row["reference"].endswith("#### " + f"{1000 * (row['index'] + 1):,}")
        assert {"answer", "base_answer", "scores", "base_scores", "stopped", "base_stopped"} <= set(row)
        assert row["new_tokens"] <= 10 and row["base_new_tokens"] <= 10
    for target, prefix in (("adapter", ""), ("base", "base_")):
        summary = generation[target]
        # Every number is the mean of the per-sample scores in eval_generations.jsonl.
        assert summary["stopped_rate"] == pytest.approx(sum(r[f"{prefix}stopped"] for r in samples) / 6)
        assert summary["mean_new_tokens"] == pytest.approx(sum(r[f"{prefix}new_tokens"] for r in samples) / 6)
        for key in ("exact_match", "rougeL", "chrf"):
            assert summary[key] == pytest.approx(sum(r[f"{prefix}scores"][key] for r in samples) / 6)
        assert summary["answer_match_samples"] == 6 and summary["batch_size"] == 4
        assert summary["tokens_per_second"] > 0
    assert generation["difference"]["chrf"] == pytest.approx(generation["adapter"]["chrf"] - generation["base"]["chrf"])
    assert generation["settings"]["adapter_merged"] is True
    assert generation["settings"]["answer_pattern"] == GSM8K_PATTERN


def test_without_generate_a_preview_of_five(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    result = cli(["eval", str(trained_run), "--max-samples", "7", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "generation" not in json.loads(out.read_text())
    assert len(_rows(tmp_path / "m.generations.jsonl")) == 5


LOCAL_TASK = """\
task: reverse_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "<|user|>\\nReverse these words: {{{{words}}}}<|end|>\\n<|assistant|>\\n"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: perplexity
  - metric: acc
"""


def test_tasks_with_a_local_task_give_adapter_and_base_scores(trained_run: Path, tmp_path: Path) -> None:
    """An lm-eval task of our own, its data a local file: runs offline, adapter vs base side by side."""
    words = ["star house bear", "king fire silver", "stone green bell", "winter lamp pen"]
    data = tmp_path / "reverse.jsonl"
    data.write_text("".join(json.dumps({"words": w, "answer": " ".join(reversed(w.split()))}) + "\n" for w in words))
    task = tmp_path / "tasks" / "reverse_ppl.yaml"
    task.parent.mkdir()
    task.write_text(LOCAL_TASK.format(data=data))
    out = tmp_path / "tasks.json"
    result = cli(["eval", str(trained_run), "--compare-base", "--max-samples", "2", "--tasks", str(task),
                  "--limit", "3", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "reverse_ppl" in result.output and "perplexity" in result.output
    tasks = json.loads(out.read_text())["tasks"]
    adapter, base = tasks["adapter"]["reverse_ppl"], tasks["base"]["reverse_ppl"]
    # The trained adapter knows the task; the base (adapter disabled) is a random model.
    assert adapter["perplexity,none"] < base["perplexity,none"] / 10, (adapter, base)
    assert tasks["difference"]["reverse_ppl"]["perplexity,none"] == pytest.approx(
        adapter["perplexity,none"] - base["perplexity,none"])
    assert tasks["settings"]["limit"] == 3 and tasks["settings"]["tasks"] == ["reverse_ppl"]


def test_tasks_errors_exit_2_before_loading(trained_run: Path, tmp_path: Path) -> None:
    result = cli(["eval", str(trained_run), "--tasks", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "a.json")])
    assert result.exit_code == 2 and "no such task file" in result.output, result.output
    bad = tmp_path / "nameless.yaml"
    bad.write_text("dataset_path: json\n")
    result = cli(["eval", str(trained_run), "--tasks", str(bad), "--output", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "no `task:` name" in result.output, result.output
    result = cli(["eval", str(trained_run), "--tasks", "no_such_task_zz", "--output", str(tmp_path / "c.json")])
    assert result.exit_code == 2 and "no task or group named 'no_such_task_zz'" in result.output, result.output
    assert not any((tmp_path / name).exists() for name in ("a.json", "b.json", "c.json"))
