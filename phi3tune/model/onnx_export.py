"""Build an ONNX Runtime GenAI folder from a merged Phi-3 folder with onnxruntime-genai's model builder.

The graph is built by ``onnxruntime_genai.models.builder`` (its Python entry: ``parse_extra_options`` then
``create_model``), never by phi3tune: the builder is what Microsoft ships Phi-3 with and follows the
runtime's operators. phi3tune adds what the builder leaves wrong for a chat fine-tune:

- ``genai_config.json`` names ``eos_token_id`` from the source's configs; for a Phi-3 folder that can be
  ``<|endoftext|>`` (32000) alone, and a chat would then run on past ``<|end|>`` (32007), inventing the
  user's next turn. The fix-up writes both, as ``phi3tune chat`` and the merged model's generation config stop.
- The builder prints its progress on stdout and tqdm bars on stderr; they are kept out of phi3tune's output
  (shown with ``PHI3TUNE_DEBUG=1``) and its temporary download cache is kept inside the staging folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from phi3tune.errors import UsageError
from phi3tune.model.loading import PHI3_EOS_ID, PHI3_STOP_IDS
from phi3tune.model.onnx_runtime import GENAI_CONFIG, require_onnx_extra
from phi3tune.training.atomic import atomic_write_json

PRECISIONS = ("int4", "fp16", "bf16", "fp32")
DEVICES = ("cpu", "cuda")
# What the builder (and ONNX Runtime's kernels) support for these two execution providers.
SUPPORTED = {("int4", "cpu"), ("fp32", "cpu"), ("int4", "cuda"), ("fp16", "cuda"), ("bf16", "cuda"), ("fp32", "cuda")}
PHI3_ARCHITECTURE = "Phi3ForCausalLM"


def default_precision(device: str) -> str:
    """int4 on CPU (ONNX Runtime's fast CPU path for Phi-3), fp16 on CUDA."""
    return "int4" if device == "cpu" else "fp16"


def check_choice(precision: str, device: str) -> None:
    """Refuse a precision/device pair the builder cannot build.

    Raises:
        UsageError: Unknown value or unsupported pair (exit 2).
    """
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision} is not one of {', '.join(PRECISIONS)}.")
    if device not in DEVICES:
        raise UsageError(f"--device {device} is not one of {', '.join(DEVICES)}.")
    if (precision, device) not in SUPPORTED:
        cpu = sorted(p for p, d in SUPPORTED if d == device)
        raise UsageError(f"--precision {precision} is not supported with --device {device}.",
                         hint=f"with --device {device} use --precision {' or '.join(cpu)}"
                         + (" (fp16 and bf16 are for --device cuda)." if device == "cpu" else "."))


def check_phi3_folder(model_dir: Path) -> None:
    """Refuse a model folder that is not a Phi-3 causal LM (the export is built and verified for Phi-3).

    Raises:
        UsageError: ``config.json`` names another architecture.
    """
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if PHI3_ARCHITECTURE not in architectures:
        raise UsageError(
            f"{model_dir} is a {', '.join(architectures) or config.get('model_type') or 'unknown'} model, not Phi-3 "
            f"({PHI3_ARCHITECTURE}).",
            hint="phi3tune exports Phi-3 fine-tunes; use onnxruntime-genai's model builder directly for other models.",
        )


def build(model_dir: Path, out: Path, *, precision: str, device: str) -> str:
    """Build the ONNX model, tokenizer and ``genai_config.json`` for ``model_dir`` into ``out``.

    Args:
        model_dir: A complete transformers Phi-3 folder (float32 weights for an exact fp32 export).
        out: The (staging) folder to write into; it may already hold files of ours.
        precision: One of ``PRECISIONS``.
        device: One of ``DEVICES`` (the builder's execution provider).

    Returns:
        The builder's own output, for ``--debug``.
    """
    require_onnx_extra()
    from onnxruntime_genai.models import builder  # heavy, optional: the onnx extra

    cache = out / ".builder-cache"
    log = io.StringIO()
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            options = builder.parse_extra_options(model_dir.name, str(model_dir), str(out), precision, device,
                                                  str(cache), [])
            builder.create_model(model_dir.name, str(model_dir), str(out), precision, device, str(cache), **options)
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
        shutil.rmtree(cache, ignore_errors=True)
    return log.getvalue()


def fix_genai_config(out: Path) -> dict[str, Any]:
    """Make ``genai_config.json`` stop at ``<|end|>`` and ``<|endoftext|>`` and pad with ``<|endoftext|>``.

    Returns:
        The config's ``model`` section as written.
    """
    path = out / GENAI_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    model = config["model"]
    found = model.get("eos_token_id")
    found = found if isinstance(found, list) else ([] if found is None else [found])
    # Phi-3's two stop ids first, in phi3tune's order; any other id the builder chose is kept after them.
    model["eos_token_id"] = list(PHI3_STOP_IDS) + [i for i in found if i not in PHI3_STOP_IDS]
    model["pad_token_id"] = PHI3_EOS_ID
    atomic_write_json(path, config)
    return model


def missing_files(out: Path) -> list[str]:
    """What a usable export must hold and ``out`` does not: model, weights it names, config, tokenizer, template."""
    config = json.loads((out / GENAI_CONFIG).read_text(encoding="utf-8")) if (out / GENAI_CONFIG).is_file() else {}
    model_file = ((config.get("model") or {}).get("decoder") or {}).get("filename", "model.onnx")
    wanted = [GENAI_CONFIG, model_file, "tokenizer.json", "tokenizer_config.json"]
    missing = [name for name in wanted if not (out / name).is_file()]
    tokenizer_config = out / "tokenizer_config.json"
    has_template = (out / "chat_template.jinja").is_file() or (
        tokenizer_config.is_file() and "chat_template" in json.loads(tokenizer_config.read_text(encoding="utf-8")))
    return missing + ([] if has_template else ["chat template (chat_template.jinja)"])
