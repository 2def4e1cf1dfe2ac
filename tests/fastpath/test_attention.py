"""phi3tune's fast path: varlen attention parity with transformers' sdpa, loss parity, and the speed policy.

CPU tests run the attention function's reference path (per-sample sdpa with the same window as the CUDA
kernel); the CUDA kernel itself is checked against that reference in the GPU-only test at the end (and in
``scripts/bench.py probe``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import needs_hf_home
from helpers import tiny_phi3_config
from phi3tune.fastpath import attention, peft_cast


# --------------------------------------------------------------------------------------------- helpers
def _tiny_config(sliding_window: int | None = 8):
    return tiny_phi3_config(sliding_window=sliding_window)


def _pair(sliding_window: int | None = 8, seed: int = 0):
    """The same random tiny Phi-3 twice: sdpa (transformers' own masks) and varlen."""
    from transformers import AutoModelForCausalLM

    attention.patch()
    cfg = _tiny_config(sliding_window)
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    fast = AutoModelForCausalLM.from_config(cfg, attn_implementation=attention.VARLEN, dtype=torch.float32).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _packed(lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 32000, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return ids, pos, cu


def _dense_reference(q, k, v, cu, window_left):
    """Dense masked attention over the flat stream, float64: block-diagonal causal (+ window)."""
    total = q.shape[0]
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff().long())
    i = torch.arange(total)
    mask = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])
    if window_left >= 0:
        mask &= i[None, :] >= i[:, None] - window_left
    qd, kd, vd = (x.double().transpose(0, 1) for x in (q, k, v))
    scores = (qd @ kd.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vd).transpose(0, 1)


# --------------------------------------------------------------------------------------------- unit
def test_segments_from_position_ids_matches_transformers() -> None:
    from transformers.masking_utils import find_packed_sequence_indices

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    cu, max_len = attention.segments_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 6, 10] and cu.dtype == torch.int32 and max_len == 4
    seq = find_packed_sequence_indices(pos)[0]
    assert torch.equal(torch.repeat_interleave(torch.arange(4), cu.diff().long()), seq)


@pytest.mark.parametrize("window_left", [-1, 3, 6])
def test_reference_varlen_matches_dense_masked_attention(window_left: int) -> None:
    torch.manual_seed(1)
    lengths = [7, 1, 12, 4]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 3, 8, dtype=torch.float64) for _ in range(3))
    out = attention.reference_varlen_attention(q, k, v, cu, window_left=window_left)
    ref = _dense_reference(q, k, v, cu, window_left)
    assert torch.allclose(out, ref, atol=1e-10)


def test_window_matches_transformers_sliding_window_rule() -> None:
    # transformers: query i sees key j iff i - sliding_window < j <= i  ->  kernel left window = sliding_window - 1
    assert attention._window(2047, 2048) == 2046
    assert attention._window(2047, 2047) == -1  # no sample reaches the window: plain causal
    assert attention._window(None, 5000) == -1


def test_mask_builder_materialises_no_mask_for_packed_training_calls() -> None:
    assert attention.varlen_mask(batch_size=1, q_length=8192, kv_length=8192, attention_mask=None) is None
    full = torch.ones(2, 16, dtype=torch.bool)
    assert attention.varlen_mask(batch_size=2, q_length=16, kv_length=16, attention_mask=full) is None


# --------------------------------------------------------------------------------------------- model parity
@needs_hf_home
def test_packed_rows_match_sdpa_including_rows_longer_than_the_window() -> None:
    ref, fast = _pair(sliding_window=8)
    lengths = [5, 20, 3, 13, 1]  # 20 and 13 > the window of 8
    ids, pos, cu = _packed(lengths)
    with torch.no_grad():
        expected = ref(input_ids=ids, position_ids=pos).logits
        from_positions = fast(input_ids=ids, position_ids=pos).logits
        from_cu = fast(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=max(lengths), max_length_k=max(lengths)).logits  # fmt: skip
    assert torch.allclose(from_positions, expected, atol=2e-5)
    assert torch.allclose(from_cu, expected, atol=2e-5)
    # each sample alone (no packing) gives the same logits: no attention across sample boundaries
    with torch.no_grad():
        alone = torch.cat([ref(input_ids=ids[:, s:e]).logits for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    assert torch.allclose(from_cu, alone, atol=2e-5)


@needs_hf_home
def test_the_sliding_window_is_applied() -> None:
    _, fast = _pair(sliding_window=8)
    ref_no_window, _ = _pair(sliding_window=None)
    ids, pos, _ = _packed([20])
    with torch.no_grad():
        windowed = fast(input_ids=ids, position_ids=pos).logits
        unwindowed = ref_no_window(input_ids=ids, position_ids=pos).logits
    # identical up to the window, different beyond it
    assert torch.allclose(windowed[:, :8], unwindowed[:, :8], atol=2e-5)
    assert (windowed[:, 9:] - unwindowed[:, 9:]).abs().max() > 1e-3


@needs_hf_home
def test_padded_batches_and_generation_match_sdpa() -> None:
    ref, fast = _pair(sliding_window=8)
    torch.manual_seed(3)
    ids = torch.randint(10, 32000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = fast(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a * mask[..., None], b * mask[..., None], atol=2e-5)
    out_ref = ref.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
    out_fast = fast.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
    assert torch.equal(out_ref, out_fast)


def test_peft_input_cast_patch_changes_no_number_under_autocast() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "2"], lora_dropout=0.0, init_lora_weights=False))
    x = torch.randn(8, 32, dtype=torch.bfloat16, requires_grad=True)

    def run():
        x.grad = None
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().sum().backward()
        return [y.detach().clone(), x.grad.clone()] + [p.grad.clone() for n, p in model.named_parameters() if "lora" in n]

    before = run()
    assert peft_cast.patch()
    after = run()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# --------------------------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(not attention.varlen_kernel_available("cuda"), reason="needs a CUDA GPU (sm80+) with torch varlen_attn")
def test_cuda_varlen_kernel_matches_reference() -> None:  # pragma: no cover - GPU only
    torch.manual_seed(0)
    lengths = [300, 1, 77, 129]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lengths), 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for window in (-1, 50):
        out = attention._run_kernel(q, k, v, cu, cu, max(lengths), max(lengths), 64**-0.5, window)
        ref = attention.reference_varlen_attention(q.float(), k.float(), v.float(), cu, 64**-0.5, window)
        assert float((out.float() - ref).norm() / ref.norm()) < 1e-2


