"""The non-finite guard reads its verdicts without stalling the GPU, and still reports the first bad step."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIG
from phi3tune.training.finite_watch import FiniteWatch


class _Event:
    """A CUDA event stand-in: ``done`` says whether the GPU has passed it."""

    def __init__(self, done: bool) -> None:
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True


def _step(watch: FiniteWatch, step: int, losses=(1.0,), grad_norm=0.5, skipped=False) -> None:
    for loss in losses:
        watch.add_loss(torch.tensor(loss))
    watch.end_step(step, grad_norm if grad_norm is None or isinstance(grad_norm, float) else torch.tensor(grad_norm),
                   skipped)


def test_the_first_nonfinite_step_is_reported_not_a_later_one() -> None:
    watch = FiniteWatch()
    _step(watch, 1)
    assert watch.first_problem(wait=False) is None
    _step(watch, 2, losses=(1.0, float("nan")))  # one bad micro-batch of two is the step's verdict
    _step(watch, 3, grad_norm=float("inf"))
    assert watch.first_problem(wait=True) == ("the training loss", 2)
    assert watch.first_problem(wait=True) == ("the gradient norm (inf)", 3)
    assert watch.first_problem(wait=True) is None


def test_gradient_norms_of_every_kind_and_skipped_steps() -> None:
    watch = FiniteWatch()
    _step(watch, 1, grad_norm=None)  # max_grad_norm 0 and no norm asked for
    _step(watch, 2, grad_norm=2.0)  # DeepSpeed hands a float
    _step(watch, 3, grad_norm=float("nan"), skipped=True)  # fp16's scaler skipped an overflowing step on purpose
    assert watch.first_problem(wait=True) is None
    _step(watch, 4, grad_norm=float("-inf"))
    assert watch.first_problem(wait=True) == ("the gradient norm (-inf)", 4)


def test_the_newest_verdict_is_waited_for_only_when_asked() -> None:
    """Without ``wait`` the GPU's newest step is read only once its copy has landed; older ones always are."""
    watch = FiniteWatch()
    _step(watch, 1, losses=(float("inf"),))
    watch._pending[-1].ready = running = _Event(done=False)
    assert watch.first_problem(wait=False) is None and not running.waited
    _step(watch, 2)
    watch._pending[-1].ready = _Event(done=False)
    assert watch.first_problem(wait=False) == ("the training loss", 1)  # one step later, without waiting on step 2
    assert running.waited  # (its event had long passed on a real GPU: synchronize returns at once)
    landed = FiniteWatch()
    _step(landed, 7, grad_norm=float("nan"))
    landed._pending[-1].ready = _Event(done=True)
    # even a landed copy waits for the next step: when it lands differs between ranks, the step read must not
    assert landed.first_problem(wait=False) is None
    assert landed.first_problem(wait=True) == ("the gradient norm (nan)", 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the verdict's pinned copy and event)")
def test_gpu_verdicts_travel_through_pinned_memory() -> None:
    watch = FiniteWatch()
    watch.add_loss(torch.tensor(1.0, device="cuda"))
    watch.end_step(1, torch.tensor(0.3, device="cuda"))
    watch.add_loss(torch.tensor(float("nan"), device="cuda"))
    watch.end_step(2, torch.tensor(0.3, device="cuda"))
    assert watch.first_problem(wait=True) == ("the training loss", 2)


def test_training_arguments_wait_on_nothing_a_step() -> None:
    """transformers' NaN filter (a host read of every loss) is off unless asked for; CUDA batches copy async."""
    from phi3tune.config.load import load_config
    from phi3tune.training.arguments import build_training_args

    cfg = load_config(TINY_CONFIG, [])
    assert build_training_args(cfg, None, "cpu", torch.float32).args["logging_nan_inf_filter"] is False
    assert "accelerator_config" not in build_training_args(cfg, None, "cpu", torch.float32).args
    gpu = build_training_args(cfg, None, "cuda", torch.bfloat16, gpu_memory=80 * 2**30).args
    assert gpu["accelerator_config"] == {"non_blocking": True}
    user = {"split_batches": True}
    cfg = load_config(TINY_CONFIG, ["training_config.logging_nan_inf_filter=true"])
    cfg.training_config["accelerator_config"] = user
    args = build_training_args(cfg, None, "cuda", torch.bfloat16, gpu_memory=80 * 2**30).args
    assert args["logging_nan_inf_filter"] is True
    assert args["accelerator_config"] == {"non_blocking": True, "split_batches": True} and user == {"split_batches": True}
    cfg.training_config["accelerator_config"] = {"non_blocking": False}
    args = build_training_args(cfg, None, "cuda", torch.bfloat16, gpu_memory=80 * 2**30).args
    assert args["accelerator_config"] == {"non_blocking": False}  # the user's choice stands


def _rank(rank: int, init_file: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        watch = FiniteWatch()
        _step(watch, 1)
        _step(watch, 2, losses=(float("nan"),) if rank == 1 else (1.0,))  # only rank 1's loss is bad
        _step(watch, 3)
        results[rank] = watch.first_problem(wait=True)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, distribute_tensor

        mesh = init_device_mesh("cpu", (2,))  # FSDP2 hands the gradient norm over as a DTensor
        watch.end_step(4, distribute_tensor(torch.tensor(float("inf")), mesh, [Replicate()]))
        results[rank + 2] = watch.first_problem(wait=True)
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_stops_at_the_step_any_rank_saw_a_nonfinite_loss(tmp_path) -> None:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "init"), results), nprocs=2)
        assert dict(results) == {0: ("the training loss", 2), 1: ("the training loss", 2),
                                 2: ("the gradient norm (inf)", 4), 3: ("the gradient norm (inf)", 4)}
