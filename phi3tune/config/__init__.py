"""The run's YAML: read (parse), checked against a schema and the installed trl/peft fields, legacy keys translated.

    cfg = load_config("configs/lora.yaml", ["training_config.max_steps=5"])
"""

from phi3tune.config.load import RunConfig, load_config

__all__ = ["RunConfig", "load_config"]
