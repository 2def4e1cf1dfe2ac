"""Run by tests/training/test_fsdp2.py under torchrun (2 CPU ranks, gloo): phi3tune's FSDP2 state helpers on a
model sharded by torch's own ``fully_shard``, checked against the same model trained unsharded in one process.

accelerate does not build FSDP on CPUs, so the training run cannot be FSDP2 here; torch's FSDP2 itself runs
on gloo, and everything phi3tune adds for it (``training/sharded.py``, ``Phi3Trainer.check_finite_weights``)
acts on the sharded model and optimizer that accelerate would hand it on GPUs.

    python -m torch.distributed.run --nproc_per_node 2 tests/training/fsdp2_ranks.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import Phi3ForCausalLM

from helpers import tiny_phi3_config
from phi3tune.training import distributed, sharded
from phi3tune.training.safe_state import load_state, save_state
from phi3tune.training.trainer import Phi3Trainer

ROWS, STEPS, MORE = 4, 3, 2


def base() -> Phi3ForCausalLM:
    torch.manual_seed(0)
    config = tiny_phi3_config()
    config._attn_implementation = "sdpa"
    return Phi3ForCausalLM(config)


def lora(model) -> PeftModel:
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


def shard(model):
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def batch(i: int) -> torch.Tensor:
    return torch.randint(0, 32000, (ROWS, 16), generator=torch.Generator().manual_seed(i))


def train(model, optimizer, steps: range, rows: slice) -> list[float]:
    """Steps of ``rows`` of each batch; the loss averaged over the ranks (each has as many tokens)."""
    losses = []
    for i in steps:
        rows_here = batch(i)[rows]
        loss = model(input_ids=rows_here, labels=rows_here).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if rows != slice(None):
            dist.all_reduce(total)
            total /= dist.get_world_size()
        losses.append(total.item())
    return losses


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    assert a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol), what


class FakeTrainer:
    """What ``Phi3Trainer.check_finite_weights`` reads of a trainer whose model accelerate sharded with FSDP2."""

    _first_nonfinite = Phi3Trainer._first_nonfinite
    check_finite_weights = Phi3Trainer.check_finite_weights
    is_fsdp_enabled = True

    def __init__(self, model, optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.accelerator = type("Accelerator", (), {"is_fsdp2": True})()
        self.state = type("State", (), {"global_step": 7})()

    def _nonfinite_error(self, what: str) -> RuntimeError:
        return RuntimeError(what)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * ROWS // world, (rank + 1) * ROWS // world)

    reference = lora(base())
    reference_opt = adamw(reference)
    reference_losses = train(reference, reference_opt, range(STEPS), slice(None))
    model = shard(lora(base()))
    optimizer = adamw(model)
    losses = train(model, optimizer, range(STEPS), mine)
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, reference_losses)), (losses, reference_losses)
    trainable = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}

    # 1. The adapter, gathered: whole tensors on rank 0, nothing elsewhere.
    gathered = sharded.trainable_state_dict(model)
    if rank == 0:
        assert set(trainable) <= set(gathered), sorted(set(trainable) - set(gathered))[:3]
        for name, value in trainable.items():
            close(gathered[name], value, name)
            assert gathered[name].device.type == "cpu"
    else:
        assert gathered == {}

    # 2. The optimizer state, gathered, in a one-process run's own layout (parameters by index).
    state = sharded.optimizer_state_dict(model, optimizer)
    if rank == 0:
        want = reference_opt.state_dict()
        assert [g["params"] for g in state["param_groups"]] == [g["params"] for g in want["param_groups"]]
        assert sorted(state["state"]) == sorted(want["state"])
        for index, moments in want["state"].items():
            for key, value in moments.items():
                close(state["state"][index][key], value, f"{index}.{key}")
    else:
        assert state == {}

    # 3. Rank 0 writes, as Phi3Trainer does (the others wait: peft's save must not need them).
    if rank == 0:
        model.save_pretrained(out / "adapter", state_dict=gathered)
        save_state(state, out / "checkpoint", "optimizer")
        save_state(reference_opt.state_dict(), out / "one-process", "optimizer")
        plain = PeftModel.from_pretrained(base(), out / "adapter")  # plain peft, no phi3tune
        for name, value in plain.named_parameters():
            if "lora_" in name:
                close(value.detach(), trainable[name], f"plain peft: {name}")
    dist.barrier()

    # 4. Resume: a fresh sharded model and optimizer from those files continue exactly like the original; so does
    #    one restored from the one-process checkpoint (a checkpoint resumes under either strategy).
    straight = train(model, optimizer, range(STEPS, STEPS + MORE), mine)
    reference_more = train(reference, reference_opt, range(STEPS, STEPS + MORE), slice(None))
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(straight, reference_more)), (straight, reference_more)
    for saved in ("checkpoint", "one-process"):
        resumed = shard(lora(base()))
        resumed_opt = adamw(resumed)
        sharded.load_adapter_weights(resumed, out / "adapter")
        sharded.load_optimizer_state(resumed, resumed_opt, load_state(out / saved, "optimizer"))
        again = train(resumed, resumed_opt, range(STEPS, STEPS + MORE), mine)
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(again, straight)), (saved, again, straight)

    # 5. A NaN in the shard that rank 1 holds: every rank raises, naming it.
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)
    if rank == world - 1:
        with torch.no_grad():
            sharded.local(param).fill_(float("nan"))
    assert distributed.is_distributed()
    try:
        FakeTrainer(model, optimizer).check_finite_weights()
    except RuntimeError as exc:
        assert str(exc) == f"weight {name} holds NaN/inf at step 7", exc
    else:
        raise AssertionError(f"rank {rank} saw no NaN")
    dist.barrier()
    print(f"rank {rank}: fsdp2 state ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
