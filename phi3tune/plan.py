"""`phi3tune train --dry-run`: what the run will do and how much GPU memory it will need. Loads no weights.

The plan comes from the same code the run uses (``phi3tune.training.arguments.build_training_args``, which
runs the fast-path policy), so the printed micro-batch, accumulation and checkpointing are the run's. The peak
is the memory model's (``phi3tune/fastpath/memory.py``), for the visible GPU or, without one, for a card of
``--gpu-memory`` GiB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from rich.console import Console
from rich.table import Table

from phi3tune.config.paths import not_a_regular_file
from phi3tune.config.schema import max_length_of
from phi3tune.errors import DataError
from phi3tune.fastpath import FastPathPlan, estimate, gpu_memory_bytes
from phi3tune.fastpath.memory import ModelShape, checkpointing_of, shape_of
from phi3tune.model import loading
from phi3tune.training.arguments import build_training_args

GIB = 2**30
# CUDA context, cuBLAS workspaces and allocator fragmentation sit outside the model's tensors.
CARD_RESERVE_BYTES = 1.5 * GIB
DEFAULT_PLAN_GPU_GIB = 80.0


@dataclass
class MemoryVerdict:
    """The estimated peak against a card, and what to change when it does not fit."""

    peak_bytes: float
    card_bytes: float
    checkpointing: str
    fits: bool
    suggestions: list[str] = field(default_factory=list)


def _source(src: Any) -> str:
    if src is None:
        return "-"
    if getattr(src, "hub", None):
        name = f" ({src.name})" if getattr(src, "name", None) else ""
        return f"hub {src.hub}{name}, split {src.split}"
    return f"file {src.path}"


def memory_verdict(cfg: Any, plan: FastPathPlan, card_bytes: float, shape: ModelShape) -> MemoryVerdict:
    """Estimate the run's peak on a card of ``card_bytes`` and suggest changes when it does not fit."""
    args = plan.args
    quantized = bool(cfg.model.quantization)
    fp8 = cfg.model.base_precision == "fp8"
    tokens = plan.tokens_per_micro_batch or int(args.get("per_device_train_batch_size", 8)) * max_length_of(args)
    mode = checkpointing_of(args)
    fused = "lora_fused" in plan.patches and "phi3_layers" in plan.patches
    model_estimate = partial(estimate, fused=fused, shape=shape)
    found = plan.memory or model_estimate(tokens, quantized=quantized, checkpointing=mode, fp8=fp8)
    usable = card_bytes - CARD_RESERVE_BYTES
    verdict = MemoryVerdict(found.peak, card_bytes, found.checkpointing, found.peak <= usable)
    if verdict.fits:
        return verdict
    alternatives = []
    if found.checkpointing != "full":
        full = model_estimate(tokens, quantized=quantized, checkpointing="full", fp8=fp8)
        alternatives.append((full.peak, "recompute activations: --set training_config.gradient_checkpointing=true"))
    if not quantized:
        qlora = model_estimate(tokens, quantized=True, checkpointing="full")
        alternatives.append((qlora.peak, "QLoRA: --set model.quantization=4bit"
                             + (" --set model.base_precision=bf16" if fp8 else "")))
    rows, accum = int(args.get("per_device_train_batch_size", 8)), int(args.get("gradient_accumulation_steps", 1))
    if rows > 1:
        half = model_estimate(tokens // 2, quantized=quantized, checkpointing=found.checkpointing, fp8=fp8)
        alternatives.append((half.peak, "a smaller micro-batch, same effective batch: --set "
                             f"training_config.per_device_train_batch_size={rows // 2} --set "
                             f"training_config.gradient_accumulation_steps={accum * 2}"))
    verdict.suggestions = [f"{text} (estimated {peak / GIB:.1f} GiB{'' if peak <= usable else ', still too much'})"
                           for peak, text in sorted(alternatives)]
    return verdict


def _check_local_data(cfg: Any) -> None:
    """The dry run loads no data, but a data file that is not there fails the run: say so now."""
    for key, path in cfg.local_data_files():
        why = not_a_regular_file(path)
        if why:
            raise DataError(f"{key}: {path}: {why}.", hint=f"fix {key}.path, or --set {key}.path=FILE")


def print_plan(cfg: Any, console: Console, *, gpu_memory_gib: float | None = None) -> MemoryVerdict:
    """Print model, data, LoRA targets, the fast-path decisions and the estimated peak GPU memory."""
    _check_local_data(cfg)
    here = loading.device_type()
    visible = gpu_memory_bytes()
    card = gpu_memory_gib * GIB if gpu_memory_gib is not None else (visible or DEFAULT_PLAN_GPU_GIB * GIB)
    planned_for = "the visible GPU" if visible and gpu_memory_gib is None else f"a {card / GIB:g} GiB GPU"
    dtype = loading.resolve_dtype(cfg.model.dtype, "cuda", cfg.model.quantization)
    model_config = loading.load_model_config(cfg.model)
    lora = loading.build_lora_config(cfg.peft_config, loading.leaf_module_names(model_config))
    trainable, total = loading.estimate_lora_parameters(model_config, lora)
    shape = shape_of(model_config, trainable=trainable, total=total)
    plan = build_training_args(cfg, None, "cuda", dtype, gpu_memory=card, shape=shape)
    args = plan.args
    verdict = memory_verdict(cfg, plan, card, shape)

    table = Table(title="phi3tune: dry run (nothing loaded, nothing written)", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    size = f"{total / 1e9:.2f}B" if total >= 1e8 else f"{total / 1e6:.1f}M"
    init = " (random init)" if cfg.model.random_init is not None else ""
    table.add_row("model", f"{cfg.model.name_or_path}{init}: {size} parameters, {model_config.num_hidden_layers} layers")
    table.add_row("planned for", f"{planned_for}, {str(dtype).replace('torch.', '')}"
                  + (f", {cfg.model.quantization} quantized" if cfg.model.quantization else "")
                  + (", fp8 base linears" if cfg.model.base_precision == "fp8" else "")
                  + (" (fp8 needs a Hopper GPU, compute capability 9.0+: not checked here)"
                     if cfg.model.base_precision == "fp8" and here != "cuda" else "")
                  + ("" if here == "cuda" else f" (this machine has no GPU: here the run would take the {here} path)"))
    table.add_row("attention", plan.attn)
    table.add_row("method", f"LoRA r={lora.r} alpha={lora.lora_alpha} dropout={lora.lora_dropout}")
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(sorted(lora.target_modules))
    table.add_row("targets", str(targets))
    table.add_row("trainable", f"{trainable:,} parameters ({100 * trainable / max(total, 1):.2f}% of the base)")
    table.add_row("train data", _source(cfg.data.train))
    eval_desc = _source(cfg.data.eval) if cfg.data.eval is not None else (
        f"{cfg.data.eval_fraction:.1%} of train" if cfg.data.eval_fraction else "none")
    table.add_row("eval data", eval_desc)
    table.add_row("loss on", cfg.data.loss_on)
    rows = int(args.get("per_device_train_batch_size", 8))
    accum = int(args.get("gradient_accumulation_steps", 1))
    max_length = max_length_of(args)
    if args.get("packing"):
        table.add_row("packing", f"{args.get('packing_strategy', 'bfd')}, rows of {max_length} tokens")
        table.add_row("batch", f"{rows} packed rows ({rows * max_length:,} tokens) a micro-batch x {accum} accumulation "
                      f"= up to {rows * max_length * accum:,} tokens a step")
    else:
        table.add_row("batch", f"{rows} sequences (padded, up to {max_length} tokens) x {accum} accumulation "
                      f"= {rows * accum} sequences a step")
    table.add_row("checkpointing", verdict.checkpointing)
    fused = [name for name in plan.patches if name != "attention"]
    table.add_row("fused kernels", ", ".join(fused) if fused else "none")
    graphs = [line.removeprefix("fast path: ") for line in plan.notes if "CUDA graphs" in line]
    if graphs:  # asked for: on, or why not
        table.add_row("CUDA graphs", graphs[0])
    steps = args.get("max_steps", -1)
    table.add_row("length", f"{steps} steps" if steps and steps > 0 else f"{args.get('num_train_epochs', 3)} epochs")
    table.add_row("learning rate", f"{args.get('learning_rate', 2e-5)} ({args.get('lr_scheduler_type', 'linear')})")
    table.add_row("output", str(cfg.output_dir))
    fits = "[green]fits[/]" if verdict.fits else "[red]does not fit[/]"
    table.add_row("peak GPU memory", f"~{verdict.peak_bytes / GIB:.1f} GiB estimated, {fits} in {card / GIB:g} GiB")
    console.print(table)
    if verdict.suggestions:
        console.print("to fit, try one of:")
        for line in verdict.suggestions:
            console.print(f"  - {line}", highlight=False)
    return verdict
