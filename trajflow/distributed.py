"""Processes and sharding for the training loop: torchrun set-up, DDP's loss module, FSDP2.

:func:`~trajflow.train.train` calls these; they are public so that tests and custom loops can
shard a model exactly as the loop does. Under ``torchrun`` (``WORLD_SIZE > 1``)
:func:`setup_processes` joins the process group (gloo on CPU, nccl on CUDA) once per process;
:func:`fully_shard_layers` makes every :class:`~trajflow.nn.TransformerLayer` its own FSDP2
unit; :func:`full_states` and :func:`load_full_optimizer` translate between FSDP's sharded
states and the single-process checkpoint format.

Example:
    >>> processes, device = setup_processes("cpu")  # no WORLD_SIZE: a single process
    >>> processes.distributed, processes.rank, device
    (False, 0, device(type='cpu'))
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: nothing is ever sharded

    class DTensor:  # type: ignore[no-redef]
        """Stands in for torch's DTensor, of which no instance can then exist."""


from trajflow.nn import TransformerLayer

__all__ = [
    "FULL_PREFIX",
    "LossModule",
    "Processes",
    "SavedState",
    "broadcast_from_rank0",
    "full_states",
    "fully_shard_layers",
    "gather_into",
    "grad_norm",
    "load_full_optimizer",
    "optimizer_by_index",
    "optimizer_by_name",
    "setup_processes",
    "unprefixed",
]


class LossModule(nn.Module):
    """Calls ``model.loss`` from ``forward``, so DDP's gradient hooks see the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *batch: Tensor, step: int, generator: torch.Generator) -> Tensor:
        loss = self.model.loss(*batch, step=step, generator=generator).loss
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError(
                f"expected model.loss(...).loss to be a scalar tensor, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
            )
        return loss


@dataclasses.dataclass
class Processes:
    """Where this process stands under ``torchrun``: its rank, the world size, its local rank.

    Example:
        >>> Processes(rank=1, world=2).distributed
        True
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_processes(device: str) -> tuple[Processes, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world <= 1:
        return Processes(), torch.device(device)
    processes = Processes(
        rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", 0))
    )
    target = torch.device(device)
    if target.type == "cuda":
        target = torch.device("cuda", processes.local_rank)
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
        # Kept up for later calls in this process (the t2i recipe trains twice) and torn down
        # at exit: an init_process_group after a destroy_process_group can deadlock in
        # torchrun's store, one rank joining the new group while another waits forever.
        atexit.register(_destroy_process_group)
    return processes, target


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def grad_norm(parameters: list[nn.Parameter], clip: float | None) -> Tensor:
    if clip is not None:
        norm = nn.utils.clip_grad_norm_(parameters, clip)
    else:
        grads = [p.grad for p in parameters if p.grad is not None]
        if any(isinstance(grad, DTensor) for grad in grads):
            # Sharded gradients: torch's clipping knows how to reduce their norm over the
            # processes; an infinite bound leaves the gradients as they are (scaled by 1).
            norm = nn.utils.clip_grad_norm_(parameters, math.inf)
        else:
            norms = [torch.linalg.vector_norm(grad) for grad in grads]
            norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    # Under FSDP the norm of the sharded gradients is a replicated DTensor.
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ------------------------------------------------------------------------------- FSDP2
FULL_PREFIX = "model."  # FSDP's names of the model's tensors: LossModule holds it as ``model``


def fully_shard_layers(root: nn.Module, mesh: Any) -> None:
    """FSDP2: every TransformerLayer is its own unit (gathered only while it runs); the rest
    of the parameters are sharded at ``root``, whose forward gathers them."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import fully_shard
    for module in list(root.modules()):
        if isinstance(module, TransformerLayer):
            fully_shard(module, mesh=mesh)
    fully_shard(root, mesh=mesh)


@torch.no_grad()
def broadcast_from_rank0(module: nn.Module, device: torch.device) -> None:
    """Rank 0's weights on every rank, one tensor at a time (DDP does this when wrapping;
    FSDP2 would shard each rank's own, possibly different, initial weights)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        staged = tensor.detach().to(device)  # nccl only broadcasts CUDA tensors
        dist.broadcast(staged.view(torch.uint8) if staged.dtype == torch.bool else staged, src=0)
        tensor.copy_(staged)


@torch.no_grad()
def gather_into(target: nn.Module, sharded: nn.Module) -> None:
    """Copies a sharded module's full tensors into its plain twin on every rank.

    One tensor at a time, so no device ever holds more than one full parameter at once.
    """
    full = target.state_dict()
    for name, value in sharded.state_dict().items():
        full[name].copy_(value.full_tensor() if isinstance(value, DTensor) else value)


def unprefixed(state: dict[str, Any]) -> dict[str, Any]:
    return {name.removeprefix(FULL_PREFIX): value for name, value in state.items()}


def optimizer_by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A full FSDP optimizer state (keyed by parameter name) keyed by parameter index, as
    ``optimizer.state_dict()`` is in a single process: the checkpoint format is the same."""
    index = {name: position for position, name in enumerate(names)}
    return {
        "state": {index[name]: values for name, values in state["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def optimizer_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_by_index`."""
    return {
        "state": {names[position]: values for position, values in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[position] for position in group["params"]]}
            for group in state["param_groups"]
        ],
    }


class SavedState:
    """Hands :func:`save_checkpoint` a state dict gathered elsewhere (by FSDP) where it
    expects an optimizer."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


def full_states(
    root: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_root: nn.Module | None,
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Tensor] | None]:
    """Full model, optimizer and EMA states gathered on rank 0's CPU (empty on other ranks).

    A collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(root, options=options)
    optimizer_state = get_optimizer_state_dict(root, optimizer, options=options)
    ema_state = None if ema_root is None else get_model_state_dict(ema_root, options=options)
    return model_state, optimizer_state, ema_state


def load_full_optimizer(
    root: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], names: list[str]
) -> None:
    """Shards a single-process optimizer state (every rank read the checkpoint) into FSDP's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        root,
        optimizer,
        optimizer_by_name(state, names),
        # Parameters that never had a gradient (FlowMatching never uses its predictor's
        # (t_out, T) path) have no state, as in a single process's optimizer.
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
