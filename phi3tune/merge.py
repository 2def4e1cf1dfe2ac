"""Merge a LoRA adapter into its base, save a plain transformers model, and verify it.

Steps: refuse a non-empty OUTPUT_DIR -> lock it -> write into a hidden staging folder beside it, marked
incomplete -> load the base unquantized in float32
(a QLoRA adapter is merged into the full-precision base, never into 4-bit weights) -> record
base + adapter logits on fixed prompts -> ``merge_and_unload`` -> check the merged logits -> cast to
the save dtype (bf16 on GPU, fp32 on CPU) -> save safetensors shards, tokenizer, generation config ->
check the saved tensors and that plain ``AutoModelForCausalLM`` loads them and generates -> remove the
incomplete marker, give the files the umask's permissions -> rename the staging folder to OUTPUT_DIR.

Why staging rather than only a ``MERGE_INCOMPLETE`` marker in OUTPUT_DIR: the merged folder is mostly read
by other tools (plain transformers, vLLM, an upload), which know nothing of the marker and would load a
half-written or unverified model. With staging, OUTPUT_DIR exists only once it is verified. The marker is
kept inside the staging folder, and phi3tune's readers (``artefacts.check_model_dir``) refuse any folder
holding it, so a staging folder renamed by hand, or an output of an older phi3tune, is still caught. A
failed verification keeps the staging folder (with ``merge_verification.json``) for inspection and names
it; any other failure removes it; one left by a killed merge is removed by the next merge into the same
OUTPUT_DIR (under its lock, so no live merge is using it). safetensors creates its files 0600 whatever the
umask, so the files are given the umask's permissions before the rename: a merged model is meant to be
shared.

Why merge in float32 even for a bf16 model: ``W + s·B·A`` is then rounded to bf16 once, instead of
peft's bf16 product and bf16 sum (two roundings), and the merge can be verified exactly. Measured on
an H100 with a full-size random-init Phi-3-mini, comparing a bf16 merged model with bf16 base +
adapter moves logits by up to ~0.4 from rounding alone (each path rounds differently, and 32 layers
amplify it), while a wrong scaling of an adapter moves them by the adapter's effect — the two are
too close to tell apart with a bf16 tolerance. So the verification has two exact parts:

1. The merge (float32): merged logits equal base + adapter logits within 1e-4 times the largest
   |logit| (never below 1e-4 absolute). Only the order of a sum changes (W·x + s·B·A·x vs
   (W + s·B·A)·x), so the difference is float32 rounding, which grows with the logits' size: measured
   ~5e-5 at |logit| ≤ 5.6 on full-size Phi-3-mini (H100) and on the tiny test model; a real Phi-3's
   logits reach ~40, where an absolute 1e-4 would flag rounding as a failure.
2. The export: every saved tensor equals the verified merged tensor cast to the save dtype, bit for
   bit, and the saved folder loads with plain transformers and generates.

The bf16 model's own logit distance from the float32 reference is reported (not judged): that is the
price of bf16 weights, the same for any bf16 export.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console

from phi3tune.model import loading, staged_output
from phi3tune.model.artefacts import MERGE_INCOMPLETE, MERGE_STAGING_SUFFIX, quoted
from phi3tune.training.atomic import atomic_write_json, settle_tree
from phi3tune.errors import Phi3TuneError
from phi3tune.model.targets import Target, load_full_model, resolve_target, tokenizer_source
from phi3tune.training.run_lock import folder_lock

INCOMPLETE_MARKER = MERGE_INCOMPLETE
VERIFICATION_FILE = "merge_verification.json"
MAX_SHARD_SIZE = "5GB"
FP32_TOLERANCE = 1e-4  # relative to max(1, largest |logit|): see the module docstring

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


@contextmanager
def _exact_float32() -> Iterator[None]:
    """Plain IEEE float32 matmuls (no TF32) while verifying, so 1e-4 is a meaningful tolerance."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _check_output_dir(output_dir: Path, adapter_path: Path) -> Path:
    return staged_output.check_new_output(output_dir, adapter_path, what="merged model", source_role="adapter")


def verification_inputs(tokenizer) -> list[torch.Tensor]:
    """Token ids (1 x T) of the fixed verification prompts, rendered with the Phi-3 chat template."""
    from phi3tune.model.chat_template import render_prompt

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
    loading.phi3_generation_config(model.config).save_pretrained(out)


def _only_safe_files(out: Path) -> list[str]:
    """Files in ``out`` that are neither safetensors, JSON nor tokenizer text (should be none)."""
    allowed = {".safetensors", ".json", ".model", ".txt", ".jinja"}
    return [p.name for p in out.iterdir() if p.is_file() and p.suffix not in allowed and p.name != INCOMPLETE_MARKER]


def staging_dir(out: Path) -> Path:
    """The hidden folder beside ``out`` that a merge writes into before renaming it to ``out``."""
    return staged_output.staging_dir(out, MERGE_STAGING_SUFFIX)


def _fresh_staging(out: Path, console: Console) -> Path:
    """An empty staging folder for ``out``; one left by a killed or failed merge (ours: marked) is removed."""
    return staged_output.fresh_staging(out, suffix=MERGE_STAGING_SUFFIX, marker=INCOMPLETE_MARKER,
                                       command="merge-adapter", console=console)


def merge_and_save(adapter_dir: Path, output_dir: Path, *, verify: bool = True, console: Console | None = None,
                   save_dtype: torch.dtype | None = None) -> None:
    """Merge an adapter into its base, save it to ``output_dir`` and (by default) verify the result.

    Args:
        adapter_dir: An adapter directory or a run's output directory.
        output_dir: A new or empty folder for the merged model.
        verify: Check merged logits against base + adapter and the saved files (module docstring).
        console: Where progress and results are printed.
        save_dtype: The saved weights' dtype; None: bf16 on GPU, fp32 on CPU (``export onnx`` asks for fp32).

    Raises:
        UsageError: Bad adapter path, non-empty output dir, or another merge writing it (exit 2).
        MergeVerificationError: A check failed (exit 1); ``output_dir`` is not created and the staging
            folder beside it is kept, marked ``MERGE_INCOMPLETE``.
    """
    console = console or Console(stderr=True)
    started = time.perf_counter()
    target: Target = resolve_target(adapter_dir, allow_model=False)
    out = _check_output_dir(Path(output_dir), Path(target.path))
    with folder_lock(out, "merge"):
        out = _check_output_dir(out, Path(target.path))  # again, now that no other merge can write it
        staging = _fresh_staging(out, console)
        try:
            seconds = _merge_into(target, staging, out, verify=verify, console=console, started=started,
                                  save_dtype=save_dtype)
        except MergeVerificationError:
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a partial model is of no use to anyone
            raise
        staged_output.publish(staging, out, what="merged model")
    console.print(f"[green]merged model {'verified' if verify else 'written'}[/] in {seconds:.1f}s: {out}",
                  highlight=False)


def _merge_into(target: Target, staging: Path, out: Path, *, verify: bool, console: Console, started: float,
                save_dtype: torch.dtype | None = None) -> float:
    """Load, merge, verify and save into ``staging``; returns the seconds taken. ``out`` is for messages."""
    from peft import PeftModel

    marker = staging / INCOMPLETE_MARKER
    device = loading.device_type()
    save_dtype = save_dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    if target.quantization:
        console.print(f"QLoRA adapter ({target.quantization}): merging into the unquantized base.")
    console.print(f"loading base {target.base} (float32 on {device}) and adapter {target.path}", highlight=False)
    tokenizer = loading.load_tokenizer(tokenizer_source(target))
    revision = target.base_revision if not Path(target.base).is_dir() else None
    base = load_full_model(target.base, dtype=torch.float32, device=device, revision=revision)
    model = PeftModel.from_pretrained(base, target.path, is_trainable=False).eval()

    inputs = verification_inputs(tokenizer)
    result: dict[str, Any] = {"save_dtype": _name(save_dtype), "n_prompts": len(inputs),
                              "n_positions": int(sum(ids.shape[1] for ids in inputs))}
    with _exact_float32():
        if verify:
            reference = prompt_logits(model, inputs)
            with model.disable_adapter():
                result["adapter_effect_max_abs"] = max_abs_diff(reference, prompt_logits(model, inputs))
        merged = _merge(model)
        if verify:
            result["max_abs_logit"] = max(float(r.abs().max()) for r in reference)
            result["max_abs_diff"] = max_abs_diff(reference, prompt_logits(merged, inputs))
            result["tolerance"] = tolerance = FP32_TOLERANCE * max(1.0, result["max_abs_logit"])
            result["passed"] = result["max_abs_diff"] <= tolerance
            console.print(
                f"verification (float32): max |logit diff| merged vs base+adapter = {result['max_abs_diff']:.3g} "
                f"(tolerance {tolerance:.3g}; the adapter itself moves logits by up to "
                f"{result['adapter_effect_max_abs']:.3g})"
            )
            if not result["passed"]:
                _fail(staging, out, result, f"merged model disagrees with base + adapter: max |logit diff| "
                      f"{result['max_abs_diff']:.3g} > tolerance {tolerance:.3g}")

    merged = merged.to(save_dtype)
    _save(merged, tokenizer, staging)
    console.print(f"saved merged model ({_name(save_dtype)}); checking the saved files before they become {out}", highlight=False)
    unsafe = _only_safe_files(staging)
    if unsafe:
        _fail(staging, out, result, f"unexpected non-safetensors/JSON files in {staging}: {unsafe}")
    if verify:
        mismatched = _saved_tensor_mismatches(merged, staging)
        del merged, model, base
        if device == "cuda":
            torch.cuda.empty_cache()
        if mismatched:
            _fail(staging, out, result, f"saved tensors differ from the verified merge: {mismatched[:5]}")
        result.update(_check_reload(staging, inputs, reference, save_dtype, device))
        if not result["generates"]:
            _fail(staging, out, result, "the saved model does not generate")
        if save_dtype != torch.float32:
            console.print(f"{_name(save_dtype)} weights: max |logit diff| vs the float32 reference "
                          f"{result['saved_vs_reference_max_abs']:.3g} (rounding of the weights, reported only)")
        result["passed"] = True
        if result["adapter_effect_max_abs"] == 0.0:
            console.print("[yellow]warning:[/] the adapter changes no logits (untrained, zero LoRA B?).")
    else:
        console.print("[yellow]not verified (--no-verify).")
    result["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(staging / VERIFICATION_FILE, {**result, "verified": verify})
    marker.unlink()
    settle_tree(staging)
    return result["seconds"]


def _fail(staging: Path, out: Path, result: dict[str, Any], message: str) -> None:
    """Record the failed check next to the incomplete marker and stop with exit 1; ``out`` is not created."""
    atomic_write_json(staging / VERIFICATION_FILE, {**result, "passed": False, "error": message})
    raise MergeVerificationError(
        f"{message}. {out} was not created; the unverified merge is kept in {staging} (marked {INCOMPLETE_MARKER}).",
        hint=f"do not use it; delete it (rm -r {quoted(staging)}), rerun with PHI3TUNE_DEBUG=1 and report the problem.",
    )


def _saved_tensor_mismatches(merged, out: Path) -> list[str]:
    """Names of tensors whose saved value is not bit-identical to the in-memory merged model's."""
    from safetensors import safe_open

    expected = merged.state_dict()
    seen, mismatched = set(), []
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                seen.add(name)
                if name not in expected or not torch.equal(handle.get_tensor(name), expected[name].cpu()):
                    mismatched.append(name)
    # A tied lm_head is saved once, as the embedding; anything else missing is an error.
    tied = {"lm_head.weight"} if getattr(merged.config, "tie_word_embeddings", False) else set()
    return mismatched + sorted(set(expected) - seen - tied)


def _check_reload(out: Path, inputs, reference, dtype: torch.dtype, device: str) -> dict[str, Any]:
    """Load the saved folder with plain transformers; measure its logits and check that it generates."""
    reloaded = load_full_model(str(out), dtype=dtype, device=device)
    saved_logits = prompt_logits(reloaded, inputs)
    with torch.no_grad():
        generated = reloaded.generate(inputs[0].to(reloaded.device), max_new_tokens=4, do_sample=False)
    del reloaded
    return {
        "saved_vs_reference_max_abs": max_abs_diff(reference, saved_logits),
        "generates": generated.shape[1] > inputs[0].shape[1],
    }


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
