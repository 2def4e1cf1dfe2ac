"""Ranks under torchrun / accelerate launch: who writes, who waits, and the collectives that keep ranks in step.

phi3tune never starts or wires processes itself: the launcher (torchrun, ``accelerate launch`` or
``phi3tune train --nproc``, which calls torchrun's Python API) sets WORLD_SIZE/RANK/LOCAL_RANK, and accelerate's
``PartialState`` opens the process group from them: gloo on a CPU, nccl on CUDA. transformers' Trainer then
finds that state and trains with DDP (or FSDP/DeepSpeed when the config says so).

One process is the degenerate case: every helper here is a no-op, so the single-process path is unchanged.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import datasets
import torch
import torch.distributed as dist

from phi3tune.data.prepare import PreparedData
from phi3tune.errors import Phi3TuneError, UsageError

# Where rank 0 leaves the tokenised data for the other ranks (beside the run folder, so every node of a
# shared-filesystem cluster sees it, and outside it, so a failed start leaves the run folder untouched).
_PREPARED_SUFFIX = ".prepared-data"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world_size() > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """The one writer: rank 0 of the whole job (not of each node)."""
    return rank() == 0


def init(device: str) -> None:
    """Open the process group (gloo on CPU, nccl on CUDA) through accelerate, before the Trainer needs it.

    transformers asks PartialState for ``cpu=False`` unless ``use_cpu`` is set, and accelerate then finds no
    multi-process backend on a CPU-only machine; creating the state first with ``cpu=True`` makes it gloo.
    """
    if not is_distributed() or (dist.is_available() and dist.is_initialized()):
        return
    from accelerate import PartialState

    PartialState(cpu=device == "cpu")


def barrier() -> None:
    if is_distributed() and dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (small plain objects: a resume plan, a path)."""
    if not (is_distributed() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of all ranks, on every rank (a stop request seen by one rank stops all)."""
    if not (is_distributed() and dist.is_initialized()):
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    box = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def first_over_ranks(value: Any) -> Any:
    """The first non-None ``value`` of all ranks (rank order), on every rank; ``value`` itself alone.

    For what one rank alone can see, such as a NaN in the shard of a weight it holds under FSDP2.
    """
    if not (is_distributed() and dist.is_initialized()):
        return value
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return next((v for v in values if v is not None), None)


@contextmanager
def main_does_it() -> Iterator[bool]:
    """``with main_does_it() as mine: if mine: write()`` — only rank 0 writes; all ranks leave together."""
    try:
        yield is_main()
    finally:
        barrier()


def prepared_data_dir(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}{_PREPARED_SUFFIX}"


_PREPARED_MARKER = "phi3tune-prepared-data"


def _fresh_prepared_dir(staging: Path) -> None:
    """An empty folder for the shared data, marked as phi3tune's; one left by a killed run of ours is replaced,
    anything else of that name is the user's and is left alone."""
    if staging.exists():
        if not (staging / _PREPARED_MARKER).is_file():
            raise UsageError(f"{staging} exists and was not made by phi3tune; it is left alone.",
                             hint="move it away, or choose another --output-dir.")
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / _PREPARED_MARKER).write_text("tokenised data shared between ranks; removed when they have loaded it\n")


@dataclass
class _PrepareFailed:
    exit_code: int


class PeerFailed(Phi3TuneError):
    """Another rank failed first and said why; this one stops with the same exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def share_prepared_data(output_dir: Path, prepare) -> Any:
    """Tokenise once: rank 0 runs ``prepare()`` and saves the splits; the other ranks load them.

    Args:
        output_dir: The run folder; the staging folder sits beside it.
        prepare: A callable returning PreparedData (only rank 0 calls it).

    Returns:
        PreparedData on every rank (the report is broadcast from rank 0).
    """
    if not is_distributed():
        return prepare()
    staging = prepared_data_dir(output_dir)
    report = None
    if is_main():
        try:
            prepared = prepare()
            _fresh_prepared_dir(staging)
            prepared.train.save_to_disk(str(staging / "train"))
            if prepared.eval is not None:
                prepared.eval.save_to_disk(str(staging / "eval"))
        except BaseException as exc:
            # The others wait in the broadcast below: tell them, or they die of a closed connection (or hang).
            broadcast(_PrepareFailed(getattr(exc, "exit_code", 1)))
            raise
        report = prepared.report
    report = broadcast(report)
    if isinstance(report, _PrepareFailed):
        raise PeerFailed("rank 0 could not prepare the data (its message is above); this rank stopped too.",
                         exit_code=report.exit_code)
    if is_main():
        barrier()  # the others have loaded it
        shutil.rmtree(staging, ignore_errors=True)
        return prepared
    # In memory, as rank 0's are: trl's own dataset maps would otherwise write cache files into the staging folder.
    train = datasets.load_from_disk(str(staging / "train"), keep_in_memory=True)
    eval_ = datasets.load_from_disk(str(staging / "eval"), keep_in_memory=True) if (staging / "eval").is_dir() else None
    barrier()
    return PreparedData(train, eval_, report)


def strategy(args: dict[str, Any], device: str) -> str:
    """How the ranks share the work, from the SFTConfig kwargs: ddp unless FSDP or DeepSpeed is configured.

    accelerate builds FSDP and DeepSpeed only on accelerators: ``AcceleratorState`` (accelerate 1.15,
    state.py:986-1016) turns ``DistributedType.FSDP`` on for MULTI_GPU and the like, never for MULTI_CPU (gloo),
    so on a CPU it runs DDP whatever is asked.
    """
    if not is_distributed():
        return "single"
    if device == "cpu":
        return "ddp"
    if args.get("deepspeed"):
        return "deepspeed"
    if args.get("fsdp"):
        return "fsdp"
    return "ddp"


def strategy_note(args: dict[str, Any], device: str) -> str | None:
    """A warning when the configured strategy cannot run here (FSDP/DeepSpeed on a CPU, or on one process)."""
    asked = "deepspeed" if args.get("deepspeed") else "fsdp" if args.get("fsdp") else None
    if asked and is_distributed() and device == "cpu":
        return (f"training_config.{asked} is set, but accelerate runs {asked} only on GPUs: these CPU ranks train "
                "with DDP (same losses, every rank holds the whole model).")
    if asked == "fsdp" and not is_distributed():
        return ("training_config.fsdp is set, but this is one process: it trains unsharded (FSDP2 shards across "
                "several: --nproc N, or torchrun).")
    return None


def layout(args: dict[str, Any], device: str) -> dict[str, Any]:
    """What run_config.yaml records about the parallel layout; the effective batch is per rank x ranks x accumulation."""
    per_rank = int(args.get("per_device_train_batch_size", 8))
    accumulation = int(args.get("gradient_accumulation_steps", 1))
    return {
        "world_size": world_size(),
        "strategy": strategy(args, device),
        "per_rank_batch": per_rank,
        "gradient_accumulation_steps": accumulation,
        "global_batch": per_rank * world_size() * accumulation,
    }


def trainer_kwargs(args: dict[str, Any], device: str) -> dict[str, Any]:
    """SFTConfig kwargs for this rank: on a CPU, ``use_cpu`` + gloo, else transformers resets accelerate's state
    to a non-distributed one (it only asks for a CPU backend when told the run is on the CPU)."""
    if args.get("fsdp") and strategy(args, device) != "fsdp":
        # What runs is DDP or one process (strategy_note says why): transformers would refuse FSDP on one
        # process, and accelerate ignores it on a CPU.
        args = {k: v for k, v in args.items() if k not in ("fsdp", "fsdp_config")}
    elif args.get("fsdp"):
        # transformers rewrites fsdp_config in place (prefixes stripped, defaults added): give it its own copy.
        args = {**args, "fsdp_config": dict(args.get("fsdp_config") or {})}
    if not is_distributed():
        return args
    # LoRA uses every adapter weight in each forward: DDP's search for unused ones is a wasted graph walk.
    args = {"ddp_find_unused_parameters": False, **args}
    if device != "cpu":
        return args
    return {**args, "use_cpu": True, "ddp_backend": args.get("ddp_backend") or "gloo"}


def world_size_change(previous: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What a resume on a different number of processes changes, or None (same number, or an older run).

    Args:
        previous: The resumed run's run_config.yaml as a dict.
        now: ``layout(...)`` of this run.
    """
    before = (previous.get("resolved") or {})
    old = int(before.get("world_size", 1))
    if old == now["world_size"]:
        return None
    old_batch = before.get("global_batch", "?")
    return (f"the run trained on {old} process(es) and resumes on {now['world_size']}: the data order changes "
            f"from here, and the global batch is {now['global_batch']} (was {old_batch}); the losses will not "
            "repeat a straight run's.")
