"""The model side: loading (dtype, attention, QLoRA, random init), what a RUN_OR_ADAPTER_OR_MODEL argument points
at, LoRA target names for Phi-3's fused projections, and the chat template with its special-token rule."""

from phi3tune.model.loading import device_type, load_model, load_tokenizer
from phi3tune.model.targets import Target, load_for_inference, resolve_target

__all__ = ["Target", "device_type", "load_for_inference", "load_model", "load_tokenizer", "resolve_target"]
