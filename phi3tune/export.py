"""``phi3tune export onnx``: a fine-tune as an ONNX Runtime GenAI folder (int4 on CPU, fp16/bf16 on CUDA), verified.

Steps: check the precision/device pair and that the ``onnx`` extra is installed -> resolve the target (a
run, an adapter or a merged model folder) -> refuse a non-empty OUTPUT_DIR -> lock it -> write into a hidden
staging folder beside it, marked ``EXPORT_INCOMPLETE`` -> a run or adapter is merged first through
``merge-adapter``'s own path (float32, verified against base + adapter; a QLoRA adapter into the
unquantized base) into ``merged-float32/`` inside the staging folder -> onnxruntime-genai's model builder
writes the ONNX model, tokenizer and chat template -> ``genai_config.json`` is made to stop at ``<|end|>`` and
``<|endoftext|>`` -> verification: greedy tokens of the export vs the merged transformers model on fixed chat
prompts (``onnx_verify``: fp32 must match token for token, exit 1 otherwise; int4/fp16/bf16 report agreement
and the first step's max |logit diff|) -> ``export_verification.json`` -> the merged copy is removed, the
marker removed, files given the umask's permissions -> the staging folder is renamed to OUTPUT_DIR.

Why merge rather than hand the builder the adapter (its ``adapter_path`` option): the builder's LoRA path
makes a graph that needs the adapter applied at run time, and the exported base's logits could not be
checked against phi3tune's verified merge. A merged folder is one model, verified twice: the merge against
base + adapter, the export against the merge.

Staging, markers and failures behave as in ``merge-adapter``: a failed verification keeps the staging folder
(named in the message, with ``export_verification.json``) for inspection; any other failure removes it;
one left by a killed export is replaced by the next export into the same OUTPUT_DIR.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from phi3tune import merge
from phi3tune.errors import Phi3TuneError, UsageError
from phi3tune.model import loading, onnx_export, onnx_verify, staged_output
from phi3tune.model.artefacts import quoted
from phi3tune.model.chat_template import render_prompt
from phi3tune.model.onnx_runtime import (
    EXPORT_INCOMPLETE,
    EXPORT_STAGING_SUFFIX,
    is_onnx_folder,
    load_genai,
    require_onnx_extra,
)
from phi3tune.model.targets import Target, load_full_model, resolve_target
from phi3tune.training.atomic import atomic_write_json, settle_tree
from phi3tune.training.run_lock import folder_lock

VERIFICATION_FILE = "export_verification.json"
MERGED_SUBDIR = "merged-float32"
log = logging.getLogger(__name__)


class ExportVerificationError(Phi3TuneError):
    """The export disagrees with the merged model where it must not: exit 1."""

    exit_code = 1


def export_onnx(source: str | Path, output_dir: Path, *, precision: str | None = None, device: str = "cpu",
                verify: bool = True, console: Console | None = None) -> None:
    """Export a run, adapter or merged model to an ONNX Runtime GenAI folder and (by default) verify it.

    Args:
        source: A run dir, an adapter dir or a merged (full) Phi-3 model dir.
        output_dir: A new or empty folder for the export.
        precision: ``int4``, ``fp16``, ``bf16`` or ``fp32``; None: int4 on CPU, fp16 on CUDA.
        device: The execution provider the export is built for (``cpu`` or ``cuda``).
        verify: Compare the export's greedy tokens with the merged model's (module docstring).
        console: Where progress and results are printed.

    Raises:
        UsageError: Missing extra, bad choice, bad target, non-empty output, or a folder in use (exit 2).
        ExportVerificationError: An fp32 export's tokens differ, or the export is unusable (exit 1).
    """
    console = console or Console(stderr=True)
    started = time.perf_counter()
    precision = precision or onnx_export.default_precision(device)
    onnx_export.check_choice(precision, device)
    og = require_onnx_extra()
    if verify and device == "cuda" and not og.is_cuda_available():
        raise UsageError("verifying a --device cuda export needs onnxruntime-genai's CUDA build and a GPU.",
                         hint="run the export on a GPU machine with onnxruntime-genai-cuda installed, "
                         "or pass --no-verify to build it here unchecked.")
    if is_onnx_folder(Path(source).expanduser()):
        raise UsageError(f"{source} is already an ONNX export.",
                         hint="give the run, adapter or merged model folder it was exported from.")
    target = resolve_target(source, allow_hub=False)
    if target.kind == "model":
        onnx_export.check_phi3_folder(Path(target.path))
    out = _check_output(Path(output_dir), target)
    with folder_lock(out, "export"):
        out = _check_output(out, target)  # again, now that no other export can write it
        staging = staged_output.fresh_staging(out, suffix=EXPORT_STAGING_SUFFIX, marker=EXPORT_INCOMPLETE,
                                              command="export onnx", console=console)
        try:
            result = _export_into(source, target, staging, out, precision=precision, device=device,
                                  verify=verify, console=console)
        except (ExportVerificationError, merge.MergeVerificationError):
            raise  # the staging folder is kept for inspection, marked incomplete
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        staged_output.publish(staging, out, what="ONNX export")
    seconds = time.perf_counter() - started
    console.print(f"[green]ONNX export ({precision}, {device}) {'verified' if verify else 'written'}[/] in "
                  f"{seconds:.1f}s: {out} ({result['size_bytes'] / 1e6:.1f} MB)", highlight=False)


def _check_output(output_dir: Path, target: Target) -> Path:
    return staged_output.check_new_output(output_dir, Path(target.path), what="ONNX export", source_role=target.kind)


def _export_into(source: str | Path, target: Target, staging: Path, out: Path, *, precision: str, device: str,
                 verify: bool, console: Console) -> dict[str, Any]:
    """Merge (if needed), build, fix up and verify into ``staging``; returns the verification record."""
    og = require_onnx_extra()
    result: dict[str, Any] = {"precision": precision, "device": device, "source": str(Path(source).expanduser()),
                              "source_kind": target.kind, "onnxruntime_genai": og.__version__}
    if target.kind == "adapter":
        model_dir = staging / MERGED_SUBDIR
        console.print(f"merging {target.path} into its base in float32 first (as merge-adapter does)", highlight=False)
        merge.merge_and_save(source, model_dir, verify=verify, console=console, save_dtype=torch.float32)
        result["merge"] = json.loads((model_dir / merge.VERIFICATION_FILE).read_text(encoding="utf-8"))
    else:
        model_dir = Path(target.path)
    onnx_export.check_phi3_folder(model_dir)  # an adapter's base is known to be Phi-3 only once merged

    console.print(f"building the {precision} ONNX model for {device} with onnxruntime-genai {og.__version__}")
    build_started = time.perf_counter()
    builder_log = onnx_export.build(model_dir, staging, precision=precision, device=device)
    result["build_seconds"] = round(time.perf_counter() - build_started, 2)
    log.debug("onnxruntime-genai model builder output:\n%s", builder_log)
    result["genai_model"] = {k: v for k, v in onnx_export.fix_genai_config(staging).items() if k != "decoder"}
    missing = onnx_export.missing_files(staging)
    if missing:
        _fail(staging, out, result, f"the builder did not write {', '.join(missing)}")

    if verify:
        result["verification"] = _verify(model_dir, staging, precision=precision, console=console)
        if not result["verification"]["passed"]:
            _fail(staging, out, result, _why(result["verification"]))
    else:
        console.print("[yellow]not verified (--no-verify).")
    if target.kind == "adapter":
        shutil.rmtree(model_dir)  # the export is the deliverable; the merged copy was only its source
    result["size_bytes"] = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    result["files"] = sorted(p.name for p in staging.iterdir() if p.name != EXPORT_INCOMPLETE)
    result["verified"] = verify
    atomic_write_json(staging / VERIFICATION_FILE, result)
    (staging / EXPORT_INCOMPLETE).unlink()
    settle_tree(staging)
    return result


def _verify(model_dir: Path, export_dir: Path, *, precision: str, console: Console) -> dict[str, Any]:
    """Greedy tokens of the export vs the merged model (reference first, then freed: never both in memory)."""
    tokenizer = loading.load_tokenizer(str(model_dir))
    prompts = [ids[0].tolist() for ids in merge.verification_inputs(tokenizer)]
    export_tokenizer = loading.load_tokenizer(str(export_dir))
    exported_prompts = [render_prompt(export_tokenizer, c) for c in merge.VERIFY_CONVERSATIONS]
    reference_model = load_full_model(str(model_dir), dtype=torch.float32, device=loading.device_type())
    reference = onnx_verify.reference_runs(reference_model, prompts)
    del reference_model
    gc.collect()
    export = onnx_verify.export_runs(load_genai(export_dir, check_complete=False), prompts)
    result = onnx_verify.compare(reference, export, exact=precision == "fp32",
                                 tokenizer_matches=exported_prompts == prompts)
    console.print(
        f"verification ({precision} export vs merged float32 model, {result['n_prompts']} chat prompts, greedy "
        f"{onnx_verify.VERIFY_NEW_TOKENS} tokens): {result['prompts_identical']}/{result['n_prompts']} identical, "
        f"token agreement {result['token_agreement']:.0%}, first-step max |logit diff| "
        f"{result['first_step_max_abs_logit_diff']:.3g}"
        + ("" if precision == "fp32" else " (reported, not judged: rounded weights)"), highlight=False)
    return result


def _why(verification: dict[str, Any]) -> str:
    if not verification["tokenizer_matches"]:
        return "the export's tokenizer renders the chat prompts differently from the merged model's"
    if not verification["generates"]:
        return "the export does not generate"
    return (f"the fp32 export's greedy tokens differ from the merged model's on "
            f"{verification['n_prompts'] - verification['prompts_identical']} of {verification['n_prompts']} prompts")


def _fail(staging: Path, out: Path, result: dict[str, Any], message: str) -> None:
    """Record the failed check beside the incomplete marker and stop with exit 1; ``out`` is not created."""
    atomic_write_json(staging / VERIFICATION_FILE, {**result, "passed": False, "error": message})
    raise ExportVerificationError(
        f"{message}. {out} was not created; the unverified export is kept in {staging} (marked {EXPORT_INCOMPLETE}).",
        hint=f"do not use it; delete it (rm -r {quoted(staging)}), rerun with PHI3TUNE_DEBUG=1 and report the problem.",
    )
