"""The fused LoRA linear (phi3tune/lora_fused.py) against peft's own ``lora.Linear.forward``.

Every check builds the same layer twice (same seed), runs one through peft's forward and one through the
patched forward, and compares outputs and the gradients of lora_A, lora_B and the input in float32. The
patch is process-wide, so each test turns it off again (conftest.py's autouse fixture) and the last test checks that a
``phi3tune train`` run does not turn it on.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import TINY_CONFIG, needs_hf_home
from helpers import tiny_phi3_config
from phi3tune.fastpath import lora_fused

# float32: absolute error up to ~1e-6 of the tensor's largest entry (a few ulps after r-long sums)
ATOL, RTOL = 1e-6, 1e-5


class _Block(nn.Module):
    def __init__(self, bias: bool = False):
        super().__init__()
        self.proj = nn.Linear(24, 40, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _peft_model(lora_alpha: int = 24, dropout: float = 0.0, bias: bool = False, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_Block(bias), LoraConfig(r=4, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=["proj"]))
    # peft initialises lora_B to zero; random B makes every gradient path non-trivial.
    with torch.no_grad():
        model.base_model.model.proj.lora_B["default"].weight.normal_()
    return model


def _run(model, x: torch.Tensor, fused: bool):
    """Output and gradients (lora_A, lora_B, input) of a random-weighted sum of the output."""
    if fused:
        assert lora_fused.patch()
    else:
        lora_fused.unpatch()
    x = x.clone().requires_grad_(True)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    layer = model.base_model.model.proj
    grads = {
        "A": layer.lora_A["default"].weight.grad.clone(),
        "B": layer.lora_B["default"].weight.grad.clone(),
        "x": x.grad.clone(),
    }
    return out.detach(), grads


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal to float32 rounding: the sums run in another order, so the error scales with the largest entry."""
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, atol=ATOL * scale, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _compare(model, x):
    ref = copy.deepcopy(model)
    out_ref, g_ref = _run(ref, x, fused=False)
    out, g = _run(model, x, fused=True)
    _close(out, out_ref, "output")
    for key in g_ref:
        _close(g[key], g_ref[key], f"grad of {key}")
    return out, g


@pytest.mark.parametrize("base_gemm_last", [True, False], ids=["base-last", "base-first"])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)], ids=["2d", "3d"])
@pytest.mark.parametrize("lora_alpha", [4, 24], ids=["scaling1", "scaling6"])
def test_fused_matches_peft_outputs_and_grads(shape, lora_alpha, base_gemm_last, monkeypatch) -> None:
    monkeypatch.setattr(lora_fused, "BASE_GEMM_LAST", base_gemm_last)
    model = _peft_model(lora_alpha=lora_alpha)
    assert model.base_model.model.proj.scaling["default"] == lora_alpha / 4
    _compare(model, torch.randn(*shape))


def _spy(monkeypatch) -> list:
    """Record each call of the fused autograd function (its scaling)."""
    calls: list = []
    original_apply = lora_fused._FusedLoraLinear.apply
    monkeypatch.setattr(lora_fused._FusedLoraLinear, "apply", lambda *a: calls.append(a[-1]) or original_apply(*a))
    return calls


def test_fused_path_is_taken(monkeypatch) -> None:
    """The common case really runs the fused autograd function (not the fallback)."""
    model = _peft_model()
    calls = _spy(monkeypatch)
    _compare(model, torch.randn(3, 5, 24))
    assert calls == [6.0]


def test_base_with_bias(monkeypatch) -> None:
    model = _peft_model(bias=True)
    calls = _spy(monkeypatch)
    _compare(model, torch.randn(3, 5, 24))
    assert len(calls) == 1


def test_trainable_base_falls_back(monkeypatch) -> None:
    """A base weight that trains (not LoRA's usual frozen base) keeps peft's path, which computes its grad."""
    model = _peft_model()
    model.base_model.model.proj.base_layer.weight.requires_grad_(True)
    monkeypatch.setattr(lora_fused._FusedLoraLinear, "apply", lambda *a: pytest.fail("fused path with a trainable base"))
    lora_fused.patch()
    model(torch.randn(2, 24)).sum().backward()
    assert model.base_model.model.proj.base_layer.weight.grad is not None


def test_frozen_input_still_trains_adapter() -> None:
    """Input without grad (a first layer): the base output is a grad-less leaf, written in place."""
    model = _peft_model()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 24)
    out_ref = ref(x)
    out_ref.sum().backward()
    lora_fused.patch()
    out = model(x)
    out.sum().backward()
    _close(out.detach(), out_ref.detach(), "output")
    for key in ("lora_A", "lora_B"):
        grad = getattr(model.base_model.model.proj, key)["default"].weight.grad
        grad_ref = getattr(ref.base_model.model.proj, key)["default"].weight.grad
        _close(grad, grad_ref, f"grad of {key}")


def test_disabled_adapter_matches_base() -> None:
    model = _peft_model()
    x = torch.randn(3, 5, 24)
    lora_fused.patch()
    with model.disable_adapter():
        out = model(x)
    torch.testing.assert_close(out, model.base_model.model.proj.base_layer(x))


def test_dropout_falls_back_to_peft(monkeypatch) -> None:
    """lora_dropout > 0 in training: peft's forward runs (same random mask with the same seed)."""
    model = _peft_model(dropout=0.3)
    monkeypatch.setattr(lora_fused._FusedLoraLinear, "apply", lambda *a: pytest.fail("fused path taken with dropout"))
    ref = copy.deepcopy(model)
    x = torch.randn(3, 5, 24)
    torch.manual_seed(3)
    out_ref, g_ref = _run(ref, x, fused=False)
    torch.manual_seed(3)
    out, g = _run(model, x, fused=True)
    torch.testing.assert_close(out, out_ref)
    for key in g_ref:
        torch.testing.assert_close(g[key], g_ref[key])


def test_dropout_in_eval_mode_is_fused() -> None:
    model = _peft_model(dropout=0.3).eval()
    x = torch.randn(3, 5, 24)
    ref_out = copy.deepcopy(model)(x)
    lora_fused.patch()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_out.detach(), atol=ATOL, rtol=RTOL)


def test_merged_and_dora_fall_back() -> None:
    from peft import LoraConfig, get_peft_model

    x = torch.randn(3, 5, 24)
    merged = _peft_model()
    expected = merged(x).detach()
    merged.merge_adapter()
    lora_fused.patch()
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)

    lora_fused.unpatch()
    torch.manual_seed(0)
    dora = get_peft_model(_Block(), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["proj"]))
    with torch.no_grad():
        dora.base_model.model.proj.lora_B["default"].weight.normal_()
    _compare(dora, x)


def test_bf16_autocast_close_to_peft() -> None:
    """bf16 base + float32 adapters under autocast (the GPU recipe's dtypes): bf16-level agreement."""
    model = _peft_model()
    model.base_model.model.proj.base_layer.to(torch.bfloat16)
    ref = copy.deepcopy(model)
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    outs, grads = [], []
    for m, fused in ((ref, False), (model, True)):
        if fused:
            lora_fused.patch()
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(xx)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        outs.append(out.float())
        layer = m.base_model.model.proj
        assert layer.lora_B["default"].weight.grad.dtype == torch.float32
        grads.append([layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad, xx.grad.float()])
    torch.testing.assert_close(outs[1], outs[0], atol=0.05, rtol=0.02)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)


@needs_hf_home
def test_tiny_phi3_loss_and_grads_equal_with_and_without_patch(monkeypatch) -> None:
    """A tiny Phi-3 with all-linear LoRA: forward + backward loss and every LoRA gradient unchanged."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = tiny_phi3_config()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(std=0.02)
    model.train()
    ref = copy.deepcopy(model)
    ids = torch.randint(10, 32000, (2, 33), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(m):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    loss_ref, g_ref = loss_and_grads(ref)
    calls = _spy(monkeypatch)
    lora_fused.patch()
    loss, g = loss_and_grads(model)
    assert len(g) == 2 * 4 * 2  # 2 layers x (qkv_proj, o_proj, gate_up_proj, down_proj) x (A, B)
    assert len(calls) == 8  # every LoRA linear took the fused path
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    for name in g_ref:
        _close(g[name], g_ref[name], name)


def test_unpatch_restores_peft_forward() -> None:
    from peft.tuners.lora.layer import Linear

    original = Linear.forward
    assert lora_fused.patch() and lora_fused.is_patched()
    assert Linear.forward is lora_fused._fused_forward
    assert lora_fused.patch()  # idempotent
    lora_fused.unpatch()
    assert not lora_fused.is_patched() and Linear.forward is original


@needs_hf_home
def test_phi3tune_train_on_cpu_does_not_apply_the_patch(tmp_path, monkeypatch) -> None:
    """The fast path is for CUDA: a CPU `phi3tune train configs/tiny.yaml` run leaves peft's forward alone."""
    from peft.tuners.lora.layer import Linear

    from phi3tune.cli import app

    original = Linear.forward
    argv = ["train", str(TINY_CONFIG), "--output-dir", str(tmp_path / "run"), "--overwrite",
            "--set", "training_config.max_steps=2", "--set", "training_config.eval_strategy='no'",
            "--set", "training_config.save_strategy='no'", "--set", "data.eval=null"]  # fmt: skip
    try:
        app(argv, standalone_mode=False)
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert (tmp_path / "run" / "adapter").is_dir()  # the run really trained a LoRA adapter
    assert not lora_fused.is_patched()
    assert Linear.forward is original and Linear.forward is not lora_fused._fused_forward
