"""Config loading: schema errors, overrides, legacy recipe keys, LoRA target names, redaction, shipped configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from phi3tune.config.load import (
    PHI3_LINEAR_MODULES,
    load_config,
    resolve_data_path,
    resolve_target_modules,
)
from phi3tune.errors import ConfigError, UsageError
from phi3tune.training.arguments import mixed_precision

from conftest import REPO_ROOT as REPO

# The two dictionaries of the Phi-3-mini-4k-instruct model card's sample_finetune.py (trl 0.8 era), verbatim;
# max_seq_length / dataset_text_field / packing were SFTTrainer arguments there and are added as users paste them.
MODEL_CARD_TRAINING_CONFIG = {
    "bf16": True,
    "do_eval": False,
    "learning_rate": 5.0e-06,
    "log_level": "info",
    "logging_steps": 20,
    "logging_strategy": "steps",
    "lr_scheduler_type": "cosine",
    "num_train_epochs": 1,
    "max_steps": -1,
    "output_dir": "./checkpoint_dir",
    "overwrite_output_dir": True,
    "per_device_eval_batch_size": 4,
    "per_device_train_batch_size": 4,
    "remove_unused_columns": True,
    "save_steps": 100,
    "save_total_limit": 1,
    "seed": 0,
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.2,
    "max_seq_length": 2048,
    "dataset_text_field": "text",
    "packing": True,
}
MODEL_CARD_PEFT_CONFIG = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": "all-linear",
    "modules_to_save": None,
}
# microsoft/Phi-3CookBook code/04.Finetuning/FineTrainingScript.py: TrainingArguments + SFTTrainer kwargs.
COOKBOOK_TRAINING_CONFIG = {
    "evaluation_strategy": "steps",
    "per_device_train_batch_size": 7,
    "gradient_accumulation_steps": 4,
    "gradient_checkpointing": True,
    "learning_rate": 1e-4,
    "fp16": True,
    "max_steps": -1,
    "num_train_epochs": 3,
    "save_strategy": "epoch",
    "logging_steps": 10,
    "output_dir": "phi3-cookbook",
    "optim": "paged_adamw_32bit",
    "lr_scheduler_type": "linear",
    "dataset_text_field": "text",
    "max_seq_length": 128,
}
# A cookbook variant with Llama-style target names (q/k/v/o), which Phi-3 fuses.
COOKBOOK_PEFT_CONFIG = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": ["q_proj", "v_proj", "k_proj", "o_proj"],
}
PHI3_AVAILABLE = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head", "embed_tokens", "norm"}


def write(tmp_path: Path, doc: Any, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8")
    return path


def base_doc(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"data": {"train": "train.jsonl"}, "training_config": {"output_dir": "out"}}
    doc.update(sections)
    return doc


def problems_of(path: Path | None, *overrides: str, **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, **kw)
    return info.value.problems


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.warnings == []
    assert cfg.output_dir is not None
    assert path.read_text().startswith("# ") and f"phi3tune train configs/{path.name}" in path.read_text()


def test_tiny_config_is_cpu_demo() -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert cfg.model.random_init["hidden_size"] == 512 and cfg.model.dtype == "float32"
    assert cfg.data.train.path == str(REPO / "phi3tune" / "sample_data" / "sample_chat.jsonl")
    assert cfg.training_config["learning_rate"] == 3e-3 and cfg.training_config["report_to"] == "none"


def test_model_card_dicts_load_with_warnings(tmp_path: Path) -> None:
    doc = base_doc(training_config=MODEL_CARD_TRAINING_CONFIG, peft_config=MODEL_CARD_PEFT_CONFIG)
    cfg = load_config(write(tmp_path, doc))
    tc = cfg.training_config
    assert tc["max_length"] == 2048 and "max_seq_length" not in tc
    assert tc["warmup_steps"] == 0.2 and "warmup_ratio" not in tc
    assert "overwrite_output_dir" not in tc and "dataset_text_field" not in tc
    assert tc["gradient_checkpointing"] is True and tc["packing"] is True
    text = "\n".join(cfg.warnings)
    for key in ("max_seq_length", "warmup_ratio", "overwrite_output_dir", "dataset_text_field"):
        assert f"training_config.{key}" in text
    assert "--overwrite" in text
    assert len(cfg.warnings) == 4  # one line per legacy key, nothing else
    assert cfg.peft_config["target_modules"] == "all-linear"


def test_cookbook_dicts_load_with_warnings(tmp_path: Path) -> None:
    doc = base_doc(training_config=COOKBOOK_TRAINING_CONFIG, peft_config=COOKBOOK_PEFT_CONFIG)
    cfg = load_config(write(tmp_path, doc))
    assert cfg.training_config["eval_strategy"] == "steps" and cfg.training_config["max_length"] == 128
    assert cfg.model.dtype == "float16"  # fp16 training on fp16 weights, as the cookbook loads them
    assert cfg.peft_config["target_modules"] == ["qkv_proj", "o_proj"]
    text = "\n".join(cfg.warnings)
    assert "evaluation_strategy" in text and "'q_proj'" in text and "'k_proj'" in text and "model.dtype" in text


def test_unknown_key_did_you_mean_with_dotted_path(tmp_path: Path) -> None:
    doc = base_doc(training_config={"output_dir": "o", "learing_rate": 1e-4}, model={"dtpye": "float32"})
    problems = problems_of(write(tmp_path, doc))
    assert "training_config.learing_rate: unknown key; did you mean 'learning_rate'?" in problems
    assert "model.dtpye: unknown key; did you mean 'dtype'?" in problems


def test_unknown_nested_data_key_and_section(tmp_path: Path) -> None:
    doc = base_doc(data={"train": {"pathh": "x.jsonl"}}, peft={"r": 8})
    problems = problems_of(write(tmp_path, doc))
    assert "data.train.pathh: unknown key; did you mean 'path'?" in problems
    assert "peft: unknown section; did you mean 'peft_config'?" in problems


def test_wrong_type_names_path_type_and_value(tmp_path: Path) -> None:
    doc = base_doc(training_config={"output_dir": "o", "learning_rate": "fast", "packing": "yes please"})
    problems = problems_of(write(tmp_path, doc))
    assert "training_config.learning_rate: expected float, got 'fast' (str)" in problems
    assert any(p.startswith("training_config.packing: expected bool") for p in problems)


def test_numeric_strings_are_converted(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {train: t.jsonl}\ntraining_config:\n  output_dir: o\n  learning_rate: 5e-6\n")
    assert yaml.safe_load(path.read_text())["training_config"]["learning_rate"] == "5e-6"  # the PyYAML trap
    cfg = load_config(path, ["peft_config.lora_dropout=1e-1"])
    assert cfg.training_config["learning_rate"] == 5e-6
    assert cfg.peft_config["lora_dropout"] == 0.1


def test_empty_yaml(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, "# only a comment\n"))
    assert "empty" in problems[0]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_yaml_list_or_scalar(tmp_path: Path, text: str) -> None:
    assert "expected a mapping of sections" in problems_of(write(tmp_path, text))[0]


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, "data:\n  train: x.jsonl\nmodel: [unclosed\n"))
    assert problems[0].startswith("YAML syntax error at line")


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in problems_of(tmp_path / "nope.yaml")[0]


def test_missing_data_section(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, {"training_config": {"output_dir": "o"}}))
    assert any(p.startswith("data: missing section") for p in problems)


def test_missing_output_dir_only_when_required(tmp_path: Path) -> None:
    path = write(tmp_path, {"data": {"train": "t.jsonl"}})
    assert load_config(path).output_dir is None
    assert any("output_dir" in p for p in problems_of(path, require_output_dir=True))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("nosuch.x=1", "--set nosuch.x: unknown section 'nosuch'"),
        ("model.nope=1", "model.nope: unknown key"),
        ("training_config.max_stpes=5", "training_config.max_stpes: unknown key; did you mean 'max_steps'?"),
        ("model.dtype.x=1", "--set model.dtype.x: model.dtype is 'float32', not a mapping"),
    ],
)
def test_bad_set_path(tmp_path: Path, override: str, expected: str) -> None:
    path = write(tmp_path, base_doc(model={"dtype": "float32"}))
    assert any(p.startswith(expected) for p in problems_of(path, override))


@pytest.mark.parametrize("override", ["training_config.max_steps", "=5", "a b=1"])
def test_bad_set_syntax(tmp_path: Path, override: str) -> None:
    problems = problems_of(write(tmp_path, base_doc()), override)
    assert any("expected KEY=VALUE" in p for p in problems)


def test_set_overrides_are_parsed_as_yaml(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, base_doc()),
        ["training_config.max_steps=5", "peft_config.target_modules=[q_proj, v_proj]", "data.train.split=x"],
    )
    assert cfg.training_config["max_steps"] == 5
    assert cfg.peft_config["target_modules"] == ["qkv_proj"]
    assert cfg.data.train.split == "x"


def test_multiple_errors_reported_together(tmp_path: Path) -> None:
    doc = {
        "model": {"dtype": "float8", "trust_remote_code": True},
        "data": {"train": "t.jsonl", "eval": "e.jsonl", "eval_fraction": 0.1},
        "training_config": {"output_dir": "o", "learing_rate": 1, "max_length": 0},
        "peft_config": {"r": "sixteen", "target_modules": ["q_proj", "wq"]},
        "extra": 1,
    }
    problems = problems_of(write(tmp_path, doc), "bad.key=1")
    joined = "\n".join(problems)
    for fragment in (
        "model.dtype",
        "trust_remote_code",
        "eval_fraction",
        "learing_rate",
        "max_length: must be > 0",
        "peft_config.r",
        "wq",
        "extra: unknown section",
        "--set bad.key",
    ):
        assert fragment in joined, fragment
    assert len(problems) >= 9


def test_output_dir_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, base_doc())
    assert load_config(path).output_dir == Path("out")
    cfg = load_config(path, ["training_config.output_dir=from_set"], output_dir="from_cli")
    assert cfg.output_dir == Path("from_cli") and cfg.training_config["output_dir"] == "from_cli"


def test_relative_data_paths_resolve_against_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cfgs").mkdir()
    path = write(tmp_path / "cfgs", {"data": {"train": "../d/train.jsonl", "eval": {"path": "e.jsonl"}}})
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["data.eval.path=cli.jsonl", "data.train.split=x"])
    assert cfg.data.train.path == str(tmp_path / "d" / "train.jsonl")
    assert cfg.data.eval.path == str(tmp_path / "cli.jsonl")  # typed on the command line: cwd-relative
    assert cfg.base_dir == tmp_path / "cfgs"


def test_resolve_data_path_pkg_scheme(tmp_path: Path) -> None:
    assert resolve_data_path("pkg://phi3tune/sample_data/a.jsonl", tmp_path) == REPO / "phi3tune/sample_data/a.jsonl"
    assert resolve_data_path("/abs/x.jsonl", tmp_path) == Path("/abs/x.jsonl")
    with pytest.raises(UsageError):
        resolve_data_path("pkg://no_such_pkg_xyz/a.jsonl", tmp_path)


def test_data_source_needs_exactly_one_of_path_or_hub(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, base_doc(data={"train": {"hub": "a/b", "path": "x"}})))
    assert any(p.startswith("data.train: give exactly one") for p in problems)
    cfg = load_config(write(tmp_path, base_doc(data={"train": {"hub": "a/b"}})))
    assert cfg.data.train.split == "train"


def test_legacy_model_and_cross_section_keys(tmp_path: Path) -> None:
    doc = base_doc(
        model={"torch_dtype": "bfloat16", "use_flash_attention_2": True},
        training_config={"output_dir": "o", "assistant_only_loss": False, "evaluation_strategy": "no"},
    )
    cfg = load_config(write(tmp_path, doc))
    assert cfg.model.dtype == "bfloat16" and cfg.model.attn_implementation == "flash_attention_2"
    assert cfg.data.loss_on == "all" and cfg.training_config["eval_strategy"] == "no"
    assert "assistant_only_loss" not in cfg.training_config
    assert len(cfg.warnings) == 4


def test_activation_checkpointing_maps_to_installed_name(tmp_path: Path) -> None:
    doc = base_doc(training_config={"output_dir": "o", "activation_checkpointing": False})
    cfg = load_config(write(tmp_path, doc))
    assert cfg.training_config["gradient_checkpointing"] is False and len(cfg.warnings) == 1


@pytest.mark.parametrize(
    ("model", "training", "fragment"),
    [
        ({"torch_dtype": "float16", "dtype": "bfloat16"}, {}, "keep only model.dtype"),
        ({}, {"warmup_ratio": 0.1, "warmup_steps": 10}, "keep only warmup_steps"),
        ({}, {"warmup_ratio": 1.5}, "fraction in [0, 1)"),
        ({"dtype": "float16"}, {"bf16": True}, "contradicts model.dtype"),
        ({}, {"bf16": True, "fp16": True}, "both true"),
        ({}, {"max_seq_length": 512, "max_length": 1024}, "keep only max_length"),
        ({"trust_remote_code": False}, {}, "Phi-3 is native in transformers"),
    ],
)
def test_legacy_conflicts_are_errors(tmp_path: Path, model: dict, training: dict, fragment: str) -> None:
    doc = base_doc(model=model, training_config={"output_dir": "o", **training})
    assert any(fragment in p for p in problems_of(write(tmp_path, doc)))


def test_random_init_keys_are_checked(tmp_path: Path) -> None:
    doc = base_doc(
        model={"random_init": {"hidden_size": 64, "num_layers": 2, "vocab_size": 100, "intermediate_size": -1}}
    )
    (problem,) = [p for p in problems_of(write(tmp_path, doc)) if p.startswith("model.random_init")]
    assert "num_layers" in problem and "did you mean 'num_hidden_layers'" in problem
    assert "vocab_size" in problem and "intermediate_size" in problem


def test_target_modules_llama_names_map_to_fused() -> None:
    targets, warnings = resolve_target_modules(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], PHI3_AVAILABLE
    )
    assert targets == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert len(warnings) == 5 and all("Llama-style" in w for w in warnings)
    assert set(PHI3_LINEAR_MODULES) <= PHI3_AVAILABLE


def test_target_modules_pass_through_and_dedupe() -> None:
    assert resolve_target_modules("all-linear", PHI3_AVAILABLE) == ("all-linear", [])
    assert resolve_target_modules(r".*\.qkv_proj", PHI3_AVAILABLE) == (r".*\.qkv_proj", [])
    assert resolve_target_modules(["qkv_proj", "qkv_proj", "lm_head"], PHI3_AVAILABLE) == (["qkv_proj", "lm_head"], [])
    assert resolve_target_modules(["self_attn.q_proj"], PHI3_AVAILABLE)[0] == ["self_attn.qkv_proj"]


def test_target_modules_nothing_matches() -> None:
    with pytest.raises(UsageError) as info:
        resolve_target_modules(["wq", "wk"], PHI3_AVAILABLE)
    assert "none of wq, wk is a module" in str(info.value) and "qkv_proj" in str(info.value)


def test_target_modules_partial_match_names_the_missing() -> None:
    with pytest.raises(UsageError) as info:
        resolve_target_modules(["qkv_proj", "c_attn"], PHI3_AVAILABLE)
    assert "c_attn is not a module of this model (matched: qkv_proj)" in info.value.message
    assert "gate_up_proj" in str(info.value.hint)


def test_tokens_are_redacted(tmp_path: Path) -> None:
    secret = "hf_" + "a" * 30
    doc = base_doc(model={"token": secret}, training_config={"output_dir": "o", "hub_token": "tok-123"})
    cfg = load_config(write(tmp_path, doc))
    dumped = cfg.to_dict()
    assert dumped["model"]["token"] == "***" and dumped["training_config"]["hub_token"] == "***"
    assert secret not in yaml.safe_dump(dumped) and secret not in repr(cfg)
    assert cfg.to_dict(redact_secrets=False)["model"]["token"] == secret


def test_mixed_precision_by_device() -> None:
    assert mixed_precision({}, device_type="cpu", model_dtype="bfloat16") == {"bf16": False, "fp16": False}
    assert mixed_precision({"bf16": True}, device_type="cpu", model_dtype="float32")["bf16"] is False
    assert mixed_precision({}, device_type="cuda", model_dtype="torch.bfloat16") == {"bf16": True, "fp16": False}
    assert mixed_precision({}, device_type="cuda", model_dtype="float16") == {"bf16": False, "fp16": True}
    assert mixed_precision({}, device_type="cuda", model_dtype="float32") == {"bf16": False, "fp16": False}
    assert mixed_precision({"bf16": True}, device_type="cuda", model_dtype="float32")["bf16"] is True


def test_finalized_model_card_config_builds_sft_config(tmp_path: Path) -> None:
    """The end of the chain: a translated model-card dict must construct trl's SFTConfig on this machine."""
    from peft import LoraConfig
    from trl import SFTConfig

    doc = base_doc(training_config=MODEL_CARD_TRAINING_CONFIG, peft_config=MODEL_CARD_PEFT_CONFIG)
    cfg = load_config(write(tmp_path, doc), output_dir=str(tmp_path / "run"))
    args = SFTConfig(**mixed_precision(cfg.training_config, device_type="cpu", model_dtype="float32"))
    assert args.max_length == 2048 and args.warmup_steps == 0.2 and args.bf16 is False
    assert LoraConfig(**cfg.peft_config).r == 16


def test_yaml_bare_no_means_the_no_strategy() -> None:
    """Regression: `--set training_config.eval_strategy=no` parsed as False and was rejected as a bool."""
    from phi3tune.config.load import load_config

    cfg = load_config(None, ["data.train=x.jsonl", "training_config.eval_strategy=no",
                             "training_config.save_strategy=no"], output_dir="out")
    assert cfg.training_config["eval_strategy"] == "no"
    assert cfg.training_config["save_strategy"] == "no"
