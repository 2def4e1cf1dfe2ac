"""Several processes (issue 11): torchrun / --nproc on CPU with gloo, the tiny model, 2 ranks.

Every run here is a real launch (subprocesses): ranks, barriers, signals and failures only exist there. The runs
are kept to 10 steps of a 64-wide 2-layer Phi-3 so the file stays near two minutes on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, needs_hf_home
from helpers import DISTRIBUTED_SETS as SETS, DISTRIBUTED_STEPS as STEPS
from helpers import adapter_tensors, assert_same_losses, cli, losses, metrics_rows
from helpers import run_phi3tune as _phi3tune, subprocess_env as _env, torchrun_command as _torchrun
from helpers import tiny_train_args, wait_for_step as _wait_for_step

pytestmark = needs_hf_home


def _args(out: Path, per_rank_batch: int, *extra: str, **sets) -> list[str]:
    return tiny_train_args(out, {**SETS, "training_config.per_device_train_batch_size": per_rank_batch, **sets}, *extra)


def _check_one_writer_run(out: Path, result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    steps = [r["step"] for r in metrics_rows(out) if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps  # one line a step: only rank 0 writes
    resolved = yaml.safe_load((out / "run_config.yaml").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["strategy"] == "ddp"
    assert resolved["global_batch"] == 2 * resolved["per_rank_batch"]
    # Each rank's RNG state is in every checkpoint; the tokenised data staging folder is gone.
    assert {p.name for p in (out / "checkpoints" / "checkpoint-10").glob("rng_state_*.json")} == {
        "rng_state_0.json", "rng_state_1.json"}
    assert not list(out.parent.glob(".*prepared-data"))
    assert (result.stdout + result.stderr).count("training finished") == 1  # one summary


@pytest.fixture(scope="module")
def nproc_run(tmp_path_factory) -> Path:
    """`phi3tune train --nproc 2`, 4 rows a rank (global batch 8): the reference 2-process run."""
    out = tmp_path_factory.mktemp("ddp") / "nproc"
    result = _phi3tune(*_args(out, 4, "--nproc", "2"))
    _check_one_writer_run(out, result)
    return out


def test_nproc_launch_writes_one_run(nproc_run):
    assert len(losses(nproc_run)) == STEPS


def test_torchrun_launch_same_run(nproc_run, tmp_path):
    out = tmp_path / "torchrun"
    result = subprocess.run(_torchrun("--standalone", "--nproc_per_node", "2", args=_args(out, 4)),
                            capture_output=True, text=True, env=_env(), timeout=300, cwd=REPO_ROOT)
    _check_one_writer_run(out, result)
    assert_same_losses(losses(out), losses(nproc_run), rel=1e-5)


def test_two_processes_match_one_with_the_same_global_batch(nproc_run, tmp_path):
    single = tmp_path / "single"
    result = cli(_args(single, 8))
    assert result.exit_code == 0, result.output[-3000:]
    assert_same_losses(losses(nproc_run), losses(single), rel=1e-3)
    two, one = adapter_tensors(nproc_run), adapter_tensors(single)
    assert sorted(two) == sorted(one)
    for name in one:
        assert (two[name] - one[name]).abs().max().item() <= 1e-4, name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost(tmp_path):
    out = tmp_path / "nodes"
    port = _free_port()
    nodes = [subprocess.Popen(
        _torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(k), "--master_addr", "127.0.0.1",
                  "--master_port", str(port), args=_args(out, 4, **{"training_config.max_steps": 3})),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO_ROOT) for k in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in metrics_rows(out) if "loss" in r] == [1, 2, 3]


def test_sigterm_to_launcher_saves_one_checkpoint_and_resume_reproduces(nproc_run, tmp_path):
    out = tmp_path / "stopped"
    launcher = subprocess.Popen([sys.executable, "-m", "phi3tune", *_args(out, 4, "--nproc", "2")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                cwd=REPO_ROOT)
    _wait_for_step(out, 2, launcher)
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 143, output[-4000:]
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    stopped_at = max(r["step"] for r in metrics_rows(out))
    assert stopped_at < STEPS
    assert checkpoints[-1].name == f"checkpoint-{stopped_at}"
    assert (checkpoints[-1] / "phi3tune_complete.json").is_file()
    assert {p.name for p in checkpoints[-1].glob("rng_state_*.json")} == {"rng_state_0.json", "rng_state_1.json"}
    assert not list((out / "checkpoints").glob(".tmp-*"))

    resumed = _phi3tune(*_args(out, 4, "--nproc", "2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_losses(losses(out), losses(nproc_run), rel=1e-5)


FAIL_ON_RANK_1 = '''
import os
if os.environ.get("RANK") == "1":
    import phi3tune.training.trainer as t
    _step = t.Phi3Trainer.training_step
    def training_step(self, *a, **k):
        if self.state.global_step == 1:
            raise RuntimeError("injected failure")
        return _step(self, *a, **k)
    t.Phi3Trainer.training_step = training_step
'''


def test_exception_on_one_rank_stops_all_and_names_it(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    started = time.monotonic()
    result = _phi3tune(*_args(tmp_path / "failed", 4, "--nproc", "2"), timeout=120,
                       PYTHONPATH=os.pathsep.join([str(hook), str(REPO_ROOT)]))
    assert time.monotonic() - started < 60
    assert result.returncode == 1, result.stderr[-4000:]
    assert "rank 1: internal error: RuntimeError: injected failure" in result.stderr
    assert "rank 1 of 2 failed" in result.stderr


def test_validation_error_reported_once_before_workers_start(tmp_path):
    started = time.monotonic()
    result = _phi3tune(*_args(tmp_path / "bad", 4, "--nproc", "2", **{"training_config.max_stepz": 3}))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("error:") == 1 and "max_stepz" in result.stderr
    assert "rank" not in result.stderr and "torch.distributed" not in result.stderr
    assert time.monotonic() - started < 60


def test_nproc_values(monkeypatch):
    from phi3tune.errors import UsageError
    from phi3tune.training import launch

    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: 0)
    assert launch.resolve_nproc("auto") == 1 and launch.resolve_nproc("3") == 3
    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: 8)
    assert launch.resolve_nproc("auto") == 8
    for bad in ("0", "-1", "two"):
        with pytest.raises(UsageError, match="--nproc"):
            launch.resolve_nproc(bad)
    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(UsageError, match=r"--nproc 4: only 2 GPUs visible \(CUDA_VISIBLE_DEVICES=0,1\)") as info:
        launch.resolve_nproc("4")  # NCCL would fail later with a duplicate-GPU error on every rank
    assert "--nproc 2" in info.value.hint


def test_layout_and_strategy(monkeypatch):
    from phi3tune.training import distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    args = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3}
    assert distributed.layout(args, "cuda") == {"world_size": 4, "strategy": "ddp", "per_rank_batch": 2,
                                                "gradient_accumulation_steps": 3, "global_batch": 24}
    fsdp = {**args, "fsdp": "full_shard auto_wrap"}
    assert distributed.strategy(fsdp, "cuda") == "fsdp" and distributed.strategy_note(fsdp, "cuda") is None
    # accelerate builds FSDP only on accelerators: a CPU run says it trains with DDP instead.
    assert distributed.strategy(fsdp, "cpu") == "ddp" and "DDP" in distributed.strategy_note(fsdp, "cpu")
    assert distributed.trainer_kwargs(args, "cpu")["ddp_backend"] == "gloo"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.strategy(args, "cpu") == "single" and distributed.trainer_kwargs(args, "cpu") == args


def test_resume_on_another_world_size_warns(monkeypatch):
    from phi3tune.training import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    now = distributed.layout({"per_device_train_batch_size": 4}, "cpu")
    assert distributed.world_size_change({"resolved": {"world_size": 2, "global_batch": 8}}, now) is None
    moved = distributed.world_size_change({"resolved": {"world_size": 1, "global_batch": 8}}, now)
    assert "1 process(es) and resumes on 2" in moved and "data order" in moved
    assert "1 process(es)" in distributed.world_size_change({"resolved": {}}, now)  # a run from before this key


def test_data_that_fails_on_rank_0_stops_the_others_with_one_clear_line(tmp_path):
    """Regression: rank 0 raised before its broadcast, so rank 1 died with gloo's 'Connection closed by peer'."""
    bad = tmp_path / "broken.jsonl"
    bad.write_text("{not json\n{also not json\n")
    result = _phi3tune(*_args(tmp_path / "bad-data", 4, "--nproc", "2", **{"data.train": json.dumps(str(bad))}),
                       timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "internal error" not in result.stderr and "Connection closed" not in result.stderr
    assert "rank 1: error: rank 0 could not prepare the data" in result.stderr


def test_a_user_folder_named_like_the_shared_data_is_left_alone(tmp_path, monkeypatch):
    """The ranks' shared data lives beside the run folder: a folder of that name phi3tune did not make is not deleted."""
    from phi3tune.errors import UsageError
    from phi3tune.training import distributed

    out = tmp_path / "run"
    mine = distributed.prepared_data_dir(out)
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not made by phi3tune"):
        distributed._fresh_prepared_dir(mine)
    assert (mine / "keep.txt").read_text() == "mine"
    (mine / "keep.txt").unlink()
    (mine / distributed._PREPARED_MARKER).write_text("")
    distributed._fresh_prepared_dir(mine)  # ours, left by a killed run: replaced
    assert [p.name for p in mine.iterdir()] == [distributed._PREPARED_MARKER]
