"""``model.base_precision: fp8`` (phi3tune/fastpath/fp8_base.py): quantisers, the e4m3 base linear, its fused LoRA
path, the conversion of a peft model, the config and device checks; GPU runs where an sm90+ GPU is present.

Tolerances. e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value by at most 2^-4 of itself;
below 2^-6 (times the row's scale) values are subnormal, spaced 2^-9, so the error is at most 2^-10 x scale.
A GEMM of two such operands has a per-output error of about sqrt(2) x the RMS relative rounding error (~2.6%),
i.e. ~3.7% of the output's natural size ``|x_m| |w_n| / sqrt(K)`` (issue 16 measured 3.7% on an H200; bf16: 0.2%).
The GEMM tests allow 8% (about 2x that) per output row and per output column, and require more than 1% (so
the FP8 path really ran). Inputs and weights have rows spanning six decades: a scale on the wrong axis, a
per-tensor scale or a forgotten scale leaves whole rows or columns at ~100% error.
"""

from __future__ import annotations

import copy
import gc
import subprocess
import sys
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT, TINY_CONFIG, needs_hf_home
from helpers import cli, losses, tiny_phi3_config, train_args
from phi3tune.config.load import load_config
from phi3tune.errors import ConfigError, UsageError
from phi3tune.fastpath import fp8_base, lora_fused, memory, policy
from phi3tune.fastpath.fp8_base import Float8FrozenLinear, quantise_rows, quantise_rows_scaled

GEMM_TOL = 0.08  # see the module docstring
GEMM_MIN = 0.01
M, K, N = 256, 128, 96  # K != N: a scale or operand on the wrong axis cannot broadcast by accident
HOPPER = fp8_base.fp8_unavailable_reason() is None
needs_hopper = pytest.mark.skipif(not HOPPER, reason=f"needs a CUDA GPU of sm90+ ({fp8_base.fp8_unavailable_reason()})")


def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this PyTorch's CPU ``_scaled_mm`` takes rowwise scales (2.13 does; 2.11 takes per-tensor only)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError):
        return False
    return True


# The numerics tests run the FP8 GEMMs on the CPU.
needs_cpu_fp8 = pytest.mark.skipif(not _cpu_rowwise_scaled_mm(),
                                   reason=f"this PyTorch's ({torch.__version__}) CPU _scaled_mm takes per-tensor scales only")


def _spread_rows(rows: int, cols: int, low: float, high: float, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * torch.logspace(low, high, rows)[:, None]).to(device)


def _normalised_error(out: torch.Tensor, ref: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Max over output rows and over output columns of the RMS error of ``out ~= a @ b.T``, each entry measured
    against its natural size ``|a_m| |b_n| / sqrt(K)``."""
    size = a.float().norm(dim=1)[:, None] * b.float().norm(dim=1)[None, :] / a.shape[1] ** 0.5
    err = (out.float() - ref.float()) / size
    return float(err.pow(2).mean(1).sqrt().max()), float(err.pow(2).mean(0).sqrt().max())


def _assert_fp8_close(out, ref, a, b, what: str) -> None:
    by_row, by_col = _normalised_error(out, ref, a, b)
    assert by_row < GEMM_TOL and by_col < GEMM_TOL, f"{what}: error {by_row:.3f} by row, {by_col:.3f} by column"
    assert max(by_row, by_col) > GEMM_MIN, f"{what}: error {max(by_row, by_col):.4f}: not an FP8 result"


# ----------------------------------------------------------------------------------------------- quantisers
def test_quantise_rows_round_trip_bounds_and_scale_shape() -> None:
    x = _spread_rows(8, 64, -3, 3, seed=0)
    x[3] = 0.0
    xq, scale = quantise_rows(x)
    assert xq.dtype == torch.float8_e4m3fn and xq.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (8, 1)
    amax = x.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(scale[amax > 0], (amax / 448)[amax > 0])
    back = xq.float() * scale
    bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert bool(((back - x).abs() <= bound).all()), float(((back - x).abs() / bound).max())
    assert bool((back[3] == 0).all())  # a zero row: scale MIN_AMAX/448, no NaN
    # each row's largest entry maps to +-448 exactly
    assert torch.equal(xq.float().abs().amax(dim=1)[amax[:, 0] > 0], torch.full((7,), 448.0))


def test_quantise_rows_scaled_folds_the_column_scale() -> None:
    x = torch.randn(5, 32)
    col = torch.logspace(-2, 2, 32)
    xq, scale = quantise_rows_scaled(x.bfloat16(), col)
    want_q, want_scale = quantise_rows(x.bfloat16().float() * col)
    assert torch.equal(xq.float(), want_q.float()) and torch.equal(scale, want_scale)


# ----------------------------------------------------------------------------------------------- the linear
def _fp8_linear(bias: bool = False) -> tuple[nn.Linear, Float8FrozenLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(K, N, bias=bias).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(_spread_rows(N, K, -3, 3, seed=1))
    return linear, Float8FrozenLinear.from_linear(linear)


@needs_cpu_fp8
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_forward_matches_the_reference_within_fp8_tolerance(bias: bool) -> None:
    linear, fp8 = _fp8_linear(bias)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.is_contiguous() and fp8.weight.shape == (N, K)
    assert fp8.weight_scale.shape == (N,) and not fp8.weight.requires_grad
    x = _spread_rows(M, K, -3, 3, seed=2)
    out = fp8(x)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    ref = x @ linear.weight.t()
    bias_part = linear.bias if bias else 0.0
    _assert_fp8_close(out - bias_part, ref, x, linear.weight, "forward")
    # bf16 input (the GPU's compute dtype): bf16 output, same accuracy; 3-d input keeps its leading shape. (With a
    # bias, bf16 rounding of bias + tiny rows would swamp those rows: that case is checked in float32 above.)
    out16 = fp8(x.bfloat16().view(4, M // 4, K))
    assert out16.dtype == torch.bfloat16 and out16.shape == (4, M // 4, N)
    if not bias:
        _assert_fp8_close(out16.view(M, N), ref, x, linear.weight, "forward bf16")


@needs_cpu_fp8
def test_input_gradient_matches_the_reference() -> None:
    linear, fp8 = _fp8_linear()
    x = _spread_rows(M, K, -1, 1, seed=3).requires_grad_(True)
    grad = _spread_rows(M, N, 2, -2, seed=4)
    fp8(x).backward(grad)
    ref = grad @ linear.weight
    # dX = dY W: the natural size of an entry is |dY_m| |W[:, k]| / sqrt(N)
    _assert_fp8_close(x.grad, ref, grad, linear.weight.t(), "input gradient")
    assert fp8.weight.grad is None


@needs_cpu_fp8
def test_autocast_output_is_the_autocast_dtype() -> None:
    _, fp8 = _fp8_linear()
    x = torch.randn(6, K, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp8(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32


@needs_cpu_fp8
def test_gemm_operands_are_k_major_as_hopper_needs(monkeypatch) -> None:
    """CPU's _scaled_mm takes any layout; Hopper's needs mat1 row-major, mat2 column-major, rowwise scales."""
    calls = []
    real = torch._scaled_mm

    def spy(a, b, *, scale_a, scale_b, out_dtype, **kw):
        calls.append((a.stride(1) == 1, b.stride(0) == 1, tuple(scale_a.shape) == (a.shape[0], 1),
                      tuple(scale_b.shape) == (1, b.shape[1]), out_dtype))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    _, fp8 = _fp8_linear()
    x = torch.randn(7, K, requires_grad=True)
    fp8(x).sum().backward()
    assert calls == [(True, True, True, True, torch.bfloat16)] * 2


# ----------------------------------------------------------------------------------------------- fused LoRA
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 48, bias=False)

    def forward(self, x):
        return self.proj(x)


def _fp8_peft_block():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Block(), LoraConfig(r=4, lora_alpha=24, lora_dropout=0.0, target_modules=["proj"]))
    with torch.no_grad():
        model.base_model.model.proj.lora_B["default"].weight.normal_()
    assert fp8_base.convert_lora_bases(model).linears == 1
    return model


def _out_and_grads(model, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7))).sum().backward()
    layer = model.base_model.model.proj
    return out.detach(), {"A": layer.lora_A["default"].weight.grad, "B": layer.lora_B["default"].weight.grad,
                          "x": x.grad}


@needs_cpu_fp8
def test_fused_lora_with_fp8_base_equals_fp8_base_plus_peft_lora(monkeypatch) -> None:
    """Same FP8 base GEMMs, LoRA in float32: the fused function equals peft's forward to float32 rounding."""
    model = _fp8_peft_block()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 5, 32)
    lora_fused.unpatch()
    out_ref, grads_ref = _out_and_grads(reference, x)
    calls = []
    original = fp8_base._Float8LoraLinear.apply
    monkeypatch.setattr(fp8_base._Float8LoraLinear, "apply", lambda *a: calls.append(a[-1]) or original(*a))
    assert lora_fused.patch()
    out, grads = _out_and_grads(model, x)
    assert calls == [6.0]  # the fused path ran, with peft's scaling
    for what, got, want in [("output", out, out_ref), *((k, grads[k], grads_ref[k]) for k in grads_ref)]:
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, atol=1e-6 * scale, rtol=1e-5, msg=lambda m, w=what: f"{w}: {m}")


def _tiny_peft_model(config, targets: str):
    """The tiny Phi-3 in bf16 (seed 0) with LoRA r=8 on ``targets``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16),
                          LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))


# qkv_proj adapted in layer 0 only: layer 1's input norm offers an input its plain qkv_proj never takes, and the
# attention output o_proj reads next has the same shape -- only the identity check keeps o_proj from taking it.
_QKV_IN_LAYER_0 = r".*\.(0\.self_attn\.qkv_proj|o_proj|gate_up_proj|down_proj)"


@needs_cpu_fp8
@needs_hf_home
@pytest.mark.parametrize("targets", ["all-linear", _QKV_IN_LAYER_0], ids=["all-linear", "qkv-in-layer-0"])
def test_norm_and_swiglu_hand_their_quantised_output_to_the_next_fp8_linear(monkeypatch, targets: str) -> None:
    """With the fast path's layers on, qkv_proj, gate_up_proj and down_proj take the e4m3 input their norm /
    SwiGLU made (o_proj quantises its own); on a CPU (eager) the numbers equal quantising in the linear."""
    from phi3tune.fastpath import fp8_quantise, phi3_layers

    config = tiny_phi3_config()
    assert config.num_hidden_layers == 2  # hidden_size is also the attention output's width (no head_dim override)
    model = _tiny_peft_model(config, targets)
    assert phi3_layers.patch() and lora_fused.patch()
    done = fp8_base.convert_lora_bases(model)
    assert done.linears == (8 if targets == "all-linear" else 7)
    ids = torch.randint(0, 1000, (2, 16))
    own = []
    quantise = fp8_quantise.rows
    monkeypatch.setattr(fp8_quantise, "rows", lambda x: own.append(x.shape[-1]) or quantise(x))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = model(input_ids=ids).logits.float()
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    handed, handed_grads = run()
    assert own == [config.hidden_size] * config.num_hidden_layers  # o_proj's input (the attention output) only
    assert not fp8_quantise._ready()  # every offer taken, or replaced by the next
    own.clear()
    replaced = dict(phi3_layers._REPLACED)
    phi3_layers._REPLACED.clear()  # each linear quantises its own input
    itself, itself_grads = run()
    assert len(own) == done.linears
    assert torch.equal(handed, itself)
    assert all(torch.equal(a, b) for a, b in zip(handed_grads, itself_grads))

    phi3_layers._REPLACED.update(replaced)
    fp8_quantise._offer(*fp8_quantise.rmsnorm_quantised(torch.randn(4, 8), torch.ones(8), 1e-5))
    phi3_layers.unpatch()  # the end of a run: nothing handed over outlives it
    assert not fp8_quantise._ready() and not phi3_layers._REPLACED


def test_only_kernels_whose_linear_is_fp8_quantise() -> None:
    from phi3tune.fastpath import fp8_quantise, phi3_layers

    fp8_quantise.quantise_in_kernels(qkv_proj=False, gate_up_proj=True, down_proj=False)
    assert set(phi3_layers._REPLACED) == {"add_rmsnorm"}
    phi3_layers.unpatch()
    fp8_quantise.quantise_in_kernels(qkv_proj=False, gate_up_proj=False, down_proj=False)
    assert not phi3_layers._REPLACED


@needs_cpu_fp8
# ----------------------------------------------------------------------------------------------- conversion
@needs_hf_home
def test_conversion_frees_bf16_weights_and_keeps_the_adapter(tmp_path) -> None:
    from safetensors.torch import load_file

    config = tiny_phi3_config()
    peft_model = _tiny_peft_model(config, "all-linear")
    bases = {n: m.base_layer for n, m in peft_model.named_modules() if hasattr(m, "base_layer")}
    refs = [weakref.ref(b.weight) for b in bases.values()]
    params = sum(b.weight.numel() for b in bases.values())
    channels = sum(b.out_features for b in bases.values())
    peft_model.save_pretrained(tmp_path / "before")
    done = fp8_base.convert_lora_bases(peft_model)
    del bases
    gc.collect()

    assert done.linears == 4 * config.num_hidden_layers and not done.kept
    assert done.bytes_before == 2 * params and done.bytes_after == params + 4 * channels  # e4m3 + float32 scales
    assert all(r() is None for r in refs), "a bf16 base weight is still alive"
    assert "fp8 base: 8 linears" in done.summary()
    dtypes = {n: p.dtype for n, p in peft_model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith("base_layer.weight")} == {torch.float8_e4m3fn}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}  # peft's LoRA weights, untouched
    rest = {d for n, d in dtypes.items() if "lora_" not in n and not n.endswith("base_layer.weight")}
    assert rest == {torch.bfloat16}  # embeddings, norms, lm_head
    ignored = set(peft_model._ddp_params_and_buffers_to_ignore)
    assert len(ignored) == 2 * done.linears
    assert ignored <= set(dict(peft_model.named_parameters())) | set(dict(peft_model.named_buffers()))

    peft_model.save_pretrained(tmp_path / "after")
    before = load_file(str(tmp_path / "before" / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "after" / "adapter_model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in after.items()} == {k: (v.shape, v.dtype) for k, v in before.items()}

    ids = torch.randint(0, 1000, (2, 16))
    for fused in (True, False):
        lora_fused.patch() if fused else lora_fused.unpatch()
        peft_model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        trained = {n for n, p in peft_model.named_parameters() if p.grad is not None}
        assert trained and all("lora_" in n for n in trained)
    assert fp8_base.convert_lora_bases(peft_model).linears == 0  # once: a converted base stays as it is


def test_layers_that_cannot_convert_are_kept() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(nn.Linear(24, 48), nn.Linear(48, 32)),
                           LoraConfig(r=2, target_modules=["0", "1"]))
    done = fp8_base.convert_lora_bases(model)
    assert done.linears == 1 and len(done.kept) == 1 and "not a multiple of 16" in done.kept[0]


@needs_cpu_fp8
@needs_hf_home
def test_train_converts_after_peft_and_saves_an_ordinary_adapter(monkeypatch, train_file, tmp_path) -> None:
    """The recipe's wiring, on a CPU with the device check lifted: converted, trained, adapter of LoRA keys only."""
    from safetensors.torch import load_file

    monkeypatch.setattr(fp8_base, "require_fp8_gpu", lambda: None)
    out = tmp_path / "run"
    result = cli(train_args(train_file, out, "--set", "model.base_precision=fp8",
                            "--set", "training_config.max_steps=2"))
    assert result.exit_code == 0, result.output
    assert "fp8 base: 8 linears" in result.output
    assert "base_precision: fp8" in (out / "run_config.yaml").read_text()
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter), sorted(adapter)[:4]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in adapter.values())


# ----------------------------------------------------------------------------------------------- config and plan
def _config(*sets: str):
    return load_config(TINY_CONFIG, list(sets))


def test_base_precision_defaults_to_bf16_and_is_recorded() -> None:
    assert _config().model.base_precision == "bf16"
    assert _config("model.base_precision=fp8").to_dict()["model"]["base_precision"] == "fp8"


@pytest.mark.parametrize("sets, expected", [
    (["model.base_precision=fp16"], "model.base_precision: Input should be 'bf16' or 'fp8'"),
    (["model.base_precision=fp8", "model.quantization=4bit"],
     "base_precision fp8 cannot be combined with quantization 4bit"),
    (["model.base_precision=fp8", "peft_config.use_dora=true"], "peft_config.use_dora: DoRA reads"),
    (["model.base_precision=fp8", "training_config.fsdp=full_shard"], "training_config.fsdp: sharding cannot"),
], ids=["bad-value", "with-qlora", "with-dora", "with-fsdp"])
def test_config_errors(sets, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(*sets)
    assert expected in str(info.value) and info.value.exit_code == 2


def test_bad_value_exits_2_through_the_cli() -> None:
    result = cli(["train", str(TINY_CONFIG), "--dry-run", "--set", "model.base_precision=e5m2"])
    assert result.exit_code == 2 and "model.base_precision" in result.output and "'fp8'" in result.output


@pytest.mark.skipif(HOPPER, reason="this machine has an FP8 GPU")
@needs_hf_home
def test_dry_run_without_a_gpu_plans_fp8_for_the_gpu_it_will_run_on() -> None:
    """Planning on a laptop for a Hopper card: the plan and its memory, and a note that the card is not checked."""
    result = cli(["train", str(TINY_CONFIG), "--dry-run", "--gpu-memory", "80", "--set", "model.base_precision=fp8"])
    assert result.exit_code == 0, result.output
    assert "fp8 needs a Hopper GPU, compute capability 9.0+: not checked here" in " ".join(result.output.split())


@pytest.mark.skipif(HOPPER, reason="this machine has an FP8 GPU")
def test_training_without_an_fp8_gpu_exits_2_naming_the_fix() -> None:
    with pytest.raises(UsageError) as info:
        policy.plan_fast_path(SimpleNamespace(base_precision="fp8"), {}, "cuda")  # a GPU run, but no Hopper here
    message = str(info.value) + (info.value.hint or "")
    assert "model.base_precision: fp8 needs a CUDA GPU of compute capability 9.0" in message
    assert "set model.base_precision: bf16" in message


@pytest.mark.skipif(HOPPER, reason="this machine has an FP8 GPU")
def test_plan_on_a_cpu_refuses_fp8() -> None:
    with pytest.raises(UsageError) as info:
        policy.plan_fast_path(SimpleNamespace(base_precision="fp8"), {}, "cpu")
    assert info.value.exit_code == 2 and "no CUDA GPU is visible" in str(info.value)


def test_pre_hopper_gpu_is_refused_by_name(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UsageError) as info:
        fp8_base.require_fp8_gpu()
    assert "NVIDIA A100-SXM4-80GB) has compute capability 8.0" in str(info.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_base.fp8_unavailable_reason() is None


def test_memory_model_counts_one_byte_a_converted_parameter() -> None:
    shape = memory.PHI3_MINI
    bf16 = memory.estimate(8192, quantized=False, checkpointing="none")
    fp8 = memory.estimate(8192, quantized=False, checkpointing="none", fp8=True)
    assert fp8.weights == (shape.params - shape.unquantized_params) + 2 * shape.unquantized_params
    assert bf16.weights - fp8.weights == shape.params - shape.unquantized_params
    assert fp8.activations == bf16.activations


def test_cli_imports_nothing_fp8() -> None:
    code = ("import sys, phi3tune.cli, phi3tune.fastpath, phi3tune.plan, phi3tune.config.load; "
            "print([m for m in ('phi3tune.fastpath.fp8_base', 'phi3tune.fastpath.fp8_quantise', "
            "'phi3tune.fastpath.fp8_kernels', 'triton') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------- GPU (sm90+)
@needs_hopper
def test_gpu_float8_linear_on_phi3_shapes() -> None:  # pragma: no cover - GPU only
    torch.manual_seed(0)
    linear = nn.Linear(3072, 9216, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    fp8 = Float8FrozenLinear.from_linear(linear)
    x = torch.randn(1024, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1024, 9216, device="cuda", dtype=torch.bfloat16)
    out = fp8(x)
    out.backward(grad)
    w = linear.weight.float()
    _assert_fp8_close(out, x.float() @ w.t(), x.detach(), w, "forward (cuda)")
    _assert_fp8_close(x.grad, grad.float() @ w, grad, w.t(), "input gradient (cuda)")
    from phi3tune.fastpath import fp8_kernels

    assert fp8_kernels.available()  # the Triton kernels ran, not the compiled fallback


@needs_hopper
@pytest.mark.parametrize("cols", [96, 3072, 8192, 16384])
def test_gpu_triton_kernels_match_the_torch_reference_bit_for_bit(cols: int) -> None:  # pragma: no cover - GPU only
    """The Triton quantiser and transpose (fp8_kernels.py) against fp8_base's torch functions, rows of six decades,
    a zero row, and a column scale (dY's path)."""
    from phi3tune.fastpath import fp8_kernels

    x = _spread_rows(300, cols, -3, 3, seed=cols, device="cuda").to(torch.bfloat16)
    x[7] = 0
    column_scale = torch.rand(cols, device="cuda") + 0.25
    for got, want in ((fp8_kernels.quantise_rows(x), quantise_rows(x)),
                      (fp8_kernels.quantise_rows(x, column_scale), quantise_rows_scaled(x, column_scale))):
        assert torch.equal(got[1], want[1]), "scales differ"
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)), "e4m3 values differ"
    wide = x[:, 1:][:, ::2]  # a strided input is made contiguous first
    assert torch.equal(fp8_kernels.quantise_rows(wide)[0].view(torch.uint8), quantise_rows(wide)[0].view(torch.uint8))
    weight = quantise_rows(_spread_rows(cols + 40, 200, -2, 2, seed=1, device="cuda"))[0]
    assert torch.equal(fp8_kernels.transpose(weight).view(torch.uint8), weight.t().contiguous().view(torch.uint8))
    x[3, 5], x[4, 6] = float("nan"), float("inf")  # Triton's max / min drop NaN: the kernel must not
    got, want = fp8_kernels.quantise_rows(x), quantise_rows(x)
    assert torch.equal(got[1].isnan(), want[1].isnan()) and got[1][3].isnan() and torch.isinf(got[1][4])
    assert torch.equal(got[0].float().isnan(), want[0].float().isnan()) and got[0][3].float().isnan().all()


def test_a_triton_kernel_that_fails_leaves_the_torch_functions_in_its_place(monkeypatch, caplog) -> None:
    from phi3tune.fastpath import fp8_quantise

    def broken(*args):
        raise RuntimeError("PTX assembly failed\nlong log")

    monkeypatch.setattr(fp8_quantise, "_TRITON_FAILED", [])
    monkeypatch.setattr(fp8_quantise, "_triton", lambda x: SimpleNamespace(MAX_ROW=32768, quantise_rows=broken,
                                                                          transpose=broken))
    x = _spread_rows(16, 32, -2, 2, seed=3)
    got = fp8_quantise.rows_scaled(x, torch.ones(32))
    want = quantise_rows(x)
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
    assert fp8_quantise._TRITON_FAILED == ["RuntimeError: PTX assembly failed"]
    assert "Triton kernel broken failed (RuntimeError: PTX assembly failed)" in caplog.text
    assert torch.equal(fp8_quantise.transposed(want[0]).view(torch.uint8), want[0].t().contiguous().view(torch.uint8))
    monkeypatch.undo()
    monkeypatch.setattr(fp8_quantise, "_TRITON_FAILED", ["RuntimeError: earlier"])
    assert fp8_quantise._triton(SimpleNamespace(device=torch.device("cuda"))) is None  # not tried again


@needs_hopper
def test_gpu_conversion_halves_base_weight_memory() -> None:  # pragma: no cover - GPU only
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(nn.Linear(4096, 4096, bias=False)).cuda().bfloat16(),
                           LoraConfig(r=8, target_modules=["0"]))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    done = fp8_base.convert_lora_bases(model)
    gc.collect()
    freed = before - torch.cuda.memory_allocated()
    assert done.linears == 1 and abs(freed - 4096 * 4096) < 2**20, freed


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):  # pragma: no cover - GPU only
    """The tiny recipe for 20 steps on the GPU's fast path, in bf16 and with the fp8 base."""
    runs = {}
    for precision in ("bf16", "fp8"):
        out = tmp_path_factory.mktemp("fp8runs") / precision
        sets = ["model.dtype=bfloat16", "model.attn_implementation=auto", "training_config.bf16=true",
                "training_config.max_steps=20", "training_config.logging_steps=1", "training_config.eval_strategy=no",
                "training_config.save_strategy=no", f"model.base_precision={precision}"]
        result = cli(["train", str(TINY_CONFIG), "--output-dir", str(out), *[a for s in sets for a in ("--set", s)]])
        assert result.exit_code == 0, result.output
        runs[precision] = (out, result.output)
    return runs


@needs_hopper
@needs_hf_home
def test_gpu_fp8_training_losses_follow_bf16(gpu_runs) -> None:  # pragma: no cover - GPU only
    (bf16_run, _), (fp8_run, fp8_log) = gpu_runs["bf16"], gpu_runs["fp8"]
    assert "fp8 base: 8 linears" in fp8_log
    assert "base_precision: fp8" in (fp8_run / "run_config.yaml").read_text()
    want, got = losses(bf16_run), losses(fp8_run)
    assert sorted(got) == sorted(want) and len(want) == 20
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
    assert worst < 0.03, {s: (got[s], want[s]) for s in want}


@needs_hopper
@needs_hf_home
def test_gpu_fp8_trained_adapter_merges_and_verifies(gpu_runs, tmp_path) -> None:  # pragma: no cover - GPU only
    fp8_run, _ = gpu_runs["fp8"]
    bf16_run, _ = gpu_runs["bf16"]
    from safetensors.torch import load_file

    keys = {k: v.shape for k, v in load_file(str(fp8_run / "adapter" / "adapter_model.safetensors")).items()}
    assert keys == {k: v.shape for k, v in load_file(str(bf16_run / "adapter" / "adapter_model.safetensors")).items()}
    result = cli(["merge-adapter", str(fp8_run), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
