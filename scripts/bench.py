#!/usr/bin/env python3
"""Benchmark phi3tune's training speed against the stock Phi-3 recipe on one GPU (issue 5).

    python scripts/bench.py run --out bench_out            # the full table: stock, phi3tune LoRA, QLoRA, ablations
    python scripts/bench.py run --rows stock,lora --steps 20
    python scripts/bench.py probe --out bench_out          # environment + attention microbenchmark (varlen/flex/sdpa)
    python scripts/bench.py run --cpu-smoke                # tiny model on a CPU: checks the script end to end

What it measures, in one run (each row in a fresh subprocess, same data, same random base weights):
  stock   the model card's recipe on current trl: padded batches of 4, sdpa, activation checkpointing,
          LoRA r=16/alpha 32/dropout 0.05 all-linear, bf16, plain trl SFTTrainer
  lora    phi3tune's default LoRA recipe: `phi3tune train configs/lora.yaml` (the CLI, in-process),
          attn_implementation auto -> the fast path of phi3tune/speed.py
  qlora   phi3tune's QLoRA recipe: `phi3tune train configs/qlora.yaml`
  abl-*   ablation rows, plain trl with one lever changed at a time (see ROWS)
  parity-fused / parity-plain   the default fast path (fused LoRA linears, compiled Phi-3 layers, varlen)
          vs the plain path (sdpa over the same packed batches, peft's LoRA, no fused kernels), same seed
          and batches, per-step losses compared (>= 30 steps); parity-fast is the earlier fast path
  lora-nofused   the recipe with PHI3TUNE_LORA_FUSED=0 PHI3TUNE_PHI3_LAYERS=0 (A/B through `phi3tune train`)
  prof-*  a row with torch.profiler over two steps: top kernels, CPU ops, and the GPU's idle gaps

Model: a randomly initialised full-size Phi-3-mini from the real config (saved once as a local base, so
every row loads the same weights the ordinary from_pretrained way). Data: synthetic chats whose token
lengths are lognormal (mean ~740, capped at 2048; fixed seed), tokenised by phi3tune's own data path.
Reported: real (non-pad) tokens/s over the measured steps (warm-up and the final step, which carries the
recipe's end-of-training work, excluded), peak GPU memory (max allocated), the
ratio to `stock`, the GPU name. Writes bench.json in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHI3_ID = "microsoft/Phi-3-mini-4k-instruct"

# ----------------------------------------------------------------------------------------------- rows
# Ablation rows are plain trl SFTTrainer runs with explicit settings, so each lever is isolated.
BASE_FAST = dict(via="trl", attn="varlen", packing=True, rows=4, ckpt="none", liger=True, lora_dropout=0.05)
ROWS: dict[str, dict] = {
    "stock": dict(via="trl", attn="sdpa", packing=False, rows=4, ckpt="full", liger=False, lora_dropout=0.05),
    "lora": dict(via="recipe", config="configs/lora.yaml"),
    "qlora": dict(via="recipe", config="configs/qlora.yaml", quant="4bit"),
    # ablations, one lever at a time
    "abl-pack-sdpa-ckpt": dict(via="trl", attn="sdpa", packing=True, rows=4, ckpt="full", liger=False, lora_dropout=0.05),
    "abl-pack-varlen-ckpt": dict(via="trl", attn="varlen", packing=True, rows=4, ckpt="full", liger=False, lora_dropout=0.05),
    "abl-pack-varlen": dict(via="trl", attn="varlen", packing=True, rows=4, ckpt="none", liger=False, lora_dropout=0.05),
    "abl-fast": dict(BASE_FAST),
    "abl-fast-drop0": dict(BASE_FAST, lora_dropout=0.0),
    "abl-fast-rows2": dict(BASE_FAST, rows=2),
    "abl-fast-every2": dict(BASE_FAST, ckpt="every_n:2"),
    "abl-fast-workers": dict(BASE_FAST, workers=2),
    "abl-fast-flex": dict(BASE_FAST, attn="flex_attention"),
    "abl-fast-compile": dict(BASE_FAST, compile=True),
    "abl-qlora-stock": dict(via="trl", attn="sdpa", packing=False, rows=4, ckpt="full", liger=False, lora_dropout=0.05, quant="4bit"),
    "abl-qlora-fast": dict(BASE_FAST, quant="4bit", ckpt="full"),
    "abl-qlora-fast-every2": dict(BASE_FAST, quant="4bit", ckpt="every_n:2", rows=2),
    "prof-fast-drop0": dict(BASE_FAST, lora_dropout=0.0, profile=True),
    "abl-fast-drop0-rows6": dict(BASE_FAST, lora_dropout=0.0, rows=6),
    "abl-fast-drop0-compile": dict(BASE_FAST, lora_dropout=0.0, compile=True, steps=24, warmup=10),
    "abl-qlora-fast-drop0": dict(BASE_FAST, quant="4bit", ckpt="full", lora_dropout=0.0),
    "abl-qlora-fast-drop0-bf16": dict(BASE_FAST, quant="4bit", ckpt="full", lora_dropout=0.0, kbit_bf16=True),
    "abl-qlora-fast-drop0-bf16-rows6": dict(BASE_FAST, quant="4bit", ckpt="full", lora_dropout=0.0, kbit_bf16=True, rows=6),
    "abl-fast-drop0-nocast": dict(BASE_FAST, lora_dropout=0.0, nocast=True),
    "parity-fast": dict(BASE_FAST, lr=2e-4, parity=True, lora_dropout=0.0, nocast=True),
    "parity-plain": dict(BASE_FAST, attn="sdpa", liger=False, lr=2e-4, parity=True, lora_dropout=0.0),
    # Levers measured after the first table (docs/benchmarks.md, "Closing the gap"); baseline for each:
    # abl-fast-drop0-nocast (the earlier shipped LoRA fast path in the plain trl loop).
    # Fused base + LoRA linears (phi3tune/lora_fused.py).
    "abl-fast-fused": dict(BASE_FAST, lora_dropout=0.0, nocast=True, fused=True),
    # Phi-3 residual+RMSNorm, qkv split + RoPE and SwiGLU compiled on the fused projections (phi3tune/phi3_layers.py),
    # no Liger. (In the first call of 2026-11-25 16:00 these rows had no norm fusion and kept Liger's RMSNorm.)
    "abl-fast-layers": dict(BASE_FAST, lora_dropout=0.0, nocast=True, phi3_layers=True),
    "abl-fast-fused-layers": dict(BASE_FAST, lora_dropout=0.0, nocast=True, fused=True, phi3_layers=True),
    "abl-fast-fused-layers-basefirst": dict(BASE_FAST, lora_dropout=0.0, nocast=True, fused=True, phi3_layers=True,
                                            base_gemm_first=True),  # fmt: skip
    "prof-fast-fused-layers": dict(BASE_FAST, lora_dropout=0.0, nocast=True, fused=True, phi3_layers=True, profile=True),
    "abl-fast-fused-layers-rows5": dict(BASE_FAST, lora_dropout=0.0, nocast=True, fused=True, phi3_layers=True, rows=5),
    # The recipe with both switched off (the earlier shipped recipe), to A/B through `phi3tune train`.
    "lora-nofused": dict(via="recipe", config="configs/lora.yaml", env={"PHI3TUNE_LORA_FUSED": "0", "PHI3TUNE_PHI3_LAYERS": "0"}),
    "prof-lora": dict(via="recipe", config="configs/lora.yaml", profile=True),
    "parity-fused": dict(BASE_FAST, lr=2e-4, parity=True, lora_dropout=0.0, nocast=True, fused=True, phi3_layers=True),
    # Launch gaps: torch.compile with Liger off: trl's whole-model compile, and per-decoder-layer compile.
    "abl-fast-compile-noliger": dict(BASE_FAST, lora_dropout=0.0, nocast=True, liger=False, compile=True, steps=24, warmup=10),
    "abl-fast-compile-layers-noliger": dict(BASE_FAST, lora_dropout=0.0, nocast=True, liger=False, compile_layers=True,
                                            steps=24, warmup=10),  # fmt: skip
    "abl-fast-compile-layers-fused-layers": dict(BASE_FAST, lora_dropout=0.0, nocast=True, fused=True, phi3_layers=True,
                                                 compile_layers=True),  # fmt: skip
    "abl-fast-compile-layers-noliger-fused": dict(BASE_FAST, lora_dropout=0.0, nocast=True, liger=False,
                                                  compile_layers=True, fused=True, steps=24, warmup=10),  # fmt: skip
}
# What phi3tune's default configs should say for the fast path: attn auto and packing on; activation
# checkpointing off for LoRA (phi3tune/speed.py would choose it when the config leaves it out), on for QLoRA.
# The recipe rows run configs/*.yaml as shipped (attn auto: the fast path decides packing, micro-batch and
# checkpointing); extra overrides for an experiment go here.
RECIPE_DEFAULTS: dict[str, list[str]] = {}
DEFAULT_ROWS = "stock,lora,lora-nofused,qlora,parity-fused,parity-plain"


# ----------------------------------------------------------------------------------------------- data
def synthetic_chats(n: int, seed: int, tokenizer, mean: float = 800.0, sigma: float = 0.8, cap: int = 2048) -> list[dict]:
    """Chats whose rendered lengths are lognormal(mean ~740), capped: words are single-token vocab pieces."""
    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()
    words = sorted(
        tok[1:] for tok, _ in vocab.items() if tok.startswith("\u2581") and tok[1:].isalpha() and tok[1:].islower() and 3 <= len(tok) <= 9
    )
    mu = math.log(mean) - sigma**2 / 2
    rows = []
    for _ in range(n):
        length = int(min(cap, max(24, rng.lognormvariate(mu, sigma))))
        body = max(8, length - 10)  # the template's tags take ~10 tokens
        n_user = max(3, int(body * rng.uniform(0.2, 0.5)))
        n_asst = max(3, body - n_user)
        user = " ".join(rng.choice(words) for _ in range(n_user))
        asst = " ".join(rng.choice(words) for _ in range(n_asst))
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": asst}]})
    return rows


def tokenise(jsonl: Path, tokenizer, max_length: int):
    """The recipe's own data path: phi3tune.data.prepare_datasets."""
    from types import SimpleNamespace

    from phi3tune.data import prepare_datasets

    src = SimpleNamespace(path=str(jsonl), hub=None, split=None, name=None, revision=None, subset=None)
    cfg = SimpleNamespace(train=src, eval=None, eval_fraction=None, format="auto", system_prompt=None,
                          on_invalid="error", on_overlength="truncate", loss_on="assistant")  # fmt: skip
    return prepare_datasets(cfg, tokenizer, max_length=max_length, seed=0).train


# ----------------------------------------------------------------------------------------------- model
def build_base(out_dir: Path, tiny: bool, device: str) -> None:
    """Random-init Phi-3-mini (full size, or tiny for --cpu-smoke) saved as a local model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return
    cfg = AutoConfig.from_pretrained(PHI3_ID)
    if tiny:
        for k, v in dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4).items():  # fmt: skip
            setattr(cfg, k, v)
    torch.manual_seed(1234)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(PHI3_ID).save_pretrained(out_dir)
    del model


# ----------------------------------------------------------------------------------------------- measurement
class Meter:
    """Per-optimizer-step wall time (synchronised), real tokens and loss."""

    def __init__(self):
        self.tokens_micro = 0
        self.padded_micro = 0
        self.steps: list[dict] = []
        self._t = None

    def count(self, inputs):
        if "attention_mask" in inputs and inputs["attention_mask"] is not None:
            self.tokens_micro += int(inputs["attention_mask"].sum())
        else:
            self.tokens_micro += int(inputs["input_ids"].numel())
        self.padded_micro += int(inputs["input_ids"].numel())

    def callback(self):
        import torch
        from transformers import TrainerCallback

        meter = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if meter._t is None:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    meter._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                now = time.perf_counter()
                meter.steps.append({"step": state.global_step, "seconds": now - meter._t,
                                    "tokens": meter.tokens_micro, "padded": meter.padded_micro})  # fmt: skip
                meter.tokens_micro = meter.padded_micro = 0
                meter._t = now

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs and meter.steps:
                    meter.steps[-1]["loss"] = logs["loss"]

        return _CB()


def profiler_callback(path: Path, start: int, steps: int):
    """torch.profiler over `steps` optimizer steps after step `start`: top kernels and GPU busy time."""
    import torch
    from transformers import TrainerCallback

    state = {"prof": None, "t0": None}

    class _Prof(TrainerCallback):
        def on_step_end(self, args, st, control, **kw):
            if not torch.cuda.is_available():
                return
            if st.global_step == start:
                torch.cuda.synchronize()
                state["prof"] = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                )
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()
            elif st.global_step == start + steps and state["prof"] is not None:
                torch.cuda.synchronize()
                wall = time.perf_counter() - state["t0"]
                prof = state["prof"]
                prof.__exit__(None, None, None)
                events = prof.key_averages()
                # Kernel rows only: the aten rows above them carry the same device time again.
                kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
                gpu_us = sum(e.self_device_time_total for e in (kernels or events))
                lines = [f"wall {wall * 1e3:.1f} ms for {steps} steps; GPU kernel time {gpu_us / 1e3:.1f} ms "
                         f"({gpu_us / 1e6 / wall:.0%} busy)"]  # fmt: skip
                lines.append(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70))
                lines.append(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
                try:
                    lines.append(gap_report(prof.events()))
                except Exception as exc:  # the report is a diagnostic; never lose the tables for it
                    lines.append(f"gap report failed: {exc!r}")
                path.write_text("\n".join(lines))
                state["prof"] = None

    return _Prof()


def gap_report(events, min_gap_us: float = 100.0, top: int = 40) -> str:
    """Where the GPU sits idle: gaps between consecutive kernels, each blamed on the CPU ops running in it.

    A gap is charged to the CPU events that overlap it most (record_function labels such as
    ``Optimizer.step#AdamW.step`` or ``enumerate(DataLoader)...``, aten ops such as ``aten::item``).
    """
    import torch
    from collections import defaultdict

    cuda = torch.autograd.DeviceType.CUDA
    kernels = sorted((e for e in events if e.device_type == cuda), key=lambda e: e.time_range.start)
    cpu = sorted((e for e in events if e.device_type != cuda), key=lambda e: e.time_range.start)
    if not kernels:
        return "gap report: no kernels"
    gaps = []
    busy_end = kernels[0].time_range.end
    prev = kernels[0]
    for k in kernels[1:]:
        if k.time_range.start - busy_end >= min_gap_us:
            gaps.append((busy_end, k.time_range.start, prev.name, k.name))
        if k.time_range.end > busy_end:
            busy_end, prev = k.time_range.end, k
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    total = sum(b - a for a, b, _, _ in gaps)
    blame: dict[str, float] = defaultdict(float)
    detail = []
    for a, b, before, after in gaps:
        overl = defaultdict(float)
        for e in cpu:
            if e.time_range.start >= b:
                break
            o = min(b, e.time_range.end) - max(a, e.time_range.start)
            if o > 0:
                overl[e.name] += o
        # the innermost-looking op covering most of the gap: prefer labels over generic runtime calls
        ranked = sorted(overl.items(), key=lambda kv: -kv[1])
        owner = next((n for n, _ in ranked if not n.startswith(("cuda", "Profiler"))), ranked[0][0] if ranked else "?")
        blame[owner] += b - a
        detail.append((b - a, before[:40], after[:40], ", ".join(f"{n[:45]}={v / 1e3:.2f}" for n, v in ranked[:6])))
    out = [f"\nGPU gaps >= {min_gap_us:.0f} us: {len(gaps)} gaps, {total / 1e3:.1f} ms of {span / 1e3:.1f} ms "
           f"({total / span:.0%} idle)", "idle blamed on (ms):"]  # fmt: skip
    for name, us in sorted(blame.items(), key=lambda kv: -kv[1])[:25]:
        out.append(f"  {us / 1e3:8.2f}  {name}")
    out.append(f"largest {top} gaps (ms | kernel before -> after | CPU ops overlapping, ms):")
    for d, before, after, ops in sorted(detail, key=lambda t: -t[0])[:top]:
        out.append(f"  {d / 1e3:7.2f} | {before} -> {after} | {ops}")
    return "\n".join(out)


def instrument(trainer_cls, meter: Meter, extra_callbacks: list | None = None) -> None:
    """Add the meter to every trainer of this class (used for the recipe path, which builds its own)."""
    orig_init = trainer_cls.__init__
    orig_loss = trainer_cls.compute_loss

    def __init__(self, *a, **kw):
        kw["callbacks"] = list(kw.get("callbacks") or []) + [meter.callback()] + list(extra_callbacks or [])
        orig_init(self, *a, **kw)

    def compute_loss(self, model, inputs, *a, **kw):
        if model.training:
            meter.count(inputs)
        return orig_loss(self, model, inputs, *a, **kw)

    trainer_cls.__init__ = __init__
    trainer_cls.compute_loss = compute_loss


def summarise(meter: Meter, warmup: int) -> dict:
    # Warm-up steps and the final step are left out: the last optimizer step also carries the recipe's
    # end-of-training work (final checkpoint, metrics flush), which is not throughput.
    steady = meter.steps[warmup:-1] if len(meter.steps) > warmup + 1 else meter.steps[warmup:]
    secs = sum(s["seconds"] for s in steady)
    toks = sum(s["tokens"] for s in steady)
    padded = sum(s["padded"] for s in steady)
    return {
        "measured_steps": len(steady),
        "seconds": round(secs, 3),
        "real_tokens": toks,
        "tokens_per_second": round(toks / secs, 1) if secs else None,
        "padded_fraction": round(1 - toks / padded, 4) if padded else None,
        "tokens_per_step": round(toks / max(1, len(steady))),
        "losses": [s.get("loss") for s in meter.steps],
        "step_seconds": [round(s["seconds"], 4) for s in meter.steps],
        "step_tokens": [s["tokens"] for s in meter.steps],
    }


def run_row(spec: dict, ctx: dict) -> dict:
    import torch

    device = ctx["device"]
    steps, warmup = spec.get("steps", ctx["steps"]), spec.get("warmup", ctx["warmup"])
    meter = Meter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if spec["via"] == "recipe":
        result = _run_recipe(spec, ctx, meter, steps)
    else:
        result = _run_trl(spec, ctx, meter, steps)
    out = {"row": spec["name"], "spec": spec, "wall_seconds": round(time.perf_counter() - t0, 1)}
    out.update(result)
    out.update(summarise(meter, warmup))
    if device == "cuda":
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def _run_trl(spec: dict, ctx: dict, meter: Meter, steps: int) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from phi3tune import attention

    device = ctx["device"]
    attn = spec["attn"]
    if attn == "varlen":
        attention.register_attention()
    tok = AutoTokenizer.from_pretrained(ctx["base"])
    kwargs = dict(dtype=torch.bfloat16 if device == "cuda" else torch.float32, attn_implementation=attn)
    if spec.get("quant"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(ctx["base"], **kwargs)
    if not spec.get("quant"):
        model = model.to(device)
    ckpt = spec["ckpt"]
    if spec.get("quant"):
        from peft import prepare_model_for_kbit_training

        if spec.get("kbit_bf16"):
            from phi3tune.speed import prepare_kbit_model

            model = prepare_kbit_model(model, use_gradient_checkpointing=ckpt != "none")
        else:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt != "none")
    train = datasets.load_from_disk(ctx["data"])
    args = dict(
        output_dir=str(Path(ctx["tmp"]) / spec["name"]),
        max_steps=steps,
        per_device_train_batch_size=spec["rows"],
        gradient_accumulation_steps=1,
        learning_rate=spec.get("lr", 5e-6),
        lr_scheduler_type="constant",
        max_length=ctx["max_length"],
        packing=spec["packing"],
        packing_strategy="bfd",
        bf16=device == "cuda",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        data_seed=0,
        gradient_checkpointing=ckpt != "none",
        disable_tqdm=True,
        dataloader_num_workers=spec.get("workers", 0),
        use_cpu=device != "cuda",
    )
    if ckpt != "none":
        gk = {"use_reentrant": False}
        if ckpt.startswith("every_n:"):
            gk["every_n_layers"] = int(ckpt.split(":")[1])
        args["gradient_checkpointing_kwargs"] = gk
    if spec.get("liger") and not spec.get("phi3_layers"):  # phi3_layers replaces Liger's three kernels
        args["use_liger_kernel"] = True
        args["liger_kernel_config"] = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                                       "fused_linear_cross_entropy": False}  # fmt: skip
    if spec.get("phi3_layers"):
        from phi3tune.phi3_layers import patch_phi3_layers

        patch_phi3_layers()
    if spec.get("compile"):
        args["torch_compile"] = True
    if spec.get("nocast"):
        from phi3tune.speed import patch_peft_input_cast

        patch_peft_input_cast()
    if spec.get("fused"):
        from phi3tune import lora_fused

        lora_fused.patch_lora_fused()
        if spec.get("base_gemm_first"):
            lora_fused.BASE_GEMM_LAST = False
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=spec["lora_dropout"], target_modules="all-linear",
                      task_type="CAUSAL_LM", bias="none")  # fmt: skip
    callbacks = [meter.callback()]
    if spec.get("profile"):
        callbacks.append(profiler_callback(Path(ctx["out"]) / f"profile-{spec['name']}.txt", start=6, steps=2))
    trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=train, processing_class=tok,
                         peft_config=lora, callbacks=callbacks)  # fmt: skip
    orig = trainer.compute_loss

    def compute_loss(model, inputs, *a, **kw):
        if model.training:
            meter.count(inputs)
        return orig(model, inputs, *a, **kw)

    trainer.compute_loss = compute_loss
    compiled = 0
    if spec.get("compile_layers"):
        # After SFTTrainer has wrapped the model with peft (and Liger, if on): compile each decoder layer on
        # its own (same code for all 32, so one graph, reused), leaving the loss/LM head and the trl loop eager.
        for module in trainer.model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                module.compile()
                compiled += 1
    trainer.train()
    out = {"attn": model.config._attn_implementation, "via": "trl", "compiled_layers": compiled}
    if spec.get("fused"):
        from phi3tune.lora_fused import is_patched

        out["lora_fused"] = is_patched()
    return out


def _run_recipe(spec: dict, ctx: dict, meter: Meter, steps: int) -> dict:
    """`phi3tune train CONFIG --set ...` through the CLI, in-process, with the meter attached."""
    import phi3tune.trainer as ptrainer

    extra = []
    if spec.get("profile"):
        extra.append(profiler_callback(Path(ctx["out"]) / f"profile-{spec['name']}.txt", start=6, steps=2))
    instrument(ptrainer.Phi3Trainer, meter, extra)
    from phi3tune.cli import app

    # Switches read by the recipe (PHI3TUNE_LORA_FUSED, PHI3TUNE_PHI3_LAYERS): each row is its own subprocess.
    os.environ.update(spec.get("env", {}))
    out_dir = Path(ctx["tmp"]) / spec["name"]
    sets = [
        f"model.name_or_path={ctx['base']}",
        "model.random_init=null",
        f"data.train={{path: {ctx['jsonl']}}}",
        "data.eval=null",
        "data.eval_fraction=null",
        f"training_config.max_steps={steps}",
        # logging_steps as the config ships it (20): logging every step would add a sync and the metrics
        # bookkeeping to every step, which a user's run does not have.
        "training_config.save_strategy='no'",
        f"training_config.max_length={ctx['max_length']}",
        "training_config.eval_strategy='no'",
    ]
    sets += RECIPE_DEFAULTS.get(spec["name"], []) + list(spec.get("sets", []))
    if spec.get("quant"):
        sets.append(f"model.quantization={spec['quant']}")
    argv = ["train", str(REPO / spec["config"]), "--output-dir", str(out_dir), "--overwrite"]
    for s in sets:
        argv += ["--set", s]
    if ctx["device"] != "cuda":
        argv += ["--set", "model.dtype=float32"]
    try:
        app(argv, standalone_mode=False)
    except SystemExit as exc:  # typer exits 0 on success
        if exc.code not in (0, None):
            raise
    log_lines = []
    rc = out_dir / "run_config.yaml"
    result = {"via": "recipe", "argv": argv, "run_config": rc.read_text() if rc.is_file() else None, "notes": log_lines}
    from phi3tune import lora_fused, phi3_layers

    result["env"], result["lora_fused"], result["phi3_layers"] = spec.get("env"), lora_fused.is_patched(), phi3_layers.is_patched()
    return result


# ----------------------------------------------------------------------------------------------- probe
def probe(out: Path) -> dict:
    """Environment + attention microbenchmark on a packed row of Phi-3-mini shapes."""
    import importlib
    import inspect

    import torch

    info: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    for mod in ("transformers", "trl", "peft", "accelerate", "datasets", "liger_kernel", "bitsandbytes", "triton",
                "pydantic", "flash_attn", "typer"):  # fmt: skip
        try:
            m = importlib.import_module(mod)
            info[mod] = getattr(m, "__version__", "ok")
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"ERR {type(exc).__name__}: {str(exc)[:120]}"
    if not torch.cuda.is_available():
        return info
    info["gpu"] = torch.cuda.get_device_name(0)
    info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    from torch.nn.attention import varlen

    info["varlen_sig"] = str(inspect.signature(varlen.varlen_attn))
    print("varlen_attn", info["varlen_sig"], flush=True)
    from phi3tune import attention

    # correctness: varlen kernel vs the reference (fp32 math on upcast inputs), with a window that bites
    torch.manual_seed(0)
    H, D = 32, 96
    lens = [2048, 700, 300, 1500, 37, 1]
    T = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    checks = {}
    for name, win in (("causal", -1), ("window2046", 2046), ("window100", 100)):
        out = attention._run_kernel(q, k, v, cu, cu, max(lens), max(lens), D**-0.5, win)
        g = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
        qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
        ref = attention.reference_varlen_attention(qf, kf, vf, cu, scale=D**-0.5, window_left=win)
        rdq, rdk, rdv = torch.autograd.grad(ref, (qf, kf, vf), g.float())

        def rel(a, b):
            return float((a.float() - b).norm() / b.norm())

        checks[name] = {"out": rel(out, ref), "dq": rel(dq, rdq), "dk": rel(dk, rdk), "dv": rel(dv, rdv)}
    info["varlen_vs_reference_rel_err"] = checks

    # timing: one layer's attention fwd+bwd on a packed row of 8192 tokens (lognormal chat lengths)
    rng = random.Random(0)
    lens, tot = [], 0
    while True:
        n = int(min(2048, max(24, rng.lognormvariate(math.log(740) - 0.32, 0.8))))
        if tot + n > 8192:
            lens.append(8192 - tot)
            break
        lens.append(n)
        tot += n
    T = 8192
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    mx = max(lens)
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    import triton.testing as tt

    timings = {}

    def bench(fn):
        def step():
            o = fn()
            o.backward(g)

        return tt.do_bench(step, warmup=50, rep=200, return_mode="median")

    timings["varlen"] = bench(lambda: attention._run_kernel(q, k, v, cu, cu, mx, mx, D**-0.5, 2046))
    seg = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))
    idx = torch.arange(T, device="cuda")
    dense = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - 2047)
    qb, kb, vb = (x.detach().transpose(0, 1)[None].requires_grad_() for x in (q, k, v))
    gb = g.transpose(0, 1)[None]

    def sdpa_dense():
        return torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=dense[None, None])

    def step_b(fn):
        def s():
            fn().backward(gb)

        return tt.do_bench(s, warmup=20, rep=100, return_mode="median")

    timings["sdpa_dense_block_mask"] = step_b(sdpa_dense)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mm(b, h, qi, ki):
            return (seg[qi] == seg[ki]) & (ki <= qi) & (ki > qi - 2047)

        bm = create_block_mask(mm, 1, None, T, T, device="cuda")
        cflex = torch.compile(flex_attention)
        timings["flex_compiled"] = step_b(lambda: cflex(qb, kb, vb, block_mask=bm))
    except Exception as exc:  # noqa: BLE001
        timings["flex_compiled"] = f"ERR {exc}"[:200]
    info["attn_fwd_bwd_ms_8192"] = timings
    info["attn_segments"] = len(lens)

    # matmul ceiling
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = tt.do_bench(lambda: a @ b, warmup=20, rep=100, return_mode="median")
    info["bf16_matmul_tflops"] = round(2 * 8192**3 / ms / 1e9, 1)
    # liger phi3 import
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_phi3  # noqa: F401

        info["liger_phi3"] = "ok"
    except Exception as exc:  # noqa: BLE001
        info["liger_phi3"] = f"ERR {exc}"[:200]
    return info


# ----------------------------------------------------------------------------------------------- driver
def prepare(ctx: dict, tiny: bool, n_samples: int) -> None:
    from transformers import AutoTokenizer

    tmp = Path(ctx["tmp"])
    tmp.mkdir(parents=True, exist_ok=True)
    base = Path(ctx["base"])
    t0 = time.perf_counter()
    build_base(base, tiny, ctx["device"])
    ctx["base_seconds"] = round(time.perf_counter() - t0, 1)
    tok = AutoTokenizer.from_pretrained(PHI3_ID)
    jsonl = Path(ctx["jsonl"])
    if not jsonl.is_file():
        rows = synthetic_chats(n_samples, seed=0, tokenizer=tok, cap=ctx["max_length"])
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not Path(ctx["data"]).is_dir():
        ds = tokenise(jsonl, tok, ctx["max_length"])
        ds.save_to_disk(ctx["data"])
    import datasets

    ds = datasets.load_from_disk(ctx["data"])
    lengths = [len(x) for x in ds["input_ids"]]
    trained = sum(sum(1 for t in row if t != -100) for row in ds["labels"])
    ctx["data_stats"] = {"samples": len(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 1),
                         "max_tokens": max(lengths), "trained_share": round(trained / sum(lengths), 3)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["run", "probe", "_row"])
    p.add_argument("--rows", default=DEFAULT_ROWS)
    # 30 steps / 10 warm-up: the stock recipe's first-use slow steps (new padded shapes) end by step ~10
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--parity-steps", type=int, default=32)
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--tmp", default="/tmp/phi3bench")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on a CPU, few steps: checks the script")
    p.add_argument("--row-timeout", type=int, default=400)
    p.add_argument("--spec", default=None)
    a = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HOME", str(REPO / ".hf-home"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    if a.cmd == "probe":
        info = probe(out)
        (out / "probe.json").write_text(json.dumps(info, indent=1))
        print(json.dumps(info, indent=1))
        return

    if a.cmd == "_row":
        spec, ctx = json.loads(a.spec)
        res = run_row(spec, ctx)
        Path(ctx["result"]).write_text(json.dumps(res, indent=1))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() and not a.cpu_smoke else "cpu"
    tiny = a.cpu_smoke or device != "cuda"
    if tiny:
        a.steps, a.warmup, a.parity_steps = min(a.steps, 4), 1, min(a.parity_steps, 4)
        a.samples = min(a.samples, 120)
        a.max_length = min(a.max_length, 512)
    tmp = Path(a.tmp)
    ctx = dict(device=device, tmp=str(tmp), out=str(out.resolve()), base=str(tmp / ("base-tiny" if tiny else "base")),
               jsonl=str(tmp / f"chats-{a.max_length}.jsonl"), data=str(tmp / f"data-{a.max_length}"),
               steps=a.steps, warmup=a.warmup, max_length=a.max_length)  # fmt: skip
    prepare(ctx, tiny, a.samples)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"# bench on {gpu}; data {ctx['data_stats']}; base built in {ctx['base_seconds']} s", flush=True)
    results = []
    for name in [r for r in a.rows.split(",") if r]:
        spec = dict(ROWS[name], name=name)
        if tiny and spec.get("quant"):
            print(f"{name}: skipped (QLoRA needs a GPU)")
            continue
        if tiny and spec.get("attn") == "flex_attention":
            continue
        if spec.get("parity"):
            spec["steps"] = a.parity_steps
        if tiny and spec.get("liger"):
            spec["liger"] = False
        rctx = dict(ctx, result=str(tmp / f"{name}.json"))
        Path(rctx["result"]).unlink(missing_ok=True)
        t0 = time.perf_counter()
        log_path = out / "rows.log"
        with open(log_path, "a") as log:
            log.write(f"\n===== {name} {json.dumps(spec)}\n")
            log.flush()
            try:
                rc = subprocess.run([sys.executable, __file__, "_row", "--spec", json.dumps([spec, rctx])],
                                    stdout=log, stderr=subprocess.STDOUT, timeout=a.row_timeout).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if Path(rctx["result"]).is_file():
            res = json.loads(Path(rctx["result"]).read_text())
        else:
            res = {"row": name, "spec": spec, "error": f"rc={rc}"}
            print(f"{name}: FAILED rc={rc} (see rows.log)", flush=True)
        res["gpu"] = gpu
        results.append(res)
        stock = next((r for r in results if r["row"] == "stock" and r.get("tokens_per_second")), None)
        if res.get("tokens_per_second"):
            ratio = res["tokens_per_second"] / stock["tokens_per_second"] if stock else None
            res["ratio_to_stock"] = round(ratio, 2) if ratio else None
            print(f"{name:24s} {res['tokens_per_second']:>10,.0f} tok/s  peak {res.get('peak_allocated_gib', '-')} GiB  "
                  f"x{res['ratio_to_stock'] if ratio else '-'}  ({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
        (out / "bench.json").write_text(json.dumps({"gpu": gpu, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                    "data": ctx["data_stats"], "args": vars(a), "rows": results}, indent=1))  # fmt: skip

    plain = next((r for r in results if r["row"] == "parity-plain" and r.get("losses")), None)
    # Every parity-* row (parity-fast, parity-fused, ...) is compared with parity-plain; bench.json keeps
    # "parity" for parity-fast, as before, and the others under "parity_<name>".
    for fast in [r for r in results if r["row"].startswith("parity-") and r["row"] != "parity-plain" and r.get("losses")]:
        if not plain:
            break
        pairs = [(x, y) for x, y in zip(fast["losses"], plain["losses"]) if x is not None and y is not None]
        rel = [abs(x - y) / abs(y) for x, y in pairs]
        parity = {"steps": len(pairs), "max_rel_diff": max(rel) if rel else None,
                  "pass": bool(rel) and len(pairs) >= min(30, a.parity_steps) and max(rel) <= 0.01,
                  "fast": [x for x, _ in pairs], "plain": [y for _, y in pairs]}  # fmt: skip
        print(f"parity ({fast['row']} vs parity-plain): {parity['steps']} steps, max relative loss difference "
              f"{parity['max_rel_diff']:.4%} -> {'PASS' if parity['pass'] else 'FAIL'}")  # fmt: skip
        data = json.loads((out / "bench.json").read_text())
        data["parity" if fast["row"] == "parity-fast" else "parity_" + fast["row"].removeprefix("parity-")] = parity
        (out / "bench.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
