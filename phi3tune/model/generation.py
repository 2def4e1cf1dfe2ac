"""Batched greedy generation for ``phi3tune eval --generate``: every sample answered, fast.

One sample at a time, a decode step costs the same GPU time whether it carries one sequence or a hundred
(it reads every weight once), so the old path spent ~all of eval's time there. Here prompts are sorted by
length, left-padded into batches (pad = ``<|endoftext|>``, attention mask 0) and decoded together with
transformers' static KV cache (allocated once per batch for prompt + budget); each sequence stops at ``<|end|>`` / ``<|endoftext|>`` and finished rows only
carry padding until the batch's last one stops. Left padding with a mask does not change a greedy answer
(tests/model/test_batched_generation.py checks batched == one-by-one, token for token, in float32; in bf16
other batch shapes round differently, so a near-tie can rarely flip).

The batch size comes from free GPU memory after loading (KV cache per token from the model's config,
plus the prefill's activations), or ``--batch-size N``; an out-of-memory batch is halved and retried.

A LoRA adapter is merged into the weights in memory for its pass (``adapter_merged``): a merged layer
runs only the base matmul, so the adapter adds no per-token cost. A 4-bit (QLoRA) base cannot be merged
without re-quantising, which would change the model that was trained: there the fastest correct path is
the same batching with the adapter unmerged (two thin extra matmuls per layer, small next to the 4-bit
dequantisation every layer already pays), its weights in the compute dtype for the pass: peft loads them in
float32, so every LoRA product of the prefill made float32 ``[tokens, out_features]`` temporaries, and the
first 4-bit adapter batch ran out of memory and was halved (H200: batch 95 where the base pass had 191).
Training computed those products in bf16 under autocast, so this is also the arithmetic that was trained.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from phi3tune.model import loading

MAX_AUTO_BATCH = 256  # past this a decode step is bound by reading the KV cache; bigger batches gain little
CPU_AUTO_BATCH = 16
MEMORY_SHARE = 0.8  # of the free GPU memory; the rest absorbs the allocator's fragmentation


@dataclass
class Generated:
    """One greedy answer.

    Attributes:
        ids: The answer's tokens, without the stop token.
        stopped: It ended with ``<|end|>`` / ``<|endoftext|>`` within the token budget.
        new_tokens: Tokens the model produced (the stop token included).
    """

    ids: list[int]
    stopped: bool
    new_tokens: int


@dataclass
class GenerationRun:
    """All answers of one pass, in the prompts' order, and what the pass cost."""

    answers: list[Generated]
    seconds: float
    batch_size: int

    @property
    def tokens_per_second(self) -> float | None:
        total = sum(a.new_tokens for a in self.answers)
        return total / self.seconds if self.seconds > 0 else None


def prompt_and_reference(ids: Sequence[int], assistant_id: int) -> tuple[list[int], list[int]] | None:
    """Split a tokenised training sample at its last assistant turn.

    The prompt is every token up to and including that turn's ``<|assistant|>`` marker, which is exactly
    what ``render_prompt`` builds for the same conversation (the newline after a marker makes no token);
    the reference is the turn's content, up to its ``<|end|>``.

    Returns:
        ``(prompt_ids, reference_ids)``, or None when the sample has no assistant turn (e.g. cut off by
        ``max_length``).
    """
    ids = list(ids)
    marks = [i for i, t in enumerate(ids) if t == assistant_id]
    if not marks:
        return None
    start = marks[-1] + 1
    reference = []
    for token in ids[start:]:
        if token in loading.PHI3_STOP_IDS:
            break
        reference.append(token)
    return ids[:start], reference


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes across all layers."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def _compute_dtype(model) -> torch.dtype:
    # The embedding's dtype is the activations' (and so the KV cache's), for a 4-bit base too, whose packed
    # weights are uint8 and whose LoRA weights may be float32.
    return model.get_input_embeddings().weight.dtype


def batch_for_memory(config, dtype: torch.dtype, prompt_lengths: Sequence[int], max_new_tokens: int,
                     free_bytes: int, adapter_unmerged: bool = False) -> int:
    """The largest batch whose KV cache and prefill activations fit in ``MEMORY_SHARE`` of ``free_bytes`` (capped)."""
    elem = torch.finfo(dtype).bits // 8
    longest_prompt = max(prompt_lengths)
    # Prefill keeps the MLP's gate/up output, its activation and a few hidden-size tensors per token.
    per_token = 3 * config.intermediate_size + 6 * config.hidden_size
    if adapter_unmerged:  # gate_up's LoRA product and the sum it is added into
        per_token += 4 * config.intermediate_size
    prefill = per_token * elem * longest_prompt
    if getattr(config, "_attn_implementation", "sdpa") == "eager":  # eager materialises the score matrix
        prefill += config.num_attention_heads * longest_prompt**2 * 4
    per_sequence = kv_bytes_per_token(config, dtype) * (longest_prompt + max_new_tokens) + prefill
    fits = int(free_bytes * MEMORY_SHARE) // max(1, per_sequence)
    return max(1, min(len(prompt_lengths), MAX_AUTO_BATCH, fits))


def auto_batch_size(model, prompt_lengths: Sequence[int], max_new_tokens: int) -> int:
    """``batch_for_memory`` with the GPU's free memory after loading; on a CPU (no allocator to ask) a fixed batch."""
    if not prompt_lengths:
        return 1
    device = next(model.parameters()).device
    if device.type != "cuda":
        return max(1, min(len(prompt_lengths), CPU_AUTO_BATCH))
    return batch_for_memory(model.config, _compute_dtype(model), prompt_lengths, max_new_tokens,
                            available_gpu_bytes(device), adapter_unmerged=bool(_active_unmerged_lora(model)))


def available_gpu_bytes(device: torch.device) -> int:
    """Free device memory plus what PyTorch's allocator holds cached but unused.

    The driver's free figure alone misses the cache: after the base pass freed its KV cache, the adapter pass
    saw 27 sequences' worth where the base had 179 (H200, docs/benchmarks.md).
    """
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _quantized(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(base, "hf_quantizer", None) is not None)


def _active_unmerged_lora(model) -> list[torch.nn.Parameter]:
    """The LoRA weights an answer computes with: those of active, enabled, unmerged LoRA layers."""
    params = []
    for module in model.modules():
        if hasattr(module, "lora_A") and not getattr(module, "merged", True) and not getattr(module, "disable_adapters", True):
            for name in module.active_adapters:
                for part in (module.lora_A, module.lora_B):
                    if name in part:
                        params.extend(part[name].parameters())
    return params


@contextlib.contextmanager
def _adapter_in_dtype(model, dtype: torch.dtype) -> Iterator[None]:
    """The unmerged adapter's weights in ``dtype`` for the duration; the originals are put back exactly."""
    saved = [(p, p.data) for p in _active_unmerged_lora(model) if p.dtype != dtype]
    for param, data in saved:
        param.data = data.to(dtype)
    try:
        yield
    finally:
        for param, data in saved:
            param.data = data


@contextlib.contextmanager
def adapter_merged(model) -> Iterator[bool]:
    """Merge a LoRA adapter into the weights for the duration (in memory only); yields whether it merged.

    Nothing is merged for a full model or a quantized base (see the module docstring): there the adapter
    runs unmerged, in the compute dtype. Unmerging subtracts the same delta again, which is exact only up
    to rounding: callers run every base pass before this one.
    """
    mergeable = hasattr(model, "merge_adapter") and hasattr(model, "disable_adapter") and not _quantized(model)
    if not mergeable:
        with _adapter_in_dtype(model, _compute_dtype(model)):
            yield False
        return
    model.merge_adapter()
    try:
        yield True
    finally:
        model.unmerge_adapter()


class _Ticker:
    """A stopping criterion that never stops: it only reports each decode step to the progress bar."""

    def __init__(self, on_step: Callable[[], None]):
        self.on_step = on_step

    def __call__(self, input_ids, scores, **kwargs):
        self.on_step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _trim(row: list[int], max_new_tokens: int) -> Generated:
    for i, token in enumerate(row):
        if token in loading.PHI3_STOP_IDS:
            return Generated(ids=row[:i], stopped=True, new_tokens=i + 1)
    return Generated(ids=row, stopped=False, new_tokens=min(len(row), max_new_tokens))


@torch.inference_mode()
def _generate_batch(model, prompts: list[list[int]], max_new_tokens: int, on_step: Callable[[], None] | None):
    from transformers import GenerationConfig, StoppingCriteriaList

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), loading.PHI3_EOS_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    # A static cache (preallocated for prompt + budget, written in place): transformers' dynamic cache
    # concatenates every layer's keys and values at every step, which was ~30% of the GPU time and made a
    # decode step 5x slower (H200, 200 prompts in one batch: 214 -> 44 ms a step; docs/benchmarks.md).
    # disable_compile: transformers would otherwise compile the decode step for a static cache, which took
    # 65 s for one batch shape and again for every new shape, more than it saves on one eval.
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(loading.PHI3_STOP_IDS),
                              pad_token_id=loading.PHI3_EOS_ID, use_cache=True, cache_implementation="static",
                              disable_compile=True)
    criteria = StoppingCriteriaList([_Ticker(on_step)]) if on_step is not None else None
    # transformers sizes every later static cache to the longest one seen (to spare recompiles), so a batch of
    # short prompts after a long one would attend over the long one's length at every step.
    for module in model.modules():
        module.__dict__.pop("_previous_max_cache_length", None)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                         stopping_criteria=criteria)
    return [_trim(row, max_new_tokens) for row in out[:, width:].tolist()]


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int | None = None,
             advance: Callable[[float], None] | None = None) -> GenerationRun:
    """Greedy answers for every prompt, batched.

    Args:
        model: A causal LM (or PeftModel) in eval mode.
        prompts: Token ids, each ending with the ``<|assistant|>`` marker.
        max_new_tokens: The budget per answer.
        batch_size: Sequences per batch; None chooses from free memory (``auto_batch_size``).
        advance: Called with progress in samples (fractions during a batch, so an ETA moves smoothly).

    Returns:
        The answers in the order of ``prompts``, the seconds spent generating and the batch size used.
    """
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: an OOM shows at once
    size = batch_size or auto_batch_size(model, [len(p) for p in prompts], max_new_tokens)
    chosen = size
    answers: dict[int, Generated] = {}
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    start = 0
    while start < len(order):
        chunk = order[start:start + size]
        step = len(chunk) / max_new_tokens
        ticks = [0]

        def on_step() -> None:
            if ticks[0] < max_new_tokens and advance is not None:
                advance(step)
            ticks[0] += 1

        try:
            batch = _generate_batch(model, [list(prompts[i]) for i in chunk], max_new_tokens, on_step)
        except torch.cuda.OutOfMemoryError:
            if size == 1 or batch_size is not None:
                raise
            torch.cuda.empty_cache()
            if advance is not None:
                advance(-step * min(ticks[0], max_new_tokens))
            size = max(1, len(chunk) // 2)
            chosen = size
            continue
        if advance is not None:
            advance(len(chunk) - step * min(ticks[0], max_new_tokens))
        answers.update(zip(chunk, batch))
        start += len(chunk)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return GenerationRun(answers=[answers[i] for i in range(len(prompts))], seconds=time.perf_counter() - started,
                         batch_size=chosen)
