"""Input paths a user names (config files, data files, ``pkg://`` files), checked without running any code.

``pkg://PACKAGE/REL/PATH`` is resolved with ``importlib.util.find_spec`` on a top-level name only: that
locates the package's folder without importing it, so naming a package in a config can never execute the
package's code while the config is checked (``importlib.resources.files`` would import it).
"""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

from phi3tune.errors import DataError

PKG_SCHEME = "pkg://"
_PKG_HINT = "pkg:// paths look like pkg://phi3tune/sample_data/sample_chat.jsonl"


def resolve_pkg_path(text: str) -> Path:
    """The file a ``pkg://PACKAGE/REL/PATH`` names inside an installed package's folder (not checked to exist).

    Args:
        text: The path as written, starting with ``pkg://``.

    Returns:
        An absolute path under the package's folder.

    Raises:
        DataError: The package name is not a plain top-level name, or no installed package has it.
    """
    package, _, rel = text[len(PKG_SCHEME) :].partition("/")
    if not package.isidentifier():
        # Dotted names would make find_spec import the parent packages.
        raise DataError(f"{text}: '{package}' is not a top-level package name", hint=_PKG_HINT)
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DataError(f"{text}: no installed package '{package}'", hint=_PKG_HINT)
    folders = list(spec.submodule_search_locations or [])
    if not folders:
        raise DataError(f"{text}: '{package}' is a single module, not a package that ships data files", hint=_PKG_HINT)
    # A namespace package can span folders: take the first that holds the file.
    found = next((Path(f) / rel for f in folders if (Path(f) / rel).exists()), Path(folders[0]) / rel)
    return found.resolve()


def not_a_regular_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (missing, a folder, a FIFO, a device), or None when it is one."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file"
    except NotADirectoryError:
        return "no such file (a parent in the path is a file, not a folder)"
    except PermissionError:
        return "cannot be read: permission denied"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    return "is not a regular file"
