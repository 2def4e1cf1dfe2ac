"""Training data: read from files or the hub, formats detected and normalised, rows validated, rendered with
Phi-3's chat template and tokenised with assistant-only labels.

    data = prepare_datasets(cfg.data, tokenizer, max_length=2048, seed=0)   # data.train, data.eval, data.report
    messages = to_phi3_messages(openai_messages, tools)   # a tool-calling chat rendered as training did
"""

from phi3tune import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "PreparedData": "phi3tune.data.prepare",
    "prepare_datasets": "phi3tune.data.prepare",
    "load_eval_dataset": "phi3tune.data.evaluation",
    "to_phi3_messages": "phi3tune.data.tools",
})
