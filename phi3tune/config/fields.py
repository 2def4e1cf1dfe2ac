"""Check a free-form config dict against the fields of an installed dataclass (trl SFTConfig, peft LoraConfig).

The two dictionaries of the Phi-3 recipes are passed straight to ``SFTConfig(**...)`` and ``LoraConfig(**...)``.
Validating them against the *installed* classes (not a copy of their field list) keeps phi3tune right when trl,
transformers or peft add or drop a field: unknown keys get a did-you-mean, and values get a basic type check
against the field annotation so a typo fails in a second instead of after the model has loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import types
import typing
from typing import Any

_NO = object()  # sentinel: "this value does not fit the annotation"


@functools.cache
def dataclass_field_types(cls: type) -> dict[str, Any]:
    """Return ``{field name: resolved annotation}`` for the init fields of a dataclass.

    Args:
        cls: A dataclass such as ``trl.SFTConfig`` or ``peft.LoraConfig``.

    Returns:
        Field names mapped to their annotations; annotations that cannot be resolved become ``Any``.
    """
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a forward reference the library never imports; fall back to no type check
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def did_you_mean(key: str, candidates: typing.Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest candidate, or an empty string."""
    names = list(candidates)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    # Short forms (`peft` for `peft_config`) score low on similarity but are obvious prefixes.
    close = close or [n for n in names if len(key) >= 3 and n.startswith(key)][:1]
    return f"; did you mean '{close[0]}'?" if close else ""


def type_name(annotation: Any) -> str:
    """Render an annotation the way a user reads it: ``float``, ``int | None``, ``list[str]``."""
    if annotation is type(None) or annotation is None:
        return "null"
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = typing.get_args(annotation)
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if args else getattr(origin, "__name__", "?")
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, ann: Any, lenient: bool) -> Any:
    """Return ``value`` fitted to ``ann`` or ``_NO``; ``lenient`` allows numeric strings for numbers."""
    if ann is Any or ann is typing.Any:
        return value
    if ann is type(None) or ann is None:
        return None if value is None else _NO
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(ann):
            fitted = _coerce(value, arg, lenient)
            if fitted is not _NO:
                return fitted
        return _NO
    if origin is typing.Literal:
        return value if value in typing.get_args(ann) else _NO
    if ann is bool:
        return value if isinstance(value, bool) else _NO
    if ann is int:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if lenient and isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                return _NO
            return int(number) if number.is_integer() else _NO
        return _NO
    if ann is float:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, (int, float)):
            return value  # keep 5 as 5: trl accepts ints for float fields and run_config.yaml stays as written
        # PyYAML reads `5e-6` (no dot) as a string; users paste that constantly, so accept it.
        if lenient and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                return _NO
        return _NO
    if ann is str:
        return value if isinstance(value, str) else _NO
    if origin in (list, tuple, typing.Sequence) or ann in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _NO
        args = typing.get_args(ann)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return _NO
            items = [_coerce(v, a, lenient) for v, a in zip(value, args, strict=True)]
        else:
            item_ann = args[0] if args else Any
            items = [_coerce(v, item_ann, lenient) for v in value]
        return _NO if any(i is _NO for i in items) else (tuple(items) if origin is tuple else items)
    if origin is dict or ann is dict:
        return value if isinstance(value, dict) else _NO
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        if isinstance(value, ann):
            return value
        allowed = {m.value for m in ann} | {m.name for m in ann}
        # YAML 1.1 reads a bare `no` as False: `eval_strategy: no` means the strategy "no".
        if value is False and "no" in allowed:
            return "no"
        return value if isinstance(value, str) and value in allowed else _NO
    # Library classes (ParallelismConfig, LoftQConfig, ...): their constructors validate a dict themselves.
    return value


def check_against_dataclass(values: dict[str, Any], cls: type, section: str) -> tuple[dict[str, Any], list[str]]:
    """Validate keys and value types of ``values`` against the init fields of ``cls``.

    Unknown keys are reported with their dotted path and a did-you-mean; values that do not fit the field's
    annotation are reported with the expected type. Numeric strings are converted for numeric fields.

    Args:
        values: The section as read from YAML (legacy keys already translated).
        cls: The dataclass the section is passed to, e.g. ``trl.SFTConfig``.
        section: The section name used in messages, e.g. ``"training_config"``.

    Returns:
        The dict with converted values, and the list of problems (empty when valid).
    """
    fields = dataclass_field_types(cls)
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in values.items():
        path = f"{section}.{key}"
        if not isinstance(key, str):
            problems.append(f"{path}: keys must be strings")
            continue
        if key not in fields:
            problems.append(f"{path}: unknown key{did_you_mean(key, fields)}")
            continue
        ann = fields[key]
        fitted = _coerce(value, ann, lenient=False)
        if fitted is _NO:
            fitted = _coerce(value, ann, lenient=True)
        if fitted is _NO:
            problems.append(f"{path}: expected {type_name(ann)}, got {value!r} ({type(value).__name__})")
            continue
        out[key] = fitted
    return out, problems
