"""Issue 9, group C: what eval, merge-adapter, chat and report read and write.

Most tests build a fake run on disk (JSON configs and header-valid safetensors files, no training): the
checks under test run before any weights are loaded. The few that need real weights use the shared
tiny ``trained_run``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from robust_runs import cli
from phi3tune.errors import UsageError
from phi3tune.run_dir import resolve_target


def _fake_run(root: Path) -> Path:
    """A run folder with run_config.yaml, base_model/ and adapter/ whose files are well-formed but tiny."""
    run = root / "run"
    base = run / "base_model"
    adapter = run / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    (run / "run_config.yaml").write_text("data:\n  train: train.jsonl\n  eval: eval.jsonl\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (base / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    save_file({"w": torch.zeros(2)}, str(base / "model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base.resolve())}))
    save_file({"lora": torch.zeros(2)}, str(adapter / "adapter_model.safetensors"))
    return run


@pytest.fixture
def fake_run(tmp_path: Path) -> Path:
    return _fake_run(tmp_path)


def _usage_error(target, **kwargs) -> UsageError:
    with pytest.raises(UsageError) as caught:
        resolve_target(target, **kwargs)
    return caught.value


# --- item 10: a mistyped local path is never a hub id -------------------------------------------------------


def test_fake_run_resolves(fake_run: Path) -> None:
    target = resolve_target(fake_run)
    assert target.kind == "adapter" and target.run_dir == fake_run


def test_mistyped_path_under_an_existing_folder_is_no_such_folder(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for allow_hub in (True, False):
        error = _usage_error("runs/s11", allow_hub=allow_hub)
        assert "no such folder" in error.message and "hub" not in error.message
    # Path-shaped targets are local even when their parent is missing too.
    for text in ("./runs/s11", "../x/y", "~/nowhere/s11", "/nowhere/at/all", "a/b/c"):
        assert "no such folder" in _usage_error(text).message


def test_hub_id_is_taken_only_where_nothing_local_matches(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_target("microsoft/Phi-3-mini-4k-instruct").kind == "model"
    # eval (allow_hub=False) never takes one.
    assert "no such folder" in _usage_error("microsoft/Phi-3-mini-4k-instruct", allow_hub=False).message


def test_cli_eval_and_chat_of_a_mistyped_path_exit_2(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for args in (["eval", "runs/s11"], ["chat", "runs/s11", "--prompt", "hi"], ["eval", "someone/else"]):
        result = cli(args)
        assert result.exit_code == 2, (args, result.output)
        assert "no such folder" in result.output and "hub id" not in result.output.split("hint")[0]


# --- item 11 and the weightless adapter: incomplete artefacts are refused up front -------------------------


def test_merge_incomplete_folder_is_refused(tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    save_file({"w": torch.zeros(2)}, str(merged / "model.safetensors"))
    (merged / "MERGE_INCOMPLETE").write_text("x")
    error = _usage_error(merged)
    assert str(merged) in error.message and "MERGE_INCOMPLETE" in error.message
    assert "merge-adapter" in error.hint and "new folder" in error.hint
    # An interrupted merge leaves only the marker: still named as an incomplete merge, not a hub problem.
    for name in ("config.json", "model.safetensors"):
        (merged / name).unlink()
    assert "incomplete merged model" in _usage_error(merged).message


def test_cli_chat_and_eval_refuse_an_incomplete_merge(tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "MERGE_INCOMPLETE").write_text("x")
    for args in (["chat", str(merged), "--prompt", "hi"], ["eval", str(merged), "--output", str(tmp_path / "m.json")]):
        result = cli(args)
        assert result.exit_code == 2 and "MERGE_INCOMPLETE" in result.output, result.output


def test_cut_off_base_model_is_named(fake_run: Path) -> None:
    (fake_run / "base_model" / "config.json").write_text("")  # a kill while config.json was written
    error = _usage_error(fake_run)
    assert "base_model" in error.message and "config.json" in error.message and "incomplete" in error.message
    (fake_run / "base_model" / "config.json").write_text("{}")
    shard = fake_run / "base_model" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:20])  # a full disk cut the weights short
    assert "model.safetensors" in _usage_error(fake_run).message


def test_base_model_still_in_staging_is_named(fake_run: Path) -> None:
    (fake_run / "base_model").rename(fake_run / ".tmp-base_model")
    error = _usage_error(fake_run)
    assert "still being written" in error.message and "--resume" in error.hint


def test_adapter_without_weights_is_refused_up_front(fake_run: Path) -> None:
    (fake_run / "adapter" / "adapter_model.safetensors").unlink()
    error = _usage_error(fake_run / "adapter")
    assert "adapter_model.safetensors" in error.message and "no weights" in error.message


def test_merge_of_an_adapter_without_weights_leaves_no_output(fake_run: Path, tmp_path: Path) -> None:
    (fake_run / "adapter" / "adapter_model.safetensors").unlink()
    out = tmp_path / "merged"
    result = cli(["merge-adapter", str(fake_run), str(out)])
    assert result.exit_code == 2 and "no weights" in result.output, result.output
    assert not out.exists()


def test_run_with_adapter_still_in_staging(fake_run: Path) -> None:
    (fake_run / "adapter").rename(fake_run / ".tmp-adapter")
    error = _usage_error(fake_run)
    assert "still being saved" in error.message and "--resume" in error.hint
    assert "staging" in _usage_error(fake_run / ".tmp-adapter").message


def test_pickled_adapter_still_refused(fake_run: Path, monkeypatch) -> None:
    adapter = fake_run / "adapter"
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    assert "pickle" in _usage_error(fake_run).message
    monkeypatch.setenv("PHI3TUNE_ALLOW_PICKLE", "1")
    assert resolve_target(fake_run).kind == "adapter"


def test_hints_quote_paths_with_spaces(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "my runs")
    shutil.rmtree(run / "adapter")
    error = _usage_error(run)
    assert f"--output-dir '{run}' --resume" in error.hint
