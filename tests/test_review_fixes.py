"""Defects a review of the merged features found: outputs under a file, dry runs of missing data, options that
only mean something with another one."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_CONFIG, needs_hf_home
from helpers import cli
from phi3tune.errors import UsageError
from phi3tune.evaluation.outputs import check_output
from phi3tune.training.run_lock import folder_lock


def test_eval_output_under_a_file_is_refused_before_anything_loads(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_output(notes / "metrics.json")
    assert notes.read_text() == "mine"


def test_a_folder_under_a_file_cannot_be_locked_and_says_why(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(UsageError, match="notes.txt is a file, not a folder"):
        with folder_lock(notes / "sub" / "run", "merge"):
            pass


@needs_hf_home
def test_train_output_under_a_file_is_exit_2_naming_it(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    result = cli(["train", str(TINY_CONFIG), "--output-dir", str(notes / "run")])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output


@needs_hf_home
def test_dry_run_names_a_missing_data_file(tmp_path: Path) -> None:
    result = cli(["train", str(TINY_CONFIG), "--dry-run", "--set", f"data.train={tmp_path / 'nope.jsonl'}"])
    assert result.exit_code == 2 and "data.train" in result.output and "no such file" in result.output


def test_gpu_memory_without_dry_run_is_exit_2(tmp_path: Path) -> None:
    result = cli(["train", str(TINY_CONFIG), "--gpu-memory", "8", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--dry-run" in result.output
    assert not (tmp_path / "run").exists()
