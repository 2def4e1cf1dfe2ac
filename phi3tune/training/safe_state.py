"""Pickle-free trainer state: optimizer, scheduler, grad scaler and RNG states as safetensors + JSON.

transformers writes these with ``torch.save`` (pickles, which execute code when loaded from an untrusted
checkpoint). Here any nested structure of dicts, lists, tuples, scalars, strings, tensors and numpy arrays is
split into a JSON skeleton (``NAME.json``) and a flat tensor file (``NAME.safetensors``), and rebuilt exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from phi3tune.training.atomic import atomic_write_text

_TENSOR, _NDARRAY, _TUPLE, _DICT = "__tensor__", "__ndarray__", "__tuple__", "__dict__"


class UnsafeStateError(TypeError):
    """A state holds something that only a pickle could store (a function, an arbitrary object)."""


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON skeleton of ``obj``; tensors and arrays go to ``tensors`` under their dotted path."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        # clone: safetensors refuses tensors that share storage (e.g. views of one flat buffer)
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
        return {_NDARRAY: path, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in obj):
            raise UnsafeStateError(f"{path}: dict keys must be str or int, got {sorted(map(repr, obj))[:3]}")
        # Keys keep their type ([key, value] pairs): optimizer states are keyed by int parameter ids.
        return {_DICT: [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    raise UnsafeStateError(f"{path}: cannot store a {type(obj).__name__} without pickle")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if _TENSOR in node:
        return tensors[node[_TENSOR]]
    if _NDARRAY in node:
        return tensors[node[_NDARRAY]].numpy().astype(node["dtype"], copy=False)
    if _TUPLE in node:
        return tuple(_decode(v, tensors) for v in node[_TUPLE])
    return {k: _decode(v, tensors) for k, v in node[_DICT]}


def save_state(obj: Any, directory: str | os.PathLike, name: str) -> None:
    """Write ``obj`` as ``NAME.json`` (+ ``NAME.safetensors`` when it holds tensors) in ``directory``.

    Raises:
        UnsafeStateError: ``obj`` holds something JSON and safetensors cannot represent.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(obj, name, tensors)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    atomic_write_text(directory / f"{name}.json", json.dumps({"format": "phi3tune-state-1", "state": skeleton}))


def has_state(directory: str | os.PathLike, name: str) -> bool:
    return (Path(directory) / f"{name}.json").is_file()


def load_state(directory: str | os.PathLike, name: str) -> Any:
    """Rebuild the object ``save_state`` wrote (tensors on the CPU)."""
    directory = Path(directory)
    skeleton = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))["state"]
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}
    return _decode(skeleton, tensors)
