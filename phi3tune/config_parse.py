"""Turn config text into a document, apply ``--set`` overrides, and turn pydantic errors into lines.

Everything here reports problems as ``dotted.path: message`` strings so that ``load_config`` can gather all of
them into one ``ConfigError``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from phi3tune.config_fields import did_you_mean
from phi3tune.errors import ConfigError

SECTIONS = ("model", "data", "training_config", "peft_config")
_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*$")


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a missing file, bad encoding or syntax error raises ``ConfigError`` with the line."""
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"], str(path))
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"YAML syntax error{where}: {reason}"], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(["not a UTF-8 text file"], str(path)) from None


def apply_override(doc: dict[str, Any], item: str, problems: list[str]) -> str | None:
    """Apply one ``KEY=VALUE`` to ``doc``; returns the dotted key, or None after recording a problem."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not _OVERRIDE_KEY.match(key):
        problems.append(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. training_config.max_steps=5")
        return None
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        problems.append(
            f"--set {key}: unknown section '{parts[0]}'{did_you_mean(parts[0], SECTIONS)} "
            f"(sections: {', '.join(SECTIONS)})"
        )
        return None
    if len(parts) == 1:
        problems.append(f"--set {key}: give a key inside the section, e.g. {key}.<name>=VALUE")
        return None
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not valid YAML (e.g. an unbalanced bracket in a prompt): take the text as written
    node = doc
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and parts[depth] in ("train", "eval") and depth == 1:
            child = node[part] = {"path": child}  # data.train: x.jsonl, then --set data.train.split=...
        elif not isinstance(child, dict):
            problems.append(f"--set {key}: {'.'.join(parts[: depth + 1])} is {child!r}, not a mapping")
            return None
        node = child
    node[parts[-1]] = value
    return key


def pydantic_problems(exc: ValidationError, section: str, root: type[BaseModel]) -> list[str]:
    """Turn pydantic errors into ``dotted.path: message`` lines, with did-you-mean for unknown keys."""
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join([section, *loc])
        if err["type"] == "extra_forbidden":
            cls: Any = root
            for part in loc[:-1]:
                field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
                cls = getattr(field, "annotation", None)
                cls = next(
                    (a for a in getattr(cls, "__args__", (cls,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                    cls,
                )
            names = cls.model_fields if isinstance(cls, type) and issubclass(cls, BaseModel) else ()
            problems.append(f"{path}: unknown key{did_you_mean(loc[-1], names)}")
        elif err["type"] == "missing":
            problems.append(f"{path}: missing (required)")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            shown = "" if err["type"].startswith("value_error") else f" (got {err.get('input')!r})"
            problems.append(f"{path}: {msg}{shown}")
    return problems
