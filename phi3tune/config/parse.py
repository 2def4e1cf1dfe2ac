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

from phi3tune.config.fields import did_you_mean
from phi3tune.errors import ConfigError
from phi3tune.config.paths import not_a_regular_file

SECTIONS = ("model", "data", "training_config", "peft_config")
_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*$")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class AliasRefused(yaml.YAMLError):
    """A YAML alias (``*name``): refused because aliases can expand a tiny file into gigabytes."""

    def __init__(self, anchor: str, mark: Any) -> None:
        super().__init__(f"YAML alias *{anchor}")
        self.anchor = anchor
        self.mark = mark

    def describe(self) -> str:
        return (
            f"line {self.mark.line + 1}, column {self.mark.column + 1}: YAML aliases (*{self.anchor}) are not "
            "accepted in phi3tune configs (they can expand a small file into a huge one); write the values out"
        )


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases and records duplicate keys (plain YAML keeps the last silently)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasRefused(event.anchor, event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                line = key_node.start_mark.line + 1
                key = (key_node.tag, key_node.value)
                if key in first:
                    self.duplicates.append(
                        f"line {line}: duplicate key '{key_node.value}' (first at line {first[key]}); "
                        "YAML would silently keep only the last value: remove one"
                    )
                else:
                    first[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> tuple[Any, list[str]]:
    """Parse YAML text without aliases; returns the document and one problem line per duplicate key.

    Raises:
        AliasRefused: The text uses an alias.
        yaml.YAMLError: Syntax errors.
        RecursionError: Nesting deeper than Python's recursion limit.
    """
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def read_yaml(path: Path, problems: list[str] | None = None) -> Any:
    """Parse a config file; an unreadable file, alias, bad encoding or syntax error raises ``ConfigError``.

    Args:
        path: The YAML file.
        problems: Where duplicate-key problems go (so they are reported with the others); None raises them.
    """
    why = not_a_regular_file(path)
    if why is not None:
        reason = "not found" if why == "no such file" else why
        raise ConfigError([f"config file {reason}: {path}"], str(path))
    try:
        doc, duplicates = parse_yaml(path.read_text(encoding="utf-8-sig"))
    except AliasRefused as exc:
        raise ConfigError([exc.describe()], str(path)) from None
    except RecursionError:
        raise ConfigError(["YAML nested too deeply (more levels than Python's recursion limit)"], str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"YAML syntax error{where}: {reason}"], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(["not a UTF-8 text file"], str(path)) from None
    if duplicates and problems is None:
        raise ConfigError(duplicates, str(path))
    if problems is not None:
        problems.extend(duplicates)
    return doc


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
        value, duplicates = parse_yaml(raw) if raw.strip() else (None, [])
    except AliasRefused:
        problems.append(f"--set {key}: YAML aliases (*name) are not accepted; write the value out")
        return None
    except RecursionError:
        problems.append(f"--set {key}: the value is nested too deeply")
        return None
    except yaml.YAMLError:
        value, duplicates = raw, []  # not valid YAML (e.g. an unbalanced bracket in a prompt): take the text as written
    if duplicates:
        problems.extend(f"--set {key}: {d.removeprefix('line 1: ')}" for d in duplicates)
        return None
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
