#!/usr/bin/env python3
"""Benchmark phi3tune's shipped recipes against the stock Phi-3 recipe on one GPU, in one call.

    python scripts/bench.py run --out bench_out                 # stock, lora, qlora, prof-lora
    python scripts/bench.py run --rows stock,lora,lora-plain,mem-lora-full --steps 30
    python scripts/bench.py run --cpu-smoke                     # tiny model on a CPU: checks the script end to end

Rows (each in a fresh subprocess, same data, same random base weights):
  stock        the model card's recipe on current trl, as a user of the sample script runs it: padded batches of
               4, sdpa, activation checkpointing, LoRA r=16/alpha 32/dropout 0.05 all-linear, bf16, plain
               SFTTrainer. Its settings are the model card's, not phi3tune's: this is the baseline.
  lora, qlora  `phi3tune train configs/lora.yaml` / `configs/qlora.yaml` as shipped, through the CLI in-process
  lora-plain   the LoRA recipe with model.fast_path.fused_lora/compiled_layers off (same call A/B)
  lora-fp8     the LoRA recipe with model.base_precision=fp8 (e4m3 base linears, FP8 GEMMs; Hopper only);
               prof-lora-fp8 profiles it. GEMM microbenchmark and bf16/fp8 loss parity: scripts/bench_fp8.py
  lora-syncs   the LoRA recipe with the per-step host syncs phi3tune avoids put back (same call A/B)
  lora-eagerload  the LoRA recipe with CUDA_MODULE_LOADING=EAGER (no kernel loaded at its first use mid-run)
  lora-graphs, lora-fp8-graphs  with model.fast_path.cuda_graphs (opt-in); prof-lora-graphs, prof-lora-fp8-graphs
  lora-inductor-swiglu  the SwiGLU backward by Inductor instead of fastpath/swiglu_backward.py (same call A/B)
  mem-*        the LoRA recipe with other checkpointing / micro-batches, to check the memory model
  prof-lora    the LoRA recipe under torch.profiler for two steps: top kernels, CPU ops, the GPU's idle gaps;
               prof-lora-stacks adds device time grouped by op and input shapes
  gen-lora     `phi3tune eval RUN --generate --compare-base --max-new-tokens 256` on 200 eval chats (issue 13):
               batched generation, adapter merged in memory, then the base; seconds after loading, tokens/s,
               the batch size chosen
  gen-qlora    the same for a QLoRA run on its 4-bit base (adapter unmerged: a 4-bit base cannot be merged)
  gen-sequential, gen-qlora-sequential
               the pre-issue-13 path on the same prompts: one `generate` per prompt, adapter then base, on the
               first --gen-sequential-samples prompts, extrapolated linearly to all of them

Every recipe row also records the dry run's estimated peak (phi3tune.plan.memory_verdict, the same
policy and memory model `phi3tune train --dry-run` prints) beside the measured one.

Model: a randomly initialised full-size Phi-3-mini from the real config (saved once as a local base, so
every row loads the same weights the ordinary from_pretrained way). Data: synthetic chats whose token
lengths are lognormal (mean ~740, capped at 2048; fixed seed), tokenised by phi3tune's own data path.
Reported: real (non-pad) tokens/s over the measured steps (warm-up and the final step, which carries the
recipe's end-of-training work, excluded), peak GPU memory (max allocated), the ratio to `stock`, the GPU.
Loss parity of the fast and plain paths is a test (tests/fastpath/test_loss_parity.py), not a row.
Earlier ablation rows and their results: docs/bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib
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
_LORA = "configs/lora.yaml"
ROWS: dict[str, dict] = {
    "stock": dict(via="stock"),
    "lora": dict(via="recipe", config=_LORA),
    "qlora": dict(via="recipe", config="configs/qlora.yaml", quant="4bit"),
    "lora-plain": dict(via="recipe", config=_LORA, sets=["model.fast_path={fused_lora: false, compiled_layers: false}"]),
    "mem-lora-full": dict(via="recipe", config=_LORA, sets=["training_config.gradient_checkpointing=true"]),
    "mem-lora-every2": dict(via="recipe", config=_LORA, sets=[
        "training_config.gradient_checkpointing=true",
        "training_config.gradient_checkpointing_kwargs={use_reentrant: false, every_n_layers: 2}"]),
    "mem-lora-rows2": dict(via="recipe", config=_LORA, sets=["training_config.per_device_train_batch_size=2"]),
    "prof-lora": dict(via="recipe", config=_LORA, profile=True),
    # the same under a profiler that also records input shapes: device time grouped by op and shapes (and by
    # Python stack where the profiler captures one)
    "prof-lora-stacks": dict(via="recipe", config=_LORA, profile="stacks"),
    "lora-fp8": dict(via="recipe", config=_LORA, sets=["model.base_precision=fp8"]),
    # the same recipes with CUDA graphs over the decoder layers (model.fast_path.cuda_graphs, opt-in)
    "lora-graphs": dict(via="recipe", config=_LORA, sets=["model.fast_path={cuda_graphs: true}"]),
    "lora-fp8-graphs": dict(via="recipe", config=_LORA, sets=["model.base_precision=fp8",
                                                              "model.fast_path={cuda_graphs: true}"]),
    "prof-lora-fp8-graphs": dict(via="recipe", config=_LORA, profile=True,
                                 sets=["model.base_precision=fp8", "model.fast_path={cuda_graphs: true}"]),
    "prof-lora-fp8": dict(via="recipe", config=_LORA, profile=True, sets=["model.base_precision=fp8"]),
    "prof-lora-graphs": dict(via="recipe", config=_LORA, profile=True, sets=["model.fast_path={cuda_graphs: true}"]),
    # the LoRA recipe with the host syncs a step that phi3tune now avoids put back (transformers' NaN filter,
    # blocking batch copies), and with every CUDA kernel loaded at start-up instead of at its first use
    "lora-syncs": dict(via="recipe", config=_LORA, sets=["training_config.logging_nan_inf_filter=true",
                                                         "training_config.accelerator_config={non_blocking: false}"]),
    "lora-eagerload": dict(via="recipe", config=_LORA, env={"CUDA_MODULE_LOADING": "EAGER"}),
    # the SwiGLU's backward by Inductor instead of phi3tune's one-pass kernel (fastpath/swiglu_backward.py)
    "lora-inductor-swiglu": dict(via="recipe", config=_LORA,
                                 attrs={"phi3tune.fastpath.swiglu_backward:ENABLED": False}),
}
_GEN = dict(via="generate", samples=200, max_new_tokens=256)
ROWS.update({
    "gen-lora": dict(_GEN),
    "gen-qlora": dict(_GEN, quant="4bit"),
    "gen-sequential": dict(_GEN, via="sequential"),
    "gen-qlora-sequential": dict(_GEN, via="sequential", quant="4bit", sequential_share=0.5),  # ~2x slower a token
})
DEFAULT_ROWS = "stock,lora,qlora,prof-lora"


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
    """The recipe's own data path: phi3tune.data.prepare.prepare_datasets."""
    from types import SimpleNamespace

    from phi3tune.data.prepare import prepare_datasets

    src = SimpleNamespace(path=str(jsonl), hub=None, split=None, name=None, revision=None, subset=None)
    cfg = SimpleNamespace(train=src, eval=None, eval_fraction=None, format="auto", system_prompt=None,
                          on_invalid="error", on_overlength="truncate", loss_on="assistant")  # fmt: skip
    return prepare_datasets(cfg, tokenizer, max_length=max_length, seed=0).train


# ----------------------------------------------------------------------------------------------- model
def phi3_config(tiny: bool):
    """The real Phi-3-mini config, or for --cpu-smoke the same shrunk to 2 layers of width 256."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(PHI3_ID)
    if tiny:
        for k, v in dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4).items():  # fmt: skip
            setattr(cfg, k, v)
    return cfg


def build_base(out_dir: Path, tiny: bool, device: str) -> None:
    """Random-init Phi-3-mini (full size, or tiny for --cpu-smoke) saved as a local model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return
    cfg = phi3_config(tiny)
    torch.manual_seed(1234)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(PHI3_ID).save_pretrained(out_dir)
    del model


# ----------------------------------------------------------------------------------------------- measurement
class Meter:
    """Per-optimizer-step time, real tokens and loss, without making the CPU wait for the GPU.

    A sync at every step would itself idle the GPU at each step boundary (the recipe keeps its CPU a step
    ahead: training/finite_watch.py), so the steps are timed with CUDA events on the GPU's own timeline and read
    after the run; the token counts stay on the device until then. One sync when the first step begins.
    """

    def __init__(self):
        self.tokens_micro = 0
        self.padded_micro = 0
        self.steps: list[dict] = []
        self._start = None

    def count(self, inputs):
        if "attention_mask" in inputs and inputs["attention_mask"] is not None:
            self.tokens_micro += inputs["attention_mask"].sum()  # a tensor: summed on the device
        else:  # padding-free; the CUDA-graph collator says how many pad tokens it appended
            from phi3tune.fastpath.static_batches import PADDING_KEY

            self.tokens_micro += int(inputs["input_ids"].numel()) - int(inputs.get(PADDING_KEY, 0))
        self.padded_micro += int(inputs["input_ids"].numel())

    @staticmethod
    def _mark():
        import torch

        if not torch.cuda.is_available():
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def resolve(self) -> None:
        """Turn the steps' marks into seconds and their token tensors into ints (one sync, after the run)."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        previous = self._start
        for step in self.steps:
            mark = step.pop("mark")
            if isinstance(mark, float):
                step["seconds"] = mark - previous
            else:
                step["seconds"] = previous.elapsed_time(mark) / 1e3
            previous = mark
            step["tokens"] = int(step["tokens"])

    def callback(self):
        import torch
        from transformers import TrainerCallback

        meter = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if meter._start is None:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    meter._start = meter._mark()

            def on_step_end(self, args, state, control, **kw):
                meter.steps.append({"step": state.global_step, "mark": meter._mark(),
                                    "tokens": meter.tokens_micro, "padded": meter.padded_micro})  # fmt: skip
                meter.tokens_micro = meter.padded_micro = 0

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs and meter.steps:
                    meter.steps[-1]["loss"] = logs["loss"]

        return _CB()


def profiler_callback(path: Path, start: int, steps: int, stacks: bool = False):
    """torch.profiler over `steps` optimizer steps after step `start`: top kernels and GPU busy time; with
    `stacks`, also the device time of each op grouped by its input shapes and calling stack (slower to record)."""
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
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                    with_stack=stacks, record_shapes=stacks,
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
                if stacks:
                    by_stack = prof.key_averages(group_by_input_shape=True, group_by_stack_n=6)
                    lines.append(by_stack.table(sort_by="self_device_time_total", row_limit=60,
                                                max_name_column_width=50, max_src_column_width=120))
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
    meter.resolve()
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

    if spec["via"] in ("generate", "sequential"):
        from bench_generation import run_generation_row

        return run_generation_row(spec, ctx)
    device = ctx["device"]
    steps, warmup = spec.get("steps", ctx["steps"]), spec.get("warmup", ctx["warmup"])
    for target, value in spec.get("attrs", {}).items():  # a fast-path switch kept for A/B rows ("module:NAME")
        module, name = target.split(":")
        setattr(importlib.import_module(module), name, value)
    meter = Meter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = _run_recipe(spec, ctx, meter, steps) if spec["via"] == "recipe" else _run_stock(spec, ctx, meter, steps)
    out = {"row": spec["name"], "spec": spec, "wall_seconds": round(time.perf_counter() - t0, 1)}
    out.update(result)
    out.update(summarise(meter, warmup))
    if device == "cuda":
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def _run_stock(spec: dict, ctx: dict, meter: Meter, steps: int) -> dict:
    """The model card's sample_finetune.py settings on current trl: the baseline every ratio is against."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    device = ctx["device"]
    tok = AutoTokenizer.from_pretrained(ctx["base"])
    model = AutoModelForCausalLM.from_pretrained(
        ctx["base"], dtype=torch.bfloat16 if device == "cuda" else torch.float32, attn_implementation="sdpa").to(device)
    args = SFTConfig(
        output_dir=str(Path(ctx["tmp"]) / spec["name"]), max_steps=steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=1, learning_rate=5e-6, lr_scheduler_type="constant", max_length=ctx["max_length"],
        packing=False, bf16=device == "cuda", logging_steps=1, save_strategy="no", report_to="none", seed=0,
        data_seed=0, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        disable_tqdm=True, use_cpu=device != "cuda",
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM",
                      bias="none")
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.load_from_disk(ctx["data"]),
                         processing_class=tok, peft_config=lora, callbacks=[meter.callback()])
    orig = trainer.compute_loss

    def compute_loss(model, inputs, *a, **kw):
        if model.training:
            meter.count(inputs)
        return orig(model, inputs, *a, **kw)

    trainer.compute_loss = compute_loss
    trainer.train()
    return {"attn": model.config._attn_implementation, "via": "stock"}


def _recipe_sets(spec: dict, ctx: dict, steps: int) -> list[str]:
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
    if ctx["device"] != "cuda":
        sets.append("model.dtype=float32")
    return sets + list(spec.get("sets", []))


def _dry_run_estimate(config: Path, sets: list[str], device: str) -> dict:
    """What `phi3tune train CONFIG --dry-run` predicts for this row: the same policy and memory model."""
    import torch
    from rich.console import Console

    from phi3tune.config.load import load_config
    from phi3tune.plan import print_plan

    cfg = load_config(config, sets, output_dir=None, require_output_dir=False)
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else 80.0
    with open(os.devnull, "w") as sink:
        verdict = print_plan(cfg, Console(file=sink), gpu_memory_gib=gib)
    return {"estimated_peak_gib": round(verdict.peak_bytes / 2**30, 2), "estimated_checkpointing": verdict.checkpointing}


def _run_recipe(spec: dict, ctx: dict, meter: Meter, steps: int) -> dict:
    """`phi3tune train CONFIG --set ...` through the CLI, in-process, with the meter attached."""
    from phi3tune.training import trainer as ptrainer

    extra = []
    if spec.get("profile"):
        import torch

        if hasattr(torch.profiler, "_utils") and hasattr(torch.profiler._utils, "_init_for_cuda_graphs"):
            torch.profiler._utils._init_for_cuda_graphs()  # a profiler after a graph capture needs it on old CUDA
        extra.append(profiler_callback(Path(ctx["out"]) / f"profile-{spec['name']}.txt", start=6, steps=2,
                                       stacks=spec["profile"] == "stacks"))
    instrument(ptrainer.Phi3Trainer, meter, extra)
    from phi3tune.cli import app

    out_dir = Path(ctx["tmp"]) / spec["name"]
    sets = _recipe_sets(spec, ctx, steps)
    if spec.get("quant"):
        sets.append(f"model.quantization={spec['quant']}")
    result = {"via": "recipe", **_dry_run_estimate(REPO / spec["config"], sets, ctx["device"])}
    argv = ["train", str(REPO / spec["config"]), "--output-dir", str(out_dir), "--overwrite"]
    for s in sets:
        argv += ["--set", s]
    try:
        app(argv, standalone_mode=False)
    except SystemExit as exc:  # typer exits 0 on success
        if exc.code not in (0, None):
            raise
    rc = out_dir / "run_config.yaml"
    result.update(argv=argv, run_config=rc.read_text() if rc.is_file() else None)
    return result


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


def launch_row(spec: dict, ctx: dict, out: Path, timeout: int, script: str = __file__,
               extra: list[str] | tuple = ()) -> tuple[dict | None, int | str]:
    """One row in a fresh process (``script _row --spec ...``), its output appended to OUT/rows.log: the row's
    result (``ctx["result"]``, written by the row) or None, and the process's return code ("timeout")."""
    result = Path(ctx["result"])
    result.unlink(missing_ok=True)
    with open(Path(out) / "rows.log", "a") as log:
        log.write(f"\n===== {spec['name']} {json.dumps(spec)}\n")
        log.flush()
        try:
            rc = subprocess.run([sys.executable, script, "_row", "--spec", json.dumps([spec, ctx]), *extra],
                                stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, **spec.get("env", {})}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return (json.loads(result.read_text()) if result.is_file() else None), rc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["run", "_row"])
    p.add_argument("--rows", default=DEFAULT_ROWS)
    # 30 steps / 10 warm-up: the stock recipe's first-use slow steps (new padded shapes) end by step ~10
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--tmp", default="/tmp/phi3bench")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on a CPU, few steps: checks the script")
    p.add_argument("--row-timeout", type=int, default=400)
    p.add_argument("--spec", default=None)
    p.add_argument("--gen-sequential-samples", type=int, default=16,
                   help="gen-*-sequential rows: prompts measured one by one (the time is extrapolated to all)")
    a = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HOME", str(REPO / ".hf-home"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    if a.cmd == "_row":
        spec, ctx = json.loads(a.spec)
        res = run_row(spec, ctx)
        Path(ctx["result"]).write_text(json.dumps(res, indent=1))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() and not a.cpu_smoke else "cpu"
    tiny = a.cpu_smoke or device != "cuda"
    if tiny:
        a.steps, a.warmup = min(a.steps, 4), 1
        a.samples = min(a.samples, 120)
        a.max_length = min(a.max_length, 512)
    tmp = Path(a.tmp)
    ctx = dict(device=device, tmp=str(tmp), out=str(out.resolve()), base=str(tmp / ("base-tiny" if tiny else "base")),
               jsonl=str(tmp / f"chats-{a.max_length}.jsonl"), data=str(tmp / f"data-{a.max_length}"),
               steps=a.steps, warmup=a.warmup, max_length=a.max_length,
               gen_sequential_samples=min(a.gen_sequential_samples, 4) if tiny else a.gen_sequential_samples,
               gen_smoke=tiny)  # fmt: skip
    prepare(ctx, tiny, a.samples)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"# bench on {gpu}; data {ctx['data_stats']}; base built in {ctx['base_seconds']} s", flush=True)
    results = []
    for name in [r for r in a.rows.split(",") if r]:
        spec = dict(ROWS[name], name=name)
        if tiny and spec.get("quant"):
            print(f"{name}: skipped (QLoRA needs a GPU)")
            continue
        t0 = time.perf_counter()
        res, rc = launch_row(spec, dict(ctx, result=str(tmp / f"{name}.json")), out, a.row_timeout)
        if res is None:
            res = {"row": name, "spec": spec, "error": f"rc={rc}"}
            print(f"{name}: FAILED rc={rc} (see rows.log)", flush=True)
        res["gpu"] = gpu
        results.append(res)
        stock = next((r for r in results if r["row"] == "stock" and r.get("tokens_per_second")), None)
        if res.get("generation_seconds") is not None:
            print(f"{name:18s} {res['generation_seconds']:>8.1f} s generation for {res['samples']} samples x "
                  f"{res['max_new_tokens']} new tokens, adapter + base{res.get('extrapolated', '')}: "
                  f"{res['generation_tokens_per_second']:,.0f} tok/s, batch {res.get('batch_size', 1)}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        elif res.get("tokens_per_second"):
            ratio = res["tokens_per_second"] / stock["tokens_per_second"] if stock else None
            res["ratio_to_stock"] = round(ratio, 2) if ratio else None
            estimate = f" (dry run {res['estimated_peak_gib']} GiB)" if res.get("estimated_peak_gib") else ""
            print(f"{name:18s} {res['tokens_per_second']:>10,.0f} tok/s  peak {res.get('peak_allocated_gib', '-')} GiB"
                  f"{estimate}  x{res['ratio_to_stock'] if ratio else '-'}  ({time.perf_counter() - t0:.0f}s)", flush=True)
        (out / "bench.json").write_text(json.dumps({"gpu": gpu, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                    "data": ctx["data_stats"], "args": vars(a), "rows": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
