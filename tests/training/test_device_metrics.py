"""The sync-free loss path gives trl's loss, gradients and logged metrics, on the tiny Phi-3."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from transformers import Phi3ForCausalLM
from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from conftest import needs_hf_home
from helpers import tiny_phi3_config
from phi3tune.training import device_metrics

pytestmark = needs_hf_home


def _fake_trainer(model, loss_type="nll"):
    """The attributes trl's and phi3tune's compute_loss read, for one process."""
    accelerator = SimpleNamespace(num_processes=1, parallelism_config=None, gather_for_metrics=lambda t: t)
    args = SimpleNamespace(loss_type=loss_type, average_tokens_across_devices=False)
    return SimpleNamespace(model=model, accelerator=accelerator, args=args, compute_loss_func=None,
                           label_smoother=None, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
                           _total_train_tokens=100, _tp_size=1)


def _model(device="cpu"):
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_phi3_config(attn_implementation="eager")).to(device).train()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    return model


def _packed_batch(device="cpu", unlabelled_row=False):
    """Two packed samples, padding-free (position_ids restart), prompt tokens unlabelled."""
    torch.manual_seed(1)
    ids = torch.randint(5, 1000, (1, 23), device=device)
    labels = ids.clone()
    labels[0, :6] = -100
    labels[0, 14:17] = -100
    if unlabelled_row:
        labels[:] = -100
    positions = torch.cat([torch.arange(14), torch.arange(9)])[None].to(device)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("unlabelled_row", [False, True])
def test_same_loss_gradients_and_metrics_as_trl(loss_type: str, unlabelled_row: bool) -> None:
    results = []
    for ours in (False, True):
        model = _model()
        trainer = _fake_trainer(model, loss_type)
        inputs = _packed_batch(unlabelled_row=unlabelled_row)
        n_items = (inputs["labels"][:, 1:] != -100).sum()
        assert device_metrics.applies(trainer, model, inputs, return_outputs=False)
        if ours:
            loss = device_metrics.compute_loss(trainer, model, inputs, n_items, padding=3)
            assert all(torch.is_tensor(v) for v in trainer._metrics["train"]["entropy"])  # nothing read yet
            device_metrics.metrics_to_floats(trainer._metrics["train"])
            trainer._total_train_tokens += 3  # trl's count includes the pad tokens phi3tune takes out
        else:
            loss = SFTTrainer.compute_loss(trainer, model, inputs, num_items_in_batch=n_items)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, dict(trainer._metrics["train"]), trainer._total_train_tokens))
    (trl_loss, trl_grads, trl_metrics, trl_tokens), (loss, grads, metrics, tokens) = results
    assert torch.equal(loss, trl_loss) and tokens == trl_tokens == 123
    assert grads.keys() == trl_grads.keys() and all(torch.equal(grads[n], trl_grads[n]) for n in grads)
    assert metrics["entropy"] == pytest.approx(trl_metrics["entropy"], rel=1e-6)
    assert metrics["mean_token_accuracy"] == pytest.approx(trl_metrics["mean_token_accuracy"], rel=1e-6)
    assert metrics["num_tokens"] == [trl_metrics["num_tokens"][0] - 3]  # the pad tokens are not counted
    assert isinstance(metrics["entropy"][0], float)


def test_left_to_trl_where_it_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    padded = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
    assert not device_metrics.applies(_fake_trainer(model), model, padded, return_outputs=False)
    packed = _packed_batch()
    several = _fake_trainer(model)
    several.accelerator.num_processes = 2  # trl gathers its metrics across ranks
    assert not device_metrics.applies(several, model, packed, return_outputs=False)
    assert not device_metrics.applies(_fake_trainer(model, "chunked_nll"), model, packed, return_outputs=False)
    assert not device_metrics.applies(_fake_trainer(model), model, packed, return_outputs=True)
    model.eval()
    assert not device_metrics.applies(_fake_trainer(model), model, packed, return_outputs=False)
    model.train()
    monkeypatch.setenv(device_metrics.HOST_SYNCS_ENV, "1")  # the bench's A/B row: trl's own path
    assert not device_metrics.applies(_fake_trainer(model), model, packed, return_outputs=False)
    assert device_metrics.score_every_position() is False


def test_metrics_to_floats_reads_only_tensors() -> None:
    metrics = {"entropy": [0.5, torch.tensor(1.5)], "num_tokens": [7], "mean_token_accuracy": [torch.tensor(0.25)]}
    device_metrics.metrics_to_floats(metrics)
    assert metrics == {"entropy": [0.5, 1.5], "num_tokens": [7], "mean_token_accuracy": [0.25]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (trl's head compacts only on CUDA)")
def test_gpu_every_position_scored_gives_the_compact_heads_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    from trl.trainer import utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)  # restored after the test
    inputs = _packed_batch("cuda")
    n_items = (inputs["labels"][:, 1:] != -100).sum()
    compact = _model("cuda")(**inputs, fused_lm_head=True, num_items_in_batch=n_items)
    assert device_metrics.score_every_position() is True
    every = _model("cuda")(**inputs, fused_lm_head=True, num_items_in_batch=n_items)
    for field in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(every, field), getattr(compact, field), rtol=1e-5, atol=1e-5)
