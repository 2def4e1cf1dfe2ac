"""The output-directory policy (README, "A run's output directory") through the CLI: nothing a user has is clobbered.

All cases fail (or pass the check) before any weights load, so they run the Typer app in-process.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, needs_hf_home
from helpers import SAMPLE, cli

pytestmark = needs_hf_home


def _train(*args: str):
    return cli(["train", str(TINY_CONFIG), "--set", "training_config.max_steps=1", *args])


def _refused(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    text = " ".join(result.stderr.split())
    assert "Traceback" not in result.output and text.count("error:") == 1, text
    for word in words:
        assert word in text, (word, text)
    return text


def test_current_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _refused(_train("--output-dir", "."), "the current directory")


def test_home_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    _refused(_train("--output-dir", "~"), "your home directory")


def test_the_config_files_own_directory_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    shutil.copy(TINY_CONFIG, config)
    _refused(cli(["train", str(config), "--output-dir", str(tmp_path)]), "the config file's own directory")


def test_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    _refused(_train("--output-dir", str(target)), "is a file")
    assert target.read_text() == "mine"


def test_non_empty_directory_needs_resume_or_overwrite(tmp_path: Path) -> None:
    (tmp_path / ".phi3tune-run").write_text("{}")  # a phi3tune run (a folder of other files is never resumed)
    (tmp_path / "keep.txt").write_text("mine")
    _refused(_train("--output-dir", str(tmp_path)), "not empty", "--resume", "--overwrite")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_resume_needs_a_run_and_contradicts_overwrite(tmp_path: Path) -> None:
    _refused(_train("--output-dir", str(tmp_path / "nothing"), "--resume"), "no run to resume")
    _refused(_train("--output-dir", str(tmp_path), "--resume", "--overwrite"), "contradict")


def test_overwrite_of_a_run_that_then_fails_validation_leaves_the_directory_alone(tmp_path: Path) -> None:
    """--overwrite empties the directory only after data and model have loaded, never for a failing run."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".phi3tune-run").write_text("{}")
    (tmp_path / "run" / "keep.txt").write_text("previous results")
    result = _train("--output-dir", str(tmp_path / "run"), "--overwrite",
                    "--set", f"data.train.path={tmp_path / 'missing.jsonl'}")  # fmt: skip
    _refused(result, "missing.jsonl")
    assert (tmp_path / "run" / "keep.txt").read_text() == "previous results"


def test_a_failing_run_does_not_create_its_output_dir(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(SAMPLE.read_text().splitlines()[0] + "\nnot json\n")
    _refused(_train("--output-dir", str(tmp_path / "new"), "--set", f"data.train.path={bad}"), "line 2")
    assert not (tmp_path / "new").exists()
