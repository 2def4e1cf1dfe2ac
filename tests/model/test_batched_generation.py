"""Issue 13: batched generation gives exactly the tokens of one-at-a-time greedy generation, the adapter merged
in memory generates what peft's unmerged adapter does, and answers stop per sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import needs_hf_home
from phi3tune.model import generation, loading
from phi3tune.model.chat_template import render_prompt
from phi3tune.model.targets import load_for_inference, resolve_target

MAX_NEW = 12


@pytest.fixture(scope="module")
def loaded(trained_run: Path):
    model, tokenizer = load_for_inference(resolve_target(str(trained_run), allow_hub=False), device="cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(loaded) -> list[list[int]]:
    """Prompts of many lengths (so batches mix them and left padding matters), some from the training task."""
    _, tokenizer = loaded
    texts = ["Reverse these words: star house bear", "Reverse these words: red blue", "hi",
             "Reverse these words: king fire silver stone green bell winter lamp pen paper",
             "Write one long sentence about the sea, the wind, the boats and the people who sail them."]
    found = [render_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    found.append(render_prompt(tokenizer, [{"role": "system", "content": "You reverse the order of the words."},
                                           {"role": "user", "content": "Reverse these words: moon tree river"}]))
    assert len({len(p) for p in found}) >= 5
    return found


def _one_by_one(model, prompts: list[list[int]]) -> list[list[int]]:
    """The old sequential path: plain ``generate`` per prompt, no padding at all."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                             eos_token_id=list(loading.PHI3_STOP_IDS), pad_token_id=loading.PHI3_EOS_ID)[0, len(prompt):]
        out.append(row.tolist())
    return out


def _tokens(run: generation.GenerationRun) -> list[list[int]]:
    """The answers as generated, stop token included (what ``_one_by_one`` returns)."""
    return [a.ids + ([loading.PHI3_END_ID] if a.stopped else []) for a in run.answers]


def _strip_stop(rows: list[list[int]]) -> list[list[int]]:
    out = []
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in loading.PHI3_STOP_IDS), None)
        out.append(row if cut is None else row[: cut + 1])
    return out


@needs_hf_home
@pytest.mark.slow
def test_batched_equals_one_by_one_for_adapter_and_base(loaded, prompts) -> None:
    model, _ = loaded
    for context in (torch.no_grad, model.disable_adapter):
        with context():
            want = _strip_stop(_one_by_one(model, prompts))
            for batch in (3, len(prompts)):  # mixed lengths in every batch
                got = generation.generate(model, prompts, max_new_tokens=MAX_NEW, batch_size=batch)
                assert [a.ids for a in got.answers] == [[t for t in row if t not in loading.PHI3_STOP_IDS] for row in want]
                assert [a.stopped for a in got.answers] == [any(t in loading.PHI3_STOP_IDS for t in row) for row in want]
                assert got.batch_size == batch


@needs_hf_home
@pytest.mark.slow
def test_merged_adapter_generates_what_the_unmerged_adapter_does(loaded, prompts) -> None:
    model, _ = loaded
    before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    unmerged = generation.generate(model, prompts, max_new_tokens=MAX_NEW, batch_size=4)
    with generation.adapter_merged(model) as merged:
        assert merged
        layer = next(m for m in model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A"))
        assert layer.merged  # the LoRA matmuls are really skipped
        in_memory = generation.generate(model, prompts, max_new_tokens=MAX_NEW, batch_size=4)
    assert [a.ids for a in in_memory.answers] == [a.ids for a in unmerged.answers]
    assert [a.stopped for a in in_memory.answers] == [a.stopped for a in unmerged.answers]
    assert not layer.merged
    for key, value in model.state_dict().items():  # unmerged again: the base weights are back (to rounding)
        if key in before:
            torch.testing.assert_close(value, before[key], rtol=0, atol=1e-5)
    with generation.adapter_merged(model.get_base_model()) as merged:  # a full model: nothing to merge
        assert not merged


def test_answers_are_cut_at_the_first_stop_token() -> None:
    end, eos = loading.PHI3_END_ID, loading.PHI3_EOS_ID
    assert generation._trim([5, 6, end, eos, eos], 5) == generation.Generated([5, 6], True, 3)
    assert generation._trim([eos, eos], 2) == generation.Generated([], True, 1)
    assert generation._trim([5, 6, 7], 3) == generation.Generated([5, 6, 7], False, 3)


def test_prompt_and_reference_split_at_the_last_assistant_turn() -> None:
    a, end, eos = 32001, loading.PHI3_END_ID, loading.PHI3_EOS_ID
    ids = [32010, 1, 2, end, a, 3, end, 32010, 4, end, a, 5, 6, end, eos]
    assert generation.prompt_and_reference(ids, a) == ([32010, 1, 2, end, a, 3, end, 32010, 4, end, a], [5, 6])
    assert generation.prompt_and_reference([32010, 1, 2], a) is None  # no assistant turn (cut off)
    assert generation.prompt_and_reference([32010, 1, a, 7, 8], a) == ([32010, 1, a], [7, 8])  # truncated turn


def test_batch_size_from_free_memory(phi3_tokenizer) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained("microsoft/Phi-3-mini-4k-instruct")
    # Phi-3-mini: 32 layers x 32 KV heads x 96 dims x K and V x 2 bytes = 384 KiB of cache per token.
    assert generation.kv_bytes_per_token(config, torch.bfloat16) == 393216
    lengths = [300] * 200
    per_sequence = 393216 * (300 + 256) + (3 * 8192 + 6 * 3072) * 2 * 300
    assert generation.batch_for_memory(config, torch.bfloat16, lengths, 256, 40 * 2**30) == int(
        40 * 2**30 * generation.MEMORY_SHARE) // per_sequence
    assert generation.batch_for_memory(config, torch.bfloat16, lengths, 256, 10**15) == 200  # never above n
    assert generation.batch_for_memory(config, torch.bfloat16, [300] * 999, 256, 10**15) == generation.MAX_AUTO_BATCH
    assert generation.batch_for_memory(config, torch.bfloat16, lengths, 256, 1) == 1


def test_an_out_of_memory_batch_is_halved_and_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def fake_batch(model, prompts, max_new_tokens, on_step):
        seen.append(len(prompts))
        if len(prompts) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [generation.Generated([len(p)], True, 2) for p in prompts]

    monkeypatch.setattr(generation, "_generate_batch", fake_batch)
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(generation, "auto_batch_size", lambda *a: 16)
    prompts = [[1] * n for n in range(1, 11)]
    run = generation.generate(model, prompts, max_new_tokens=4)
    assert [a.ids for a in run.answers] == [[n] for n in range(1, 11)]  # every answer, in the prompts' order
    assert run.batch_size == 2 and seen[:3] == [10, 5, 2]
    with pytest.raises(torch.cuda.OutOfMemoryError):  # an explicit --batch-size is not second-guessed
        generation.generate(model, prompts, max_new_tokens=4, batch_size=8)


def test_gpu_memory_for_the_batch_counts_what_the_allocator_holds_cached(monkeypatch) -> None:
    """The adapter pass runs after the base pass freed its KV cache into PyTorch's cache: that memory is available."""
    import torch

    from phi3tune.model import generation

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 140 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 90 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * 2**30)
    assert generation.available_gpu_bytes(torch.device("cuda", 0)) == 80 * 2**30


def test_decoding_writes_a_static_cache_in_place_without_compiling() -> None:
    """transformers' dynamic cache concatenates the whole cache at every step (5x slower decode on an H200), and
    a static cache would otherwise compile the decode step for every batch shape (65 s each)."""
    seen = {}

    class Model(torch.nn.Linear):
        def generate(self, input_ids, attention_mask, generation_config, stopping_criteria):
            seen.update(cache=generation_config.cache_implementation, no_compile=generation_config.disable_compile,
                        sticky_length=hasattr(self, "_previous_max_cache_length"))
            return torch.cat([input_ids, torch.full((len(input_ids), 1), loading.PHI3_END_ID)], dim=1)

    model = Model(2, 2)
    model._previous_max_cache_length = 4096  # what transformers leaves after a batch of long prompts
    answers = generation._generate_batch(model, [[1, 2], [3]], max_new_tokens=4, on_step=None)
    assert [a.stopped for a in answers] == [True, True]
    # ...and this batch's cache is sized for its own prompts, not the longest batch before it.
    assert seen == {"cache": "static", "no_compile": True, "sticky_length": False}


def test_an_unmerged_adapter_answers_in_the_compute_dtype_and_is_restored_exactly(phi3_tokenizer) -> None:
    """A 4-bit base cannot be merged: its adapter runs unmerged, cast from peft's float32 to the compute dtype
    for the pass (float32 LoRA products over the prefill ran the first 4-bit adapter batch out of memory)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3ForCausalLM

    from helpers import tiny_phi3_config

    model = get_peft_model(Phi3ForCausalLM(tiny_phi3_config()).to(torch.bfloat16),
                           LoraConfig(r=4, target_modules=["qkv_proj"], task_type="CAUSAL_LM"))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = torch.randn_like(p, dtype=torch.float32)  # as PeftModel.from_pretrained loads them
    before = [p.detach().clone() for p in lora]
    assert len(generation._active_unmerged_lora(model)) == len(lora)
    with model.disable_adapter():
        assert generation._active_unmerged_lora(model) == []  # the base pass computes with no adapter weight
    with generation._adapter_in_dtype(model, torch.bfloat16):
        assert {p.dtype for p in lora} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(lora, before))


def test_an_unmerged_adapter_leaves_room_for_its_prefill_products(phi3_tokenizer) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained("microsoft/Phi-3-mini-4k-instruct")
    merged = generation.batch_for_memory(config, torch.bfloat16, [1000] * 256, 256, 100 * 2**30)
    unmerged = generation.batch_for_memory(config, torch.bfloat16, [1000] * 256, 256, 100 * 2**30,
                                           adapter_unmerged=True)
    assert unmerged < merged
