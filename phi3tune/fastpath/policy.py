"""The fast-path policy: what ``attn_implementation: auto`` decides on a GPU. It only decides; nothing is patched here.

``plan_fast_path`` is called by the training run and by ``phi3tune train --dry-run`` alike, so the dry run
prints what the run will do. ``phi3tune.fastpath.apply_patches(plan)`` then turns the decided patches on.
Keys the user set in ``training_config`` always win (a note says what the fast path would have chosen).
The levers, each measured in docs/benchmarks.md:

* ``packing: true, packing_strategy: bfd``: trl's best-fit-decreasing packing; its collator is padding-free
  (one flat row with ``position_ids`` and ``cu_seq_lens``), so the varlen kernel sees true sample boundaries.
* token-budget micro-batches: packed rows of ``max_length`` up to ``TOKEN_BUDGET`` tokens; a user's larger
  batch becomes micro-batches with ``gradient_accumulation_steps`` so the optimizer step sees the same rows.
* activation checkpointing from the memory model (``memory.py``): none when it fits, else every n-th layer,
  else all (trl's SFTConfig turns it on by default).
* ``model.fast_path.compiled_layers``: Phi-3's residual add + RMSNorm, qkv split + RoPE and SwiGLU compiled on
  the fused projections (``phi3_layers.py``); Liger's kernels for the same three only where that is off.
* ``model.fast_path.fused_lora``: each LoRA linear fused with its frozen base (``lora_fused.py``); LoRA inputs stay
  bf16 under autocast (``peft_cast.py``); pinned, persistent dataloader workers.
* ``model.fast_path.cuda_graphs`` (opt-in): the decoder layers replayed from CUDA graphs over batches padded to
  the token budget (``cuda_graphs.py``); off with FSDP2, QLoRA, checkpointing or unpacked data.
* ``model.base_precision: fp8`` (opt-in, Hopper only: checked here): the memory model counts the converted base
  at 1 byte a parameter; the conversion itself runs after peft has wrapped the model (``fp8_base.py``).

Under ``training_config.fsdp`` (FSDP2) the fused kernels are off: they were tested on one GPU with whole weights,
not on weights FSDP2 gathers and frees per layer (tests/training/test_fsdp2.py). Packing, token-budget micro-batches
and the varlen kernel work on the batch and stay on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Mapping

from phi3tune.config.schema import max_length_of
from phi3tune.fastpath import attention, memory

log = logging.getLogger(__name__)

# Benchmark-only overrides of model.fast_path ("0" = off), for A/B rows of one recipe in one call.
LORA_FUSED_ENV = "PHI3TUNE_LORA_FUSED"
PHI3_LAYERS_ENV = "PHI3TUNE_PHI3_LAYERS"
CUDA_GRAPHS_ENV = "PHI3TUNE_CUDA_GRAPHS"

# Tokens per micro-batch: 4 packed rows of 2048. Below ~4k tokens an H100 is under-used by Phi-3-mini's
# matmuls; above ~8k the gain is small and memory grows linearly.
TOKEN_BUDGET = 8192
# The fast path targets a peak well inside the card, leaving room for fragmentation and eval batches.
MEMORY_FRACTION = 0.55
# QLoRA exists to fit small cards: its memory target is a fixed budget, whatever the card.
QLORA_MEMORY_BUDGET = 7.5 * 2**30
# A card size to plan for when there is no GPU to ask (an H100/A100 80GB).
DEFAULT_GPU_MEMORY_BYTES = 80 * 2**30

# Keys the policy decides; a null value for one of them in the config means "unset".
POLICY_KEYS = (
    "packing",
    "packing_strategy",
    "per_device_train_batch_size",
    "gradient_checkpointing",
    "gradient_checkpointing_kwargs",
    "use_liger_kernel",
    "liger_kernel_config",
    "dataloader_pin_memory",
    "dataloader_num_workers",
    "dataloader_persistent_workers",
)


@dataclass
class FastPathPlan:
    """What the run will do on its device: SFTConfig arguments, patches to apply, and the memory plan.

    Attributes:
        enabled: Whether the GPU fast path applies at all.
        attn: The attention implementation the model is loaded with.
        args: SFTConfig keyword arguments after the policy.
        patches: Names of ``phi3tune.fastpath`` patch modules to turn on, in order.
        notes: One line per decision, for the log and the dry run.
        tokens_per_micro_batch: Packed tokens per micro-batch (rows x max_length).
        memory: The memory model's prediction for the chosen checkpointing (CUDA only).
        gpu_memory_bytes: The card size the plan was made for (CUDA only).
        kbit_prepare: QLoRA is prepared with ``phi3tune.model.prepare_kbit_model`` (bf16 norms), not peft's.
        sharded: FSDP2 shards this run's weights (several GPU ranks with ``training_config.fsdp``).
        cuda_graphs: The decoder layers replay from CUDA graphs (``cuda_graphs.py``; one process only: the run
            checks that when it installs them).
    """

    enabled: bool
    attn: str
    args: dict[str, Any]
    patches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tokens_per_micro_batch: int = 0
    memory: memory.MemoryEstimate | None = None
    gpu_memory_bytes: float | None = None
    kbit_prepare: bool = False
    sharded: bool = False
    cuda_graphs: bool = False


def _switch(model_cfg: Any, key: str, env_name: str, env: Mapping[str, str], default: bool = True) -> bool:
    if env.get(env_name) is not None:
        return env[env_name] != "0"
    switches = getattr(model_cfg, "fast_path", None)
    value = getattr(switches, key, None) if switches is not None else None
    return default if value is None else bool(value)


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_attn_implementation(requested: str | None, device_type: str, *, assume_gpu: bool = False) -> str:
    """The attention implementation the model is loaded with.

    ``auto`` on a CUDA GPU with PyTorch's varlen kernel (compute capability >= 8.0) is ``varlen``; else
    ``flash_attention_2`` where flash-attn is installed, else ``sdpa``. On a CPU ``auto`` is ``sdpa``.
    ``assume_gpu`` plans for a GPU that is not here (the dry run's ``--gpu-memory``): varlen when this torch
    has the kernel.
    """
    requested = (requested or "auto").lower()
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "sdpa"
    has_kernel = attention.varlen_kernel_available("cuda") or (assume_gpu and attention.varlen_kernel_in_torch())
    if has_kernel:
        return attention.VARLEN
    return "flash_attention_2" if _flash_attn_available() else "sdpa"


def gpu_memory_bytes() -> float | None:
    """Total memory of the first visible CUDA device, or None without one."""
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return None


def plan_fast_path(
    model_cfg: Any,
    training_args: dict[str, Any],
    device_type: str,
    *,
    gpu_memory: float | None = None,
    env: Mapping[str, str] | None = None,
    shape: memory.ModelShape = memory.PHI3_MINI,
    sharded: bool | None = None,
) -> FastPathPlan:
    """Decide the fast path for ``device_type``; see the module docstring.

    Args:
        model_cfg: phi3tune's model section (``attn_implementation``, ``quantization``, ``fast_path``).
        training_args: SFTConfig keyword arguments from the config.
        device_type: ``cuda`` or ``cpu`` (the dry run passes ``cuda`` to plan for a GPU that is not here).
        gpu_memory: Card size in bytes; default: the visible GPU's, else ``DEFAULT_GPU_MEMORY_BYTES``.
        env: Environment for the benchmark overrides (default ``os.environ``).
        shape: The model's size for the memory model (default: Phi-3-mini, which the shipped recipes train).
        sharded: Whether FSDP2 will shard this run (the launch decides: one process or CPU ranks drop
            ``fsdp``); default: whether ``fsdp`` is set.
    """
    env = os.environ if env is None else env
    # A key set to null means "let phi3tune decide": it counts as unset.
    args = {k: v for k, v in training_args.items() if not (v is None and k in POLICY_KEYS)}
    requested = str(getattr(model_cfg, "attn_implementation", "auto") or "auto").lower()
    quantized = bool(getattr(model_cfg, "quantization", None))
    fp8 = getattr(model_cfg, "base_precision", "bf16") == "fp8"
    planning_only = gpu_memory is not None and device_type == "cuda" and gpu_memory_bytes() is None
    if fp8 and not planning_only:
        from phi3tune.fastpath import fp8_base  # imported only when a config asks for fp8

        fp8_base.require_fp8_gpu()  # the run, and a dry run on a GPU: exit 2 before anything loads
    attn = resolve_attn_implementation(requested, device_type, assume_gpu=planning_only)
    if sharded is None:
        sharded = bool(args.get("fsdp"))
    plan = FastPathPlan(enabled=False, attn=attn, args=args, sharded=sharded)
    if fp8:
        plan.notes.append("fp8 base: frozen LoRA base linears in e4m3 with per-channel scales, FP8 GEMMs "
                          "(model.base_precision; it saves memory, not time yet: docs/benchmarks.md)")

    if attn == attention.VARLEN:
        plan.patches.append("attention")
    graphs_asked = _switch(model_cfg, "cuda_graphs", CUDA_GRAPHS_ENV, env, default=False)
    if device_type != "cuda":
        plan.notes.append(f"fast path: off ({device_type}: the GPU levers do not apply)")
        if graphs_asked:
            plan.notes.append(f"fast path: CUDA graphs off (no CUDA GPU: {device_type})")
        return plan
    if requested not in ("auto", "varlen"):
        plan.notes.append(f"fast path: off (model.attn_implementation: {requested} was chosen explicitly)")
        if graphs_asked:
            plan.notes.append(f"fast path: CUDA graphs off (they need the fast path: model.attn_implementation "
                              f"auto or varlen, not {requested})")
        return plan
    plan.enabled = True
    plan.kbit_prepare = quantized and attn == attention.VARLEN
    user = set(args)

    def choose(key: str, value: Any, why: str) -> None:
        if key in user:
            if args[key] != value:
                plan.notes.append(
                    f"fast path: keeping {key}={args[key]!r} from the config (the fast path uses {value!r}: {why})"
                )
            return
        args[key] = value
        plan.notes.append(f"fast path: {key}={value!r} ({why})")

    # 1. Packing: padding-free best-fit-decreasing rows with true sample boundaries.
    choose("packing", True, "pack samples into full rows, no pad tokens")
    if args.get("packing"):
        choose("packing_strategy", "bfd", "padding-free collator with per-sample boundaries for the varlen kernel")
    max_length = max_length_of(args)
    packed = bool(args.get("packing")) and args.get("packing_strategy", "bfd") in ("bfd", "bfd_split")

    # 2. Token-budget micro-batches.
    if packed:
        rows_budget = max(1, TOKEN_BUDGET // max_length)
        if "per_device_train_batch_size" in user:
            rows = int(args["per_device_train_batch_size"])
            if rows > rows_budget and rows % rows_budget == 0:
                args["per_device_train_batch_size"] = rows_budget
                args["gradient_accumulation_steps"] = int(args.get("gradient_accumulation_steps", 1)) * (rows // rows_budget)
                plan.notes.append(
                    f"fast path: per_device_train_batch_size {rows} rows -> {rows_budget} rows x "
                    f"{rows // rows_budget} accumulation steps (token budget {TOKEN_BUDGET} a micro-batch)"
                )
        else:
            args["per_device_train_batch_size"] = rows_budget
            plan.notes.append(
                f"fast path: per_device_train_batch_size={rows_budget} packed rows of {max_length} tokens "
                f"(token budget {TOKEN_BUDGET})"
            )
    plan.tokens_per_micro_batch = int(args.get("per_device_train_batch_size", 8)) * max_length

    # 3. Phi-3's compiled layers (else Liger's kernels), fused LoRA linears, bf16 LoRA inputs.
    compiled_layers = _switch(model_cfg, "compiled_layers", PHI3_LAYERS_ENV, env)
    fused_lora = _switch(model_cfg, "fused_lora", LORA_FUSED_ENV, env)
    if sharded:
        compiled_layers = fused_lora = False
        note = ("fast path: compiled Phi-3 layers, Liger kernels and fused LoRA linears off under training_config.fsdp "
                "(FSDP2): not yet verified on weights FSDP2 gathers and frees per layer; plain PyTorch layers run")
        log.info(note)
        plan.notes.append(note)
    if compiled_layers:
        plan.patches.append("phi3_layers")
        plan.notes.append("fast path: Phi-3 residual+RMSNorm, qkv split+RoPE and SwiGLU fused by torch.compile "
                          "(model.fast_path.compiled_layers)")
        # Liger would patch the same modules per instance; its kernels are redundant here.
        choose("use_liger_kernel", False, "phi3tune's compiled layers cover RMSNorm, RoPE and SwiGLU")
    elif _liger_available() and not sharded:
        choose("use_liger_kernel", True, "Liger RMSNorm + RoPE + SwiGLU kernels")
        if args.get("use_liger_kernel") and "liger_kernel_config" not in user:
            # trl's chunked LM head already computes the loss without logits: Liger's cross-entropy stays off.
            args["liger_kernel_config"] = {"rope": True, "rms_norm": True, "swiglu": True,
                                           "cross_entropy": False, "fused_linear_cross_entropy": False}
    elif not sharded:
        plan.notes.append("fast path: compiled layers off and Liger not installed (pip install 'phi3tune[fast]'): "
                          "plain PyTorch RMSNorm/RoPE/SwiGLU")
    if args.get("bf16") or args.get("fp16"):
        plan.patches.append("peft_cast")
        plan.notes.append("fast path: LoRA inputs stay bf16 under autocast (no float32 copy per LoRA layer)")
    if fused_lora:
        plan.patches.append("lora_fused")
        plan.notes.append("fast path: fused base + LoRA linears (model.fast_path.fused_lora)")
    elif not sharded:
        plan.notes.append("fast path: fused LoRA linears off")

    # 4. Activation checkpointing: none when it fits (after graphs' buffers, 5.), else every n-th layer, else all.
    plan.gpu_memory_bytes = total = gpu_memory if gpu_memory is not None else (gpu_memory_bytes() or DEFAULT_GPU_MEMORY_BYTES)
    budget = QLORA_MEMORY_BUDGET if quantized else total * MEMORY_FRACTION
    graphs_off = ("FSDP2 shards the weights" if sharded
                  else "QLoRA's 4-bit kernels are not checked under capture" if quantized
                  else "batches are not packed with bfd" if not packed
                  else "activation checkpointing recomputes inside backward" if args.get("gradient_checkpointing")
                  else None)
    graph_bytes = memory.cuda_graph_bytes(plan.tokens_per_micro_batch, shape) if graphs_asked and not graphs_off else 0
    sizes = dict(quantized=quantized, fused=compiled_layers and fused_lora, shape=shape, fp8=fp8)
    least = partial(memory.least_recompute, plan.tokens_per_micro_batch, **sizes)
    chosen = least(budget_bytes=budget - graph_bytes)
    if graph_bytes and chosen.checkpointing != "none" and "gradient_checkpointing" not in user:
        graphs_off, graph_bytes = "the micro-batch fits only with activation checkpointing", 0
        chosen = least(budget_bytes=budget)
    if "gradient_checkpointing" in user:
        mode = memory.checkpointing_of(args)
        if args["gradient_checkpointing"] and chosen.checkpointing != "full":
            plan.notes.append("fast path: keeping gradient_checkpointing=True from the config "
                              f"(the fast path would use {chosen.checkpointing!r}: recompute costs ~25% of the step)")
        chosen = memory.estimate(plan.tokens_per_micro_batch, checkpointing=mode, **sizes)
    else:
        mode = chosen.checkpointing
        args["gradient_checkpointing"] = mode != "none"
        if mode != "none" and "gradient_checkpointing_kwargs" not in user:
            kwargs: dict[str, Any] = {"use_reentrant": False}
            if mode.startswith("every_n:"):
                kwargs["every_n_layers"] = int(mode.split(":")[1])
            args["gradient_checkpointing_kwargs"] = kwargs
        plan.notes.append(
            f"fast path: activation checkpointing {mode} ({plan.tokens_per_micro_batch} tokens a micro-batch, "
            f"predicted peak {(chosen.peak + graph_bytes) / 2**30:.1f} GiB of a {budget / 2**30:.1f} GiB budget)"
        )
    plan.memory = chosen

    # 5. CUDA graphs (opt-in): they pay only where the GPU waits on launches (docs/benchmarks.md "2026-12-02").
    if graphs_asked:
        if not graphs_off and chosen.peak + graph_bytes > budget:  # the config's checkpointing leaves no room
            graphs_off = f"their {graph_bytes / 2**30:.1f} GiB of buffers exceed the {budget / 2**30:.1f} GiB budget"
        if graphs_off:
            plan.notes.append(f"fast path: CUDA graphs off ({graphs_off})")
        else:
            plan.cuda_graphs = True
            plan.memory = replace(chosen, fixed=chosen.fixed + graph_bytes)
            plan.notes.append(f"fast path: decoder layers replayed from CUDA graphs, micro-batches padded to "
                              f"{plan.tokens_per_micro_batch} tokens, +{graph_bytes / 2**30:.1f} GiB of static "
                              "buffers (model.fast_path.cuda_graphs)")

    # 6. Input pipeline: data are pre-tokenised; keep the GPU fed.
    choose("dataloader_pin_memory", True, "pinned host batches")
    choose("dataloader_num_workers", 2, "collate off the training thread")
    if args.get("dataloader_num_workers"):
        choose("dataloader_persistent_workers", True, "workers survive epochs")
    return plan
