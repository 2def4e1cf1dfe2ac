"""Merge a LoRA adapter into its base, save a plain transformers model, and verify it.

Steps: refuse a non-empty OUTPUT_DIR -> mark it incomplete -> load the base unquantized (bf16 on GPU,
fp32 on CPU; a QLoRA adapter is merged into the full-precision base, never into 4-bit weights) ->
record base + adapter logits on fixed prompts -> ``merge_and_unload`` -> save safetensors shards,
tokenizer, generation config -> reload the saved folder with plain ``AutoModelForCausalLM`` and compare
its logits with the recorded ones -> remove the incomplete marker.

Verifying the reloaded files rather than the in-memory merge also proves the output loads anywhere.

Tolerances (max absolute logit difference): fp32 1e-4 — the merge only reorders a sum (W x + s·B A x
vs (W + s·B A) x), so differences are float32 rounding. bf16/fp16: the merged weight ``W + s·BA`` is
rounded once more to 8 (bf16) significant bits than the separate computation, and that rounding
propagates through every layer; we accept differences up to 2^-5 (= 4 bf16 steps at |logit| ≈ 1)
or 1% of the largest |logit|, whichever is larger. A wrong merge (say, a scaling off by 2×) moves
logits by the adapter's whole effect, which the verification also reports so the two can be compared.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from phi3tune import modeling
from phi3tune.checkpoints import atomic_write_json
from phi3tune.errors import Phi3TuneError, UsageError
from phi3tune.run_dir import Target, load_full_model, resolve_target

INCOMPLETE_MARKER = "MERGE_INCOMPLETE"
VERIFICATION_FILE = "merge_verification.json"
MAX_SHARD_SIZE = "5GB"
FP32_TOLERANCE = 1e-4
LOW_PRECISION_ABS_TOLERANCE = 2.0**-5
LOW_PRECISION_REL_TOLERANCE = 0.01

# Fixed verification prompts: short and long, code and non-English, so many vocabulary rows and
# positions are exercised. Tests check held-out prompts of their own.
VERIFY_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Write a Python function that reverses a list, with a docstring."}],
    [{"role": "user", "content": "Übersetze bitte: the quick brown fox jumps over the lazy dog. 日本語でも。"}],
    [{"role": "user", "content": "List three prime numbers greater than 100 and explain why each is prime."},
     {"role": "assistant", "content": "101, 103 and 107: none has a divisor up to its square root."},
     {"role": "user", "content": "And the next one?"}],
]  # fmt: skip


class MergeVerificationError(Phi3TuneError):
    """The merged model's logits differ from base + adapter beyond the tolerance: exit 1."""

    exit_code = 1


def tolerance_for(dtype: torch.dtype, max_abs_logit: float) -> float:
    """The accepted max absolute logit difference for a merge in ``dtype`` (see module docstring)."""
    if dtype == torch.float32:
        return FP32_TOLERANCE
    return max(LOW_PRECISION_ABS_TOLERANCE, LOW_PRECISION_REL_TOLERANCE * max_abs_logit)


def _check_output_dir(output_dir: Path, adapter_path: Path) -> Path:
    out = output_dir.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} is a file.", hint="choose a new folder for the merged model.")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"output directory {out} is not empty.", hint="choose a new or empty folder.")
    if out == adapter_path.resolve() or adapter_path.resolve() in out.parents:
        raise UsageError("the merged model cannot be written inside the adapter folder.")
    return out


def verification_inputs(tokenizer) -> list[torch.Tensor]:
    """Token ids (1 x T) of the fixed verification prompts, rendered with the Phi-3 chat template."""
    from phi3tune.chat_template import render_prompt

    return [torch.tensor([render_prompt(tokenizer, conv)]) for conv in VERIFY_CONVERSATIONS]


@torch.no_grad()
def prompt_logits(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float32 CPU logits of ``model`` for each prompt (one at a time: no padding effects)."""
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in inputs]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute elementwise difference over two lists of same-shaped tensors."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _merge(peft_model):
    """Fold the LoRA weights into the base layers (``safe_merge`` refuses to write NaN/inf weights)."""
    return peft_model.merge_and_unload(safe_merge=True)


def _save(model, tokenizer, out: Path) -> None:
    model.config.use_cache = True  # training turns the KV cache off; inference wants it on
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")  # the merged weights are full precision
    model.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(out)
    modeling.phi3_generation_config(model.config).save_pretrained(out)


def _only_safe_files(out: Path) -> list[str]:
    """Files in ``out`` that are neither safetensors, JSON nor tokenizer text (should be none)."""
    allowed = {".safetensors", ".json", ".model", ".txt", ".jinja"}
    return [p.name for p in out.iterdir() if p.is_file() and p.suffix not in allowed and p.name != INCOMPLETE_MARKER]


def merge_and_save(adapter_dir: Path, output_dir: Path, *, verify: bool = True, console: Console | None = None) -> None:
    """Merge an adapter into its base, save it to ``output_dir`` and (by default) verify the result.

    Args:
        adapter_dir: An adapter directory or a run's output directory.
        output_dir: A new or empty folder for the merged model.
        verify: Reload the saved model and compare its logits with base + adapter.
        console: Where progress and results are printed.

    Raises:
        UsageError: Bad adapter path or non-empty output dir (exit 2).
        MergeVerificationError: Logits differ beyond the tolerance (exit 1); ``MERGE_INCOMPLETE`` stays.
    """
    from peft import PeftModel

    console = console or Console(stderr=True)
    started = time.perf_counter()
    target: Target = resolve_target(adapter_dir, allow_model=False)
    out = _check_output_dir(Path(output_dir), Path(target.path))
    out.mkdir(parents=True, exist_ok=True)
    marker = out / INCOMPLETE_MARKER
    marker.write_text("phi3tune merge-adapter started; this folder is not a usable model until this file is gone.\n")

    device = modeling.device_type()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if target.quantization:
        console.print(f"QLoRA adapter ({target.quantization}): merging into the unquantized base in {_name(dtype)}.")
    console.print(f"loading base {target.base} ({_name(dtype)}, {device}) and adapter {target.path}")
    tokenizer = modeling.load_tokenizer(target.path)
    revision = target.base_revision if not Path(target.base).is_dir() else None
    base = load_full_model(target.base, dtype=dtype, device=device, revision=revision)
    model = PeftModel.from_pretrained(base, target.path, is_trainable=False).eval()

    inputs = verification_inputs(tokenizer)
    reference = prompt_logits(model, inputs) if verify else []
    if verify:
        with model.disable_adapter():
            adapter_effect = max_abs_diff(reference, prompt_logits(model, inputs))

    merged = _merge(model)
    _save(merged, tokenizer, out)
    del merged, model, base
    if device == "cuda":
        torch.cuda.empty_cache()
    console.print(f"saved merged model to {out}")
    unsafe = _only_safe_files(out)
    if unsafe:
        raise MergeVerificationError(f"unexpected non-safetensors/JSON files in {out}: {unsafe}")

    if not verify:
        console.print("[yellow]not verified (--no-verify).")
        marker.unlink()
        return
    result = _verify(out, inputs, reference, dtype, device, adapter_effect)
    result["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out / VERIFICATION_FILE, result)
    console.print(
        f"verification: max |logit diff| merged vs base+adapter = {result['max_abs_diff']:.3g} "
        f"(tolerance {result['tolerance']:.3g}, {_name(dtype)}; adapter's own effect {adapter_effect:.3g})"
    )
    if not result["passed"]:
        raise MergeVerificationError(
            f"merged model disagrees with base + adapter: max |logit diff| {result['max_abs_diff']:.3g} > "
            f"tolerance {result['tolerance']:.3g}. {out} is left marked {INCOMPLETE_MARKER}.",
            hint="rerun with PHI3TUNE_DEBUG=1 and report it; do not use this merged model.",
        )
    if adapter_effect == 0.0:
        console.print("[yellow]warning:[/] the adapter changes no logits (untrained, zero LoRA B?).")
    marker.unlink()
    console.print(f"[green]merged model verified[/] in {result['seconds']:.1f}s: {out}")


def _verify(out: Path, inputs, reference, dtype: torch.dtype, device: str, adapter_effect: float) -> dict[str, Any]:
    """Reload the saved folder with plain transformers, compare logits, and check that it generates."""
    reloaded = load_full_model(str(out), dtype=dtype, device=device)
    merged_logits = prompt_logits(reloaded, inputs)
    diff = max_abs_diff(reference, merged_logits)
    tolerance = tolerance_for(dtype, max(float(r.abs().max()) for r in reference))
    with torch.no_grad():
        generated = reloaded.generate(inputs[0].to(reloaded.device), max_new_tokens=4, do_sample=False)
    del reloaded
    return {
        "passed": bool(diff <= tolerance) and generated.shape[1] > inputs[0].shape[1],
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "dtype": _name(dtype),
        "adapter_effect_max_abs": adapter_effect,
        "n_prompts": len(inputs),
        "n_positions": int(sum(ids.shape[1] for ids in inputs)),
    }


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
