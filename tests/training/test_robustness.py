"""Runs that fail fail safely: non-finite losses and weights, out of memory, skipped rows (issue 4, items 2, 6, 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import needs_hf_home
from helpers import at_step, cli, nonfinite_tensors, train_args

pytestmark = [needs_hf_home, pytest.mark.slow]


def test_nan_loss_stops_at_its_step_with_exit_3_and_nothing_nonfinite_is_saved(
    train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    at_step(monkeypatch, "compute_loss", 5, lambda trainer, loss: loss * float("nan"))
    result = cli(train_args(train_file, out))
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "non-finite at step 5" in text
    assert "learning_rate=0.00075 (now 0.003)" in text and "phi3tune data check" in text
    assert "checkpoint-3" in text and "--resume" in text  # the last good checkpoint predates the NaN
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-3"]
    assert not (out / "adapter").exists()
    assert nonfinite_tensors(out) == []
    # on_invalid: skip trained on the 24 valid rows and said which lines it skipped.
    assert "27 rows read, 24 used" in text and "skipped 1 invalid" in text and "line" in text


def test_nonfinite_weights_are_never_saved(train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights that turn NaN without a NaN loss (here: poisoned during save step 6) stop the save itself."""

    def poison(trainer, result):
        lora_b = next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)
        with torch.no_grad():
            lora_b.fill_(float("inf"))

    out = tmp_path / "run"
    at_step(monkeypatch, "training_step", 6, poison)
    result = cli(train_args(train_file, out))
    assert result.exit_code == 3, result.output
    assert "NaN/inf at step 6" in " ".join(result.output.split())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]
    assert not (out / "adapter").exists()
    assert nonfinite_tensors(out) == []


def test_cuda_out_of_memory_exits_3_with_hints_from_the_config(
    train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(trainer, loss):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (simulated)")

    at_step(monkeypatch, "compute_loss", 2, oom)
    result = cli(train_args(train_file, tmp_path / "run", "--set", "training_config.max_length=1024"))
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "out of memory" in text and "Traceback" not in text
    assert "per_device_train_batch_size=4" in text and "gradient_accumulation_steps=2 (now 8 x 1)" in text
    assert "max_length=512 (now 1024)" in text
    assert "gradient_checkpointing=true (now off)" in text
    assert "model.quantization=4bit" in text


def test_safe_state_round_trips_trainer_state_without_pickle(tmp_path: Path) -> None:
    import random

    import numpy as np

    from phi3tune.training.safe_state import UnsafeStateError, load_state, save_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "python": random.getstate(), "numpy": np.random.get_state(),
             "cpu": torch.random.get_rng_state()}  # fmt: skip
    save_state(state, tmp_path, "state")
    back = load_state(tmp_path, "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    assert back["python"] == state["python"] and torch.equal(back["cpu"], state["cpu"])
    assert back["numpy"][0] == "MT19937" and (back["numpy"][1] == state["numpy"][1]).all()
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # int keys, tuples kept
    restored = torch.optim.AdamW(model.parameters())
    restored.load_state_dict(back["optimizer"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(restored.state_dict()["state"][0][key], state["optimizer"]["state"][0][key])
    with pytest.raises(UnsafeStateError, match="function"):
        save_state({"lr_lambda": lambda step: 1.0}, tmp_path, "bad")


def test_a_second_signal_aborts_at_once_with_its_exit_code() -> None:
    import os
    import signal

    from phi3tune.errors import TrainingInterrupted
    from phi3tune.training.signals import graceful_stop

    with graceful_stop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.exit_code == 143
        with pytest.raises(TrainingInterrupted) as again:
            os.kill(os.getpid(), signal.SIGTERM)
    assert again.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_stop_another_rank_asked_for_is_not_this_ranks_second_signal() -> None:
    """Under torchrun sync_stop can set the request before this rank's own copy of the same SIGTERM arrives; that
    copy is this rank's first signal (it would otherwise abort without saving while the other ranks save)."""
    import os
    import signal

    from phi3tune.errors import TrainingInterrupted
    from phi3tune.training.signals import graceful_stop

    with graceful_stop() as stop:
        stop.signum = signal.SIGTERM  # what sync_stop sets when another rank got the signal first
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received and stop.exit_code == 143
        with pytest.raises(TrainingInterrupted):
            os.kill(os.getpid(), signal.SIGTERM)
