"""`phi3tune merge-adapter`: merged logits equal base + adapter, plain loading, and a check that can fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import needs_hf_home
from phi3tune import merge
from helpers import cli

pytestmark = [needs_hf_home, pytest.mark.slow]

# Not among merge.VERIFY_CONVERSATIONS: the merged model must agree on prompts it was never checked on.
HELD_OUT = [
    [{"role": "user", "content": "Reverse these words: lamp river gold"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue? " * 5}],
]


@pytest.fixture(scope="module")
def merged_dir(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merge") / "merged"
    result = cli(["merge-adapter", str(trained_run), str(out)])
    assert result.exit_code == 0, result.output
    assert "max |logit diff|" in result.output
    return out


def _logits(model, tokenizer, conversation) -> torch.Tensor:
    from phi3tune.model.chat_template import render_prompt

    with torch.no_grad():
        return model(input_ids=torch.tensor([render_prompt(tokenizer, conversation)])).logits


def test_merged_logits_equal_base_plus_adapter_on_held_out_prompts(trained_run: Path, merged_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(trained_run / "base_model", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, trained_run / "adapter").eval()
    for conversation in HELD_OUT:
        reference = _logits(peft_model, tokenizer, conversation)
        with peft_model.disable_adapter():
            base_only = _logits(peft_model, tokenizer, conversation)
        assert (reference - base_only).abs().max() > 1e-2, "the adapter must be non-zero for this test to mean anything"
        assert (_logits(merged, tokenizer, conversation) - reference).abs().max() <= 1e-4
    report = json.loads((merged_dir / merge.VERIFICATION_FILE).read_text())
    assert report["passed"] and report["max_abs_diff"] <= report["tolerance"]
    assert report["tolerance"] == pytest.approx(1e-4 * max(1.0, report["max_abs_logit"]))


def test_merged_dir_is_safe_complete_and_generates(merged_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in merged_dir.iterdir()}
    assert merge.INCOMPLETE_MARKER not in names
    assert all(n.endswith((".safetensors", ".json", ".jinja")) for n in names), names
    assert any(n.endswith(".safetensors") for n in names)
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["use_cache"] is True and "quantization_config" not in config
    generation = json.loads((merged_dir / "generation_config.json").read_text())
    assert {32007, 32000} <= set(generation["eos_token_id"])

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    prompt = tokenizer.apply_chat_template(HELD_OUT[0], add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_a_corrupted_merge_fails_verification(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    """Prove the check can fail: a merge with the LoRA scaling doubled must be caught (exit 1)."""
    real_merge = merge._merge

    def doubled_scaling(peft_model):
        for module in peft_model.modules():
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling = {name: 2 * value for name, value in module.scaling.items()}
        return real_merge(peft_model)

    monkeypatch.setattr(merge, "_merge", doubled_scaling)
    out = tmp_path / "bad"
    result = cli(["merge-adapter", str(trained_run / "adapter"), str(out)])
    assert result.exit_code == 1, result.output
    assert "disagrees" in result.output
    # The unverified merge never appears under the output's name; it is kept, marked, in the staging folder.
    staging = merge.staging_dir(out.resolve())
    assert not out.exists() and (staging / merge.INCOMPLETE_MARKER).is_file()
    report = json.loads((staging / merge.VERIFICATION_FILE).read_text())
    assert not report["passed"] and report["max_abs_diff"] > report["tolerance"]


def test_non_empty_output_is_refused(trained_run: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = cli(["merge-adapter", str(trained_run), str(tmp_path)])
    assert result.exit_code == 2 and "not empty" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_pickle_adapter_refused_unless_allowed(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    from phi3tune.errors import UsageError
    from phi3tune.model.targets import resolve_target

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", adapter)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    result = cli(["merge-adapter", str(adapter), str(tmp_path / "out")])
    assert result.exit_code == 2 and "pickle" in result.output
    with pytest.raises(UsageError):
        resolve_target(adapter)
    monkeypatch.setenv("PHI3TUNE_ALLOW_PICKLE", "1")
    assert resolve_target(adapter).kind == "adapter"


def test_moved_run_finds_its_own_base_model(trained_run: Path, tmp_path: Path) -> None:
    from phi3tune.model.targets import resolve_target

    run = tmp_path / "moved"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    config_path = run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "base_model")
    config_path.write_text(json.dumps(config))
    target = resolve_target(run)
    assert target.base == str((run / "base_model").resolve()) and target.run_dir == run


def test_a_corrupted_export_fails_verification(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    """The saved tensors are checked bit for bit: one weight changed on disk must be caught (exit 1)."""
    from safetensors.torch import load_file, save_file

    real_save = merge._save

    def save_then_corrupt(model, tokenizer, out: Path) -> None:
        real_save(model, tokenizer, out)
        shard = next(out.glob("*.safetensors"))
        tensors = load_file(str(shard))
        name = next(n for n in tensors if "down_proj" in n)
        tensors[name] = tensors[name] + 1e-3
        save_file(tensors, str(shard), metadata={"format": "pt"})

    monkeypatch.setattr(merge, "_save", save_then_corrupt)
    out = tmp_path / "bad_export"
    result = cli(["merge-adapter", str(trained_run), str(out)])
    assert result.exit_code == 1, result.output
    assert "down_proj" in result.output and not out.exists()
    assert (merge.staging_dir(out.resolve()) / merge.INCOMPLETE_MARKER).is_file()
