"""The model side: loading (dtype, attention, QLoRA, random init), what a RUN_OR_ADAPTER_OR_MODEL argument points
at (``targets``), completeness checks of saved folders (``artefacts``), LoRA target names for Phi-3's fused
projections, and the chat template with its special-token rule.
"""

from phi3tune import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "Target": "phi3tune.model.targets",
    "resolve_target": "phi3tune.model.targets",
    "load_for_inference": "phi3tune.model.targets",
    "load_model": "phi3tune.model.loading",
    "load_tokenizer": "phi3tune.model.loading",
    "device_type": "phi3tune.model.loading",
    "render_prompt": "phi3tune.model.chat_template",
})
