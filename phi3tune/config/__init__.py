"""The run's YAML: read (parse), checked against a schema and the installed trl/peft fields, legacy keys translated.

    cfg = load_config("configs/lora.yaml", ["training_config.max_steps=5"])
"""

from phi3tune import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "RunConfig": "phi3tune.config.load",
    "load_config": "phi3tune.config.load",
    "max_length_of": "phi3tune.config.schema",
})
