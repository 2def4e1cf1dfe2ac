"""Phi3Trainer.floating_point_ops: the same estimate as transformers' Trainer, the parameter count taken once."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import Trainer

from phi3tune.training.trainer import Phi3Trainer


class _Model:
    main_input_name = "input_ids"

    def __init__(self):
        self.calls = 0

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        self.calls += 1
        return 1234 if exclude_embeddings else 99999


def test_same_estimate_as_transformers_and_counted_once() -> None:
    model = _Model()
    ours = SimpleNamespace(model=model, _flops_parameter_count=None)
    stock = SimpleNamespace(model=_Model())
    for n in (7, 11, 7):
        inputs = {"input_ids": torch.zeros(1, n, dtype=torch.long)}
        assert Phi3Trainer.floating_point_ops(ours, inputs) == Trainer.floating_point_ops(stock, inputs) == 6 * n * 1234
    assert model.calls == 1 and stock.model.calls == 3


def test_inputs_without_the_main_input_count_zero() -> None:
    ours = SimpleNamespace(model=_Model(), _flops_parameter_count=None)
    assert Phi3Trainer.floating_point_ops(ours, {"inputs_embeds": torch.zeros(1, 3, 4)}) == 0
