"""The parts of ``phi3tune eval`` that are neither data nor model: scoring generated answers against their
references (``metrics``, ``answers``), the checked ``--generate``/``--tasks`` options (``options``), the eval
output-file policy (``outputs``) and the bridge to EleutherAI's lm-evaluation-harness (``harness``).
``phi3tune/evaluate.py`` is the verb that runs them top to bottom, as ``train.py`` runs ``training/``."""
