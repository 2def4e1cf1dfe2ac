"""phi3tune/fastpath/swiglu_backward.py: the SwiGLU's one-pass backward equals autograd's.

On a CPU the torch reference runs (and is checked against autograd of ``phi3_layers.swiglu``); on a GPU the Triton
kernel is checked against that reference, and the MLP forward is checked to take it.
"""

from __future__ import annotations

import pytest
import torch

from phi3tune.fastpath import phi3_layers, swiglu_backward

needs_triton = pytest.mark.skipif(not swiglu_backward.triton_available(), reason="needs a CUDA GPU with Triton")


def _autograd_grad(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    leaf = gate_up.detach().clone().requires_grad_()
    phi3_layers.swiglu(leaf).backward(grad)
    return leaf.grad


def test_reference_equals_autograd_in_float64() -> None:
    torch.manual_seed(0)
    gate_up = torch.randn(5, 7, 2 * 24, dtype=torch.float64) * 4  # sigmoid's tails included
    grad = torch.randn(5, 7, 24, dtype=torch.float64)
    got = swiglu_backward.backward_reference(gate_up, grad)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _autograd_grad(gate_up, grad))


def test_apply_gives_the_forward_its_value_and_this_backward() -> None:
    torch.manual_seed(1)
    gate_up = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    calls = []

    def forward(x):
        calls.append(torch.is_grad_enabled())
        return phi3_layers.swiglu(x)

    out = swiglu_backward.apply(gate_up, forward)
    assert calls == [False]  # the forward is not recorded: only this backward runs
    torch.testing.assert_close(out, phi3_layers.swiglu(gate_up.detach()))
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(gate_up.grad, _autograd_grad(gate_up, grad))


def test_mlp_on_cpu_keeps_autograd_of_the_plain_function() -> None:
    assert not swiglu_backward.usable(torch.zeros(2, 8))


def _kernel_stand_in(gate_up, grad):
    """What the Triton kernel gives (the same numbers, no autograd graph), runnable on a CPU."""
    with torch.no_grad():
        return swiglu_backward.backward_reference(gate_up, grad)


def test_a_failing_kernel_warns_once_and_the_reference_answers(monkeypatch, caplog) -> None:
    monkeypatch.setattr(swiglu_backward, "_FAILED", False)
    monkeypatch.setattr(swiglu_backward, "ENABLED", True)
    monkeypatch.setattr(swiglu_backward, "triton_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # usable() on a CPU tensor
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(swiglu_backward, "_kernel_backward", broken)
    gate_up, grad = torch.randn(4, 2 * 6), torch.randn(4, 6)
    assert swiglu_backward.usable(gate_up)
    with caplog.at_level("WARNING"):
        got = swiglu_backward.backward(gate_up, grad)
        again = swiglu_backward.backward(gate_up, grad)
    torch.testing.assert_close(got, swiglu_backward.backward_reference(gate_up, grad))
    torch.testing.assert_close(again, got)
    assert calls == [1]  # not tried again
    assert not swiglu_backward.usable(gate_up)  # the MLP takes the compiled function's own backward from now on
    assert sum("SwiGLU backward kernel failed" in r.message for r in caplog.records) == 1


def test_out_of_memory_in_the_kernel_is_not_a_kernel_failure(monkeypatch) -> None:
    monkeypatch.setattr(swiglu_backward, "_FAILED", False)
    monkeypatch.setattr(swiglu_backward, "usable", lambda t: True)

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(swiglu_backward, "_kernel_backward", oom)
    with pytest.raises(torch.OutOfMemoryError):
        swiglu_backward.backward(torch.randn(2, 4), torch.randn(2, 2))
    assert not swiglu_backward._FAILED


def test_second_derivatives_through_apply_match_autograd(monkeypatch) -> None:
    """A gradient penalty (create_graph=True) differentiates the backward: the kernel's output has no graph, so
    that case must take the reference, not the kernel."""
    monkeypatch.setattr(swiglu_backward, "usable", lambda t: True)
    monkeypatch.setattr(swiglu_backward, "_kernel_backward", _kernel_stand_in)
    torch.manual_seed(5)
    start = torch.randn(3, 2 * 5, dtype=torch.float64)

    def penalised(fn):
        gate_up = start.clone().requires_grad_()
        y = fn(gate_up)
        (g,) = torch.autograd.grad(y.square().sum(), gate_up, create_graph=True)
        (g.square().sum() + y.sum()).backward()
        return gate_up.grad

    want = penalised(phi3_layers.swiglu)
    got = penalised(lambda gu: swiglu_backward.apply(gu, phi3_layers.swiglu))
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------- GPU
@needs_triton
@pytest.mark.parametrize("shape", [(1, 517, 2 * 8192), (3, 5, 2 * 96)])
def test_gpu_kernel_matches_reference(shape) -> None:  # pragma: no cover - GPU only
    torch.manual_seed(2)
    gate_up = (torch.randn(shape, device="cuda") * 3).bfloat16()
    grad = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda").bfloat16()
    got = swiglu_backward.backward(gate_up, grad)
    want = swiglu_backward.backward_reference(gate_up, grad)
    assert got.shape == gate_up.shape and got.dtype == torch.bfloat16
    # float32 math rounded once on both sides; sigmoid's implementations may differ in the last float32 bit
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-5)
    # a strided incoming gradient (a slice of a wider tensor) gives the same
    wide = torch.randn(*shape[:-1], shape[-1], device="cuda").bfloat16()
    wide[..., : shape[-1] // 2] = grad
    torch.testing.assert_close(swiglu_backward.backward(gate_up, wide[..., : shape[-1] // 2]), got, rtol=0, atol=0)


@needs_triton
def test_gpu_mlp_forward_takes_this_backward_and_grads_match(monkeypatch) -> None:  # pragma: no cover - GPU only
    from types import SimpleNamespace

    torch.manual_seed(3)
    hidden, inter = 64, 96
    linear = dict(bias=False, device="cuda", dtype=torch.bfloat16)
    mlp = SimpleNamespace(config=SimpleNamespace(hidden_act="silu"),
                          gate_up_proj=torch.nn.Linear(hidden, 2 * inter, **linear),
                          down_proj=torch.nn.Linear(inter, hidden, **linear))
    x = torch.randn(2, 33, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    used = []
    monkeypatch.setattr(swiglu_backward, "backward",
                        lambda *a: used.append(1) or swiglu_backward.backward_reference(*a))
    out = phi3_layers.mlp_forward(mlp, x)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert used == [1]
    # the reference: autograd through the same compiled forward (Inductor's backward)
    ref_x = x.detach().clone().requires_grad_()
    ref = mlp.down_proj(phi3_layers._swiglu(mlp.gate_up_proj(ref_x)))
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    ref.backward(grad)
    scale = float(ref_x.grad.abs().max())
    assert scale > 0
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=2e-2, atol=2e-2 * scale)
