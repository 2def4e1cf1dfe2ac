"""End to end: `phi3tune train` of the tiny random-init Phi-3 through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_CONFIG, TRAINED_RUN_STEPS, needs_hf_home, run_cli
from helpers import metrics_rows

pytestmark = [needs_hf_home, pytest.mark.slow]


def test_train_writes_the_output_layout(trained_run: Path) -> None:
    for name in ["run_config.yaml", "metrics.jsonl", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer_config.json",
                 "adapter/generation_config.json", "base_model/config.json", "eval_metrics.json"]:
        assert (trained_run / name).is_file(), name
    checkpoints = sorted((trained_run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and all((c / "phi3tune_complete.json").is_file() for c in checkpoints)
    assert not list(trained_run.rglob("*.bin")), "only safetensors/JSON are written"


def test_training_loss_falls(trained_run: Path) -> None:
    rows = [r for r in metrics_rows(trained_run) if r.get("loss") is not None]
    assert rows[-1]["step"] == TRAINED_RUN_STEPS
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert all(r["tokens"] > 0 for r in rows)
    eval_metrics = json.loads((trained_run / "eval_metrics.json").read_text())
    assert eval_metrics["eval_loss"] < rows[0]["loss"]
    assert eval_metrics["n_samples"] > 0 and eval_metrics["n_tokens"] > 0


def test_generation_config_stops_at_end_and_endoftext(trained_run: Path) -> None:
    gen = json.loads((trained_run / "adapter" / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) >= {32007, 32000}


def test_only_lora_weights_trained_and_base_unchanged(trained_run: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = trained_run / "base_model"
    base_weights = load_file(str(next(base_dir.glob("*.safetensors"))))
    adapter = load_file(str(trained_run / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter), sorted(adapter)[:5]
    # LoRA B starts at zero: a non-zero B proves the adapter trained.
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, trained_run / "adapter")
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace("base_layer.", "")
        if key in base_weights:
            assert torch.equal(tensor, base_weights[key].to(tensor.dtype)), f"base weight {key} changed"


def test_run_config_records_resolved_settings(trained_run: Path) -> None:
    import yaml

    cfg = yaml.safe_load((trained_run / "run_config.yaml").read_text())
    assert cfg["versions"]["trl"] and cfg["versions"]["peft"]
    assert cfg["resolved"]["device"] == "cpu"
    assert cfg["data"]["train"] and cfg["data_report"]["fingerprint"]


def test_dry_run_of_the_gpu_recipe_prints_the_plan_without_weights(tmp_path: Path) -> None:
    result = run_cli("train", "configs/lora.yaml", "--dry-run", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "trainable" in text and "qkv_proj" in text or "all-linear" in text
    assert not (tmp_path / "run").exists()


def test_real_run_without_weights_fails_clearly(tmp_path: Path) -> None:
    result = run_cli("train", "configs/lora.yaml", "--output-dir", str(tmp_path / "run"),
                     "--set", "data.train={path: %s}" % (Path(__file__).parents[1] / "phi3tune/sample_data/sample_chat.jsonl"),
                     "--set", "data.eval=null")
    assert result.returncode in (2, 3), result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr


def test_non_empty_output_dir_is_refused(trained_run: Path) -> None:
    result = run_cli("train", str(TINY_CONFIG), "--output-dir", str(trained_run))
    assert result.returncode == 2
    assert "not empty" in result.stderr and "--resume" in result.stderr


def test_qlora_without_a_gpu_is_a_resource_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: QLoRA can run here")
    result = run_cli("train", "configs/qlora.yaml", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "CUDA GPU" in result.stderr and "Traceback" not in result.stderr
