"""Reading raw rows from local files (.jsonl, .json, .csv, .parquet) and hub datasets."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3tune.config.paths import PKG_SCHEME, not_a_regular_file, resolve_pkg_path
from phi3tune.data.validate import INVALID_JSON, RowProblem
from phi3tune.errors import DataError, ResourceError

# utf-8-sig: editors on Windows save UTF-8 with a byte-order mark; plain utf-8 would keep it as a character
# that breaks the first JSON line and becomes part of the first CSV column's name.
_ENCODING = "utf-8-sig"
_TOO_DEEP = "JSON nested too deeply (more levels than Python's recursion limit)"
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_JSON_KIND = {str: "a string", int: "a number", float: "a number", bool: "true/false", type(None): "null"}


@dataclass
class LoadedRows:
    """Raw rows of one source, with the numbers users see for them.

    Attributes:
        source: Human-readable name (file path or ``hub:id[split]``).
        rows: The raw rows (dicts for well-formed data; anything else is flagged during validation).
        numbers: 1-based number of each row as the user finds it: the line for .jsonl, the record
            index otherwise.
        unit: ``"line"`` for .jsonl, ``"row"`` otherwise; used in messages ("line 7").
    """

    source: str
    rows: Sequence[Any]
    numbers: list[int] = field(default_factory=list)
    unit: str = "row"

    def where(self, index: int) -> str:
        """Say where the row at 0-based ``index`` lives, e.g. ``line 7``."""
        return f"{self.unit} {self.numbers[index]}"


def resolve_path(path: str | Path, base_dir: Path | None) -> Path:
    """Find a data file relative to the config's directory first, then the current directory.

    ``pkg://PACKAGE/REL/PATH`` names a file shipped inside an installed package.

    Args:
        path: The path as written in the config.
        base_dir: The config file's directory, or None.

    Returns:
        The existing file's path.

    Raises:
        DataError: When no candidate is a regular file (saying what the first existing one is instead).
    """
    text = str(path)
    # A file shipped in a package, e.g. pkg://phi3tune/sample_data/x.jsonl; located without importing it.
    p = resolve_pkg_path(text) if text.startswith(PKG_SCHEME) else Path(text).expanduser()
    candidates = [p] if p.is_absolute() else ([base_dir / p] if base_dir else []) + [Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c
    for c in candidates:
        why = not_a_regular_file(c)
        if c.exists() and why is not None:
            raise DataError(f"data file {c} {why}", hint="point data.*.path at a .jsonl/.json/.csv/.parquet file")
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DataError(f"data file not found: {path} (looked at {tried})", hint="check data.*.path in the config")


def _read_jsonl(path: Path) -> LoadedRows:
    """Every line, a broken one kept as a ``RowProblem`` in its place so that all are reported at once
    (``data.on_invalid`` then stops on them or skips them like any invalid row)."""
    rows: list[Any] = []
    numbers: list[int] = []
    broken = 0
    with path.open(encoding=_ENCODING) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (often a trailing one) are not rows
            try:
                rows.append(json.loads(line.rstrip("\r\n")))  # a newline would read as "control character"
            except json.JSONDecodeError as e:
                rows.append(RowProblem(INVALID_JSON, f"not valid JSON ({e.msg}, column {e.colno})"))
                broken += 1
            except RecursionError:
                rows.append(RowProblem(INVALID_JSON, _TOO_DEEP))
                broken += 1
            numbers.append(line_no)
    if rows and broken == len(rows):
        # Not one line parses: not JSON Lines at all (a pretty-printed .json, another format), not a few bad rows.
        raise DataError(
            f"{path}: none of its {len(rows)} lines is valid JSON (line {numbers[0]}: {rows[0].reason})",
            hint="each line of a .jsonl file must be one complete JSON object; a JSON list belongs in a .json file",
        )
    return LoadedRows(str(path), rows, numbers, unit="line")


def _read_json(path: Path) -> LoadedRows:
    text = path.read_text(encoding=_ENCODING)
    try:
        data = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: {_TOO_DEEP}", hint="a .json data file must hold a list of objects") from None
    except json.JSONDecodeError as e:
        whole_file_error = DataError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})",
            hint="a .json data file must hold a list of objects, one object, or {\"data\": [...]}",
        )
        if e.msg == "Extra data":  # JSON Lines saved as .json: read it as such, as `datasets` does
            try:
                return _read_jsonl(path)
            except DataError:  # no line parses on its own: the file is one broken JSON document
                raise whole_file_error from None
        raise whole_file_error from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    elif isinstance(data, dict):
        data = [data]  # one conversation saved as a single object is one row
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of rows, one row object or {{\"data\": [...]}}; found "
            f"{_JSON_KIND.get(type(data), type(data).__name__)}",
            hint="wrap the rows in a list, or save one JSON object per line as .jsonl",
        )
    return LoadedRows(str(path), data, list(range(1, len(data) + 1)))


def _read_csv(path: Path) -> LoadedRows:
    with path.open(encoding=_ENCODING, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        seen: dict[str, int] = {}
        for col, name in enumerate(header, start=1):
            if name in seen:
                # DictReader would silently keep only the last column of that name.
                raise DataError(
                    f"{path}: line 1 (header): duplicate column {name!r} (columns {seen[name]} and {col})",
                    hint="rename or remove one of the columns",
                )
            seen[name] = col
        try:
            rows = list(reader)
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({e})", hint="fix that line") from None
    return LoadedRows(str(path), rows, list(range(1, len(rows) + 1)))


def _read_parquet(path: Path) -> LoadedRows:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read as Parquet ({e})", hint="check that the file is a valid Parquet file") from None
    return LoadedRows(str(path), rows, list(range(1, len(rows) + 1)))


def load_local(path: Path) -> LoadedRows:
    """Read every row of a local data file.

    Args:
        path: An existing .jsonl, .json, .csv or .parquet file.

    Returns:
        The file's rows with their user-facing numbers.

    Raises:
        DataError: Unknown suffix, undecodable file or malformed JSON (with the line number).
    """
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise DataError(
            f"{path}: unsupported data file type '{suffix or '(none)'}'",
            hint=f"use one of {', '.join(LOCAL_SUFFIXES)}",
        )
    try:
        return readers[suffix](path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", hint="save the file as UTF-8") from None


def load_hub(hub: str, name: str | None = None, split: str | None = None, revision: str | None = None) -> LoadedRows:
    """Load one split of a Hugging Face Hub dataset.

    Args:
        hub: Dataset id, e.g. ``HuggingFaceH4/ultrachat_200k``.
        name: Dataset config name, if any.
        split: Split name; ``train`` when not given.
        revision: Git revision, if pinned.

    Returns:
        The split's rows (a ``datasets.Dataset``, iterated lazily).

    Raises:
        ResourceError: The dataset cannot be fetched (offline, unknown, gated) or lacks the split.
    """
    import datasets

    split = split or "train"
    label = f"hub:{hub}" + (f"/{name}" if name else "") + f"[{split}]"
    try:
        ds = datasets.load_dataset(hub, name, split=split, revision=revision)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{label}: {e}", hint="set data.*.split to one of the dataset's splits") from None
        raise ResourceError(f"cannot load {label}: {e}", hint=_hub_hint()) from None
    except Exception as e:  # offline, 404, gated, auth: all surface as different exception types
        raise ResourceError(f"cannot load {label}: {type(e).__name__}: {e}", hint=_hub_hint()) from None
    return LoadedRows(label, ds, list(range(1, len(ds) + 1)))


def _hub_hint() -> str:
    return (
        "check the dataset id and your network; gated datasets need `hf auth login`; "
        "offline (HF_HUB_OFFLINE=1) only cached datasets load — or point data.*.path at a local file"
    )


def load_source(source: Any, base_dir: Path | None = None) -> LoadedRows:
    """Load a config data source (``.path`` or ``.hub`` with ``.name``/``.split``/``.revision``).

    Args:
        source: A data source object from the config (duck-typed).
        base_dir: Directory relative paths resolve against first.

    Returns:
        The source's rows.
    """
    path = getattr(source, "path", None)
    hub = getattr(source, "hub", None)
    if path:
        return load_local(resolve_path(path, base_dir))
    if hub:
        return load_hub(hub, getattr(source, "name", None), getattr(source, "split", None), getattr(source, "revision", None))
    raise DataError("a data source has neither 'path' nor 'hub'", hint="set data.train.path or data.train.hub")
