"""Bad configs, overrides and data through the `phi3tune` CLI: exit 2, one message, no traceback.

Issue 4, items 1, 2 (malformed JSONL) and 9 (`phi3tune data check`). The config engineer's unit tests
(test_config.py) cover the messages in depth. Here each case is one CLI invocation: a real process for a
representative few (started at once; each costs ~5 s of imports), the Typer app in-process for the rest.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, needs_hf_home, run_cli
from helpers import SAMPLE, cli

pytestmark = [needs_hf_home, pytest.mark.slow]

GOOD_DATA = f"data:\n  train: {SAMPLE}\n"


def _case_files(root: Path) -> dict[str, list[str]]:
    """name -> CLI arguments; each case writes the files it needs under ``root``."""
    def config(name: str, text: str) -> str:
        path = root / f"{name}.yaml"
        path.write_text(text)
        return str(path)

    broken = root / "broken.jsonl"
    broken.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n"
        + json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n"
    )  # fmt: skip
    malformed = root / "malformed.jsonl"
    malformed.write_text(SAMPLE.read_text().splitlines()[0] + "\n" + '{"messages": [{"role": "user",\n')
    out = ["--output-dir", str(root / "never")]
    return {
        "unknown_key": ["train", config("unknown", GOOD_DATA + "training_config:\n  learing_rate: 1.0e-4\n"), *out],
        "wrong_type": ["train", config("wrong", GOOD_DATA + "training_config:\n  per_device_train_batch_size: eight\n"),
                       *out],
        "empty_yaml": ["train", config("empty", ""), *out],
        "yaml_list": ["train", config("list", "- model\n- data\n"), *out],
        "missing_section": ["train", config("nodata", "training_config:\n  max_steps: 5\n"), *out],
        "bad_set_path": ["train", str(TINY_CONFIG), "--set", "trainig_config.max_steps=5", *out],
        "malformed_jsonl": ["train", str(TINY_CONFIG), "--set", f"data.train.path={malformed}", *out],
        "check_sample": ["data", "check", str(SAMPLE)],
        "check_broken": ["data", "check", str(broken)],
        "check_tiny_config": ["data", "check", str(TINY_CONFIG)],
    }


IN_PROCESS = {"wrong_type", "empty_yaml", "yaml_list", "missing_section", "bad_set_path", "check_tiny_config"}


def _in_process(args: list[str]) -> subprocess.CompletedProcess:
    """The same invocation through the Typer app in this process, shaped like a finished subprocess."""
    result = cli(args)
    return subprocess.CompletedProcess(args, result.exit_code, stdout=result.stdout, stderr=result.stderr)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Every case's result: real processes run concurrently while the in-process cases run here."""
    cases = _case_files(tmp_path_factory.mktemp("cli"))
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_cli, *args, env={"COLUMNS": "400"})
                   for name, args in cases.items() if name not in IN_PROCESS}  # fmt: skip
        done = {name: _in_process(args) for name, args in cases.items() if name in IN_PROCESS}
        done.update({name: future.result() for name, future in futures.items()})
    return done


@pytest.mark.parametrize(
    ("case", "names"),
    [
        ("unknown_key", ["training_config.learing_rate", "learning_rate"]),
        ("wrong_type", ["training_config.per_device_train_batch_size"]),
        ("empty_yaml", ["empty", "data"]),
        ("yaml_list", ["expected a mapping", "list"]),
        ("missing_section", ["data"]),
        ("bad_set_path", ["trainig_config", "training_config"]),
        ("malformed_jsonl", ["malformed.jsonl", "line 2"]),
    ],
)
def test_bad_config_or_data_exits_2_with_one_message(
    results: dict[str, subprocess.CompletedProcess], case: str, names: list[str]
) -> None:
    result = results[case]
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("error:") == 1, result.stderr
    for name in names:
        assert name in result.stderr, (name, result.stderr)


def test_failed_validation_creates_no_output_dir(results: dict) -> None:
    roots = {Path(r.args[r.args.index("--output-dir") + 1]).parent for r in results.values() if "--output-dir" in r.args}
    assert roots and not any((root / "never").exists() for root in roots)


def test_data_check_passes_on_the_bundled_sample(results: dict) -> None:
    result = results["check_sample"]
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "format: messages" in text and "token lengths (max_length=1024)" in text
    assert "data check passed" in text and "trained" in text and "<|assistant|>" in text


def test_data_check_of_a_config_uses_its_data_and_max_length(results: dict) -> None:
    result = results["check_tiny_config"]
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "max_length=128" in text and "eval" in text and "sample_chat_eval.jsonl" in text


def test_data_check_reports_broken_rows_with_line_numbers_and_exits_2(results: dict) -> None:
    result = results["check_broken"]
    assert result.returncode == 2, result.stdout + result.stderr
    text = result.stdout + result.stderr
    assert "unknown role" in text and "no assistant turn" in text
    assert "2 invalid rows" in text and "data check failed" in text
    assert "Traceback" not in text
