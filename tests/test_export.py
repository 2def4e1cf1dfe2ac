"""`phi3tune export onnx`: fp32 exports reproduce the merged model's greedy tokens, int4 reports agreement,
genai_config stops at <|end|> and <|endoftext|>, chat answers from the export, and bad inputs exit 2."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_CONFIG, needs_hf_home
from helpers import cli, tiny_phi3_config
from phi3tune import export, merge
from phi3tune.model import loading, onnx_export, onnx_verify
from phi3tune.model.onnx_runtime import EXPORT_INCOMPLETE, EXTRA_INSTALL, GENAI_CONFIG, load_genai

needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime_genai") is None,
    reason=f"the onnx extra is not installed ({EXTRA_INSTALL}; scripts/setup.sh installs it)",
)


def heavy(test):
    """Runs the tiny model through the real export: needs the tokenizer cache and the onnx extra."""
    return needs_hf_home(needs_onnx(pytest.mark.slow(test)))


# Not among merge.VERIFY_CONVERSATIONS: the export must agree on prompts it was never checked on.
HELD_OUT = [
    [{"role": "user", "content": "Reverse these words: lamp river gold"}],
    [{"role": "system", "content": "You reverse the order of the words you are given."},
     {"role": "user", "content": "Reverse these words: king fire silver"}],
]  # fmt: skip
ANSWERED = "Reverse these words: star house bear"


def _export(source: Path, out: Path, *args: str):
    return cli(["export", "onnx", str(source), str(out), *args])


def _report(out: Path) -> dict:
    return json.loads((out / export.VERIFICATION_FILE).read_text())


@pytest.fixture(scope="module")
def fp32_export(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "fp32"
    result = _export(trained_run, out, "--precision", "fp32")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def int4_export(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "int4"
    result = _export(trained_run, out)  # int4 is the CPU default
    assert result.exit_code == 0, result.output
    assert "reported, not judged" in result.output
    return out


# --- acceptance 1: fp32 is exact, int4 runs and reports, genai_config, chat -----------------------------------


@heavy
def test_fp32_export_reproduces_base_plus_adapter_greedy_tokens(trained_run: Path, fp32_export: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phi3tune.model.chat_template import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(fp32_export)
    base = AutoModelForCausalLM.from_pretrained(trained_run / "base_model", dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, trained_run / "adapter").eval()
    prompts = [render_prompt(tokenizer, c) for c in HELD_OUT]
    want = [tokens for tokens, _ in onnx_verify.reference_runs(reference, prompts)]
    got = [tokens for tokens, _ in onnx_verify.export_runs(load_genai(fp32_export), prompts)]
    assert got == want and any(len(t) > 1 for t in want), (got, want)
    report = _report(fp32_export)
    check = report["verification"]
    assert report["verified"] and check["passed"] and check["prompts_identical"] == check["n_prompts"] == 4
    assert check["token_agreement"] == 1.0 and check["first_step_max_abs_logit_diff"] < 1e-3
    assert report["merge"]["passed"] and report["source_kind"] == "adapter"


@heavy
def test_export_folder_is_complete_and_stops_at_end_and_endoftext(fp32_export: Path) -> None:
    names = {p.name for p in fp32_export.iterdir()}
    assert {GENAI_CONFIG, "model.onnx", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            export.VERIFICATION_FILE} <= names
    assert EXPORT_INCOMPLETE not in names and export.MERGED_SUBDIR not in names, names
    assert not any(p.name.startswith(".") for p in fp32_export.parent.iterdir()), "no staging or lock left beside it"
    model = json.loads((fp32_export / GENAI_CONFIG).read_text())["model"]
    assert model["eos_token_id"][:2] == [32007, 32000] and model["pad_token_id"] == 32000
    assert {p.stat().st_mode & 0o777 for p in fp32_export.iterdir()} <= {0o644, 0o664, 0o666}


@heavy
def test_int4_export_runs_and_reports_agreement(int4_export: Path, fp32_export: Path) -> None:
    report = _report(int4_export)
    check = report["verification"]
    assert report["precision"] == "int4" and check["passed"] and check["generates"] and check["tokenizer_matches"]
    assert 0.0 <= check["token_agreement"] <= 1.0 and check["first_step_max_abs_logit_diff"] > 0
    assert report["size_bytes"] < _report(fp32_export)["size_bytes"]


@heavy
def test_chat_on_the_export_answers_like_the_run(trained_run: Path, fp32_export: Path, int4_export: Path) -> None:
    args = ["--prompt", ANSWERED, "--max-new-tokens", "12"]
    from_run = cli(["chat", str(trained_run), *args])
    from_export = cli(["chat", str(fp32_export), *args])
    assert from_run.exit_code == 0 and from_export.exit_code == 0, from_export.output
    assert "onnxruntime-genai" in from_export.stderr
    assert from_export.stdout.strip() == from_run.stdout.strip() != ""
    from_int4 = cli(["chat", str(int4_export), *args])
    assert from_int4.exit_code == 0 and from_int4.stdout.strip(), from_int4.output


@heavy
def test_interactive_chat_on_the_export_stops_at_end(fp32_export: Path) -> None:
    from rich.console import Console

    from phi3tune.chat import chat_loop
    from phi3tune.model.loading import load_tokenizer

    model, tokenizer = load_genai(fp32_export), load_tokenizer(str(fp32_export))
    stops: list[int] = []
    real = model.generate

    def spy(*args, **kwargs):
        output = real(*args, **kwargs)
        stops.append(int(output[0, -1]))
        return output

    model.generate = spy
    lines = iter([ANSWERED, "Reverse these words: a b c", "/exit"])
    out = io.StringIO()
    turns = chat_loop(model, tokenizer, system=None, max_new_tokens=40, console=Console(file=io.StringIO()),
                      read_line=lambda: next(lines), out=out)
    assert turns == 2 and out.getvalue().strip()
    assert stops and all(s in (32007, 32000) for s in stops), stops  # the answers ended, not cut off at 40
    assert "<|end|>" not in out.getvalue()


# --- acceptance 3: a QLoRA adapter is merged into the unquantized base, then exported exactly -----------------


@heavy
def test_qlora_adapter_export_matches_its_merged_model(trained_run: Path, tmp_path: Path) -> None:
    # bitsandbytes cannot train on a CPU, so the CPU test takes the trained run and marks it as a QLoRA run
    # (model.quantization: 4bit), the key the merge path reads; test_real_qlora_run_exports_exactly trains
    # a real one where a GPU is present.
    run = tmp_path / "qlora-run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    config = yaml.safe_load((run / "run_config.yaml").read_text())
    config["model"]["quantization"] = "4bit"
    (run / "run_config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "onnx"
    result = _export(run, out, "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert "QLoRA adapter (4bit): merging into the unquantized base" in result.output
    check = _report(out)["verification"]
    assert check["passed"] and check["prompts_identical"] == check["n_prompts"]


def _tiny_base(folder: Path) -> Path:
    """configs/tiny.yaml's random-init model saved as an ordinary model folder, as a real base is loaded."""
    from transformers import AutoModelForCausalLM

    model_cfg = yaml.safe_load(TINY_CONFIG.read_text())["model"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_phi3_config(**model_cfg["random_init"]))
    loading.save_base_model(model, loading.load_tokenizer(model_cfg["name_or_path"]), folder)
    return folder


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                    reason="a real QLoRA run needs a CUDA GPU and bitsandbytes")
@heavy
def test_real_qlora_run_exports_exactly(tmp_path: Path) -> None:
    # A random_init model cannot be loaded in 4 bit (train refuses the pair): the base is saved first and the
    # run loads it from its folder through bitsandbytes, as QLoRA loads a real checkpoint.
    run = tmp_path / "qlora"
    result = cli(["train", str(TINY_CONFIG), "--output-dir", str(run),
                  "--set", f"model.name_or_path={_tiny_base(tmp_path / 'base')}", "--set", "model.random_init=null",
                  "--set", "model.quantization=4bit", "--set", "model.dtype=bfloat16",
                  "--set", "training_config.max_steps=20"])
    assert result.exit_code == 0, result.output
    result = _export(run, tmp_path / "onnx", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert "QLoRA adapter (4bit): merging into the unquantized base" in result.output
    assert _report(tmp_path / "onnx")["verification"]["prompts_identical"] == len(merge.VERIFY_CONVERSATIONS)


# --- a merged model folder as the source; the genai_config fix-up ------------------------------------------


@heavy
def test_merged_folder_without_generation_config_still_stops_at_end(trained_run: Path, tmp_path: Path) -> None:
    # Without generation_config.json the builder takes eos from config.json: <|endoftext|> alone.
    model_dir = tmp_path / "model"
    shutil.copytree(trained_run / "base_model", model_dir)
    (model_dir / "generation_config.json").unlink()
    out = tmp_path / "onnx"
    result = _export(model_dir, out, "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert json.loads((out / GENAI_CONFIG).read_text())["model"]["eos_token_id"][:2] == [32007, 32000]
    assert _report(out)["source_kind"] == "model" and "merge" not in _report(out)


def test_fix_genai_config_adds_end_to_a_config_that_stops_only_at_endoftext(tmp_path: Path) -> None:
    (tmp_path / GENAI_CONFIG).write_text(json.dumps({"model": {"eos_token_id": 32000, "pad_token_id": 0}}))
    onnx_export.fix_genai_config(tmp_path)
    model = json.loads((tmp_path / GENAI_CONFIG).read_text())["model"]
    assert model["eos_token_id"] == [32007, 32000] and model["pad_token_id"] == 32000
    (tmp_path / GENAI_CONFIG).write_text(json.dumps({"model": {"eos_token_id": [32000, 7]}}))
    onnx_export.fix_genai_config(tmp_path)
    assert json.loads((tmp_path / GENAI_CONFIG).read_text())["model"]["eos_token_id"] == [32007, 32000, 7]


# --- failures: verification (exit 1), interruption, and exit 2 for the user's mistakes ----------------------


@heavy
def test_an_fp32_export_that_disagrees_fails_and_keeps_its_staging(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    real = onnx_verify.export_runs

    def one_token_off(model, prompts, *args):
        runs = real(model, prompts, *args)
        tokens, logits = runs[1]
        return [runs[0], ([t + 1 for t in tokens], logits), *runs[2:]]

    monkeypatch.setattr(onnx_verify, "export_runs", one_token_off)
    out = tmp_path / "onnx"
    result = _export(trained_run / "base_model", out, "--precision", "fp32")
    assert result.exit_code == 1, result.output
    assert "greedy tokens differ" in result.output and "1 of 4 prompts" in result.output
    staging = tmp_path / f".onnx{export.EXPORT_STAGING_SUFFIX}"
    assert not out.exists() and (staging / EXPORT_INCOMPLETE).is_file()
    assert not _report(staging)["passed"]
    # chat refuses the kept, unverified export
    result = cli(["chat", str(staging), "--prompt", "hi"])
    assert result.exit_code == 2 and "incomplete ONNX export" in result.output
    # the next export into the same output replaces it
    monkeypatch.setattr(onnx_verify, "export_runs", real)
    result = _export(trained_run / "base_model", out, "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert not staging.exists() and "removing" in result.output


@heavy
def test_interrupted_export_leaves_nothing(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    def killed_midway(source, target, staging, out, **kwargs):
        (staging / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_export_into", killed_midway)
    out = tmp_path / "onnx"
    result = _export(trained_run, out)
    assert result.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_extra_is_exit_2_naming_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails as if not installed
    out = tmp_path / "onnx"
    result = _export(tmp_path / "run", out)  # checked before the target is even looked at
    assert result.exit_code == 2, result.output
    assert "pip install 'phi3tune[onnx]'" in result.output and not out.exists()
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / GENAI_CONFIG).write_text("{}")
    result = cli(["chat", str(tmp_path / "fake"), "--prompt", "hi"])
    assert result.exit_code == 2 and "pip install 'phi3tune[onnx]'" in result.output


@heavy
def test_non_empty_output_is_refused(trained_run: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = _export(trained_run, tmp_path)
    assert result.exit_code == 2 and "not empty" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@heavy
def test_wrong_targets_and_choices_are_exit_2(trained_run: Path, tmp_path: Path, fp32_export: Path) -> None:
    from safetensors.torch import save_file

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    save_file({"w": torch.zeros(1)}, str(llama / "model.safetensors"))
    cases = {
        "no such folder": [str(tmp_path / "nope"), str(tmp_path / "o1")],
        "not Phi-3": [str(llama), str(tmp_path / "o2")],
        "already an ONNX export": [str(fp32_export), str(tmp_path / "o3")],
        "is a file": [str(trained_run / "run_config.yaml"), str(tmp_path / "o4")],
        "inside the adapter folder": [str(trained_run / "adapter"), str(trained_run / "adapter" / "onnx")],
        "not supported with --device cpu": [str(trained_run), str(tmp_path / "o5"), "--precision", "fp16"],
        "is not one of": [str(trained_run), str(tmp_path / "o6"), "--precision", "int8"],
    }
    for expected, args in cases.items():
        result = cli(["export", "onnx", *args])
        assert result.exit_code == 2 and expected in result.output, (expected, result.output)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))
    assert not (trained_run / "adapter" / "onnx").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@heavy
def test_verifying_a_cuda_export_without_cuda_is_exit_2(trained_run: Path, tmp_path: Path) -> None:
    result = _export(trained_run, tmp_path / "o", "--device", "cuda")
    assert result.exit_code == 2 and "--no-verify" in result.output

