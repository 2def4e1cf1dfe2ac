"""Loss parity, an invariant: the fast path (varlen attention, compiled Phi-3 layers, fused LoRA linears, bf16
LoRA inputs) and the plain path (sdpa, peft's LoRA) give the same per-step losses over 30 steps of the same
packed batches; and the plain path still gives the committed reference numbers (reference_losses.json), so a
change that moves both paths alike is caught too. Regenerate the reference only on purpose:
``PHI3TUNE_WRITE_REFERENCE=1 pytest tests/test_loss_parity.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import needs_hf_home
from helpers import tiny_phi3_config
from phi3tune import fastpath
from phi3tune.fastpath import attention

REFERENCE = Path(__file__).with_name("reference_losses.json")
STEPS = 30


def _tiny_pair(device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    cfg = tiny_phi3_config(intermediate_size=96, sliding_window=8)
    attention.patch()
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device)
    fast = AutoModelForCausalLM.from_config(cfg, attn_implementation=attention.VARLEN, dtype=dtype).to(device)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _batches(device: str) -> list[dict]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=32000, padding_free=True)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        examples = []
        for _ in range(3):
            n = int(torch.randint(4, 24, (1,), generator=g))
            ids = torch.randint(10, 2000, (n,), generator=g).tolist()
            examples.append({"input_ids": ids, "labels": ids})
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(examples).items()})
    return batches


def _train(model, batches: list[dict], autocast_dtype: torch.dtype | None) -> list[float]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora).train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    device = next(peft_model.parameters()).device.type
    losses = []
    for batch in batches:
        with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _fast_path_on() -> None:
    plan = fastpath.FastPathPlan(enabled=True, attn=attention.VARLEN, args={},
                                 patches=["attention", "phi3_layers", "peft_cast", "lora_fused"])
    assert fastpath.apply_patches(plan) == []


@needs_hf_home
def test_fast_and_plain_paths_give_the_same_losses_and_the_reference_numbers() -> None:
    batches = _batches("cpu")
    ref, fast = _tiny_pair("cpu", torch.float32)
    plain = _train(ref, batches, None)
    _fast_path_on()
    quick = _train(fast, batches, None)
    assert plain[-1] < plain[0]  # it trains
    rel = [abs(a - b) / abs(b) for a, b in zip(quick, plain)]
    assert max(rel) < 0.01, max(rel)
    if os.environ.get("PHI3TUNE_WRITE_REFERENCE"):
        REFERENCE.write_text(json.dumps({"torch": torch.__version__, "plain_cpu_float32": plain}, indent=1) + "\n")
    reference = json.loads(REFERENCE.read_text())["plain_cpu_float32"]
    drift = [abs(a - b) / abs(b) for a, b in zip(plain, reference)]
    assert len(reference) == STEPS and max(drift) < 1e-3, max(drift)


@needs_hf_home
@pytest.mark.skipif(not attention.varlen_kernel_available("cuda"), reason="needs a CUDA GPU (sm80+) with torch varlen_attn")
def test_fast_path_loss_parity_on_the_gpu_in_bf16() -> None:  # pragma: no cover - GPU only
    batches = _batches("cuda")
    ref, fast = _tiny_pair("cuda", torch.bfloat16)
    plain = _train(ref, batches, torch.bfloat16)
    _fast_path_on()
    quick = _train(fast, batches, torch.bfloat16)
    rel = [abs(a - b) / abs(b) for a, b in zip(quick, plain)]
    assert max(rel) < 0.01, max(rel)
