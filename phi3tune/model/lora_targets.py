"""LoRA target names for Phi-3: map Llama-style projection names onto Phi-3's fused modules.

Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``. Recipes written for Llama (and many
Phi-3 tutorials) still list ``q_proj``/``v_proj``/``gate_proj``; peft would match nothing and fail late, or,
for a partial list, silently train fewer modules than the user asked for. Resolving names here, against the
model's real module names, turns both into a warning or a clear error before any weights load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from phi3tune.errors import UsageError

#: The linear layers of every Phi-3 decoder layer (what ``all-linear`` adapts, lm_head aside).
PHI3_LINEAR_MODULES: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

#: Leaf names of the ``Phi3ForCausalLM`` modules LoRA can wrap (transformers 5); checks configs before a
#: model exists. The recipe re-resolves against the loaded model's own names.
PHI3_LORA_MODULES: frozenset[str] = frozenset({*PHI3_LINEAR_MODULES, "lm_head", "embed_tokens"})

#: Llama-style names and the Phi-3 module that holds their weights.
LLAMA_TO_PHI3: dict[str, str] = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "query_key_value": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}

# peft treats a string target as a regex over full module names; only plain identifiers are names.
_PLAIN_NAME = re.compile(r"^[A-Za-z_][\w.]*$")
_PASS_THROUGH = {"all-linear"}


def _resolve_one(name: str, available: set[str]) -> tuple[str | None, str | None]:
    """Return (resolved name or None, warning or None) for one target name; dotted suffixes are kept."""
    prefix, _, leaf = name.rpartition(".")
    if leaf in available:
        return name, None
    fused = LLAMA_TO_PHI3.get(leaf)
    if fused is not None and fused in available:
        resolved = f"{prefix}.{fused}" if prefix else fused
        return resolved, (
            f"peft_config.target_modules: '{name}' is a Llama-style name; Phi-3 fuses it into '{fused}', "
            f"so '{resolved}' is adapted instead"
        )
    return None, None


def resolve_target_modules(
    target_modules: str | Iterable[str] | None, available: set[str]
) -> tuple[list[str] | str | None, list[str]]:
    """Resolve LoRA ``target_modules`` against a model's leaf module names.

    ``"all-linear"`` and regex strings pass through unchanged (peft applies them). Llama-style names map to
    Phi-3's fused modules with one warning each; duplicates are removed in order.

    Args:
        target_modules: The ``peft_config.target_modules`` value: ``"all-linear"``, a name, a regex, a list of
            names, or None (peft's own default for the architecture).
        available: Leaf module names of the model, e.g. ``{"qkv_proj", "o_proj", "gate_up_proj", ...}``.

    Returns:
        The resolved targets (list, or the string unchanged) and the warnings to show.

    Raises:
        UsageError: The list is empty, or some names (after mapping) are not modules of the model.
    """
    if target_modules is None:
        return None, []
    if isinstance(target_modules, str):
        if target_modules in _PASS_THROUGH or not _PLAIN_NAME.match(target_modules):
            return target_modules, []
        names = [target_modules]
    else:
        names = list(target_modules)
    if not names:
        raise UsageError(
            "peft_config.target_modules: empty list; LoRA would adapt nothing",
            hint="use 'all-linear' or a list such as [qkv_proj, o_proj, gate_up_proj, down_proj]",
        )
    resolved: list[str] = []
    warnings: list[str] = []
    unmatched: list[str] = []
    for name in names:
        if not isinstance(name, str):
            unmatched.append(repr(name))
            continue
        target, warning = _resolve_one(name, available)
        if target is None:
            unmatched.append(name)
            continue
        if warning:
            warnings.append(warning)
        if target not in resolved:
            resolved.append(target)
    if unmatched:
        if resolved:
            what = f"{', '.join(unmatched)} {'is' if len(unmatched) == 1 else 'are'} not a module of this model"
            what += f" (matched: {', '.join(resolved)})"
        else:
            what = f"none of {', '.join(unmatched)} is a module of this model"
        raise UsageError(
            f"peft_config.target_modules: {what}",
            hint=f"available: {', '.join(sorted(available))} (or 'all-linear')",
        )
    return resolved, warnings
