"""The run folder's lifecycle never loses a user's work (issue 9, items 1-3, 5-7, 9, 15 and its rc-1 cases).

Most cases are refused before any weights load and run the Typer app in-process; the rest share one finished
4-step run of the 64-wide tiny Phi-3 (3 steps an epoch, so max_steps ends inside the second epoch).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phi3tune
from conftest import REPO_ROOT, needs_hf_home
from phi3tune.training.atomic import atomic_write_text
from phi3tune.training.checkpoints import COMPLETE_MARKER
from phi3tune.errors import ResourceError, UsageError
from phi3tune.training.resources import translate_resource_error
from phi3tune.training.layout import MARKER
from phi3tune.training.run_folder import check_output_dir
from phi3tune.training.run_lock import folder_lock
from helpers import adapter_tensors, cli, losses, train_args

pytestmark = needs_hf_home

STEPS = 4


def _text(result) -> str:
    return " ".join(result.output.split())


def _refused(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    text = _text(result)
    assert "Traceback" not in text and "internal error" not in text, text
    for word in words:
        assert word in text, (word, text)
    return text


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its bytes."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


def _run(train_file: Path, out: Path, *extra: str) -> list[str]:
    return train_args(train_file, out, "--set", f"training_config.max_steps={STEPS}", *extra)


@pytest.fixture(scope="module")
def finished(train_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: checkpoints 3 and 4, adapter/, base_model/, metrics."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = cli(_run(train_file, out))
    assert result.exit_code == 0, result.output
    assert (out / "checkpoints" / f"checkpoint-{STEPS}" / COMPLETE_MARKER).is_file()
    return out


@pytest.fixture
def copy_of(finished: Path, tmp_path: Path):
    def make(*, adapter: bool = True) -> Path:
        out = tmp_path / "run"
        shutil.copytree(finished, out)
        if not adapter:
            shutil.rmtree(out / "adapter")
        return out

    return make


# ---- item 1: --overwrite never deletes a folder holding the user's project ---------------------------------


def test_overwrite_refuses_a_folder_that_contains_the_current_directory(train_file: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    parent = tmp_path / "parent"
    (parent / "proj" / "sub").mkdir(parents=True)
    (parent / MARKER).write_text("{}")  # even a phi3tune run folder is refused when it holds the project
    (parent / "proj" / "NOTES.md").write_text("mine")
    before = _snapshot(parent)
    monkeypatch.chdir(parent / "proj" / "sub")
    _refused(cli(_run(train_file, parent, "--overwrite")), "contains the current directory")
    assert _snapshot(parent) == before


@pytest.mark.parametrize("what", ["config", "data", "package", "home"])
def test_overwrite_refuses_a_folder_holding_config_data_package_or_home(
    what: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "run"
    (folder / "inner").mkdir(parents=True)
    (folder / MARKER).write_text("{}")
    config, data = tmp_path / "x.yaml", tmp_path / "d.jsonl"
    if what == "config":
        config = folder / "inner" / "x.yaml"
    elif what == "data":
        data = folder / "inner" / "d.jsonl"
    elif what == "package":
        monkeypatch.setattr(phi3tune, "__file__", str(folder / "inner" / "phi3tune" / "__init__.py"))
    else:
        monkeypatch.setenv("HOME", str(folder / "inner"))
    with pytest.raises(UsageError) as caught:
        check_output_dir(folder, resume=False, overwrite=True, config_path=config, data_paths=[data])
    assert "will not delete" in caught.value.message
    assert {"config": "the config file", "data": "a data file", "package": "phi3tune package",
            "home": "home directory"}[what] in caught.value.message


def test_not_empty_hint_offers_overwrite_only_where_it_would_be_accepted(
    train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = tmp_path / "parent"
    (parent / "sub").mkdir(parents=True)
    (parent / MARKER).write_text("{}")
    monkeypatch.chdir(parent / "sub")
    text = _refused(cli(_run(train_file, Path(".."))), "not empty")
    assert "--overwrite" not in text


# ---- items 1 and 7: --overwrite and --resume act only on phi3tune's own folders ---------------------------


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_resume_or_overwrite_of_a_folder_phi3tune_did_not_make_changes_nothing(
    flag: str, train_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "other-tool"
    checkpoint = out / "checkpoints" / "checkpoint-500"
    checkpoint.mkdir(parents=True)
    (checkpoint / "weights.safetensors").write_bytes(b"their work")
    before = _snapshot(out)
    _refused(cli(_run(train_file, out, flag)), "not a phi3tune run folder")
    assert _snapshot(out) == before


def test_runs_made_before_the_marker_are_still_phi3tune_runs(tmp_path: Path) -> None:
    old = tmp_path / "old-run"
    (old / "checkpoints").mkdir(parents=True)
    (old / "run_config.yaml").write_text("model: {}\n")
    assert check_output_dir(old, resume=True, overwrite=False) == old.resolve()


# ---- item 2: --overwrite is staged until trl accepted the settings ------------------------------------------


@pytest.mark.parametrize("bad", ["training_config.optim=adamw_bogus", "training_config.lr_scheduler_kwargs={bogus: 1}"])
def test_overwrite_that_trl_rejects_puts_the_old_run_back(bad: str, copy_of, train_file: Path) -> None:
    out = copy_of()
    leftover = out.parent / f".{out.name}.phi3tune-old-1"  # an earlier --overwrite killed midway
    (leftover / "adapter").mkdir(parents=True)
    before = _snapshot(out.parent)
    result = cli(_run(train_file, out, "--overwrite", "--set", bad))
    _refused(result, "training_config", "put back", f"{leftover} holds a run")
    assert _snapshot(out.parent) == before


def test_overwrite_replaces_the_run_once_training_began_and_files_follow_the_umask(copy_of, train_file: Path) -> None:
    out = copy_of()
    (out / "stale.txt").write_text("from the old run")
    previous = os.umask(0o027)
    try:
        result = cli(_run(train_file, out, "--overwrite", "--set", "training_config.max_steps=1"))
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()
    assert max(losses(out)) == 1
    assert not list(out.parent.glob(f".{out.name}.phi3tune-old-*"))
    assert (out / "train_report.png").is_file() and (out / "run_config.yaml").is_file()
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o750 if (out / name).is_dir() else 0o640)}
    assert not wrong, wrong


# ---- item 3: one process per run folder ---------------------------------------------------------------------


def test_second_train_into_a_locked_folder_exits_2_naming_the_holder(train_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with folder_lock(out, "train"):
        _refused(cli(_run(train_file, out)), "in use", str(os.getpid()))
    assert not out.exists()


# ---- item 5: resuming a finished run changes nothing; max_steps is a hard stop -----------------------------


def test_resume_of_a_finished_run_is_a_no_op(copy_of, train_file: Path) -> None:
    out = copy_of()
    before = _snapshot(out)
    for _ in range(2):
        result = cli(_run(train_file, out, "--resume"))
        assert result.exit_code == 0, result.output
        assert "nothing to resume" in _text(result) and f"step {STEPS}/{STEPS}" in _text(result)
    assert _snapshot(out) == before


def test_resume_at_the_last_step_trains_no_further_step(copy_of, finished: Path, train_file: Path) -> None:
    """Killed while the adapter was being saved: --resume writes it from the final checkpoint, no step 5."""
    out = copy_of(adapter=False)
    result = cli(_run(train_file, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert max(losses(out)) == STEPS and losses(out) == losses(finished)
    assert not (out / "checkpoints" / f"checkpoint-{STEPS + 1}").exists()
    saved, want = adapter_tensors(out), adapter_tensors(finished)
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)


# ---- item 6: base_model/ is atomic, and a damaged one is rewritten before training ---------------------------


def test_damaged_base_model_is_written_again_before_training(copy_of, finished: Path, train_file: Path) -> None:
    out = copy_of(adapter=False)
    shutil.rmtree(out / "checkpoints" / f"checkpoint-{STEPS}")
    (out / "base_model" / "config.json").write_text("")  # what a kill during the old, non-atomic save left
    result = cli(_run(train_file, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert "base_model" in _text(result) and "writing it again" in _text(result)
    json.loads((out / "base_model" / "config.json").read_text())
    assert losses(out) == losses(finished)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_save_base_model_failing_midway_leaves_no_base_model(tmp_path: Path) -> None:
    from phi3tune.model.loading import save_base_model

    class Model:
        config = type("Config", (), {"bos_token_id": 1})()

        def save_pretrained(self, directory, **_):
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "config.json").write_text("")

    class Tokenizer:
        def save_pretrained(self, directory):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        save_base_model(Model(), Tokenizer(), tmp_path / "base_model")
    assert not (tmp_path / "base_model").exists()


# ---- disk full -> exit 3 ------------------------------------------------------------------------------------


def test_disk_full_is_a_resource_error() -> None:
    for exc in (OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors"),
                RuntimeError("Error while serializing: IoError(Os { code: 28, message: \"No space left on device\" })")):
        translated = translate_resource_error(exc)
        assert isinstance(translated, ResourceError) and translated.exit_code == 3
        assert "disk is full" in translated.message


def test_disk_full_before_training_exits_3_and_leaves_no_half_run(
    train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from phi3tune.model import loading

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loading, "save_base_model", full)
    out = tmp_path / "run"
    result = cli(_run(train_file, out))
    assert result.exit_code == 3, result.output
    assert "disk is full" in _text(result)
    assert not out.exists()


# ---- item 9: no pickle is read on --resume without the opt-in ------------------------------------------------


@pytest.mark.parametrize("safe, pickled", [
    (("rng_state.safetensors", "rng_state.json"), "rng_state.pth"),
    (("optimizer.safetensors", "optimizer.json"), "optimizer.pt"),
    (("scheduler.json",), "scheduler.pt"),
    (("adapter_model.safetensors",), "adapter_model.bin"),
])
def test_resume_refuses_a_checkpoint_holding_pickles(
    safe: tuple[str, ...], pickled: str, copy_of, train_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = copy_of(adapter=False)
    checkpoint = out / "checkpoints" / f"checkpoint-{STEPS}"
    for name in safe:
        (checkpoint / name).unlink()
    torch.save({"state": [1, 2, 3]}, checkpoint / pickled)

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_load)
    before = _snapshot(out)
    _refused(cli(_run(train_file, out, "--resume")), pickled, "PHI3TUNE_ALLOW_PICKLE")
    assert _snapshot(out) == before


# ---- rc-1 cases: damaged checkpoints and run_config.yaml, unwritable folders -------------------------------


@pytest.mark.parametrize("damage", ["optimizer.safetensors", "trainer_state.json"])
def test_damaged_complete_checkpoint_falls_back_to_the_previous_one(
    damage: str, copy_of, finished: Path, train_file: Path
) -> None:
    out = copy_of(adapter=False)
    newest = out / "checkpoints" / f"checkpoint-{STEPS}"
    (newest / damage).write_bytes((newest / damage).read_bytes()[:40])
    result = cli(_run(train_file, out, "--resume"))
    assert result.exit_code == 0, result.output
    text = _text(result)
    assert f"checkpoint-{STEPS} is damaged" in text and damage in text and "checkpoint-3" in text
    assert (out / "checkpoints" / f"corrupt-checkpoint-{STEPS}" / damage).is_file()  # kept, set aside
    assert losses(out) == losses(finished)


def test_every_checkpoint_damaged_exits_2_naming_them(copy_of, train_file: Path) -> None:
    out = copy_of(adapter=False)
    for checkpoint in (out / "checkpoints").glob("checkpoint-*"):
        (checkpoint / "trainer_state.json").write_text("{")
    before = _snapshot(out)
    _refused(cli(_run(train_file, out, "--resume")), "checkpoint-3", f"checkpoint-{STEPS}", "delete")
    assert _snapshot(out) == before


def test_damaged_run_config_on_resume_exits_2_naming_it(copy_of, train_file: Path) -> None:
    out = copy_of(adapter=False)
    (out / "run_config.yaml").write_text("model: [unclosed\n")
    _refused(cli(_run(train_file, out, "--resume")), "run_config.yaml", "damaged")


def test_unwritable_output_folder_exits_2_before_anything_loads(
    train_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests run as root, who may write anywhere: the permission check itself is made to say no."""
    from phi3tune.data import prepare as data
    from phi3tune.model import loading

    locked = tmp_path / "readonly"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the folder was checked")

    monkeypatch.setattr(data, "prepare_datasets", must_not_load)
    monkeypatch.setattr(loading, "load_tokenizer", must_not_load)
    _refused(cli(_run(train_file, locked / "run")), "permission denied", str(locked))


# ---- item 15: files follow the umask --------------------------------------------------------------------------


def test_atomic_writes_and_the_report_png_follow_the_umask(tmp_path: Path) -> None:
    from phi3tune.report import RunMetrics, plot_report

    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        plot_report(RunMetrics(), tmp_path / "r.png", title="t")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "r.png").stat().st_mode & 0o777 == 0o644


# ---- misleading: a signal during the final adapter save says what happened ---------------------------------

_SIGNAL_DURING_SAVE = """
import os, signal, sys
import phi3tune.train as train
original = train.save_adapter
def save_adapter(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
train.save_adapter = save_adapter
from phi3tune.cli import app
app(sys.argv[1:], prog_name="phi3tune")
"""


def test_sigterm_during_the_final_adapter_save_says_the_adapter_was_saved(train_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = _run(train_file, out, "--set", "training_config.max_steps=1")
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_DURING_SAVE, *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, "COLUMNS": "400"}, timeout=300)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 143, text
    assert "SIGTERM during the final save" in text and "adapter was saved" in text and "Traceback" not in text
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

