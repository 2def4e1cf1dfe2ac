"""Exact resume: an interrupted-and-resumed run equals an uninterrupted one, step for step (issue 4, items 3-5, 8).

All runs share one 8-step setup (3 steps an epoch) of a 64-wide tiny Phi-3; ``straight`` is the reference.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import needs_hf_home, run_cli
from phi3tune.training.checkpoints import COMPLETE_MARKER
from helpers import (
    FAKE_TOKEN,
    MAX_STEPS,
    SIGINT,
    adapter_tensors,
    assert_same_losses,
    cli,
    losses,
    metrics_rows,
    pickle_like_files,
    send_signal_at_step,
    train_args,
)

pytestmark = [needs_hf_home, pytest.mark.slow]


@pytest.fixture(scope="module")
def straight(train_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: MAX_STEPS uninterrupted steps."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = cli(train_args(train_file, out))
    assert result.exit_code == 0, result.output
    return out


def test_same_seed_same_config_gives_identical_runs(straight: Path, train_file: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert cli(train_args(train_file, again)).exit_code == 0
    assert losses(again) == losses(straight)  # bitwise, on the CPU
    first, second = adapter_tensors(straight), adapter_tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_sigint_mid_epoch_saves_and_resume_matches_straight_run(
    straight: Path, train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during step 5 (the middle of the second epoch): step 5 finishes, is saved, exit 130."""
    out = tmp_path / "run"
    send_signal_at_step(monkeypatch, 5, SIGINT)
    result = cli(train_args(train_file, out))
    assert result.exit_code == 130, result.output
    assert "SIGINT" in result.output and "--resume" in result.output
    assert (out / "checkpoints" / "checkpoint-5" / COMPLETE_MARKER).is_file()
    assert not (out / "adapter").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()

    result = cli(train_args(train_file, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "checkpoint-5" in result.output
    assert "changed setting" not in result.output
    assert_same_losses(losses(out), losses(straight))
    # metrics.jsonl reads as one clean run: one row per step, cumulative tokens continue across the resume.
    rows, reference = metrics_rows(out), metrics_rows(straight)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in reference]
    assert [r["learning_rate"] for r in rows] == [r["learning_rate"] for r in reference]


def test_checkpoints_hold_no_pickles(straight: Path) -> None:
    checkpoints = list((straight / "checkpoints").glob("checkpoint-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        names = {p.name for p in checkpoint.iterdir()}
        assert {"optimizer.safetensors", "scheduler.json", "rng_state.safetensors", "training_args.json"} <= names
    assert pickle_like_files(straight) == []


def test_save_failing_midway_keeps_previous_checkpoint_and_resume_uses_it(
    straight: Path, train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second save (step 6) dies after the weights are written: checkpoint-3 stays complete and is resumed."""
    from phi3tune.training.trainer import Phi3Trainer

    out = tmp_path / "run"
    original = Phi3Trainer._save_optimizer_and_scheduler
    calls = []

    def failing_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (simulated)")
        return original(self, output_dir)

    monkeypatch.setattr(Phi3Trainer, "_save_optimizer_and_scheduler", failing_save)
    result = cli(train_args(train_file, out))
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    checkpoints = out / "checkpoints"
    assert (checkpoints / "checkpoint-3" / COMPLETE_MARKER).is_file()
    assert not (checkpoints / "checkpoint-6").exists()
    assert list(checkpoints.glob(".tmp-*")), "the half-written save stays in its staging folder"
    monkeypatch.undo()

    result = cli(train_args(train_file, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert "checkpoint-3" in result.output
    assert not list(checkpoints.glob(".tmp-*"))
    assert_same_losses(losses(out), losses(straight))


def test_incomplete_checkpoint_is_ignored_and_removed(straight: Path, train_file: Path, tmp_path: Path) -> None:
    """A checkpoint folder without its completeness marker (killed mid-save) is never resumed."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "adapter")
    newest = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    (newest / COMPLETE_MARKER).unlink()
    (newest / "optimizer.safetensors").write_bytes(b"truncated")
    result = cli(train_args(train_file, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert f"removed incomplete checkpoint {newest.name}" in result.output
    assert_same_losses(losses(out), losses(straight))


def test_sigterm_to_a_real_process_saves_exits_143_and_resume_finishes(
    straight: Path, train_file: Path, tmp_path: Path
) -> None:
    """A real SIGTERM (as a scheduler sends) to `phi3tune train`; the run also carries a hub token."""
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    out = tmp_path / "run"
    args = train_args(train_file, out, "--set", f"model.token={FAKE_TOKEN}")
    proc = subprocess.Popen([sys.executable, "-m", "phi3tune.cli", *args], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be signalled:\n" + proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 143, output
    assert "SIGTERM" in output and "--resume" in output and "Traceback" not in output
    saved = [p for p in (out / "checkpoints").glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    assert saved and max(int(p.name.split("-")[1]) for p in saved) < MAX_STEPS

    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_losses(losses(out), losses(straight))
    # The token never reaches disk or the logs.
    for text in (output, result.stdout, result.stderr):
        assert FAKE_TOKEN not in text
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".jsonl", ".md", ".txt", ".jinja"):
            assert FAKE_TOKEN not in path.read_text(errors="replace"), path
    assert "model" in (out / "run_config.yaml").read_text()


def test_sigterm_during_an_evaluation_pass_saves_at_once_and_resume_matches(
    train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduler's SIGTERM during the evaluation after step 4: the pass is left at its next batch instead of run
    to the end (a large eval set takes minutes, a grace period ~30 s), step 4 is checkpointed, exit 143; resumed,
    the run is the uninterrupted one (with dropout, so the RNG states must be exact too)."""
    import os

    from phi3tune.training.trainer import Phi3Trainer

    evaluating = ("--set", f"data.eval={{path: {train_file}}}", "--set", "training_config.eval_strategy=steps",
                  "--set", "training_config.eval_steps=4", "--set", "training_config.per_device_eval_batch_size=2")
    reference = tmp_path / "straight"
    assert cli(train_args(train_file, reference, *evaluating, lora_dropout=0.3)).exit_code == 0
    batches = []
    original = Phi3Trainer.prediction_step

    def prediction_step(self, *args, **kwargs):
        batches.append(self.state.global_step)
        if len(batches) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Phi3Trainer, "prediction_step", prediction_step)
    out = tmp_path / "run"
    result = cli(train_args(train_file, out, *evaluating, lora_dropout=0.3))
    assert result.exit_code == 143, result.output
    assert batches == [4, 4]  # of the pass's 12 batches: left right after the one the signal came in
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")
                   if (p / COMPLETE_MARKER).is_file())
    output = " ".join(result.output.split())
    assert saved[-1] == 4 and "SIGTERM: training stopped at step 4/8" in output
    assert "SIGTERM received: saving a checkpoint at step 4" in output and "Traceback" not in output
    monkeypatch.undo()
    result = cli(train_args(train_file, out, *evaluating, "--resume", lora_dropout=0.3))
    assert result.exit_code == 0, result.output
    assert_same_losses(losses(out), losses(reference))


def test_resume_with_lora_dropout_replays_the_same_dropout_masks(
    train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With dropout the losses depend on the RNG: equal curves prove the RNG states are restored exactly."""
    reference = tmp_path / "straight"
    assert cli(train_args(train_file, reference, lora_dropout=0.3)).exit_code == 0
    out = tmp_path / "run"
    send_signal_at_step(monkeypatch, 5, SIGINT)
    assert cli(train_args(train_file, out, lora_dropout=0.3)).exit_code == 130
    monkeypatch.undo()
    assert cli(train_args(train_file, out, "--resume", lora_dropout=0.3)).exit_code == 0
    assert_same_losses(losses(out), losses(reference))


def test_resume_with_a_changed_config_says_what_changed(straight: Path, train_file: Path, tmp_path: Path) -> None:
    """Extending a finished run is allowed, but a resumed run only equals a straight one with the same config."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    result = cli(train_args(train_file, out, "--resume", "--set", f"training_config.max_steps={MAX_STEPS + 1}"))
    assert result.exit_code == 0, result.output
    assert f"changed setting: training_config.max_steps: {MAX_STEPS} -> {MAX_STEPS + 1}" in result.output
    assert max(losses(out)) == MAX_STEPS + 1
