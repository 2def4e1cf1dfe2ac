"""Compare an ONNX export with the merged transformers model it was built from, on fixed chat prompts.

Both sides get the same token ids (rendered with the Phi-3 chat template) and run greedy generation
with the same stop ids. The reference runs first and is freed before the export is loaded, so a
full-size model is never in memory twice.

What is judged (``passed``): an fp32 export must produce the reference's greedy tokens token for token
(the builder only re-expresses the same float32 arithmetic; measured max |logit diff| ~1e-5 on the tiny
model), the export's tokenizer must render the prompts to the same ids, and the export must generate.
For int4/fp16/bf16 the weights themselves are rounded, so greedy paths may part after a near-tie: the
token agreement and the first step's max |logit diff| are reported, not judged.

Token agreement is the share of the reference's tokens that the export reproduces before their paths
first differ (after that point they continue from different texts, so later positions say nothing).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from phi3tune.model.loading import PHI3_EOS_ID, PHI3_STOP_IDS
from phi3tune.model.onnx_runtime import GenAIModel

VERIFY_NEW_TOKENS = 16


@torch.no_grad()
def _run(model, prompts: list[list[int]], new_tokens: int, logits_of: Callable[[list[int]], torch.Tensor]):
    runs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=next(model.parameters()).device)
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                do_sample=False, eos_token_id=list(PHI3_STOP_IDS), pad_token_id=PHI3_EOS_ID)
        runs.append((output[0, len(prompt):].tolist(), logits_of(prompt).float().cpu()))
    return runs


def reference_runs(model, prompts: list[list[int]], new_tokens: int = VERIFY_NEW_TOKENS) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy tokens and first-step logits of a transformers model for each prompt (one at a time)."""
    device = next(model.parameters()).device

    def last_logits(prompt: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([prompt], device=device)).logits[0, -1]

    return _run(model, prompts, new_tokens, last_logits)


def export_runs(model: GenAIModel, prompts: list[list[int]], new_tokens: int = VERIFY_NEW_TOKENS) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy tokens and first-step logits of the ONNX export for each prompt."""
    return _run(model, prompts, new_tokens, model.first_step_logits)


def _agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(reference: list[tuple[list[int], torch.Tensor]], export: list[tuple[list[int], torch.Tensor]], *,
            exact: bool, tokenizer_matches: bool) -> dict[str, Any]:
    """The verification result (module docstring): per-prompt tokens, agreement, logit distance, ``passed``.

    Args:
        reference: ``reference_runs`` of the merged model.
        export: ``export_runs`` of the export, same prompts.
        exact: Judge token-for-token equality (fp32 exports).
        tokenizer_matches: The export's tokenizer renders the prompts to the reference's ids.
    """
    prompts = []
    for (ref_tokens, ref_logits), (exp_tokens, exp_logits) in zip(reference, export):
        prompts.append({
            "reference_tokens": ref_tokens,
            "export_tokens": exp_tokens,
            "identical": ref_tokens == exp_tokens,
            "agreeing_prefix": _agreeing_prefix(ref_tokens, exp_tokens),
            "first_step_max_abs_logit_diff": float((ref_logits - exp_logits).abs().max()),
            "first_step_argmax_agrees": int(ref_logits.argmax()) == int(exp_logits.argmax()),
        })
    total = sum(len(p["reference_tokens"]) for p in prompts)
    result: dict[str, Any] = {
        "judged": "greedy tokens identical" if exact else "reported only (rounded weights)",
        "new_tokens": VERIFY_NEW_TOKENS,
        "prompts_identical": sum(p["identical"] for p in prompts),
        "n_prompts": len(prompts),
        "token_agreement": (sum(p["agreeing_prefix"] for p in prompts) / total) if total else 1.0,
        "first_step_max_abs_logit_diff": max(p["first_step_max_abs_logit_diff"] for p in prompts),
        "tokenizer_matches": tokenizer_matches,
        "generates": all(p["export_tokens"] for p in prompts),
        "prompts": prompts,
    }
    result["passed"] = bool(result["generates"] and tokenizer_matches
                            and (not exact or result["prompts_identical"] == len(prompts)))
    return result

