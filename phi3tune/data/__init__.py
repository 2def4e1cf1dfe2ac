"""Training data: read from files or the hub, formats detected and normalised, rows validated, rendered with
Phi-3's chat template and tokenised with assistant-only labels.

    data = prepare_datasets(cfg.data, tokenizer, max_length=2048, seed=0)   # data.train, data.eval, data.report
    messages = to_phi3_messages(openai_messages, tools)   # a tool-calling chat rendered as training did
"""

from phi3tune.data.prepare import PreparedData, prepare_datasets
from phi3tune.data.tools import to_phi3_messages

__all__ = ["PreparedData", "prepare_datasets", "to_phi3_messages"]
