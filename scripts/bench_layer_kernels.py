#!/usr/bin/env python3
"""Kernels of one Phi-3-mini decoder layer at the recipe's micro-batch (issue 16), against their alternatives.

    python scripts/bench_layer_kernels.py attention --out OUT   # -> OUT/attention.json
    python scripts/bench_layer_kernels.py swiglu --out OUT      # -> OUT/swiglu.json
    python scripts/bench_layer_kernels.py attention --cpu-smoke # checks the script on tiny shapes

swiglu: the SwiGLU's backward at 8,192 tokens (gate_up 8,192 x 16,384, bf16): Inductor's (``torch.compile`` of
``phi3_layers.swiglu``, the gradient of its output taken alone), phi3tune's Triton kernel
(``fastpath/swiglu_backward.py``) and the eager torch reference; GPU ms a call (CUDA events, calls back to back),
the effective bandwidth, and the largest difference to Inductor's result.

attention: one decoder layer's attention of the recipe's micro-batch: 8,192 packed tokens, 32 heads of 96, bf16, causal
inside each sample. Sample lengths: ``long`` (4 x 2,047), ``short`` (16 x 512), ``mixed`` (random 32..2,047).
Rows:

- ``flash``: ``torch.nn.attention.varlen.varlen_attn`` (the fast path's kernel today, FlashAttention 2).
- ``cudnn``: ``aten::_cudnn_attention_forward/backward`` with ragged offsets (cum_seq_q/k), the kernel
  PyTorch's nested-tensor sdpa uses; no sliding window, so it only applies where no sample reaches
  Phi-3's window (2,047).
- ``cudnn-padded``: the same with the offsets padded to a fixed count by empty samples and a fixed max
  length, so that cuDNN's execution graph (built per shape) is reused across micro-batches.

Per row: the GPU's median ms for forward and forward + backward (CUDA events over back-to-back calls), the first
call's wall ms (graph build), and the norm-wise relative error of the output and of dq/dk/dv against a float32
reference (per-sample sdpa).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_fp8 import _rel, _timer  # noqa: E402


def sample_lengths(kind: str, tokens: int, longest: int, seed: int = 0) -> list[int]:
    if kind == "long":
        lengths = [longest] * (tokens // longest)
    elif kind == "short":
        lengths = [512] * (tokens // 512)
    else:
        rng = random.Random(seed)
        lengths = []
        while sum(lengths) < tokens:
            lengths.append(min(rng.randint(32, longest), tokens - sum(lengths)))
    if sum(lengths) < tokens:
        lengths.append(tokens - sum(lengths))
    return lengths


class CudnnVarlen:
    """Causal ragged attention through cuDNN: (T, H, D) contiguous q/k/v, int32 cumulative offsets."""

    @staticmethod
    def build():
        import torch

        class _Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, cu, max_len, scale):
                res = torch.ops.aten._cudnn_attention_forward(
                    q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True, False, scale=scale)
                out, lse, seed, offset = res[0], res[1], res[6], res[7]
                ctx.save_for_backward(q, k, v, out, lse, seed, offset, cu)
                ctx.max_len, ctx.scale = max_len, scale
                return out

            @staticmethod
            def backward(ctx, grad):
                q, k, v, out, lse, seed, offset, cu = ctx.saved_tensors
                dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
                    grad.contiguous(), q, k, v, out, lse, seed, offset, None, cu, cu, ctx.max_len, ctx.max_len,
                    0.0, True, scale=ctx.scale)
                return dq, dk, dv, None, None, None

        return _Fn.apply


def swiglu(args: argparse.Namespace) -> dict:
    import torch

    from phi3tune.fastpath import phi3_layers, swiglu_backward

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    tokens, half = (64, 96) if smoke else (args.tokens, 8192)
    timer = _timer(device, args.iters, 3, args.back_to_back)
    torch.manual_seed(0)
    dtype = torch.float32 if smoke else torch.bfloat16
    gate_up = (torch.randn(tokens, 2 * half, device=device) * 3).to(dtype).requires_grad_()
    grad = torch.randn(tokens, half, device=device).to(dtype)
    compiled = torch.compile(phi3_layers.swiglu) if not smoke else phi3_layers.swiglu
    out = compiled(gate_up)
    inductor = lambda: torch.autograd.grad(out, gate_up, grad, retain_graph=True)[0]  # noqa: E731
    kernel = lambda: swiglu_backward.backward(gate_up.detach(), grad)  # noqa: E731
    reference = lambda: swiglu_backward.backward_reference(gate_up.detach(), grad)  # noqa: E731
    want = inductor()
    moved = 2 * gate_up.numel() * gate_up.element_size() + grad.numel() * grad.element_size()
    rows = {}
    for name, fn in (("inductor", inductor), ("kernel", kernel), ("reference", reference)):
        ms = timer(fn)
        got = fn()
        rows[name] = {"ms": round(ms, 4), "max_abs_diff_vs_inductor": float((got.float() - want.float()).abs().max()),
                      "bytes_if_read_once_GB": round(moved / 1e9, 3), "TB_s_if_read_once": round(moved / ms / 1e9, 2)}
        print("swiglu", name, rows[name], flush=True)
    return {"tokens": tokens, "half": half, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["attention", "swiglu"])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=96)
    p.add_argument("--longest", type=int, default=2047)
    p.add_argument("--pad-to", type=int, default=64, help="cudnn-padded: offsets padded to this many samples")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--back-to-back", type=int, default=8)
    args = p.parse_args()
    if args.cmd == "swiglu":
        report = swiglu(args)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "swiglu.json").write_text(json.dumps(report, indent=1))
        return
    attention(args)


def attention(args: argparse.Namespace) -> None:
    import torch

    from phi3tune.fastpath.attention import reference_varlen_attention

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if smoke:
        args.tokens, args.heads, args.head_dim, args.longest, args.pad_to = 96, 2, 16, 40, 8
    dtype = torch.float32 if smoke else torch.bfloat16
    timer = _timer(device, args.iters, 3, args.back_to_back)
    scale = args.head_dim ** -0.5
    report: dict = {"device": torch.cuda.get_device_name() if not smoke else "cpu", "torch": torch.__version__,
                    "cudnn": torch.backends.cudnn.version() if not smoke else None, "args": vars(args), "rows": {}}

    kernels = {}
    if not smoke:
        from torch.nn.attention.varlen import varlen_attn

        kernels["flash"] = lambda q, k, v, cu, m: varlen_attn(q, k, v, cu, cu, m, m, scale=scale, window_size=(-1, 0))
        cudnn = CudnnVarlen.build()
        kernels["cudnn"] = lambda q, k, v, cu, m: cudnn(q, k, v, cu, m, scale)

        def padded(q, k, v, cu, m):
            pad = cu.new_full((args.pad_to + 1 - cu.numel(),), int(cu[-1]))
            return cudnn(q, k, v, torch.cat([cu, pad]), args.longest + 1, scale)

        kernels["cudnn-padded"] = padded
    else:
        kernels["reference"] = lambda q, k, v, cu, m: reference_varlen_attention(q, k, v, cu, scale=scale)

    torch.manual_seed(0)
    for kind in ("long", "short", "mixed"):
        lengths = sample_lengths(kind, args.tokens, args.longest)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        shape = (args.tokens, args.heads, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        grad = torch.randn(shape, device=device, dtype=dtype)
        # float32 reference, one sample at a time
        qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = reference_varlen_attention(qr, kr, vr, cu, scale=scale)
        ref.backward(grad.float())
        rows = {}
        for name, fn in kernels.items():
            row: dict = {"samples": len(lengths), "longest": max(lengths)}
            try:
                qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
                t0 = time.perf_counter()
                out = fn(qi, ki, vi, cu, max(lengths))
                out.backward(grad)
                if device == "cuda":
                    torch.cuda.synchronize()
                row["first_call_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
                row["rel_err"] = {"out": _rel(out.detach(), ref.detach()), "dq": _rel(qi.grad, qr.grad),
                                  "dk": _rel(ki.grad, kr.grad), "dv": _rel(vi.grad, vr.grad)}
                with torch.no_grad():
                    row["fwd_ms"] = round(timer(lambda: fn(q, k, v, cu, max(lengths))), 4)

                def fwd_bwd():
                    qi.grad = ki.grad = vi.grad = None
                    fn(qi, ki, vi, cu, max(lengths)).backward(grad)

                row["fwd_bwd_ms"] = round(timer(fwd_bwd), 4)
            except Exception as exc:  # a kernel the build lacks is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows[name] = row
            print(kind, name, row, flush=True)
        report["rows"][kind] = rows
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
