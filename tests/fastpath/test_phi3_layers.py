"""phi3tune/phi3_layers.py: Phi-3's attention and MLP forwards with the cheap split, against transformers' own.

The patched forwards must compute the same function: logits, loss and every gradient of a tiny random Phi-3
(with LoRA on all linears, as trained) equal the unpatched model's in float32, for packed rows through the
varlen attention, padded batches through sdpa, and generation with a KV cache.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import needs_hf_home
from helpers import tiny_phi3_config
from phi3tune.fastpath import attention, phi3_layers

pytestmark = needs_hf_home


def _tiny(attn: str):
    from transformers import AutoModelForCausalLM

    cfg = tiny_phi3_config(intermediate_size=96, sliding_window=8)
    attention.patch()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)


def _with_lora(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model.train()


def _loss_and_grads(model, **inputs):
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def _compare(ref, patched_model, **inputs):
    logits_ref, loss_ref, g_ref = _loss_and_grads(ref, **inputs)
    assert phi3_layers.patch() and phi3_layers.is_patched()
    logits, loss, g = _loss_and_grads(patched_model, **inputs)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    assert g.keys() == g_ref.keys() and len(g) == 16
    for name in g_ref:
        scale = float(g_ref[name].abs().max()) or 1.0
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5 * scale, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_packed_rows_varlen_same_logits_loss_and_grads() -> None:
    model = _with_lora(_tiny(attention.VARLEN))
    ref = copy.deepcopy(model)
    lengths = [5, 12, 3, 9]  # one sample longer than the sliding window
    ids = torch.randint(10, 32000, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    _compare(ref, model, input_ids=ids, position_ids=pos, labels=ids)


def test_packed_rows_through_the_swiglu_backward_function_same_grads(monkeypatch) -> None:
    """The MLP as on a GPU: the SwiGLU inside swiglu_backward's autograd function (its kernel stood in for by the
    reference, which gives the same numbers), against transformers' own model."""
    from phi3tune.fastpath import swiglu_backward

    taken = []

    def stand_in(gate_up, grad):
        taken.append(1)
        with torch.no_grad():
            return swiglu_backward.backward_reference(gate_up, grad)

    monkeypatch.setattr(swiglu_backward, "usable", lambda t: True)
    monkeypatch.setattr(swiglu_backward, "_kernel_backward", stand_in)
    model = _with_lora(_tiny(attention.VARLEN))
    ref = copy.deepcopy(model)
    lengths = [6, 10, 4]
    ids = torch.randint(10, 32000, (1, sum(lengths)), generator=torch.Generator().manual_seed(6))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    _compare(ref, model, input_ids=ids, position_ids=pos, labels=ids)
    assert len(taken) == model.config.num_hidden_layers


def test_padded_batch_sdpa_same_logits_loss_and_grads() -> None:
    model = _with_lora(_tiny("sdpa"))
    ref = copy.deepcopy(model)
    ids = torch.randint(10, 32000, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    _compare(ref, model, input_ids=ids, attention_mask=mask, labels=labels)


def test_generation_with_kv_cache_unchanged() -> None:
    model = _tiny("sdpa").eval()
    ids = torch.randint(10, 32000, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    phi3_layers.patch()
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)


def test_split_rope_outputs_and_their_gradients_are_contiguous(monkeypatch) -> None:
    """The compiled split + RoPE returns token-major contiguous tensors, and the gradients the varlen kernel
    sends back to them are contiguous too. Otherwise the compiled backward first copies each gradient to the
    layout of its output (3 copies a layer, ~6.5 ms of an H200 step)."""
    model = _with_lora(_tiny(attention.VARLEN))
    seen: list[tuple[str, bool]] = []
    original = phi3_layers._qkv_rope

    def watched(*args):
        outputs = original(*args)
        for name, t in zip("qkv", outputs):
            seen.append((f"{name} out", t.is_contiguous()))
            t.register_hook(lambda g, name=name: seen.append((f"{name} grad", g.is_contiguous())))
        return outputs

    monkeypatch.setattr(phi3_layers, "_qkv_rope", watched)
    assert phi3_layers.patch()
    lengths = [5, 12, 3]
    ids = torch.randint(10, 32000, (1, sum(lengths)), generator=torch.Generator().manual_seed(4))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    model(input_ids=ids, position_ids=pos, labels=ids).loss.backward()
    layers = model.config.num_hidden_layers
    assert len(seen) == 6 * layers
    assert all(ok for _, ok in seen), [name for name, ok in seen if not ok]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the copy is torch.compile's")
def test_gpu_compiled_split_rope_backward_copies_nothing() -> None:
    """On a GPU the split + RoPE is compiled; its backward, fed the varlen kernel's (tokens, heads, dim)
    gradients the way the attention forward hands them back, launches no copy. The token count changes between
    calls, as micro-batches do in training: the graph is then compiled for dynamic shapes, where AOTAutograd
    copies a gradient whose layout differs from its output's (with one fixed shape it does not)."""
    from types import SimpleNamespace

    heads, dim = 4, 32
    layer = SimpleNamespace(
        config=SimpleNamespace(num_attention_heads=heads, _attn_implementation="capture"), head_dim=dim,
        num_key_value_heads=heads, scaling=dim ** -0.5, attention_dropout=0.0, training=True, layer_idx=0,
        qkv_proj=torch.nn.Identity(), o_proj=torch.nn.Identity())
    captured = {}

    def capture(module, q, k, v, mask, **kwargs):  # what varlen_attention_forward does with its inputs
        flat = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k, v)]
        captured["flat"] = flat
        return flat[0].view(q.shape[0], q.shape[2], heads, dim), None

    phi3_layers.patch()
    from transformers.models.phi3 import modeling_phi3

    modeling_phi3.ALL_ATTENTION_FUNCTIONS.register("capture", capture)
    for tokens in (64, 80, 96):  # the second count recompiles for dynamic shapes; the third is profiled
        qkv = torch.randn(1, tokens, 3 * heads * dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        angles = torch.randn(1, tokens, dim, device="cuda")
        cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
        phi3_layers.attention_forward(layer, qkv, (cos, sin), None)
        flat = captured["flat"]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.autograd.backward(flat, [torch.randn_like(f) for f in flat])
            torch.cuda.synchronize()
    assert phi3_layers._qkv_rope.compiled is not None and not phi3_layers._qkv_rope.failed
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert not copies, copies


def test_patch_is_class_level_and_reversible() -> None:
    from transformers.models.phi3 import modeling_phi3

    attn, mlp = modeling_phi3.Phi3Attention.forward, modeling_phi3.Phi3MLP.forward
    layer = modeling_phi3.Phi3DecoderLayer.forward
    assert phi3_layers.patch() and phi3_layers.patch()  # idempotent
    assert modeling_phi3.Phi3DecoderLayer.forward is phi3_layers.decoder_layer_forward
    assert modeling_phi3.Phi3Attention.forward is phi3_layers.attention_forward
    assert modeling_phi3.Phi3MLP.forward is phi3_layers.mlp_forward
    phi3_layers.unpatch()
    assert modeling_phi3.Phi3Attention.forward is attn and modeling_phi3.Phi3MLP.forward is mlp
    assert modeling_phi3.Phi3DecoderLayer.forward is layer
    assert not phi3_layers.is_patched()


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog) -> None:
    """A compiler error on the first call: the eager function answers, once warned, and is used from then on."""
    wrapped = phi3_layers.CompiledOnce(phi3_layers.swiglu)

    class FakeCuda:
        device = torch.device("cuda")

    def broken_compile(fn):
        def call(*args):
            raise RuntimeError("no working C compiler")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(phi3_layers.swiglu, "__name__", "swiglu", raising=False)
    x = torch.randn(3, 8)
    calls = []
    wrapped.fn = lambda *a: calls.append(a) or phi3_layers.swiglu(x)
    with caplog.at_level("WARNING"):
        wrapped(FakeCuda())
        wrapped(FakeCuda())
    assert wrapped.failed and len(calls) == 2
    assert sum("torch.compile" in r.message for r in caplog.records) == 1


def test_out_of_memory_is_not_taken_for_a_compile_failure(monkeypatch) -> None:
    """A CUDA OOM inside the compiled function propagates (exit 3 with hints), and compiling stays on."""
    wrapped = phi3_layers.CompiledOnce(phi3_layers.swiglu)

    class FakeCuda:
        device = torch.device("cuda")

    def oom_compile(fn):
        def call(*args):
            raise torch.OutOfMemoryError("CUDA out of memory")

        return call

    monkeypatch.setattr(torch, "compile", oom_compile)
    with pytest.raises(torch.OutOfMemoryError):
        wrapped(FakeCuda())
    assert not wrapped.failed


def test_with_activation_checkpointing_and_fused_lora_same_grads(monkeypatch) -> None:
    """Smaller GPUs get (every-n) activation checkpointing with both fast-path patches: same loss and grads."""
    from phi3tune.fastpath import lora_fused

    calls = []
    original_forward = lora_fused._FusedLoraLinear.forward
    monkeypatch.setattr(lora_fused._FusedLoraLinear, "forward", staticmethod(lambda *a: calls.append(1) or original_forward(*a)))

    model = _with_lora(_tiny(attention.VARLEN))
    ref = copy.deepcopy(model)
    lengths = [6, 10, 4]
    ids = torch.randint(10, 32000, (1, sum(lengths)), generator=torch.Generator().manual_seed(4))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    _, loss_ref, g_ref = _loss_and_grads(ref, input_ids=ids, position_ids=pos, labels=ids)
    assert lora_fused.patch() and phi3_layers.patch()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    _, loss, g = _loss_and_grads(model, input_ids=ids, position_ids=pos, labels=ids)
    assert len(calls) == 2 * 2 * 4  # each fused linear ran twice: forward, and its recomputation in backward
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-6)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        scale = float(g_ref[name].abs().max()) or 1.0
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5 * scale, rtol=1e-4, msg=lambda m: f"{name}: {m}")
