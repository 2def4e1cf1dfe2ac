"""FSDP2: phi3tune's checkpoints and adapter from a model whose weights are sharded across the ranks.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, applied by accelerate when ``training_config.fsdp`` is set and
the ranks are GPUs) each parameter is a DTensor of which every rank holds 1/N. transformers' own FSDP save path
writes ``torch.save`` pickles (``pytorch_model_fsdp.bin``, ``optimizer.bin``), or nothing but a DCP folder for
the model with ``SHARDED_STATE_DICT``, and ``--resume`` refuses pickles. Here instead the trainable weights
(the LoRA adapter: megabytes, not the sharded base) and their optimizer state are gathered in full, and rank 0
writes them in the same files as a one-process or DDP run: ``adapter_model.safetensors`` and the optimizer state
keyed by parameter index (``safe_state``). A checkpoint is therefore the same whatever the strategy, and resumes
under any of them. Loading gives every rank the full tensors and lets torch keep each rank's shard.

Every function that gathers or scatters is a collective: all ranks call it, in the same order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from phi3tune.errors import UsageError

ADAPTER_FILE = "adapter_model.safetensors"
# Full tensors, on rank 0's CPU only (the other ranks get {}): the gathered state never sits on a GPU whole.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
# Every rank passes the full tensors it read; torch keeps the local shard of each.
_SCATTER = StateDictOptions(full_state_dict=True, strict=False)


def is_fsdp2(trainer: Any) -> bool:
    """Whether accelerate prepared ``trainer``'s model with FSDP2 (only on GPUs; see ``distributed.strategy``)."""
    return bool(getattr(trainer, "is_fsdp_enabled", False) and getattr(trainer.accelerator, "is_fsdp2", False))


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (a DTensor's shard; a plain tensor is all of itself)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights gathered in full, keyed by the model's own names. Collective; {} on ranks > 0.

    Feed it to ``PeftModel.save_pretrained(..., state_dict=...)`` on rank 0: peft keeps the adapter's keys.
    """
    return get_model_state_dict(model, options=_GATHER)


def adapter_key_map(model: torch.nn.Module) -> dict[str, str]:
    """``{key in adapter_model.safetensors: the model's parameter name}`` for the trainable weights.

    Asked of peft itself (``get_peft_model_state_dict`` on a state dict of index markers), so LoRA, DoRA and
    ``modules_to_save`` are named exactly as peft's save names them.
    """
    from peft import get_peft_model_state_dict

    names = [name for name, param in model.named_parameters() if param.requires_grad]
    markers = {name: torch.tensor([i]) for i, name in enumerate(names)}
    saved = get_peft_model_state_dict(model, state_dict=markers, adapter_name=model.active_adapter,
                                      save_embedding_layers=False)
    return {key: names[int(marker)] for key, marker in saved.items()}


def load_adapter_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Put ``checkpoint``'s adapter into the sharded model (every rank reads the file). Collective.

    Raises:
        UsageError: The checkpoint holds no safetensors adapter, or not this model's adapter weights.
    """
    path = Path(checkpoint) / ADAPTER_FILE
    if not path.is_file():
        raise UsageError(f"--resume: {checkpoint} holds no {ADAPTER_FILE}, which FSDP2 resumes from.",
                         hint="resume from a checkpoint phi3tune wrote, or start the run over.")
    saved = load_file(str(path))
    names = adapter_key_map(model)
    missing = sorted(set(names) - set(saved))
    if missing:
        raise UsageError(f"--resume: {path} lacks {len(missing)} of this model's adapter weights (e.g. {missing[0]}).",
                         hint="resume with the peft_config the checkpoint was trained with, or start over.")
    # Keys the model does not train (a base embedding peft saved beside the adapter) stay as loaded.
    set_model_state_dict(model, {names[key]: saved[key] for key in names}, options=_SCATTER)


def _parameter_order(model: torch.nn.Module, optimizer: Any) -> list[str]:
    """The model's name of each optimizer parameter, in ``optimizer.state_dict()``'s index order."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def optimizer_state_dict(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer state gathered in full, in ``torch.optim.Optimizer.state_dict()``'s own layout (parameters
    by index, as a one-process run saves it). Collective; {} on ranks > 0."""
    order = _parameter_order(model, optimizer)
    full = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if not full:
        return {}
    index = {name: i for i, name in enumerate(order)}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in full["param_groups"]]
    return {"state": {index[name]: value for name, value in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Restore ``optimizer_state_dict``'s layout (or a one-process/DDP checkpoint's) into the sharded optimizer.
    Collective; every rank passes the state it read."""
    order = _parameter_order(model, optimizer)
    by_name = {
        "state": {order[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [order[int(i)] for i in group["params"]]}
                         for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_SCATTER)
