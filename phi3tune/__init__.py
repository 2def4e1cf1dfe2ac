"""phi3tune: fine-tune Phi-3 Mini with LoRA or QLoRA from one YAML file."""

from __future__ import annotations

import importlib
from typing import Any, Callable

__version__ = "0.1.0"


def lazy_face(package: str, public: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """A subpackage's public names, each imported from its module on first use: ``(__getattr__, __all__)``.

    A leaf module of a subpackage (say ``training.layout``) must be importable without pulling in the rest of
    it, or the subpackages' imports would run in circles.
    """

    def __getattr__(name: str) -> Any:
        if name in public:
            return getattr(importlib.import_module(public[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(public)
