"""``training_config.fsdp`` / ``fsdp_config``: checked here, because transformers types them loosely.

transformers 5.17 declares ``fsdp: str | None`` (so the recommended ``fsdp: true`` failed the generic type check)
and ``fsdp_config: dict | str | None`` (any key, any value, read only once the model is loaded). phi3tune runs
FSDP2 (``torch.distributed.fsdp.fully_shard`` through accelerate) and nothing else, so:

- ``fsdp``: ``true``/``false``, or transformers' deprecated words (``full_shard``, ``shard_grad_op``,
  ``offload``, ``auto_wrap``), which are read as ``fsdp: true`` plus the matching ``fsdp_config`` keys, with a
  warning; FSDP1-only words are refused.
- ``fsdp_config``: a mapping or a JSON file (relative to the config file), inlined; keys with or without the
  ``fsdp_`` prefix; ``fsdp_version`` must be 2 (written out when absent); FSDP1-only and XLA keys are refused;
  every value is type-checked.
- Cross-checks: ``fsdp_config`` without ``fsdp``, ``fsdp`` with ``deepspeed``, 8-bit quantization (its weights
  cannot be sharded). FSDP's own ``activation_checkpointing`` is refused: accelerate wraps each layer in torch's
  checkpoint wrapper, which adds ``_checkpoint_wrapped_module`` to the module names peft 0.21 uses to find an
  adapter's weights in a state dict, so the gathered adapter would be saved without the wrapped layers'
  weights (reproduced on CPU over gloo). ``gradient_checkpointing`` (transformers' own, no wrapper) recomputes
  the same way under FSDP2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phi3tune.config.fields import did_you_mean

VERSION = 2
# FSDP2 keys of transformers' fsdp_config (TrainingArguments._process_fsdp_args), with their accepted values.
_BOOL_KEYS = ("reshard_after_forward", "cpu_offload", "activation_checkpointing", "cpu_ram_efficient_loading")
_CHOICES = {
    "state_dict_type": ("FULL_STATE_DICT", "SHARDED_STATE_DICT"),
    "auto_wrap_policy": ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"),
}
_OTHER_KEYS = ("version", "transformer_layer_cls_to_wrap", "min_num_params")
FSDP2_KEYS = (*_BOOL_KEYS, *_CHOICES, *_OTHER_KEYS)
FSDP1_ONLY_KEYS = ("forward_prefetch", "backward_prefetch", "use_orig_params", "sync_module_states", "limit_all_gathers")
XLA_KEYS = ("xla", "xla_fsdp_settings", "xla_fsdp_grad_ckpt", "xla_fsdp_v2")
# transformers' legacy `fsdp` words: FSDP2 reads full_shard/shard_grad_op as reshard_after_forward true/false.
_WORDS = {"full_shard": ("reshard_after_forward", True), "shard_grad_op": ("reshard_after_forward", False),
          "offload": ("cpu_offload", True), "auto_wrap": None}
_FSDP1_WORDS = ("hybrid_shard", "hybrid_shard_zero2", "no_shard")
_SECTION = "training_config"


def take_fsdp(training_config: dict[str, Any], base_dir: Path, problems: list[str],
              warnings: list[str]) -> dict[str, Any]:
    """Remove ``fsdp``/``fsdp_config`` from ``training_config`` (before its generic type check) and return them
    checked and normalised: ``{}``, or ``{"fsdp": True, "fsdp_config": {...}}`` (``fsdp: false`` is kept as is).

    Args:
        training_config: The raw section; the two keys are popped from it.
        base_dir: What a relative ``fsdp_config`` file path is relative to (the config file's folder).
        problems: Appended to, one line per problem.
        warnings: Appended to, one line per translated value.
    """
    has_fsdp, has_config = "fsdp" in training_config, "fsdp_config" in training_config
    fsdp = training_config.pop("fsdp", None)
    raw_config = training_config.pop("fsdp_config", None)
    fsdp_config = _read_config(raw_config, base_dir, problems)
    if not fsdp:
        if fsdp_config:
            warnings.append(f"{_SECTION}.fsdp_config: has no effect without {_SECTION}.fsdp: true")
        out = {"fsdp": fsdp} if has_fsdp else {}
        if has_config:
            out["fsdp_config"] = raw_config
        return out
    if fsdp_config is None:
        return {}
    if fsdp is not True:
        _translate_words(fsdp, fsdp_config, problems, warnings)
    _check_keys(fsdp_config, problems)
    if not any(k in fsdp_config for k in ("version", "fsdp_version")):
        fsdp_config["fsdp_version"] = VERSION  # explicit in run_config.yaml, whatever transformers' default becomes
    return {"fsdp": True, "fsdp_config": fsdp_config}


def _read_config(value: Any, base_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    """The fsdp_config mapping (a JSON file is read and inlined), or None after reporting a problem."""
    where = f"{_SECTION}.fsdp_config"
    if value is None:
        return {}
    if isinstance(value, str):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            problems.append(f"{where}: cannot read {path} ({exc.strerror or exc})")
            return None
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: {path} is not valid JSON ({exc.msg}, line {exc.lineno})")
            return None
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping (or a JSON file path), got {value!r} ({type(value).__name__})")
        return None
    return dict(value)


def _translate_words(fsdp: Any, fsdp_config: dict[str, Any], problems: list[str], warnings: list[str]) -> None:
    where = f"{_SECTION}.fsdp"
    words = fsdp.split() if isinstance(fsdp, str) else fsdp if isinstance(fsdp, list) else None
    if words is None or not all(isinstance(w, str) for w in words):
        problems.append(f"{where}: expected true/false (or transformers' words such as 'full_shard auto_wrap'), "
                        f"got {fsdp!r}")
        return
    for word in words:
        if word in _FSDP1_WORDS:
            problems.append(f"{where}: '{word}' exists only in FSDP1, which phi3tune does not run; use fsdp: true "
                            "(FSDP2 shards fully; fsdp_config.reshard_after_forward: false keeps the gathered "
                            "weights between forward and backward)")
        elif word not in _WORDS:
            problems.append(f"{where}: unknown option '{word}'{did_you_mean(word, _WORDS)}; expected true/false")
        elif _WORDS[word] is not None:
            key, value = _WORDS[word]
            if fsdp_option(fsdp_config, key) is None:  # the user's own key, either spelling, wins
                fsdp_config[key] = value
    if not any(p.startswith(where) for p in problems):
        extra = {k: v for k, v in fsdp_config.items() if k in ("reshard_after_forward", "cpu_offload")}
        warnings.append(f"{where}: {fsdp!r} is transformers' deprecated form; read as fsdp: true"
                        + (f" with fsdp_config {extra}" if extra else ""))


def _check_keys(fsdp_config: dict[str, Any], problems: list[str]) -> None:
    seen: dict[str, str] = {}
    for raw_key, value in fsdp_config.items():
        where = f"{_SECTION}.fsdp_config.{raw_key}"
        key = raw_key.removeprefix("fsdp_") if isinstance(raw_key, str) else raw_key
        if key in seen:
            problems.append(f"{where}: given twice (also as '{seen[key]}')")
            continue
        seen[key] = raw_key
        if key in FSDP1_ONLY_KEYS:
            problems.append(f"{where}: an FSDP1 setting; phi3tune runs FSDP2 only (remove it)")
        elif key in XLA_KEYS:
            problems.append(f"{where}: XLA (TPU) FSDP is not supported by phi3tune (remove it)")
        elif key not in FSDP2_KEYS:
            problems.append(f"{where}: unknown key{did_you_mean(str(key), FSDP2_KEYS)}")
        else:
            problem = _value_problem(key, value)
            if problem:
                problems.append(f"{where}: {problem}")


def _value_problem(key: str, value: Any) -> str | None:
    if key == "version":
        if value == VERSION and not isinstance(value, bool):
            return None
        return (f"must be {VERSION}, got {value!r}: phi3tune runs FSDP2 only (FSDP1 is deprecated in transformers "
                "and its checkpoints are not phi3tune's)")
    if key in _BOOL_KEYS:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if key in _CHOICES:
        return None if value in _CHOICES[key] else f"expected one of {', '.join(_CHOICES[key])}, got {value!r}"
    if key == "min_num_params":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if ok else f"expected an integer >= 0, got {value!r}"
    names = [value] if isinstance(value, str) else value
    ok = isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)
    return None if ok else f"expected a class name or a list of them (e.g. Phi3DecoderLayer), got {value!r}"


def fsdp_option(fsdp_config: dict[str, Any] | None, key: str, default: Any = None) -> Any:
    """A value of a checked fsdp_config, whichever spelling (``key`` or ``fsdp_key``) the user chose."""
    config = fsdp_config or {}
    return config.get(key, config.get(f"fsdp_{key}", default))


def check_fsdp_with(training_config: dict[str, Any], quantization: str | None, problems: list[str],
                    warnings: list[str]) -> None:
    """Cross-checks of a run with ``fsdp: true`` against the rest of the config (called after every type check)."""
    if training_config.get("fsdp") is not True:
        return
    config = training_config.get("fsdp_config") or {}
    if training_config.get("deepspeed"):
        problems.append(f"{_SECTION}: fsdp and deepspeed together; choose one (FSDP2: remove deepspeed)")
    if fsdp_option(config, "activation_checkpointing"):
        problems.append(f"{_SECTION}.fsdp_config.activation_checkpointing: true is not supported: its layer wrapper "
                        "hides the adapter's weights from peft's save, so the adapter would be saved incomplete; "
                        "remove it and use training_config.gradient_checkpointing: true (the same recompute)")
    if quantization == "8bit":
        problems.append("model.quantization: 8bit with training_config.fsdp: 8-bit weights cannot be sharded by "
                        "FSDP2 on several GPUs; use 4bit (QLoRA, stored in the compute dtype so FSDP2 can shard it) "
                        "or train with DDP (remove training_config.fsdp)")
    if fsdp_option(config, "state_dict_type", "FULL_STATE_DICT") != "FULL_STATE_DICT":
        warnings.append(f"{_SECTION}.fsdp_config.state_dict_type: phi3tune's checkpoints always hold the gathered "
                        "LoRA adapter and optimizer state (safetensors; small, only the trainable weights), so this "
                        "setting changes nothing")
