"""Tokenizer and model loading: dtype, attention, quantization, random init, LoRA config.

Everything that touches the hub goes through here so that an unreachable hub, gated repo or missing
weights turns into one clear message (exit 2 or 3) instead of a traceback.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from phi3tune.model.artefacts import folder_problem
from phi3tune.training.atomic import staged_folder
from phi3tune.errors import ResourceError, UsageError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel

log = logging.getLogger(__name__)

# Phi-3's chat turns end with <|end|>; <|endoftext|> closes the document. Generation must stop at both.
PHI3_END_ID = 32007
PHI3_EOS_ID = 32000
PHI3_STOP_IDS = [PHI3_END_ID, PHI3_EOS_ID]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def device_type() -> str:
    """The accelerator training runs on: ``cuda`` when a CUDA GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(requested: str, device: str, quantization: str | None = None) -> torch.dtype:
    """Map the config's dtype to a torch dtype; ``auto`` is bf16 where supported, fp32 on CPU."""
    if requested != "auto":
        return _DTYPES[requested]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@contextmanager
def _hub_errors(what: str, name: str) -> Iterator[None]:
    """Turn hub / filesystem failures into one message that says what to do."""
    try:
        yield
    except (UsageError, ResourceError):
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, HF hub errors…
        text = str(exc)
        low = text.lower()
        if "gated" in low or "401" in text or "403" in text or "access to model" in low:
            raise ResourceError(
                f"cannot load the {what} of '{name}': the repository is gated or needs a token.",
                hint="accept the licence on the model page and run `hf auth login`, or set model.token.",
            ) from exc
        if Path(name).exists() and not Path(name).is_dir():
            raise UsageError(f"model.name_or_path '{name}' is a file; it must be a hub id or a model folder.") from exc
        raise ResourceError(
            f"cannot load the {what} of '{name}': not in the local cache and the hub is unreachable "
            f"or offline ({type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}).",
            hint="check the name and your network, set HF_HOME to a cache that holds it, or point "
            "model.name_or_path at a local folder.",
        ) from exc


def load_tokenizer(name_or_path: str, revision: str | None = None, token: str | None = None):
    """Load the tokenizer with its chat template; pad with <|endoftext|> on the right for training."""
    from transformers import AutoTokenizer

    with _hub_errors("tokenizer", name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, token=token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            f"the tokenizer of '{name_or_path}' has no chat template.",
            hint="use a Phi-3 instruct model (e.g. microsoft/Phi-3-mini-4k-instruct) or a folder saved by phi3tune.",
        )
    return tokenizer


def load_model_config(model_cfg: Any):
    """Load the model's config.json (no weights) and apply ``random_init`` size overrides."""
    from transformers import AutoConfig

    with _hub_errors("config", model_cfg.name_or_path):
        config = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision, token=model_cfg.token)
    if config.model_type not in {"phi3"}:
        log.warning("model type is '%s', not phi3: phi3tune is built and tested for Phi-3.", config.model_type)
    for key, value in (model_cfg.random_init or {}).items():
        setattr(config, key, value)
    return config


def leaf_module_names(config) -> set[str]:
    """Names of the model's leaf modules, from a weightless (meta-device) instance of the architecture."""
    model = build_meta_model(config)
    wrappable = (torch.nn.Linear, torch.nn.Embedding)
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, wrappable)}


def build_meta_model(config):
    """Instantiate the architecture on the meta device: shapes and names without memory or weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def estimate_lora_parameters(config, lora_config) -> tuple[int, int]:
    """(trainable LoRA parameters, total base parameters) for the plan shown by --dry-run."""
    from peft import get_peft_model

    model = build_meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, lora_config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return trainable, total


def require_device_for(quantization: str | None, device: str) -> None:
    """QLoRA's bitsandbytes kernels need a CUDA GPU: say so before anything loads."""
    if quantization and device != "cuda":
        raise ResourceError(
            f"model.quantization: {quantization} (QLoRA) needs a CUDA GPU and none is visible.",
            hint="run on a GPU machine, or --set model.quantization=null to train LoRA in bf16/fp32.",
        )


def load_model(model_cfg: Any, *, dtype: torch.dtype, attn_implementation: str, device: str, seed: int,
               sharded: bool = False) -> "PreTrainedModel":
    """Load (or randomly initialise) the base model on ``device`` for training.

    ``random_init`` builds a Phi3ForCausalLM from the real config with the configured sizes, seeded so two
    runs with the same seed start from the same weights. ``sharded`` (FSDP2) stores QLoRA's 4-bit weights in
    ``dtype``, which FSDP2 can shard (its default uint8 storage is left whole on every GPU by accelerate).
    """
    from transformers import AutoModelForCausalLM

    require_device_for(model_cfg.quantization, device)
    if model_cfg.random_init is not None:
        config = load_model_config(model_cfg)
        config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        if model_cfg.quantization:
            raise UsageError("model.random_init cannot be combined with model.quantization.")
        return model.to(device)

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if model_cfg.quantization:
        kwargs["quantization_config"] = quantization_config(model_cfg.quantization,
                                                            quant_storage=dtype if sharded else None)
        # This rank's GPU (accelerate set it from LOCAL_RANK under torchrun; 0 alone), not every rank's GPU 0.
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    with _hub_errors("weights", model_cfg.name_or_path):
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.name_or_path, revision=model_cfg.revision, token=model_cfg.token, **kwargs
        )
    if not model_cfg.quantization:
        model = model.to(device)
    return model


def quantization_config(kind: str, quant_storage: torch.dtype | None = None) -> "BitsAndBytesConfig":
    """QLoRA's recipe: nf4 with double quantization and bf16 compute (4bit), or LLM.int8 (8bit).

    ``quant_storage``: the dtype the packed 4-bit weights are stored in (bitsandbytes' default is uint8). FSDP2
    needs a floating dtype equal to its mixed-precision parameter dtype to shard them: the run's compute dtype.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ResourceError(
            "model.quantization needs bitsandbytes, which is not installed.",
            hint="pip install 'phi3tune[qlora]' (bitsandbytes needs a CUDA GPU).",
        ) from exc
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def build_lora_config(peft_config: dict[str, Any], available_modules: set[str]):
    """A peft LoraConfig whose target modules are checked against the model's real module names."""
    from peft import LoraConfig

    from phi3tune.config.load import resolve_target_modules

    params = dict(peft_config)
    params.setdefault("task_type", "CAUSAL_LM")
    params.setdefault("target_modules", "all-linear")
    targets, warnings = resolve_target_modules(params["target_modules"], available_modules)
    for line in warnings:
        log.warning(line)
    if not isinstance(targets, str) and "lm_head" in targets:
        raise UsageError(
            "peft_config.target_modules: lm_head cannot take a LoRA adapter here (trl computes the loss from "
            "lm_head.weight directly, so the adapter would never train).",
            hint="remove lm_head from target_modules; to train it fully use peft_config.modules_to_save: [lm_head].",
        )
    params["target_modules"] = targets
    try:
        return LoraConfig(**params)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"peft_config: {exc}") from exc


def phi3_generation_config(model_config):
    """Generation config that stops at <|end|> as well as <|endoftext|>."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=getattr(model_config, "bos_token_id", 1),
        eos_token_id=list(PHI3_STOP_IDS),
        pad_token_id=PHI3_EOS_ID,
    )


def save_base_model(model, tokenizer, directory: Path) -> None:
    """Save a randomly initialised base (safetensors + tokenizer) so the adapter has a base to point at.

    Written beside, flushed and renamed into place (replacing a damaged one): a kill or a full disk
    mid-save leaves a ``.tmp-`` folder, never a ``base_model/`` that looks whole.
    """
    with staged_folder(directory) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        phi3_generation_config(model.config).save_pretrained(staging)


# What a saved random_init base needs to load (a kill or full disk during a non-atomic save left a 0-byte
# config.json).
BASE_MODEL_REQUIRED = ("config.json", "model*.safetensors", "tokenizer_config.json", "generation_config.json")


def base_model_problem(directory: Path) -> str | None:
    """Why a random_init run's saved ``base_model/`` cannot be used (``missing`` when absent), or None."""
    return folder_problem(directory, BASE_MODEL_REQUIRED) if directory.exists() else "missing"
