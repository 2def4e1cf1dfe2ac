"""CUDA graphs over the decoder layers (fastpath/cuda_graphs.py, static_batches.py): the static-shape padding changes no loss, the
router runs the layers' own forwards wherever a graph does not apply, the policy turns graphs on only where they
can work; on a GPU, graphed training follows eager training step for step, gradient accumulation included."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_CONFIG, needs_hf_home
from helpers import cli, tiny_phi3_config
from helpers import fast_path_model_cfg as _model_cfg
from helpers import fast_path_plan as _plan
from phi3tune import fastpath
from phi3tune.fastpath import attention, cuda_graphs, policy
from phi3tune.fastpath.cuda_graphs import DecoderGraphs, _own_gradient
from phi3tune.fastpath.static_batches import PADDING_KEY, StaticShape, pad_batch, segment_capacity

PAD = 32000


def _collate(rows: list[list[int]]) -> dict:
    """trl's padding-free collator on packed rows (``seq_lengths`` as trl's bfd packing writes them)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)
    g = torch.Generator().manual_seed(sum(map(sum, rows)))
    examples = []
    for lengths in rows:
        ids = torch.randint(10, 2000, (sum(lengths),), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids, "seq_lengths": lengths})
    return collator(examples)


def test_pad_batch_appends_pad_samples_and_empty_segments() -> None:
    batch = _collate([[5, 9], [7]])  # 21 tokens, 3 samples
    shape = StaticShape(tokens=48, segments=8, max_length=16)
    out = pad_batch(batch, shape, PAD)
    assert out[PADDING_KEY] == 27
    assert out["input_ids"].shape == out["labels"].shape == out["position_ids"].shape == (1, 48)
    assert torch.equal(out["input_ids"][:, :21], batch["input_ids"]) and (out["input_ids"][0, 21:] == PAD).all()
    assert torch.equal(out["labels"][:, :21], batch["labels"]) and (out["labels"][0, 21:] == -100).all()
    # 27 pad tokens: one pad sample of 16 and one of 11 (never longer than max_length), then empty segments
    assert out["cu_seq_lens_q"].tolist() == [0, 5, 14, 21, 37, 48, 48, 48, 48]
    assert out["cu_seq_lens_k"] is out["cu_seq_lens_q"] and out["cu_seq_lens_q"].dtype == torch.int32
    assert out["position_ids"][0, 21:].tolist() == list(range(16)) + list(range(11))
    assert out["max_length_q"] == out["max_length_k"] == 16
    assert out["seq_idx"].shape == (1, 48) and out["seq_idx"][0, 21:].tolist() == [3] * 16 + [4] * 11
    assert "phi3tune_padding_tokens" not in batch  # the collator's own batch is not changed


def test_a_full_batch_gets_only_empty_segments() -> None:
    batch = _collate([[16], [10, 6]])  # bfd rows filled to max_length: nothing to pad
    out = pad_batch(batch, StaticShape(tokens=32, segments=5, max_length=16), PAD)
    assert out[PADDING_KEY] == 0 and torch.equal(out["input_ids"], batch["input_ids"])
    assert out["cu_seq_lens_q"].tolist() == [0, 16, 26, 32, 32, 32] and torch.equal(out["seq_idx"], batch["seq_idx"])


@pytest.mark.parametrize("shape", [StaticShape(tokens=16, segments=8, max_length=16),   # too many tokens
                                   StaticShape(tokens=48, segments=3, max_length=16),   # too many samples
                                   StaticShape(tokens=48, segments=8, max_length=8)])   # a sample too long
def test_a_batch_that_does_not_fit_is_returned_unchanged(shape: StaticShape) -> None:
    batch = _collate([[5, 9], [7]])
    assert pad_batch(batch, shape, PAD) is batch


def test_segment_capacity_is_the_fullest_rows_plus_pad_samples() -> None:
    rows = [[100], [10, 20, 30], [5] * 7, [50, 50]]
    assert segment_capacity(rows, rows=2, shape_tokens=4096, max_length=2048) == 7 + 3 + 2


@needs_hf_home
def test_padding_changes_neither_the_loss_nor_the_real_tokens_logits() -> None:
    from transformers import AutoModelForCausalLM

    attention.patch()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_phi3_config(sliding_window=8), attn_implementation=attention.VARLEN)
    batch = _collate([[6, 9], [12]])
    padded = pad_batch(batch, StaticShape(tokens=64, segments=10, max_length=16), PAD)
    padded = {k: v for k, v in padded.items() if k != PADDING_KEY}
    with torch.no_grad():
        plain, pad = model(**batch), model(**padded)
    assert torch.allclose(pad.logits[:, :27], plain.logits, atol=1e-5)
    assert torch.allclose(pad.loss, plain.loss, atol=1e-6)


@needs_hf_home
def test_router_runs_the_layers_own_forward_where_no_graph_applies() -> None:
    from transformers import AutoModelForCausalLM

    attention.patch()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_phi3_config(), attn_implementation=attention.VARLEN).train()
    batch = _collate([[6, 9], [12]])
    want = model(**batch, use_cache=False).logits
    graphs = DecoderGraphs(model.model.layers, StaticShape(tokens=27, segments=3, max_length=12)).install()
    assert all("forward" in vars(layer) for layer in model.model.layers)
    got = model(**batch, use_cache=False).logits  # as trl calls it; on a CPU never a graph
    assert torch.equal(got, want) and graphs.eager == 1 and graphs.replayed == 0 and graphs.graphed is None
    # the device is the last check: every other condition of a replay held for this call
    assert graphs.last_eager_reason == "not on a CUDA device", graphs.last_eager_reason
    model(**batch)  # use_cache defaults to True: a KV cache, never a graph
    assert "KV cache" in graphs.last_eager_reason
    with torch.no_grad():
        model(**batch, use_cache=False)
    assert graphs.eager == 2  # evaluation is not counted as a training micro-batch
    graphs.release()
    assert not any("forward" in vars(layer) for layer in model.model.layers)
    assert torch.equal(model(**batch, use_cache=False).logits, want)


def test_trainer_keeps_pad_tokens_out_of_the_model_and_the_token_count(monkeypatch) -> None:
    from trl import SFTTrainer

    from phi3tune.training.trainer import Phi3Trainer

    seen: dict = {}

    def trl_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.update(inputs)
        self._total_train_tokens += inputs["position_ids"].size(1)  # what trl counts for a padding-free batch
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]  # and logs
        return torch.tensor(1.0)

    monkeypatch.setattr(SFTTrainer, "compute_loss", trl_compute_loss)
    trainer = object.__new__(Phi3Trainer)
    trainer._total_train_tokens, trainer._metrics = 0, {"train": {}}
    batch = pad_batch(_collate([[5, 9], [7]]), StaticShape(tokens=48, segments=8, max_length=16), PAD)
    Phi3Trainer.compute_loss(trainer, SimpleNamespace(training=True), batch)
    assert PADDING_KEY not in seen and seen["input_ids"].shape == (1, 48)
    assert trainer._total_train_tokens == 21 and trainer._metrics["train"]["num_tokens"] == [21]


def test_only_the_training_dataloader_gets_the_padding_collator(monkeypatch) -> None:
    from trl import SFTTrainer

    from phi3tune.training.trainer import Phi3Trainer

    monkeypatch.setattr(SFTTrainer, "get_train_dataloader", lambda self: self.data_collator)
    trainer = object.__new__(Phi3Trainer)
    trainer.data_collator, trainer.train_collator = "shared", "padding"
    assert Phi3Trainer.get_train_dataloader(trainer) == "padding" and trainer.data_collator == "shared"
    trainer.train_collator = None
    assert Phi3Trainer.get_train_dataloader(trainer) == "shared"


def test_gradient_hook_keeps_accumulation_off_the_graphs_buffer() -> None:
    """A graph's backward returns its static buffer; autograd would keep it as ``.grad`` and the next replay
    would overwrite it (the second micro-batch counted twice, the first lost)."""
    static = torch.zeros(3)

    class Replay(torch.autograd.Function):  # what make_graphed_callables' backward returns
        @staticmethod
        def forward(ctx, w):
            return w.detach().clone()

        @staticmethod
        def backward(ctx, grad):
            static.copy_(grad)
            return static.detach()

    param = torch.nn.Parameter(torch.zeros(3))
    param.register_hook(_own_gradient(param))
    for k in (1.0, 2.0):  # two accumulation micro-batches
        (Replay.apply(param) * k).sum().backward()
    assert param.grad.tolist() == [3.0, 3.0, 3.0]  # without the hook: 4


def _tightest_card(args: dict) -> int:
    """The smallest card (GiB) on which the fast path trains ``args`` without activation checkpointing."""
    return next(g for g in range(40, 120) if not _plan(_model_cfg(), args, gib=g).args["gradient_checkpointing"])


@pytest.mark.parametrize("args, model, why", [
    ({}, {}, None),
    ({"gradient_checkpointing": True}, {}, "activation checkpointing"),
    ({"packing": False}, {}, "not packed"),
    ({"fsdp": "full_shard"}, {}, "FSDP2"),
    ({}, {"quantization": "4bit"}, "QLoRA"),
])
def test_policy_plans_graphs_only_where_they_can_work(args: dict, model: dict, why: str | None) -> None:
    model_cfg = _model_cfg(cuda_graphs=True)
    for key, value in model.items():
        setattr(model_cfg, key, value)
    plan = _plan(model_cfg, {"max_length": 2048, "bf16": True, **args})
    assert plan.cuda_graphs is (why is None)
    notes = [line for line in plan.notes if "CUDA graphs" in line]
    assert len(notes) == 1, plan.notes
    assert ("replayed from CUDA graphs" in notes[0]) if why is None else (why in notes[0] and "CUDA graphs off (" in notes[0]), notes


def test_graphs_are_opt_in_and_their_buffers_are_in_the_memory_plan() -> None:
    args = {"max_length": 2048, "bf16": True}
    default = _plan(_model_cfg(), args)
    assert not default.cuda_graphs and not any("CUDA graphs" in line for line in default.notes)
    assert not _plan(_model_cfg(), args, "cpu").cuda_graphs
    on = _plan(_model_cfg(cuda_graphs=True), args)
    assert on.cuda_graphs and _plan(_model_cfg(), args, env={policy.CUDA_GRAPHS_ENV: "1"}).cuda_graphs
    assert on.memory.peak - default.memory.peak == 32 * 8192 * 3072 * 2  # a static input buffer a layer


def test_graph_buffers_come_out_of_the_checkpointing_budget() -> None:
    """On a card where the micro-batch fits without checkpointing only without the graphs' buffers, the plan
    does not overrun its budget: graphs off (saying why) and checkpointing as without them."""
    args = {"max_length": 2048, "bf16": True}
    gib = _tightest_card(args)
    plan = _plan(_model_cfg(cuda_graphs=True), args, gib=gib)
    assert plan.memory.peak <= gib * 2**30 * policy.MEMORY_FRACTION
    assert not plan.cuda_graphs and plan.args["gradient_checkpointing"] is False
    assert any("CUDA graphs off (the micro-batch fits only with activation checkpointing" in n for n in plan.notes)
    roomy = _plan(_model_cfg(cuda_graphs=True), args, gib=gib + 4)
    assert roomy.cuda_graphs and roomy.memory.peak <= (gib + 4) * 2**30 * policy.MEMORY_FRACTION


@needs_hf_home
def test_dry_run_says_whether_graphs_will_run() -> None:
    def dry_run(*sets: str) -> str:
        args = ["train", str(TINY_CONFIG), "--dry-run", "--gpu-memory", "80", "--set", "model.fast_path.cuda_graphs=true"]
        result = cli(args + [part for s in sets for part in ("--set", s)])
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    assert "CUDA graphs off (they need the fast path: model.attn_implementation auto or varlen, not sdpa)" in dry_run()
    assert "decoder layers replayed from CUDA graphs" in dry_run("model.attn_implementation=auto")
    out = dry_run("model.attn_implementation=auto", "training_config.gradient_checkpointing=true")
    assert "CUDA graphs off (activation checkpointing" in out, out


def test_graphs_respect_the_configs_own_checkpointing_choice() -> None:
    args = {"max_length": 2048, "bf16": True}
    gib = _tightest_card(args)
    # checkpointing off by the user's choice on the tightest card: the graphs' buffers would overrun the budget
    plan = _plan(_model_cfg(cuda_graphs=True), {**args, "gradient_checkpointing": False}, gib=gib)
    assert not plan.cuda_graphs and plan.memory.peak <= gib * 2**30 * policy.MEMORY_FRACTION
    assert any("buffers exceed the" in n for n in plan.notes), plan.notes
    # checkpointing on by the user's choice: graphs off, and their buffers do not shape the fast path's advice
    on = _plan(_model_cfg(cuda_graphs=True), {**args, "gradient_checkpointing": True}, gib=gib)
    assert not on.cuda_graphs and any("would use 'none'" in n for n in on.notes), on.notes


def test_a_second_signal_during_capture_is_not_taken_for_a_failed_capture(monkeypatch) -> None:
    from phi3tune.errors import TrainingInterrupted

    layer = torch.nn.Linear(4, 4)
    graphs = DecoderGraphs([layer], StaticShape(tokens=4, segments=1, max_length=4))
    inputs = (torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), torch.zeros(1, 4, dtype=torch.long),
              torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))

    def interrupted(*_args, **_kwargs):
        raise TrainingInterrupted("SIGINT again: stopped at once", exit_code=130)

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", interrupted)
    with pytest.raises(TrainingInterrupted):
        graphs._capture(torch.zeros(1, 4, 4), inputs)
    assert graphs.failure is None

    def broken(*_args, **_kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", broken)
    assert graphs._capture(torch.zeros(1, 4, 4), inputs) is False  # training goes on eagerly
    assert graphs.failure == "capture failed: RuntimeError: operation not permitted when stream is capturing"


# ------------------------------------------------------------------------------------------------------ GPU


def _gpu_training(graphed: bool, steps: int = 6, accumulation: int = 2) -> tuple[list[float], torch.Tensor,
                                                                                  DecoderGraphs | None]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plan = fastpath.FastPathPlan(enabled=True, attn=attention.VARLEN, args={},
                                 patches=["attention", "phi3_layers", "peft_cast", "lora_fused"])
    assert fastpath.apply_patches(plan) == []
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_phi3_config(num_hidden_layers=3, sliding_window=8),
                                             attn_implementation=attention.VARLEN, dtype=torch.bfloat16).cuda()
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora).train()
    shape = StaticShape(tokens=96, segments=12, max_length=32)
    graphs = DecoderGraphs(model.get_base_model().model.layers, shape).install() if graphed else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses, first_grads = [], None
    for _ in range(steps):
        total = 0.0
        for _ in range(accumulation):
            rows = [[int(torch.randint(3, 16, (1,), generator=g)) for _ in range(2)] for _ in range(3)]
            batch = pad_batch(_collate(rows), shape, PAD)
            batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items() if k != PADDING_KEY}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch, use_cache=False).loss / accumulation  # as trl calls it
            loss.backward()
            total += float(loss.detach())
        if first_grads is None:  # the accumulated gradient of the first step, every LoRA tensor
            first_grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    if graphs is not None:
        graphs.release()
    fastpath.unpatch_all()
    return losses, first_grads, graphs


@needs_hf_home
@pytest.mark.skipif(not attention.varlen_kernel_available("cuda"), reason="needs a CUDA GPU (sm80+) with torch varlen_attn")
def test_gpu_graphed_training_follows_eager_training() -> None:  # pragma: no cover - GPU only
    eager, eager_grads, _ = _gpu_training(graphed=False)
    graphed, graphed_grads, graphs = _gpu_training(graphed=True)
    assert graphs.failure is None and graphs.replayed == 12 and graphs.eager == 0, graphs.summary()
    rel = [abs(a - b) / abs(b) for a, b in zip(graphed, eager)]
    assert max(rel) < 0.01, (rel, graphed, eager)
    # The losses barely move in 6 steps; the accumulated gradient shows a micro-batch counted twice at once
    # (g2 + g2 instead of g1 + g2: a relative difference of order 1).
    grad_rel = float((graphed_grads - eager_grads).norm() / eager_grads.norm())
    assert grad_rel < 0.05, grad_rel


@needs_hf_home
@pytest.mark.skipif(not attention.varlen_kernel_available("cuda"), reason="needs a CUDA GPU (sm80+) with torch varlen_attn")
def test_gpu_kernel_takes_pad_samples_and_empty_segments() -> None:  # pragma: no cover - GPU only
    from transformers import AutoModelForCausalLM

    attention.patch()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_phi3_config(sliding_window=8), attn_implementation=attention.VARLEN,
                                             dtype=torch.bfloat16).cuda()
    batch = _collate([[6, 9], [12]])
    padded = pad_batch(batch, StaticShape(tokens=64, segments=10, max_length=16), PAD)
    plain = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    padded = {k: v.cuda() if torch.is_tensor(v) else v for k, v in padded.items() if k != PADDING_KEY}
    with torch.no_grad():
        a, b = model(**plain), model(**padded)
    assert torch.isfinite(b.logits).all()
    assert torch.allclose(b.logits[:, :27].float(), a.logits.float(), atol=2e-2) and abs(float(a.loss - b.loss)) < 1e-2
