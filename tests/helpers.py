"""Shared test helpers: a very small training setup, in-process CLI runs, metrics readers, a tiny Phi-3 config,
fault injection.

In-process runs (``cli``) go through the real Typer app, so exit codes and messages are the user's, without
paying a Python start-up per run; tests that need a real process (signals, tracebacks) use ``run_cli``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import REPO_ROOT, TINY_CONFIG

SAMPLE = REPO_ROOT / "phi3tune" / "sample_data" / "sample_chat.jsonl"
N_VALID = 24  # with batch 8: 3 steps an epoch, so 8 steps cross two epoch boundaries
MAX_STEPS = 8
SAVE_STEPS = 3
INVALID_ROWS = [
    {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": "a question and no answer"}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "   "}]},
]
FAKE_TOKEN = "hf_" + "Q" * 34


# Several-process runs (tests/training/test_distributed.py, test_fsdp2.py): a 64-wide tiny model, 10 steps, a
# checkpoint every 5, a loss line every step, no eval.
DISTRIBUTED_STEPS = 10
DISTRIBUTED_SETS = {
    "model.random_init.hidden_size": 64,
    "model.random_init.intermediate_size": 128,
    "data.eval": "null",
    "training_config.eval_strategy": "no",
    "training_config.max_steps": DISTRIBUTED_STEPS,
    "training_config.save_steps": 5,
    "training_config.logging_steps": 1,
    "training_config.warmup_steps": 0,
}


def write_train_file(directory: Path) -> Path:
    """N_VALID sample chats with three invalid rows mixed in (lines 5, 11, 20), for ``on_invalid: skip``."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:N_VALID]]
    for line_no, bad in zip((5, 11, 20), INVALID_ROWS):
        rows.insert(line_no - 1, bad)
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_args(train_file: Path, output_dir: Path, *extra: str, lora_dropout: float = 0.0) -> list[str]:
    """``phi3tune train`` arguments for a ~1 s/step run of a 64-wide tiny Phi-3 on ``train_file``."""
    sets = {
        "model.random_init.hidden_size": 64,
        "model.random_init.intermediate_size": 128,
        "data.train.path": json.dumps(str(train_file)),
        "data.eval": "null",
        "data.on_invalid": "skip",
        "training_config.eval_strategy": "no",
        "training_config.max_steps": MAX_STEPS,
        "training_config.save_steps": SAVE_STEPS,
        "training_config.logging_steps": 1,
        "peft_config.lora_dropout": lora_dropout,
    }
    return tiny_train_args(output_dir, sets, *extra)


def tiny_train_args(output_dir: Path, sets: dict, *extra: str) -> list[str]:
    """``phi3tune train`` arguments: the tiny config into ``output_dir``, each of ``sets`` as a ``--set``."""
    args = ["train", str(TINY_CONFIG), "--output-dir", str(output_dir)]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


def cli(args: list[str]):
    """Run the phi3tune CLI in this process; returns click's Result (exit_code, output)."""
    from phi3tune.cli import app

    # Wide columns: rich would otherwise wrap long paths in the messages the tests look for.
    return CliRunner().invoke(app, args, catch_exceptions=False, env={"COLUMNS": "400"})


def metrics_rows(run: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl, as written."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run: Path) -> dict[int, float]:
    """Per-step training losses from a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in metrics_rows(run) if "loss" in r}


def tiny_phi3_config(**overrides):
    """The real Phi-3-mini config (from the offline cache) shrunk to a 2-layer, 64-wide model, for unit tests."""
    from transformers import AutoConfig

    from conftest import PHI3_ID

    cfg = AutoConfig.from_pretrained(PHI3_ID)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4)
    for key, value in {**sizes, **overrides}.items():
        setattr(cfg, key, value)
    return cfg


def assert_same_losses(got: dict[int, float], want: dict[int, float], rel: float = 1e-5) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in want:
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, got[step], want[step])


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def at_step(monkeypatch, method: str, step: int, action: Callable) -> None:
    """Call ``action(trainer, result)`` from inside ``Phi3Trainer.<method>`` while step ``step`` runs.

    ``method`` is ``training_step`` (mid-step, after forward/backward) or ``compute_loss`` (whose return value
    ``action`` may replace).
    """
    from phi3tune.training.trainer import Phi3Trainer

    original = getattr(Phi3Trainer, method)

    def wrapped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.model.training and self.state.global_step + 1 == step:
            replaced = action(self, result)
            return result if replaced is None else replaced
        return result

    monkeypatch.setattr(Phi3Trainer, method, wrapped)


def send_signal_at_step(monkeypatch, step: int, sig: int) -> None:
    """Deliver a real ``sig`` to this process in the middle of step ``step``."""
    at_step(monkeypatch, "training_step", step, lambda trainer, _: os.kill(os.getpid(), sig))


SIGINT, SIGTERM = signal.SIGINT, signal.SIGTERM


def pickle_like_files(root: Path) -> list[Path]:
    """Files that are pickles or torch.save zips (by content, not by name)."""
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            head = path.open("rb").read(9)
            # A pickle (protocol 2+) opens with 0x80 and its protocol; a safetensors file with its header's
            # 8-byte length (which can start with 0x80 too) and then "{".
            pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and head[8:9] != b"{"
            if pickled or head[:4] == b"PK\x03\x04" or path.suffix in (".bin", ".pt", ".pth", ".pkl"):
                found.append(path)
    return found


def nonfinite_tensors(root: Path) -> list[str]:
    """``file:key`` of every saved tensor with a NaN/inf, across all safetensors files under ``root``."""
    bad = []
    for path in root.rglob("*.safetensors"):
        for key, tensor in load_file(str(path)).items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad.append(f"{path.relative_to(root)}:{key}")
    return bad


# ---- several processes (issue 11): real launches, each a subprocess -----------------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment, with the repository importable and unbuffered, wide output (for the messages looked for)."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300", "PYTHONPATH": path, **extra}


def run_phi3tune(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -m phi3tune ARGS`` in a subprocess (``--nproc N`` starts the ranks through torchrun's API)."""
    return subprocess.run([sys.executable, "-m", "phi3tune", *args], capture_output=True, text=True,
                          env=subprocess_env(**env), timeout=timeout, cwd=REPO_ROOT)


def torchrun_command(*launcher: str, args: list[str]) -> list[str]:
    """``torchrun LAUNCHER... -m phi3tune ARGS`` as an argv."""
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "phi3tune", *args]


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until ``run``'s metrics.jsonl has reached ``step`` (fails if ``proc`` ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and any(r.get("step", 0) >= step for r in metrics_rows(run)):
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


def fast_path_model_cfg(attn: str = "auto", quantization: str | None = None, **switches):
    """A ``model`` section as the fast-path policy reads it (switches unset unless given)."""
    from types import SimpleNamespace

    fast_path = SimpleNamespace(**{"fused_lora": None, "compiled_layers": None, **switches})
    return SimpleNamespace(attn_implementation=attn, quantization=quantization, fast_path=fast_path)


def fast_path_plan(model_cfg, args, device="cuda", gib=80.0, env=None):
    """``plan_fast_path`` for a card of ``gib`` GiB, without the environment's benchmark overrides."""
    from phi3tune.fastpath import policy

    return policy.plan_fast_path(model_cfg, dict(args), device, gpu_memory=gib * 2**30, env=env or {})
