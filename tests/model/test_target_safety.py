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

from helpers import cli
from phi3tune.errors import UsageError
from phi3tune.model.targets import resolve_target


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


# --- item 4: eval --output never overwrites what eval did not write; locks ----------------------------------


@pytest.mark.parametrize("victim", ["metrics.jsonl", "run_config.yaml", "cfg.yaml", "notes.json"])
def test_eval_output_refuses_files_it_did_not_write(fake_run: Path, tmp_path: Path, victim: str) -> None:
    target = fake_run / victim if victim in ("metrics.jsonl", "run_config.yaml") else tmp_path / victim
    if not target.exists():
        target.write_text('{"mine": 1}\n' if victim.endswith(".json") else "model: {}\n")
    before = target.read_bytes()
    result = cli(["eval", str(fake_run), "--output", str(target)])
    assert result.exit_code == 2, result.output
    assert "not written by phi3tune eval" in result.output and "hint" in result.output
    assert target.read_bytes() == before


def test_eval_output_folder_is_exit_2(fake_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "some folder"
    folder.mkdir()
    result = cli(["eval", str(fake_run), "--output", str(folder)])
    assert result.exit_code == 2 and "is a folder" in result.output, result.output
    assert f"'{folder / 'eval_metrics.json'}'" in result.output
    assert list(folder.iterdir()) == []


def test_eval_output_accepts_new_and_earlier_eval_files(fake_run: Path, tmp_path: Path) -> None:
    from phi3tune.evaluate import check_output

    assert check_output(tmp_path / "new.json") == tmp_path / "new.json"
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"written_by": "phi3tune eval", "eval_loss": 1.0}))
    (tmp_path / "earlier.generations.jsonl").write_text(json.dumps({"prompt": "p", "reference": "r", "answer": "a"}) + "\n")
    assert check_output(earlier) == earlier
    # The run's training-time eval_metrics.json (kept under training_eval by eval) is accepted too.
    (fake_run / "eval_metrics.json").write_text(json.dumps({"eval_loss": 1.0, "n_samples": 2}))
    assert check_output(fake_run / "eval_metrics.json")
    # ...but not a generations file that is someone else's.
    (tmp_path / "other.generations.jsonl").write_text("my notes\n")
    with pytest.raises(UsageError, match="other.generations.jsonl"):
        check_output(tmp_path / "other.json")


def test_eval_into_a_run_in_use_is_exit_2(fake_run: Path) -> None:
    from phi3tune.training.run_lock import folder_lock

    with folder_lock(fake_run, "train"):
        result = cli(["eval", str(fake_run)])
    assert result.exit_code == 2 and "in use by process" in result.output and "train" in result.output


def test_merge_into_an_output_in_use_is_exit_2(fake_run: Path, tmp_path: Path) -> None:
    from phi3tune.training.run_lock import folder_lock

    out = tmp_path / "merged"
    with folder_lock(out, "merge"):
        result = cli(["merge-adapter", str(fake_run), str(out)])
    assert result.exit_code == 2 and "in use by process" in result.output, result.output
    assert not out.exists()


# --- eval --set ----------------------------------------------------------------------------------------------


def test_eval_set_is_checked_before_loading(fake_run: Path) -> None:
    result = cli(["eval", str(fake_run), "--set", "training_config.learning_rate=1", "--set", "data.on_invalid=maybe",
                  "--set", "nonsense"])
    assert result.exit_code == 2, result.output
    assert "training_config.learning_rate" in result.output and "data.on_invalid" in result.output
    assert "KEY=VALUE" in result.output


def test_eval_set_applies_to_the_runs_data_policies(fake_run: Path) -> None:
    from phi3tune.data.evaluation import _data_policies, apply_eval_overrides
    from phi3tune.model.targets import read_run_config

    run_config = read_run_config(fake_run)
    changed = apply_eval_overrides(run_config, ["data.on_invalid=skip", "training_config.max_length=64"])
    assert changed["data"]["on_invalid"] == "skip" and changed["training_config"]["max_length"] == 64
    assert run_config["data"].get("on_invalid") is None  # a copy: the recorded config is untouched
    assert _data_policies(changed).on_invalid == "skip"
    assert _data_policies(apply_eval_overrides({}, ["data.format=alpaca"])).format == "alpaca"


# --- merge-adapter: staged and renamed, files follow the umask --------------------------------------------


def test_interrupted_merge_leaves_no_output(fake_run: Path, tmp_path: Path, monkeypatch) -> None:
    from phi3tune import merge

    def killed_midway(target, staging, out, **kwargs):
        (staging / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "_merge_into", killed_midway)
    out = tmp_path / "merged"
    result = cli(["merge-adapter", str(fake_run), str(out)])
    assert result.exit_code == 130
    assert not out.exists() and not merge.staging_dir(out).exists()


def test_merge_replaces_a_staging_folder_left_by_a_killed_merge(fake_run: Path, tmp_path: Path, monkeypatch) -> None:
    from phi3tune import merge

    out = tmp_path / "merged"
    stale = merge.staging_dir(out)
    stale.mkdir()
    (stale / "MERGE_INCOMPLETE").write_text("x")
    (stale / "model.safetensors").write_bytes(b"half")

    def finished(target, staging, out, **kwargs):
        assert not (staging / "model.safetensors").exists()
        (staging / "config.json").write_text("{}")
        (staging / "MERGE_INCOMPLETE").unlink()
        return 0.0

    monkeypatch.setattr(merge, "_merge_into", finished)
    result = cli(["merge-adapter", str(fake_run), str(out)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["config.json"] and not stale.exists()
    # A folder of that name that phi3tune did not make is left alone.
    other = tmp_path / "other"
    merge.staging_dir(other).mkdir()
    (merge.staging_dir(other) / "mine.txt").write_text("mine")
    result = cli(["merge-adapter", str(fake_run), str(other)])
    assert result.exit_code == 2 and "left alone" in result.output
    assert (merge.staging_dir(other) / "mine.txt").read_text() == "mine"


@pytest.mark.slow
def test_merged_files_follow_the_umask(trained_run: Path, tmp_path: Path) -> None:
    from phi3tune import merge

    out = tmp_path / "merged"
    previous = os.umask(0o022)
    try:
        result = cli(["merge-adapter", str(trained_run), str(out), "--no-verify"])
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert "MERGE_INCOMPLETE" not in modes and not merge.staging_dir(out).exists()
    assert resolve_target(out).kind == "model"


# --- chat: empty prompts and prompts past the context -------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_chat_refuses_an_empty_prompt(fake_run: Path, prompt: str) -> None:
    result = cli(["chat", str(fake_run), "--prompt", prompt])
    assert result.exit_code == 2 and "--prompt is empty" in result.output, result.output


@pytest.fixture(scope="module")
def short_context_model():
    """A tiny random Phi-3 with a 64-token context (enough to test the check, no weights to load)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=32000)
    return Phi3ForCausalLM(config).eval()


def test_chat_refuses_a_prompt_past_the_context(short_context_model, phi3_tokenizer) -> None:
    from phi3tune.chat import generate_reply

    long = [{"role": "user", "content": "word " * 100}]
    with pytest.raises(UsageError) as caught:
        generate_reply(short_context_model, phi3_tokenizer, long, max_new_tokens=8)
    assert "context length of 64 tokens" in caught.value.message and "the prompt is 1" in caught.value.message
    # A short prompt fits, unless max_new_tokens leaves no room for it.
    short = [{"role": "user", "content": "hi"}]
    assert isinstance(generate_reply(short_context_model, phi3_tokenizer, short, max_new_tokens=4), str)
    with pytest.raises(UsageError, match="lower --max-new-tokens to at most"):
        generate_reply(short_context_model, phi3_tokenizer, short, max_new_tokens=63)


def test_interactive_chat_keeps_going_after_a_too_long_message(short_context_model, phi3_tokenizer) -> None:
    import io

    from rich.console import Console

    from phi3tune.chat import chat_loop

    lines = iter(["word " * 100, "hi", "/exit"])
    console_out = io.StringIO()
    turns = chat_loop(short_context_model, phi3_tokenizer, system=None, max_new_tokens=4,
                      console=Console(file=console_out, width=400), read_line=lambda: next(lines), out=io.StringIO())
    assert turns == 1 and "context length of 64" in console_out.getvalue()


# --- printed commands quote paths ---------------------------------------------------------------------------


def test_report_retry_hint_quotes_the_run_path(tmp_path: Path, monkeypatch, caplog) -> None:
    from phi3tune import report

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report, "plot_report", broken)
    run = tmp_path / "my run"
    run.mkdir()
    report.write_report(run)
    assert f"phi3tune report '{run}'" in caplog.text


# --- eval --set end to end: the hint eval gives can be followed -----------------------------------------------


@pytest.mark.slow
def test_eval_invalid_rows_hint_and_set_on_invalid(trained_run: Path, tmp_path: Path) -> None:
    data = tmp_path / "mixed.jsonl"
    good = {"messages": [{"role": "user", "content": "Reverse these words: a b"}, {"role": "assistant", "content": "b a"}]}
    bad = {"messages": [{"role": "user", "content": "no answer"}]}
    data.write_text("".join(json.dumps(r) + "\n" for r in (good, bad, good)))
    out = tmp_path / "m.json"
    result = cli(["eval", str(trained_run), "--data", str(data), "--output", str(out)])
    assert result.exit_code == 2 and "--set data.on_invalid=skip" in result.output, result.output
    assert not out.exists()
    result = cli(["eval", str(trained_run), "--data", str(data), "--output", str(out), "--set", "data.on_invalid=skip"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["n_samples"] == 2
