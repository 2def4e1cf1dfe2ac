#!/usr/bin/env python3
"""What CUDA graphs over the decoder stack would buy the LoRA step (issue 16): the same forward + backward, eager
and replayed from a CUDA graph, on one GPU, bf16 and with the fp8 base.

    python scripts/bench_graphs.py --out OUT                 # -> OUT/graphs.json
    python scripts/bench_graphs.py --cpu-smoke --out OUT     # tiny model, eager rows only: checks the script

Why: the fp8 recipe's step is bound by the CPU launching ~2,900 kernels a step through Python (52% GPU-busy under the
profiler on an H200; ~215 ms of kernels in a ~342 ms step, docs/benchmarks.md "2026-12-01 (night)"), and the
bf16 step partly so. A CUDA graph replays the whole stack's kernels with one launch. This script measures that
before any of it goes into the recipe: a random-init full-size Phi-3-mini with phi3tune's fast path (varlen
attention, compiled norm / RoPE / SwiGLU, fused LoRA linears; r=16 all-linear, as configs/lora.yaml), one packed
micro-batch of --tokens tokens in samples of --sample-length (fixed shapes: the recipe would pad each micro-batch
to its token budget), bf16 autocast. Rows:

  eager        embeddings -> 32 decoder layers -> norm -> lm_head -> loss, backward: what the recipe runs
  graphed      the same with the 32 layers as one ``torch.cuda.make_graphed_callables`` module (forward and
               backward each one graph replay); embeddings, lm_head and the loss stay eager
  compiled     the stack through ``torch.compile`` (fewer, larger kernels: the other lever the issue names;
               opt-in, its compile takes minutes at full size)
  *-fp8        the same with ``model.base_precision: fp8`` (``fp8_base.convert_lora_bases``)

Reported per row: ms a step (median of --iters, each synchronised), tokens/s, peak GiB allocated and reserved (a
graph's activations sit in its private pool), the fast path's kernels that fell back, the GPU kernel time of one
step (torch.profiler: the floor a graph can reach), and the largest relative difference of the LoRA gradients to
the eager row's on the same batch (the graph must compute the same thing; the attention backward is not
deterministic, so ~1e-3 is expected).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))


def build(device: str, tiny: bool, fp8: bool):
    """The peft-wrapped random-init model with phi3tune's fast-path patches on."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import bench

    from phi3tune.fastpath import attention, lora_fused, peft_cast, phi3_layers

    for module in (attention, phi3_layers, peft_cast, lora_fused):
        module.patch()
    cfg = bench.phi3_config(tiny)  # the benchmark's model, as scripts/bench.py builds it
    cfg._attn_implementation = attention.VARLEN
    torch.manual_seed(1234)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():  # B = 0 would leave A without a gradient to compare
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    if fp8:
        from phi3tune.fastpath import fp8_base

        fp8_base.convert_lora_bases(model)
    model.train()
    return model


def decoder_stack(layers, position_embeddings, attention_kwargs):
    """The decoder layers as one module of one tensor argument (what make_graphed_callables takes)."""
    import torch

    class DecoderStack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, hidden_states):
            for layer in self.layers:
                hidden_states = layer(hidden_states, attention_mask=None, position_embeddings=position_embeddings,
                                      **attention_kwargs)
            return hidden_states

    return DecoderStack()


def gpu_kernel_ms(step) -> float:
    """Sum of the GPU kernel times of one call of ``step`` (torch.profiler): the floor a graph could reach."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return round(sum(e.self_device_time_total for e in prof.key_averages()) / 1e3, 2)


def fallbacks() -> list[str]:
    """The fast path's kernels that fell back to a slower path so far (torch.compile failures, Triton failures)."""
    from phi3tune.fastpath import phi3_layers

    found = [f"compile of {name} failed" for name in ("_qkv_rope", "_swiglu", "_rmsnorm", "_add_rmsnorm")
             if getattr(phi3_layers, name).failed]
    fp8_quantise = sys.modules.get("phi3tune.fastpath.fp8_quantise")
    if fp8_quantise is not None:
        found += [f"fp8 Triton kernels: {why}" for why in fp8_quantise._TRITON_FAILED]
    return found


def run(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    device = "cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda"
    tiny = device == "cpu"
    tokens, length = (256, 64) if tiny else (args.tokens, args.sample_length)
    iters, warmup = (2, 1) if tiny else (args.iters, args.warmup)
    rows = [r for r in args.rows.split(",") if r]
    result: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)",
                    "torch": torch.__version__, "tokens": tokens, "sample_length": length, "rows": {}}
    reference_grads: dict[str, dict] = {}
    for fp8 in sorted({r.endswith("-fp8") for r in rows}):
        if fp8 and device != "cuda":
            result["rows"].update({r: {"skipped": "fp8 needs an sm90 GPU"} for r in rows if r.endswith("-fp8")})
            continue
        model = build(device, tiny, fp8)
        base = model.base_model.model
        vocab = base.config.vocab_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
        positions = torch.arange(length).repeat(tokens // length).unsqueeze(0).to(device)
        cu = torch.arange(0, tokens + 1, length, dtype=torch.int32, device=device)
        attention_kwargs = dict(position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                max_length_q=length, max_length_k=length)
        labels = ids.roll(-1, dims=1)
        lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        autocast = torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False)
        with autocast:
            hidden = base.model.embed_tokens(ids)
            position_embeddings = base.model.rotary_emb(hidden, positions)

        def step(layers) -> None:
            with autocast:
                h = layers(base.model.embed_tokens(ids))
                logits = base.lm_head(base.model.norm(h))
                loss = F.cross_entropy(logits.float().view(-1, vocab), labels.view(-1))
            loss.backward()

        def measure(kind: str) -> dict:
            # a stack of its own each row: make_graphed_callables replaces the module's forward in place
            stack = decoder_stack(base.model.layers, position_embeddings, attention_kwargs)
            layers = stack
            if kind == "graphed":
                if hasattr(torch.profiler, "_utils") and hasattr(torch.profiler._utils, "_init_for_cuda_graphs"):
                    torch.profiler._utils._init_for_cuda_graphs()  # a profiler after a capture needs it on old CUDA
                with autocast:
                    static = hidden.detach().clone()
                    layers = torch.cuda.make_graphed_callables(stack, (static,), num_warmup_iters=3)
            elif kind == "compiled":
                layers = torch.compile(stack)  # compiles in the first step below (minutes at full size)
            model.zero_grad(set_to_none=True)
            step(layers)  # one step from zero grads on the fixed batch: the gradients compared between rows
            grads = {n: p.grad.float().clone() for n, p in lora}
            if kind == "eager":
                reference_grads[str(fp8)] = grads
            times = []
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            for i in range(warmup + iters):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.zero_grad(set_to_none=True)
                step(layers)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(times)
            cuda = device == "cuda"
            # reserved, not only allocated: a graph's activations live in its private pool
            row = {"ms_per_step": round(ms, 2), "tokens_per_second": round(tokens / ms * 1e3),
                   "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                   "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None}
            if device == "cuda":
                row["gpu_kernel_ms"] = gpu_kernel_ms(functools.partial(step, layers))
            ref = reference_grads.get(str(fp8))

            def max_rel_diff(got: dict) -> float:
                return max(float((got[n] - ref[n]).norm() / ref[n].norm().clamp(min=1e-30)) for n in ref)

            if ref is not None:
                row["max_rel_grad_diff_vs_eager"] = max_rel_diff(grads)
            if kind == "eager":  # the floor: eager against itself (the attention backward is not deterministic)
                model.zero_grad(set_to_none=True)
                step(layers)
                row["max_rel_grad_diff_eager_repeat"] = max_rel_diff({n: p.grad.float() for n, p in lora})
            # the fallbacks are process-wide and permanent: a row after a failed compile or kernel measures them
            row["fallbacks"] = fallbacks()
            return row  # a graph's memory pool (the stack's activations) goes with `layers`

        # eager first: the other rows' gradients are compared with its
        for name in sorted([r for r in rows if r.endswith("-fp8") == fp8], key=lambda r: not r.startswith("eager")):
            kind = name.removesuffix("-fp8")
            if kind == "graphed" and device != "cuda":
                result["rows"][name] = {"skipped": "CUDA graphs need a CUDA GPU"}
                continue
            try:
                result["rows"][name] = measure(kind)
            except Exception as exc:  # noqa: BLE001 - one row's failure is its result; the other rows still run
                result["rows"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}", "fallbacks": fallbacks()}
            if kind == "compiled":
                torch._dynamo.reset()
            print(f"{name:14s} {json.dumps(result['rows'][name])}", flush=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        model = base = lora = None  # the two full-size models are not held at once
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--rows", default="eager,graphed,eager-fp8,graphed-fp8",
                   help="of eager, graphed, compiled (torch.compile of the stack: fewer, larger kernels; its compile "
                        "takes minutes), each also with -fp8")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the packed micro-batch")
    p.add_argument("--sample-length", type=int, default=2048, help="tokens a packed sample")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on a CPU, eager rows: checks the script")
    args = p.parse_args()
    if args.tokens % args.sample_length:
        p.error("--tokens must be a multiple of --sample-length")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HOME", str(REPO / ".hf-home"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / "graphs.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'graphs.json'}")


if __name__ == "__main__":
    main()
