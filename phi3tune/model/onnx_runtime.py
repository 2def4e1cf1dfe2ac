"""Run an ONNX Runtime GenAI folder (what ``phi3tune export onnx`` writes) the way phi3tune runs a transformers model.

``GenAIModel`` stands in for the small part of a transformers model that ``chat`` and the export's
verification use: ``generate`` (greedy, stops at the given ids, feeds a transformers streamer exactly as
transformers does: the prompt first, then each new token, then ``end()``), ``config.max_position_embeddings``
and ``parameters()`` (for the device prompts are put on). So ``chat`` keeps one generation path, one stop
rule and one context check whichever runtime answers; and the verification compares the export with the
merged model through the same call.

The runtime is the optional ``onnx`` extra; ``require_onnx_extra`` turns its absence into one exit-2 message.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Iterator

import torch

from phi3tune.errors import UsageError
from phi3tune.model.artefacts import quoted

EXTRA_INSTALL = "pip install 'phi3tune[onnx]'"
GENAI_CONFIG = "genai_config.json"
EXPORT_INCOMPLETE = "EXPORT_INCOMPLETE"
EXPORT_STAGING_SUFFIX = ".phi3tune-export"
_EXTRA_MODULES = ("onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir")


def require_onnx_extra() -> ModuleType:
    """``onnxruntime_genai``, once the whole ``onnx`` extra is importable.

    Raises:
        UsageError: A package of the extra is missing (exit 2, naming the install command).
    """
    modules = {}
    for name in _EXTRA_MODULES:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError as exc:
            raise UsageError(
                f"ONNX export and ONNX chat need the optional 'onnx' extra ({name} is not installed: {exc}).",
                hint=f"install it: {EXTRA_INSTALL}",
            ) from exc
    return modules["onnxruntime_genai"]


def is_onnx_folder(path: Path) -> bool:
    """An ONNX GenAI folder, finished or not (chat routes it here rather than to transformers)."""
    return path.is_dir() and ((path / GENAI_CONFIG).is_file() or (path / EXPORT_INCOMPLETE).exists()
                              or path.name.endswith(EXPORT_STAGING_SUFFIX))


def read_genai_config(folder: Path) -> dict[str, Any]:
    """``genai_config.json`` as a dict.

    Raises:
        UsageError: It is missing, not JSON, or names a model file that is not there.
    """
    path = folder / GENAI_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        model_file = config["model"]["decoder"]["filename"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is missing or not a valid ONNX GenAI config ({type(exc).__name__}).",
                         hint="export the model again with `phi3tune export onnx` into a new folder.") from exc
    if not (folder / model_file).is_file():
        raise UsageError(f"ONNX folder {folder} is incomplete: {model_file}, named in {GENAI_CONFIG}, is missing.",
                         hint="copy the whole export folder again, or export again into a new folder.")
    return config


def check_onnx_folder(folder: Path) -> dict[str, Any]:
    """Refuse an export that was interrupted or failed its verification; return its GenAI config.

    Raises:
        UsageError: The folder is a staging folder, is marked incomplete, or its config or model is missing.
    """
    if (folder / EXPORT_INCOMPLETE).exists() or folder.name.endswith(EXPORT_STAGING_SUFFIX):
        raise UsageError(
            f"{folder} is an incomplete ONNX export: `phi3tune export onnx` was interrupted or its verification failed.",
            hint=f"do not use it; export again into a new folder, then delete this one (rm -r {quoted(folder)}).",
        )
    return read_genai_config(folder)


class GenAIModel:
    """An ONNX GenAI model behind the slice of the transformers interface phi3tune uses (module docstring)."""

    def __init__(self, og_model: Any, context_length: int) -> None:
        self._og = require_onnx_extra()
        self._model = og_model
        self.config = SimpleNamespace(max_position_embeddings=context_length)

    def parameters(self) -> Iterator[torch.Tensor]:
        yield torch.empty(0)  # prompts stay on the CPU: onnxruntime-genai takes plain token lists

    def _generator(self, prompt: list[int], max_new_tokens: int):
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
        generator = self._og.Generator(self._model, params)
        generator.append_tokens(prompt)
        return generator

    def first_step_logits(self, prompt: list[int]) -> torch.Tensor:
        """Float32 logits (vocab,) for the token after ``prompt``."""
        generator = self._generator(prompt, 1)
        return torch.from_numpy(generator.get_logits().reshape(-1).astype("float32"))

    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int, eos_token_id: list[int] | int,
                 streamer=None, do_sample: bool = False, **_ignored: Any) -> torch.Tensor:
        """Greedy tokens after ``input_ids`` (1 x T) until a stop id or ``max_new_tokens``; prompt + answer."""
        if do_sample:
            raise ValueError("GenAIModel.generate is greedy only")
        prompt = [int(t) for t in input_ids[0].tolist()]
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        if streamer is not None:
            streamer.put(torch.tensor([prompt]))
        generator = self._generator(prompt, max_new_tokens)
        new: list[int] = []
        while len(new) < max_new_tokens and not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            new.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in stops:
                break
        if streamer is not None:
            streamer.end()
        return torch.tensor([prompt + new])


def load_genai(folder: Path, *, check_complete: bool = True) -> GenAIModel:
    """Load an ONNX GenAI folder with onnxruntime-genai (``check_complete=False``: the export's own staging folder).

    Raises:
        UsageError: The extra is missing, the folder is incomplete, or the runtime cannot load it here
            (an export for CUDA on a machine without onnxruntime-genai's CUDA build, say).
    """
    og = require_onnx_extra()
    config = check_onnx_folder(folder) if check_complete else read_genai_config(folder)
    try:
        model = og.Model(str(folder))
    except Exception as exc:  # noqa: BLE001 - the runtime reports every load failure as a RuntimeError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"onnxruntime-genai cannot load {folder}: {first}",
            hint="an export for --device cuda runs only where onnxruntime-genai-cuda and a GPU are; "
            "otherwise export again (into a new folder) with --device cpu.",
        ) from exc
    return GenAIModel(model, int(config["model"].get("context_length") or 4096))
