"""phi3tune: fine-tune Phi-3 Mini with LoRA or QLoRA from one YAML file."""

__version__ = "0.1.0"
