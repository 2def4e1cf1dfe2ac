"""Translate keys that published Phi-3 recipes use but the installed libraries renamed or dropped.

The model card's ``sample_finetune.py`` and the Phi-3 cookbook were written for transformers 4 / trl 0.8:
``max_seq_length``, ``warmup_ratio``, ``overwrite_output_dir``, ``evaluation_strategy``... README ("The config file") promises
that their dictionaries paste in and work, so each such key is translated with one warning line, or rejected
with the replacement named, never silently ignored. Renames are decided against the *installed* field names,
so the same table works whichever side of a rename the installed trl/transformers is on.
"""

from __future__ import annotations

from typing import Any

from phi3tune.config.schema import DTYPE_ALIASES

# old name -> new name; applied only when the installed SFTConfig has the new name and lacks the old one.
TRAINING_RENAMES: dict[str, str] = {
    "max_seq_length": "max_length",
    "evaluation_strategy": "eval_strategy",
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    "use_liger": "use_liger_kernel",
    "no_cuda": "use_cpu",
    "push_to_hub_token": "hub_token",
}

# Keys dropped with a warning that says what replaces them.
TRAINING_DROPPED: dict[str, str] = {
    "dataset_text_field": "phi3tune renders chat data itself with the Phi-3 chat template, so there is no text "
    "column; ignored",
    "overwrite_output_dir": "ignored; phi3tune never overwrites silently: pass --overwrite (or --resume) to "
    "reuse a non-empty output dir",
    "logging_dir": "removed in transformers 5; ignored (TensorBoard reads TENSORBOARD_LOGGING_DIR)",
}

MODEL_RENAMES: dict[str, str] = {
    "torch_dtype": "dtype",
    "model_name_or_path": "name_or_path",
    "pretrained_model_name_or_path": "name_or_path",
    "model_name": "name_or_path",
    "model_id": "name_or_path",
    "checkpoint_path": "name_or_path",
}

PEFT_RENAMES: dict[str, str] = {"lora_r": "r", "lora_rank": "r", "rank": "r", "alpha": "lora_alpha"}


def _norm_dtype(value: Any) -> Any:
    return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value


class _Translator:
    """Holds the document being translated and the warnings/problems it produced."""

    def __init__(self, doc: dict[str, Any], training_fields: set[str]) -> None:
        self.doc = doc
        self.fields = training_fields
        self.warnings: list[str] = []
        self.problems: list[str] = []

    def section(self, name: str) -> dict[str, Any]:
        if not isinstance(self.doc.get(name), dict):
            self.doc[name] = {}
        return self.doc[name]

    def move(self, src: str, old: str, dst: str, new: str, value: Any, why: str) -> None:
        """Move ``src.old`` to ``dst.new`` (value already mapped); a conflicting ``dst.new`` is a problem."""
        target = self.section(dst)
        norm = _norm_dtype if new == "dtype" else (lambda v: v)
        if new in target and norm(target[new]) != norm(value):
            self.problems.append(
                f"{src}.{old}: {why}, but {dst}.{new} is also set to {target[new]!r}; keep only {dst}.{new}"
            )
            return
        target[new] = value
        self.warnings.append(f"{src}.{old}: {why}; using {dst}.{new}: {value!r}")

    def rename_within(self, name: str, renames: dict[str, str], why: str) -> dict[str, Any] | None:
        """Apply ``renames`` inside section ``name``; the section, or None when the document has none."""
        section = self.doc.get(name)
        if not isinstance(section, dict):
            return None
        for old, new in renames.items():
            if old in section:
                self.move(name, old, name, new, section.pop(old), why)
        return section

    def model(self) -> None:
        model = self.rename_within("model", MODEL_RENAMES, "old name")
        if model is None:
            return
        if "trust_remote_code" in model:
            model.pop("trust_remote_code")
            self.problems.append(
                "model.trust_remote_code: not supported; Phi-3 is native in transformers (Phi3ForCausalLM), so no "
                "remote code is needed or run. Delete this key"
            )
        for old in ("use_flash_attention_2", "use_flash_attention"):
            if old in model:
                self.attention_flag("model", old, model.pop(old))
        for bits in ("4", "8"):
            old = f"load_in_{bits}bit"
            if old in model:
                if model.pop(old) is True:
                    self.move("model", old, "model", "quantization", f"{bits}bit", "old bitsandbytes flag")
                else:
                    self.warnings.append(f"model.{old}: false is the default; ignored")
        if "use_cache" in model:
            model.pop("use_cache")
            self.warnings.append("model.use_cache: phi3tune turns the KV cache off for training itself; ignored")

    def attention_flag(self, src: str, old: str, value: Any) -> None:
        if value is True:
            self.move(src, old, "model", "attn_implementation", "flash_attention_2", "old attention flag")
        else:
            self.warnings.append(
                f"{src}.{old}: old attention flag set to {value!r}; ignored (see model.attn_implementation)"
            )

    def training(self) -> None:
        tc = self.doc.get("training_config")
        if not isinstance(tc, dict):
            return
        for old, new in TRAINING_RENAMES.items():
            if old in tc and old not in self.fields and new in self.fields:
                value = tc.pop(old)
                if new in tc and tc[new] != value:
                    self.problems.append(
                        f"training_config.{old}: renamed to '{new}', which is also set ({tc[new]!r}); keep only {new}"
                    )
                else:
                    tc[new] = value
                    self.warnings.append(
                        f"training_config.{old}: renamed to '{new}' in the installed trl/transformers; translated"
                    )
        if "warmup_ratio" in tc and "warmup_ratio" not in self.fields:
            self.warmup_ratio(tc, tc.pop("warmup_ratio"))
        for old, why in TRAINING_DROPPED.items():
            if old in tc and (old == "dataset_text_field" or old not in self.fields):
                tc.pop(old)
                self.warnings.append(f"training_config.{old}: {why}")
        if "torch_dtype" in tc:
            self.move("training_config", "torch_dtype", "model", "dtype", tc.pop("torch_dtype"), "the model's dtype")
        if "attn_implementation" in tc:
            value = tc.pop("attn_implementation")
            self.move(
                "training_config", "attn_implementation", "model", "attn_implementation", value, "a model setting"
            )
        for old in ("use_flash_attention_2", "use_flash_attention"):
            if old in tc:
                self.attention_flag("training_config", old, tc.pop(old))
        if "assistant_only_loss" in tc:
            value = tc.pop("assistant_only_loss")
            loss_on = "assistant" if value else "all"
            self.move(
                "training_config", "assistant_only_loss", "data", "loss_on", loss_on, "phi3tune builds the loss mask"
            )
        if "model_init_kwargs" in tc:
            tc.pop("model_init_kwargs")
            self.problems.append(
                "training_config.model_init_kwargs: phi3tune loads the model itself; put dtype, attn_implementation "
                "and quantization in the model section instead"
            )
        self.precision(tc)

    def warmup_ratio(self, tc: dict[str, Any], value: Any) -> None:
        try:
            ratio = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            ratio = None
        if ratio is None or not 0 <= ratio < 1:
            self.problems.append(f"training_config.warmup_ratio: expected a fraction in [0, 1), got {value!r}")
        elif tc.get("warmup_steps") not in (None, 0):
            self.problems.append(
                "training_config.warmup_ratio: transformers 5 merged it into warmup_steps, which is also set; "
                "keep only warmup_steps (a value below 1 is a ratio of total steps)"
            )
        else:
            tc["warmup_steps"] = ratio
            self.warnings.append(
                f"training_config.warmup_ratio: transformers 5 dropped it; using warmup_steps: {ratio} "
                "(a value below 1 is a ratio of total steps)"
            )

    def precision(self, tc: dict[str, Any]) -> None:
        """Keep bf16/fp16 consistent with model.dtype; an explicit contradiction is a problem."""
        bf16, fp16 = tc.get("bf16") is True, tc.get("fp16") is True
        dtype = (
            _norm_dtype(self.doc.get("model", {}).get("dtype", "auto"))
            if isinstance(self.doc.get("model"), dict)
            else "auto"
        )
        if bf16 and fp16:
            self.problems.append("training_config: bf16 and fp16 are both true; choose one")
        elif bf16 and dtype == "float16":
            self.problems.append(
                "training_config.bf16: true contradicts model.dtype: float16; set fp16 or dtype bfloat16"
            )
        elif fp16 and dtype == "bfloat16":
            self.problems.append(
                "training_config.fp16: true contradicts model.dtype: bfloat16; set bf16 or dtype float16"
            )
        elif fp16 and dtype == "auto":
            # Cookbook recipes train fp16 on fp16 weights; auto would load bf16 and mix the two.
            self.move("training_config", "fp16", "model", "dtype", "float16", "fp16 training")

    def peft(self) -> None:
        self.rename_within("peft_config", PEFT_RENAMES, "not a LoraConfig field")


def translate_legacy(doc: dict[str, Any], training_fields: set[str]) -> tuple[list[str], list[str]]:
    """Rewrite legacy keys of a parsed config document in place.

    Args:
        doc: The whole document (sections as dicts); modified in place.
        training_fields: Field names of the installed ``trl.SFTConfig``.

    Returns:
        ``(warnings, problems)``: one warning line per translated or dropped key; problems for keys that are
        rejected or that conflict with their replacement.
    """
    translator = _Translator(doc, training_fields)
    translator.model()
    translator.training()
    translator.peft()
    return translator.warnings, translator.problems
