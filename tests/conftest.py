"""Shared fixtures: an offline Hugging Face cache copied from ../shared, the real Phi-3 tokenizer, shared data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PHI3TUNE_SHARED", REPO_ROOT.parent / "shared"))
SHARED_HF_HOME = SHARED / "hf-home"
SHARED_DATASETS = SHARED / "datasets"
PHI3_ID = "microsoft/Phi-3-mini-4k-instruct"

needs_hf_home = pytest.mark.skipif(
    not SHARED_HF_HOME.is_dir(), reason=f"no Phi-3 tokenizer cache at {SHARED_HF_HOME} (../shared/hf-home)"
)
needs_shared_datasets = pytest.mark.skipif(
    not SHARED_DATASETS.is_dir(), reason=f"no shared chat datasets at {SHARED_DATASETS} (../shared/datasets)"
)


@pytest.fixture(scope="session", autouse=True)
def offline_hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """Point HF_HOME at a writable copy of ../shared/hf-home and forbid network access for the whole session."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    if not SHARED_HF_HOME.is_dir():
        return None
    home = tmp_path_factory.mktemp("hf") / "hf-home"
    shutil.copytree(SHARED_HF_HOME, home)
    os.environ["HF_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def phi3_tokenizer(offline_hf_home: Path | None):
    """The real Phi-3-mini-4k-instruct tokenizer, loaded offline."""
    if offline_hf_home is None:
        pytest.skip(f"no Phi-3 tokenizer cache at {SHARED_HF_HOME}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(PHI3_ID)


def run_cli(*args: str, env: dict | None = None, timeout: int = 600):
    """Run the real `phi3tune` entry point in a subprocess (exit codes and signals behave as for a user)."""
    import subprocess
    import sys

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "phi3tune.cli", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO_ROOT,
    )


TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"
TRAINED_RUN_STEPS = 60


@pytest.fixture(scope="session")
def trained_run(offline_hf_home: Path | None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short tiny-model training through the CLI, shared by every test that needs a finished run."""
    if offline_hf_home is None:
        pytest.skip(f"no Phi-3 tokenizer cache at {SHARED_HF_HOME}")
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_cli("train", str(TINY_CONFIG), "--output-dir", str(out),
                     "--set", f"training_config.max_steps={TRAINED_RUN_STEPS}",
                     "--set", "training_config.save_steps=30")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The robustness tests' training file: sample chats with three invalid rows (tests/helpers.py)."""
    from helpers import write_train_file

    return write_train_file(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _fast_path_patches_restored():
    """The GPU fast path patches peft and transformers process-wide; no test leaves them on for the next one."""
    yield
    from phi3tune.fastpath import unpatch_all

    unpatch_all()
