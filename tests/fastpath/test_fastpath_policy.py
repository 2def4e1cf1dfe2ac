"""The fast-path policy decides without patching; apply_patches / unpatch_all turn its patches on and off;
the memory model predicts the measured peaks; --dry-run prints the plan and whether it fits."""

from __future__ import annotations

import pytest

from helpers import fast_path_model_cfg as _model_cfg
from helpers import fast_path_plan as _plan
from phi3tune import fastpath
from phi3tune.fastpath import attention, lora_fused, memory, peft_cast, phi3_layers, policy

GIB = 2**30


def test_auto_is_sdpa_on_cpu_and_explicit_values_are_kept() -> None:
    assert policy.resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert policy.resolve_attn_implementation("eager", "cuda") == "eager"
    assert policy.resolve_attn_implementation("varlen", "cpu") == attention.VARLEN


def test_fast_path_is_off_on_cpu_and_for_explicit_attention() -> None:
    args = {"per_device_train_batch_size": 4, "bf16": False}
    plan = _plan(_model_cfg(), args, device="cpu")
    assert plan.args == args and not plan.enabled and "off" in plan.notes[0] and plan.patches == []
    plan = _plan(_model_cfg("sdpa"), args)
    assert plan.args == args and not plan.enabled and "explicitly" in plan.notes[0]


def test_fast_path_lora_on_an_80gb_card() -> None:
    plan = _plan(_model_cfg(), {"max_length": 2048, "bf16": True})
    assert plan.args["packing"] is True and plan.args["packing_strategy"] == "bfd"
    assert plan.args["per_device_train_batch_size"] == policy.TOKEN_BUDGET // 2048
    assert plan.args["gradient_checkpointing"] is False
    assert any("activation checkpointing none" in line for line in plan.notes)
    assert {"phi3_layers", "lora_fused", "peft_cast"} <= set(plan.patches)


def test_fast_path_keeps_user_keys_and_splits_big_batches() -> None:
    user = {"max_length": 2048, "bf16": True, "packing": False, "gradient_checkpointing": True}
    plan = _plan(_model_cfg(), user)
    assert plan.args["packing"] is False and plan.args["gradient_checkpointing"] is True
    assert any("keeping packing=False" in line for line in plan.notes)
    plan = _plan(_model_cfg(), {"max_length": 2048, "per_device_train_batch_size": 16})
    assert plan.args["per_device_train_batch_size"] * plan.args["gradient_accumulation_steps"] == 16
    assert plan.args["per_device_train_batch_size"] * 2048 <= policy.TOKEN_BUDGET


def test_fast_path_qlora_stays_in_its_memory_budget() -> None:
    plan = _plan(_model_cfg(quantization="4bit"), {"max_length": 2048})
    assert plan.args["gradient_checkpointing"] is True and plan.kbit_prepare is (plan.attn == attention.VARLEN)
    assert plan.memory.peak <= policy.QLORA_MEMORY_BUDGET


def test_small_card_gets_checkpointing_from_the_memory_model() -> None:
    roomy, small = _plan(_model_cfg(), {"max_length": 2048}), _plan(_model_cfg(), {"max_length": 2048}, gib=24)
    assert roomy.memory.checkpointing == "none" and small.memory.checkpointing != "none"
    assert small.args["gradient_checkpointing"] is True
    assert small.memory.peak <= 24 * GIB * policy.MEMORY_FRACTION


def test_switches_come_from_the_config_and_the_benchmark_env_overrides_them() -> None:
    plan = _plan(_model_cfg(fused_lora=False, compiled_layers=False), {"max_length": 2048, "bf16": True})
    assert "lora_fused" not in plan.patches and "phi3_layers" not in plan.patches
    assert any("fused LoRA linears off" in line for line in plan.notes)
    plan = _plan(_model_cfg(fused_lora=False), {"max_length": 2048}, env={policy.LORA_FUSED_ENV: "1"})
    assert "lora_fused" in plan.patches
    plan = _plan(_model_cfg(), {"max_length": 2048}, env={policy.PHI3_LAYERS_ENV: "0"})
    assert "phi3_layers" not in plan.patches


def test_planning_patches_nothing_and_apply_then_unpatch_all_restores_everything() -> None:
    fastpath.unpatch_all()
    plan = _plan(_model_cfg("varlen"), {"max_length": 2048, "bf16": True})
    modules = (attention, phi3_layers, peft_cast, lora_fused)
    assert not any(m.is_patched() for m in modules)
    assert fastpath.apply_patches(plan) == []
    assert all(m.is_patched() for m in modules)
    fastpath.unpatch_all()
    assert not any(m.is_patched() for m in modules)
    from transformers import AttentionInterface

    assert attention.VARLEN not in AttentionInterface._global_mapping


@pytest.mark.parametrize("quantized, checkpointing, tokens, measured_gib", [
    (False, "none", 8124, 32.09),  # configs/lora.yaml, H100, docs/benchmarks.md
    (True, "full", 8124, 4.99),    # configs/qlora.yaml, same call
])
def test_memory_model_predicts_the_measured_recipe_peaks(quantized, checkpointing, tokens, measured_gib) -> None:
    found = memory.estimate(tokens, quantized=quantized, checkpointing=checkpointing)
    assert abs(found.peak / GIB - measured_gib) / measured_gib < 0.15


def test_memory_model_orders_the_modes() -> None:
    peaks = [memory.estimate(8192, quantized=False, checkpointing=m).peak for m in memory.CHECKPOINTING_MODES]
    assert peaks == sorted(peaks, reverse=True)
    assert memory.weight_bytes(True) < memory.weight_bytes(False) / 3
