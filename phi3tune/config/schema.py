"""Pydantic schema of the ``model`` and ``data`` sections, and data-path resolution.

``training_config`` and ``peft_config`` are not modelled here: they are checked against the installed trl and
peft classes (see ``config_fields``) so that any field those libraries accept is accepted too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from phi3tune.config.fields import did_you_mean
from phi3tune.config.paths import PKG_SCHEME, resolve_pkg_path
# trl's SFTConfig default for max_length (1.16): what a config without training_config.max_length trains with.
DEFAULT_MAX_LENGTH = 1024


def max_length_of(training_config: Any) -> int:
    """The sequence length a run uses: ``training_config.max_length``, or trl's default when unset or null."""
    return int(training_config.get("max_length") or DEFAULT_MAX_LENGTH)


EVAL_CONFLICT = "data: give either 'eval' or 'eval_fraction', not both"

# random_init keys that are sizes: positive ints. vocab_size is left out on purpose: the real tokenizer is
# kept, its special tokens reach id 32063, so a smaller vocabulary would index out of range.
RANDOM_INIT_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "sliding_window",
)
# Non-size knobs of Phi3Config that are harmless to override on a random model.
RANDOM_INIT_OTHER = ("initializer_range", "rms_norm_eps", "tie_word_embeddings", "hidden_act")

DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "torch.bfloat16": "bfloat16",
    "torch.float16": "float16",
    "torch.float32": "float32",
}


class _Strict(BaseModel):
    """Base of every section: unknown keys are errors, never silently dropped."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FastPathConfig(_Strict):
    """``model.fast_path``: the GPU fast path's fused kernels (phi3tune/fastpath/), on by default."""

    fused_lora: bool = Field(True, description="Fuse each LoRA linear with its frozen base layer (one GEMM epilogue).")
    compiled_layers: bool = Field(
        True, description="Phi-3's residual+RMSNorm, qkv split+RoPE and SwiGLU compiled on the fused projections."
    )
    cuda_graphs: bool = Field(
        False, description="Replay each decoder layer's forward and backward from a CUDA graph (one GPU, packed "
        "batches padded to the token budget, no activation checkpointing, not QLoRA). Off by default: it pays "
        "only where the CPU cannot keep the GPU busy (docs/benchmarks.md).",
    )


class ModelConfig(_Strict):
    """The ``model`` section: which base model to load and how."""

    name_or_path: str = Field(
        "microsoft/Phi-3-mini-4k-instruct", description="Hub id or local directory of a Phi-3-architecture model."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(
        "auto", description="Weight dtype; auto = bfloat16 where supported, else float32 on CPU."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention", "varlen"] = Field(
        "auto", description="Attention kernel; varlen = phi3tune's PyTorch varlen attention over packed rows."
    )
    quantization: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA: 4bit (nf4, double quant) or 8bit bitsandbytes; null = no quantization."
    )
    random_init: dict[str, Any] | None = Field(
        None, description="Demo/test mode: real config and tokenizer, random weights, these Phi3Config overrides."
    )
    token: str | bool | None = Field(
        None, repr=False, description="Hugging Face hub token (secret; redacted whenever the config is written)."
    )
    fast_path: FastPathConfig = Field(
        default_factory=FastPathConfig, description="Switches of the GPU fast path (attn_implementation auto/varlen)."
    )
    base_precision: Literal["bf16", "fp8"] = Field(
        "bf16",
        description="Frozen LoRA base linears: bf16, or fp8 (e4m3 weights + per-channel scales, FP8 GEMMs; "
        "Hopper GPUs only, changes numerics; phi3tune/fastpath/fp8_base.py).",
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("quantization", mode="before")
    @classmethod
    def _quant_alias(cls, value: Any) -> Any:
        # YAML users write `4bit`, `4-bit`, `nf4` or the integer 4 interchangeably.
        aliases = {4: "4bit", 8: "8bit", "4-bit": "4bit", "nf4": "4bit", "8-bit": "8bit", "int8": "8bit"}
        return aliases.get(value, value) if isinstance(value, (str, int)) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _fp8_not_quantized(self) -> ModelConfig:
        if self.base_precision == "fp8" and self.quantization:
            raise ValueError(
                f"base_precision fp8 cannot be combined with quantization {self.quantization} (QLoRA keeps its own "
                "quantized base): set model.base_precision: bf16, or model.quantization: null"
            )
        return self

    @field_validator("random_init")
    @classmethod
    def _check_random_init(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        problems = []
        for key, size in value.items():
            if key in RANDOM_INIT_SIZES:
                if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                    problems.append(f"'{key}' must be a positive integer, got {size!r}")
            elif key == "vocab_size":
                problems.append("'vocab_size' cannot be changed: the real Phi-3 tokenizer (ids up to 32063) is used")
            elif key not in RANDOM_INIT_OTHER:
                problems.append(f"'{key}' is not a Phi3Config size{did_you_mean(key, RANDOM_INIT_SIZES)}")
        if not problems:
            heads = value.get("num_attention_heads", 32)
            kv_heads = value.get("num_key_value_heads", value.get("num_attention_heads", 32))
            if value.get("hidden_size", 3072) % heads:
                problems.append(f"hidden_size must be divisible by num_attention_heads ({heads})")
            if heads % kv_heads:
                problems.append(f"num_attention_heads must be divisible by num_key_value_heads ({kv_heads})")
        if problems:
            raise ValueError("; ".join(problems))
        return value


class DataSource(_Strict):
    """One dataset: a local file (``path``) or a hub dataset (``hub`` with ``split``)."""

    path: str | None = Field(None, description="Local .jsonl/.json/.csv/.parquet file, relative to the config file.")
    hub: str | None = Field(None, description="Hub dataset id, e.g. HuggingFaceH4/ultrachat_200k.")
    split: str = Field("train", description="Split of the hub dataset.")
    name: str | None = Field(None, description="Config (subset) name of the hub dataset.")
    revision: str | None = Field(None, description="Hub revision of the dataset.")

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSource:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (local file) or 'hub' (hub dataset id)")
        if self.path is not None and (self.name or self.revision):
            raise ValueError("'name' and 'revision' apply to hub datasets only")
        return self


class DataConfig(_Strict):
    """The ``data`` section: where conversations come from and how bad rows are handled."""

    train: DataSource = Field(description="Training data: a path string, {path: ...} or {hub: ..., split: ...}.")
    eval: DataSource | None = Field(None, description="Evaluation data, same forms as train.")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="Hold out this fraction of train for evaluation (instead of eval)."
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = Field(
        "auto", description="Row format; auto detects it per file."
    )
    system_prompt: str | None = Field(None, description="System turn added to conversations that have none.")
    on_invalid: Literal["error", "skip"] = Field("error", description="Fail on invalid rows, or skip and count them.")
    on_overlength: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with samples longer than training_config.max_length."
    )
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="Tokens that carry loss: assistant turns (with their <|end|>) or everything."
    )
    # Default escape, not error: equally safe (no text can become a marker) without stopping on data that
    # merely mentions "<|end|>" or an HTML "<s>"; `data check` lists such rows either way (special_text.py).
    special_tokens_in_text: Literal["error", "escape", "allow"] = Field(
        "escape",
        description="Special-token strings such as <|end|> inside text: escape (plain text), error (invalid "
        "rows) or allow (real special tokens; only for trusted pre-rendered data).",
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _bare_path(cls, value: Any) -> Any:
        # `train: data/train.jsonl` is the most common form; treat a bare string as a local path.
        return {"path": value} if isinstance(value, str) else value


def resolve_data_path(path: str | Path, base_dir: str | Path) -> Path:
    """Resolve a data path from a config file to an absolute path.

    ``pkg://PACKAGE/REL/PATH`` names a file shipped inside an installed package (e.g.
    ``pkg://phi3tune/sample_data/sample_chat.jsonl``), so bundled configs work outside the repository too.
    ``~`` is expanded; other relative paths are taken relative to ``base_dir`` (the config file's directory).

    Args:
        path: The path as written in the config.
        base_dir: Directory that relative paths are relative to.

    Returns:
        An absolute path (not checked for existence; the data module reports missing files).

    Raises:
        DataError: A ``pkg://`` path that names no installed package (the package is never imported).
    """
    text = str(path)
    if text.startswith(PKG_SCHEME):
        return resolve_pkg_path(text)
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = Path(base_dir) / candidate
    return candidate.resolve()
