"""phi3tune's fast-path policy: what ``attn_implementation: auto`` and the default config choose.

API (called by the recipe, ``phi3tune/train.py``)
-------------------------------------------------
``resolve_attn_implementation(requested: str, device_type: str) -> str``
    ``auto`` on a CUDA GPU with PyTorch's varlen kernel (compute capability >= 8.0): ``"varlen"``
    (phi3tune's padding-free attention, ``phi3tune/attention.py``; registered with transformers here);
    else ``flash_attention_2`` when the flash-attn package is installed, else ``sdpa``. On a CPU ``auto``
    is ``sdpa``. An explicit ``varlen`` is registered and kept (it runs its exact reference path where
    the kernel is missing). Any other explicit value is returned unchanged.

``apply_fast_path(model_cfg, training_args: dict, device_type: str, *, gpu_memory_bytes=None)
        -> tuple[dict, list[str]]``
    Returns a new SFTConfig kwargs dict and one log line per decision. Only on CUDA and only when
    ``model_cfg.attn_implementation`` is ``auto`` or ``varlen``; otherwise the args come back unchanged
    with one line saying why. Keys the user set in ``training_config`` always win (a line says what the
    fast path would have chosen). The levers, each measured in docs/benchmarks.md:

    * ``packing: true, packing_strategy: bfd`` — trl's best-fit-decreasing packing, which also makes the
      collator padding-free (one flat row with ``position_ids`` and ``cu_seq_lens``): no pad tokens are
      computed, and the varlen kernel sees the true per-sample boundaries.
    * token-budget micro-batches: ``per_device_train_batch_size`` packed rows of ``max_length`` tokens,
      sized to ``TOKEN_BUDGET`` tokens; a user's larger batch is split into micro-batches with
      ``gradient_accumulation_steps`` so the optimizer step sees the same rows.
    * activation checkpointing off when the activations fit the GPU (trl's SFTConfig turns it *on* by
      default); otherwise every n-th layer only (``gradient_checkpointing_kwargs.every_n_layers``), or all.
    * Phi-3's residual add + RMSNorm, qkv split + RoPE and SwiGLU as ``torch.compile``-fused functions of
      the fused projections (``phi3tune/phi3_layers.py``; ``PHI3TUNE_PHI3_LAYERS=0`` turns them off).
    * Liger kernels (RMSNorm, RoPE, SwiGLU) through ``use_liger_kernel`` only where phi3_layers is off;
      trl's own chunked LM head already computes the loss without logits, so Liger's fused cross-entropy
      stays off.
    * dataloader: pinned memory, 2 workers, persistent.

    ``model_cfg`` needs ``attn_implementation`` and ``quantization`` attributes (phi3tune's ModelConfig).

    * LoRA inputs stay bf16 under autocast (``patch_peft_input_cast``, process-wide, exact).
    * fused base + LoRA linears (``phi3tune/lora_fused.py``); ``PHI3TUNE_LORA_FUSED=0`` in the environment
      turns them off (for A/B runs).

``prepare_kbit_model(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=None) -> model``
    QLoRA preparation for the fast path, in place of ``peft.prepare_model_for_kbit_training``: freezes the
    base and enables checkpointing/input grads, but keeps norms and embeddings in bf16 (peft upcasts them to
    float32, which makes the residual stream float32). H100: 9.6k -> 14.5k tokens/s, 7.8 -> 5.1 GiB; per-step
    losses within 0.012% of peft's preparation (docs/benchmarks.md). The recipe should call it when the
    fast path is on (CUDA, attn auto/varlen).

``patch_peft_input_cast() -> bool``
    see above; called by ``apply_fast_path`` when bf16/fp16 autocast is on.

``activation_bytes_per_token(quantized: bool, checkpointing: str) -> float`` and
``plan_memory(...)`` — the memory model behind the choice (constants measured on an H100).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from typing import Any

log = logging.getLogger(__name__)

# Environment switch for the fused LoRA linears ("0" = off), for A/B measurements of the same recipe.
LORA_FUSED_ENV = "PHI3TUNE_LORA_FUSED"
# Same for phi3tune/phi3_layers.py's compiled qkv split + RoPE and SwiGLU ("0" = off: Liger's kernels instead).
PHI3_LAYERS_ENV = "PHI3TUNE_PHI3_LAYERS"

# Tokens per micro-batch the fast path aims for: 4 packed rows of 2048. Below ~4k tokens an H100 is
# under-used by Phi-3-mini's matmuls; above ~8k the gain is small and memory grows linearly.
TOKEN_BUDGET = 8192

# Measured on an H100 (docs/benchmarks.md), Phi-3-mini, LoRA r=16 all-linear, bf16, varlen attention,
# packed rows: activation memory kept for backward, per token of the micro-batch. Peak at 8,192 tokens:
# 32.09 GiB with phi3_layers + fused LoRA (2.97e6 a token), 34.96-35.09 GiB with either switched off
# (3.35e6); the larger one is used so that switching them off never outgrows the plan.
ACT_BYTES_PER_TOKEN_NO_CKPT = 3.4e6
ACT_BYTES_PER_TOKEN_FULL_CKPT = 0.35e6
# Fixed costs besides the base weights: LoRA weights + Adam state, CUDA context, allocator slack.
FIXED_OVERHEAD_BYTES = 2.5e9
# Phi-3-mini base weights: bf16 and nf4 (double quant; embeddings and norms stay 16/32-bit).
PARAMS_PHI3_MINI = 3.82e9

# The fast path targets a peak well inside the card: a fraction of its memory.
MEMORY_FRACTION = 0.55
# QLoRA exists to fit small cards: its memory target is a fixed budget, whatever the card.
QLORA_MEMORY_BUDGET = 7.5 * 2**30


# Keys the policy decides; a null value for one of them in the config means "unset".
_POLICY_KEYS = (
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


def _liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(requested: str, device_type: str) -> str:
    """The attention implementation the model is loaded with."""
    from phi3tune import attention

    requested = (requested or "auto").lower()
    if requested == attention.VARLEN:
        attention.register_attention()
        if not attention.varlen_kernel_available(device_type):
            log.warning("attention: varlen requested; no CUDA varlen kernel here, running its exact reference path")
        return attention.VARLEN
    if requested != "auto":
        return requested
    if device_type == "cuda":
        if attention.varlen_kernel_available("cuda"):
            attention.register_attention()
            log.info("attention: varlen (torch.nn.attention.varlen.varlen_attn, padding-free, per-sample boundaries)")
            return attention.VARLEN
        if _flash_attn_available():
            log.info("attention: flash_attention_2 (torch varlen kernel unavailable)")
            return "flash_attention_2"
        log.info("attention: sdpa (no varlen kernel in this torch, flash-attn not installed)")
    return "sdpa"


def activation_bytes_per_token(quantized: bool = False, checkpointing: str = "none") -> float:
    """Activation memory per micro-batch token: ``checkpointing`` is ``none``, ``full`` or ``every_n:N``."""
    if checkpointing == "full":
        return ACT_BYTES_PER_TOKEN_FULL_CKPT
    if checkpointing.startswith("every_n:"):
        n = int(checkpointing.split(":", 1)[1])
        kept = 1.0 - 1.0 / n
        return ACT_BYTES_PER_TOKEN_FULL_CKPT + kept * (ACT_BYTES_PER_TOKEN_NO_CKPT - ACT_BYTES_PER_TOKEN_FULL_CKPT)
    return ACT_BYTES_PER_TOKEN_NO_CKPT


def weight_bytes(quantized: bool) -> float:
    if quantized:
        # nf4 + double quant on the linear layers, embeddings/lm_head in bf16, norms fp32
        return PARAMS_PHI3_MINI * 0.56 + 2 * 32064 * 3072 * 2
    return PARAMS_PHI3_MINI * 2


def plan_memory(tokens: int, quantized: bool, budget_bytes: float) -> tuple[str, float]:
    """Least recompute that fits: ('none' | 'every_n:N' | 'full', predicted peak bytes)."""
    base = weight_bytes(quantized) + FIXED_OVERHEAD_BYTES
    for mode in ("none", "every_n:4", "every_n:3", "every_n:2", "full"):
        peak = base + tokens * activation_bytes_per_token(quantized, mode)
        if peak <= budget_bytes:
            return mode, peak
    return "full", base + tokens * activation_bytes_per_token(quantized, "full")


def _gpu_memory_bytes() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # pragma: no cover
        return None
    return None


def apply_fast_path(
    model_cfg: Any,
    training_args: dict[str, Any],
    device_type: str,
    *,
    gpu_memory_bytes: float | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Adjust SFTConfig kwargs for speed on a GPU. See the module docstring."""
    # A key set to null means "let phi3tune decide": it counts as unset.
    args = {k: v for k, v in training_args.items() if not (v is None and k in _POLICY_KEYS)}
    lines: list[str] = []
    requested = str(getattr(model_cfg, "attn_implementation", "auto") or "auto").lower()
    quantized = bool(getattr(model_cfg, "quantization", None))
    if device_type != "cuda":
        return args, [f"fast path: off ({device_type}: the GPU levers do not apply)"]
    if requested not in ("auto", "varlen"):
        return args, [f"fast path: off (model.attn_implementation: {requested} was chosen explicitly)"]

    user = set(args)

    def choose(key: str, value: Any, why: str) -> None:
        if key in user:
            if args[key] != value:
                lines.append(f"fast path: keeping {key}={args[key]!r} from the config (the fast path uses {value!r}: {why})")
            return
        args[key] = value
        lines.append(f"fast path: {key}={value!r} ({why})")

    # 1. Packing: padding-free best-fit-decreasing rows with true sample boundaries.
    choose("packing", True, "pack samples into full rows, no pad tokens")
    if args.get("packing"):
        choose("packing_strategy", "bfd", "padding-free collator with per-sample boundaries for the varlen kernel")
    max_length = int(args.get("max_length") or 1024)
    packed = bool(args.get("packing")) and args.get("packing_strategy", "bfd") in ("bfd", "bfd_split")

    # 2. Token-budget micro-batches.
    rows_budget = max(1, TOKEN_BUDGET // max_length) if packed else None
    if packed:
        if "per_device_train_batch_size" in user:
            rows = int(args["per_device_train_batch_size"])
            if rows > rows_budget and rows % rows_budget == 0:
                accum = int(args.get("gradient_accumulation_steps", 1)) * (rows // rows_budget)
                args["per_device_train_batch_size"] = rows_budget
                args["gradient_accumulation_steps"] = accum
                lines.append(
                    f"fast path: per_device_train_batch_size {rows} rows -> {rows_budget} rows x "
                    f"{rows // rows_budget} accumulation steps (token budget {TOKEN_BUDGET} a micro-batch)"
                )
        else:
            args["per_device_train_batch_size"] = rows_budget
            lines.append(
                f"fast path: per_device_train_batch_size={rows_budget} packed rows of {max_length} tokens "
                f"(token budget {TOKEN_BUDGET})"
            )
    rows = int(args.get("per_device_train_batch_size", 8))
    tokens = rows * max_length

    # 3. Activation checkpointing: off when it fits, else every n-th layer, else all.
    total = gpu_memory_bytes if gpu_memory_bytes is not None else _gpu_memory_bytes()
    budget = QLORA_MEMORY_BUDGET if quantized else (total or 80e9) * MEMORY_FRACTION
    mode, peak = plan_memory(tokens, quantized, budget)
    if "gradient_checkpointing" in user:
        if args["gradient_checkpointing"] and mode != "full":
            lines.append(
                "fast path: keeping gradient_checkpointing=True from the config "
                f"(the fast path would use {mode!r}: recompute costs ~25% of the step)"
            )
    else:
        if mode == "none":
            args["gradient_checkpointing"] = False
        else:
            args["gradient_checkpointing"] = True
            if mode.startswith("every_n:") and "gradient_checkpointing_kwargs" not in user:
                args["gradient_checkpointing_kwargs"] = {"use_reentrant": False, "every_n_layers": int(mode.split(":")[1])}
            elif "gradient_checkpointing_kwargs" not in user:
                args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        lines.append(
            f"fast path: activation checkpointing {mode} ({tokens} tokens a micro-batch, predicted peak "
            f"{peak / 2**30:.1f} GiB of a {budget / 2**30:.1f} GiB budget)"
        )

    # 4. Phi-3's norms, split + RoPE and SwiGLU as compiled functions of the fused projections
    #    (phi3tune/phi3_layers.py); where they are switched off, Liger's kernels for the same three.
    phi3_layers_on = os.environ.get(PHI3_LAYERS_ENV, "1") != "0"
    if phi3_layers_on:
        from phi3tune.phi3_layers import patch_phi3_layers

        phi3_layers_on = patch_phi3_layers()
    if phi3_layers_on:
        lines.append(
            "fast path: Phi-3 residual+RMSNorm, qkv split+RoPE and SwiGLU fused by torch.compile "
            f"({PHI3_LAYERS_ENV}=0 turns it off)"
        )
        # Liger would patch the same modules per instance; its kernels are redundant here.
        choose("use_liger_kernel", False, "phi3tune's compiled layers cover RMSNorm, RoPE and SwiGLU")
    elif _liger_available():
        choose("use_liger_kernel", True, "Liger RMSNorm + RoPE + SwiGLU kernels")
        if args.get("use_liger_kernel") and "liger_kernel_config" not in user:
            args["liger_kernel_config"] = {
                "rope": True,
                "rms_norm": True,
                "swiglu": True,
                "cross_entropy": False,
                "fused_linear_cross_entropy": False,
            }
    else:
        lines.append(
            "fast path: Liger kernels not installed (pip install 'phi3tune[fast]'): plain PyTorch RMSNorm/RoPE/SwiGLU"
        )
    # trl 1.16 marks use_liger_kernel deprecated in favour of hub kernels (which need the internet).
    warnings.filterwarnings("ignore", message=r".*use_liger_kernel=True.*deprecated.*", category=FutureWarning)

    # 5. LoRA under autocast: skip peft's copy of every LoRA input to the adapters' float32 (autocast casts
    #    it straight back to bf16 for the matmul, so the result is the same; the copies cost ~15% of a step).
    if args.get("bf16") or args.get("fp16"):
        if patch_peft_input_cast():
            lines.append("fast path: LoRA inputs stay bf16 under autocast (no float32 copy per LoRA layer)")

    # 5b. Fused base + LoRA linears (phi3tune/lora_fused.py): no full-size scale/add passes per LoRA layer.
    if os.environ.get(LORA_FUSED_ENV, "1") != "0":
        from phi3tune.lora_fused import patch_lora_fused

        if patch_lora_fused():
            lines.append(
                f"fast path: fused base + LoRA linears (one GEMM epilogue add; {LORA_FUSED_ENV}=0 turns it off)"
            )
    else:
        lines.append(f"fast path: fused LoRA linears off ({LORA_FUSED_ENV}=0)")

    # 6. Input pipeline: data are pre-tokenised; keep the GPU fed.
    choose("dataloader_pin_memory", True, "pinned host batches")
    choose("dataloader_num_workers", 2, "collate off the training thread")
    if args.get("dataloader_num_workers"):
        choose("dataloader_persistent_workers", True, "workers survive epochs")
    return args, lines


_PEFT_CAST_PATCHED = False


def patch_peft_input_cast() -> bool:
    """Make peft's LoRA layers skip casting their input to the adapter dtype when autocast would cast it back.

    peft keeps LoRA weights in float32 and, before ``lora_A``, copies the (bf16) layer input to float32;
    under bf16 autocast ``lora_A``'s matmul then casts it back to bf16. The round trip is exact, so skipping
    it changes no number (with ``lora_dropout: 0``); it saves two full-size copies per LoRA layer forward and
    two in backward. Only applies while autocast is on with the input's dtype. Process-wide, idempotent;
    returns True once the patch is in place.
    """
    global _PEFT_CAST_PATCHED
    if _PEFT_CAST_PATCHED:
        return True
    try:
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # pragma: no cover - peft missing
        return False
    original = BaseTunerLayer._cast_input_dtype

    def _cast_input_dtype(self, x, dtype):
        if (
            isinstance(x, torch.Tensor)
            and dtype == torch.float32
            and x.dtype in (torch.bfloat16, torch.float16)
            and torch.is_autocast_enabled(x.device.type)
            and torch.get_autocast_dtype(x.device.type) == x.dtype
        ):
            return x
        return original(self, x, dtype)

    _cast_input_dtype._phi3tune_original = original  # type: ignore[attr-defined]
    BaseTunerLayer._cast_input_dtype = _cast_input_dtype
    _PEFT_CAST_PATCHED = True
    return True


def prepare_kbit_model(model: Any, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None):
    """QLoRA preparation without peft's float32 upcast of norms and embeddings.

    ``peft.prepare_model_for_kbit_training`` casts every non-4-bit parameter (embeddings, lm_head, RMSNorm
    weights) to float32, which makes the whole residual stream float32: twice the activation bytes and
    slower elementwise kernels. The QLoRA paper's recipe computes in bf16 (``bnb_4bit_compute_dtype``);
    RMSNorm already normalises in float32 internally (transformers and Liger both upcast inside the kernel).
    This does the rest of peft's preparation: freeze the base, and make checkpointing work with a frozen
    embedding (inputs that require grad).
    """
    for param in model.parameters():
        param.requires_grad = False
    if use_gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {})
        kwargs.setdefault("use_reentrant", False)
        # Like the Trainer: these two select layers / placement, the rest go to torch.utils.checkpoint.
        every_n_layers = kwargs.pop("every_n_layers", 1)
        offload = kwargs.pop("offload", False)
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload
        )
        model.enable_input_require_grads()
    return model
