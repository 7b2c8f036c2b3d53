"""The training loop: AdamW, warmup + cosine, clipping, NaN-step skipping, EMA, exact resume.

Works for any model with ``loss(x0, step=..., generator=...)`` returning an object with a
scalar ``.loss`` (:class:`~trajflow.ntm.NTM`, :class:`~trajflow.flow_matching.FlowMatching`).
Every random draw of step ``i`` comes from seeds derived from ``(seed, i)``: the data batch and
a per-step ``torch.Generator`` passed to ``model.loss``. Together with checkpoints of the
optimizer and scheduler this makes resuming exact: ``k`` steps, save, load and continue to
``N`` gives bitwise the parameters of ``N`` steps in one go.

Launched under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on CUDA), or sharded with FSDP2 (``fsdp=True``:
every :class:`~trajflow.nn.TransformerLayer` and the rest at the root); every rank takes its
slice of the step's batch, and only rank 0 writes checkpoints, in the single-process format.
A rank's slice may be split into ``micro_batches`` whose gradients accumulate before the
update. Global micro-batch ``j`` (rank ``r``, micro-batch ``i``, ``j = r · micro_batches + i``)
draws its randomness from the stream ``"model/<j>"``, so ``W`` processes with ``M``
micro-batches train the same parameters (to float rounding) as one process with ``W · M``.

Example:
    >>> from trajflow.config import ModelConfig
    >>> model_config = ModelConfig(
    ...     predictor={"name": "mlp", "kwargs": {"features": 2, "hidden_features": [32]}},
    ...     transporter=[{"name": "affine_coupling",
    ...                   "kwargs": {"features": 2, "time_features": 8, "hidden_features": [16]}}],
    ... )
    >>> config = TrainConfig(iterations=5, batch_size=64, warmup_steps=2, ema_decay=0.9)
    >>> result = train(model_config=model_config, config=config, progress=False)
    >>> result.step, len(result.losses), result.skipped_steps, result.ema is not None
    (5, 5, 0, True)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from trajflow.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_training_state,
    save_checkpoint,
)
from trajflow.config import ModelConfig
from trajflow.data import DATASETS, sample_dataset
from trajflow.distributed import (
    FULL_PREFIX,
    LossModule,
    Processes,
    SavedState,
    broadcast_from_rank0,
    full_states,
    fully_shard_layers,
    gather_into,
    grad_norm,
    load_full_optimizer,
    optimizer_by_index,
    setup_processes,
    unprefixed,
)
from trajflow.progress import progress_bar

__all__ = [
    "DataFn",
    "TrainConfig",
    "TrainResult",
    "WarmupCosine",
    "ema_decay_at",
    "init_model",
    "step_seed",
    "train",
    "update_ema",
]

#: ``data_fn(step, batch_size)``: the batch of a step (deterministic in step): a tensor of
#: clean data, or a tuple of tensors with ``batch_size`` rows each (e.g. images and caption
#: tokens), passed to ``model.loss`` as positional arguments.
DataFn = Callable[[int, int], Tensor | tuple[Tensor, ...]]


class TrainConfig(BaseModel):
    """Hyper-parameters and bookkeeping of a training run.

    Attributes:
        iterations: Total optimisation steps (a resumed run continues up to this).
        batch_size: Global batch size (split across ranks under torchrun).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        betas: AdamW's moment decays.
        warmup_steps: Steps of linear warmup from ``lr / warmup_steps`` to ``lr``.
        min_lr_ratio: The cosine decays the rate to ``min_lr_ratio · lr``.
        grad_clip: Clip the global gradient norm to this (``None``: no clipping).
        ema_decay: Decay of the parameter EMA (``None``: no EMA).
        ema_warmup: Ramp the EMA decay up as ``min(ema_decay, (1 + n) / (10 + n))`` at step
            ``n``, so the EMA forgets the initial weights. Without it, a run shorter than a
            few times ``1 / (1 - ema_decay)`` steps keeps a visible share of them (after 2000
            steps at 0.999, 13.5 % of the EMA is the initialisation).
        checkpoint_every: Write a checkpoint every this many steps (``None``: only at the end);
            needs ``out_dir``.
        keep_last: Keep only the newest this many checkpoints of the run, deleting older ones
            after each successful save (``None``: keep all).
        out_dir: Folder of the ``step_00000100``-style checkpoints (``None``: none written).
        seed: Seeds the data and model randomness of every step.
        log_every: Steps between progress-bar and history updates.
        dataset: Registered toy dataset (``DATASETS``) of the default ``data_fn``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``… or ``"auto"`` (CUDA when available).
        precision: ``"float32"``, or ``"bf16"``: the loss runs under bfloat16 autocast (on
            CUDA, or CPU where supported); parameters, optimizer state, log-determinants and
            losses stay float32.
        compile: Run the loss through ``torch.compile``.
        micro_batches: Split each rank's share of the batch into this many micro-batches and
            accumulate their gradients (each loss scaled by ``1 / micro_batches``; under DDP
            only the last one all-reduces). Must divide the per-rank batch.
        fsdp: Under ``torchrun``, shard parameters, gradients and optimizer state with FSDP2
            instead of replicating them with DDP. Checkpoints are gathered to rank 0 in the
            single-process format. Without ``torchrun`` (one process) there is nothing to
            shard and it has no effect.

    Example:
        >>> TrainConfig(iterations=10).betas
        (0.9, 0.95)
    """

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(1000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    ema_warmup: bool = False
    checkpoint_every: int | None = Field(None, ge=1)
    keep_last: int | None = Field(None, ge=1)
    out_dir: str | None = None
    seed: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    dataset: str = "checkerboard"
    device: str = "cpu"
    precision: Literal["float32", "bf16"] = "float32"
    compile: bool = False
    micro_batches: int = Field(1, ge=1)
    fsdp: bool = False

    @model_validator(mode="after")
    def _ema_warmup_needs_an_ema(self) -> TrainConfig:
        if self.ema_warmup and self.ema_decay is None:
            raise ValueError("ema_warmup needs ema_decay (there is no EMA to warm up)")
        return self

    @model_validator(mode="after")
    def _micro_batches_divide_the_batch(self) -> TrainConfig:
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"micro_batches ({self.micro_batches}) must divide batch_size ({self.batch_size})"
            )
        return self

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        return betas

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS.names())}")
        return name

    @field_validator("device")
    @classmethod
    def _valid_device(cls, device: str) -> str:
        if device != "auto":
            try:
                torch.device(device)
            except RuntimeError as error:
                raise ValueError(f"expected 'auto' or a torch device string: {error}") from None
        return device


class WarmupCosine:
    """Learning-rate multiplier: linear warmup, then a cosine down to ``min_lr_ratio``.

    ``(i + 1) / warmup_steps`` for steps ``i < warmup_steps``, then
    ``r + (1 - r) · ½(1 + cos(π p))`` with ``p = (i - warmup) / (iterations - warmup)``
    (clamped to 1). A class rather than a lambda, so schedulers holding it can be pickled
    and its settings appear in the scheduler's ``state_dict``.

    Example:
        >>> schedule = WarmupCosine(iterations=10, warmup_steps=2, min_lr_ratio=0.0)
        >>> [round(schedule(i), 3) for i in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """

    def __init__(self, iterations: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        self.iterations = iterations
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.iterations - self.warmup_steps, 1), 1)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine


def step_seed(seed: int, step: int, stream: str = "data") -> int:
    """A 63-bit seed derived from ``(seed, stream, step)``, the same in every process.

    Streams keep the data and the model's noise independent (``"data"``, ``"model/<rank>"``).

    Example:
        >>> step_seed(0, 5) == step_seed(0, 5), step_seed(0, 5) == step_seed(0, 6)
        (True, False)
    """
    digest = hashlib.blake2b(f"{seed}/{stream}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_model(model_config: ModelConfig, seed: int) -> nn.Module:
    """Builds ``model_config``'s model with initial weights drawn from a seed derived from ``seed``.

    The global RNG is left as it was. Without this, two runs of the same config would start
    from different weights (torch seeds its global RNG anew in every process).

    Example:
        >>> from trajflow.config import toy_flow_matching_config
        >>> a, b = (init_model(toy_flow_matching_config(), seed=3) for _ in range(2))
        >>> all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
        True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(seed, 0, "init"))
        return model_config.build()


def ema_decay_at(config: TrainConfig, step: int) -> float:
    """The EMA decay applied after step ``step`` (0-based): ``ema_decay``, ramped if ``ema_warmup``.

    Example:
        >>> config = TrainConfig(ema_decay=0.999, ema_warmup=True)
        >>> ema_decay_at(config, 0), ema_decay_at(config, 90), ema_decay_at(config, 10**5)
        (0.1, 0.91, 0.999)
    """
    if config.ema_decay is None:
        raise ValueError("ema_decay_at needs a TrainConfig with ema_decay set")
    if not config.ema_warmup:
        return config.ema_decay
    return min(config.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay · ema + (1 - decay) · model`` for parameters; buffers are copied.

    Example:
        >>> ema, model = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        >>> _ = ema.weight.data.fill_(0.0), model.weight.data.fill_(1.0)
        >>> update_ema(ema, model, decay=0.9)
        >>> round(ema.weight.item(), 6)
        0.1
    """
    for average, parameter in zip(ema.parameters(), model.parameters(), strict=True):
        average.lerp_(parameter.detach(), 1 - decay)
    for average, buffer in zip(ema.buffers(), model.buffers(), strict=True):
        average.copy_(buffer)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: The trained model (unwrapped from DDP).
        ema: The EMA copy of the model, or ``None``.
        step: Steps completed (``config.iterations``).
        losses: Loss of every step run by this call (NaN/inf ones included as they came).
        skipped_steps: Steps skipped for a non-finite loss or gradient norm, over the whole
            run (a resumed run includes those before the checkpoint).
        skipped_at: Their step indices.
        final_loss: Mean of the finite losses of the last ``log_every`` steps.
        wall_time: Seconds spent in this call's training loop.
        checkpoints: Checkpoint folders written by this call.
        history: Every ``log_every`` steps: step, mean loss, learning rate and gradient norm.
    """

    model: nn.Module
    ema: nn.Module | None
    step: int
    losses: list[float]
    skipped_steps: int
    skipped_at: list[int]
    final_loss: float
    wall_time: float
    checkpoints: list[Path]
    history: list[dict[str, float]]


def _default_data(config: TrainConfig) -> DataFn:
    def data_fn(step: int, batch_size: int) -> Tensor:
        return sample_dataset(config.dataset, batch_size, seed=step_seed(config.seed, step))

    return data_fn


def _local_batch(
    batch: Tensor | tuple[Tensor, ...],
    step: int,
    batch_size: int,
    processes: Processes,
    local: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, ...]:
    """Checks a step's batch, takes this rank's rows and moves them to the model."""
    parts = (batch,) if isinstance(batch, Tensor) else batch
    if (
        not isinstance(parts, tuple | list)
        or not parts
        or not all(isinstance(part, Tensor) and part.shape[:1] == (batch_size,) for part in parts)
    ):
        found = (
            [getattr(part, "shape", type(part).__name__) for part in parts]
            if isinstance(parts, tuple | list)
            else type(batch).__name__
        )
        raise TypeError(
            f"expected data_fn({step}, {batch_size}) to return a tensor or a tuple of tensors "
            f"with {batch_size} rows each, got {found}"
        )
    rows = slice(processes.rank * local, (processes.rank + 1) * local)
    return tuple(
        part[rows].to(device=device, dtype=dtype if part.is_floating_point() else None)
        for part in parts
    )


# ------------------------------------------------------------------------------- the loop
def train(
    model: nn.Module | None = None,
    config: TrainConfig | dict[str, Any] | None = None,
    data_fn: DataFn | None = None,
    model_config: BaseModel | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
) -> TrainResult:
    """Trains ``model`` for ``config.iterations`` steps (or up to them, when resuming).

    Each step: the batch ``data_fn(i, batch_size)``, ``model.loss(x0, step=i, generator=g_i)``
    with ``g_i`` seeded from ``(seed, i)``, backward, gradient clipping, and an AdamW update
    unless the loss or the gradient norm is NaN/inf — such steps are counted and never
    applied (the learning-rate schedule still advances, so it depends on the step index
    only). The EMA copy, if any, is updated after every applied step. With
    ``micro_batches > 1`` each rank's rows are split into micro-batches, each with its own
    generator, whose gradients accumulate into the step's.

    Args:
        model: The model; ``None`` builds it from ``model_config`` with initial weights
            seeded from ``config.seed`` (see :func:`init_model`), or from the checkpoint's
            config when resuming.
        config: A :class:`TrainConfig` (or a dict of its fields); default ``TrainConfig()``.
        data_fn: ``(step, batch_size) -> Tensor`` of clean data; must be deterministic in
            ``step`` for exact resume. Default: ``config.dataset`` drawn with a seed derived
            from ``(seed, step)``.
        model_config: Saved in checkpoints so :func:`~trajflow.checkpoint.load_checkpoint` can
            rebuild the model; builds the model if ``model`` is ``None``.
        resume: A checkpoint folder, or a run folder whose newest ``step_*`` checkpoint to
            continue from. Weights, optimizer, scheduler, EMA and RNG states are restored;
            optimizer hyper-parameters come from the checkpoint, the schedule from ``config``.
        progress: Show progress (rank 0 only): a tqdm bar on a terminal, else a plain line
            every 10% of the run (see :func:`~trajflow.progress.progress_bar`).

    Returns:
        A :class:`TrainResult`. Its losses are averaged over the ranks. Under FSDP its model
        and EMA are plain (unsharded) modules on the CPU holding the gathered weights.

    Raises:
        ValueError: If there is no model to train, ``resume`` holds no checkpoint, or the batch
            does not split evenly across ranks and micro-batches.
        TypeError: If the model has no ``loss`` method or ``data_fn`` returns no tensor.
    """
    if config is None:
        config = TrainConfig()
    elif not isinstance(config, TrainConfig):
        config = TrainConfig.model_validate(config)
    processes, device = setup_processes(config.device)
    result = _train(model, config, data_fn, model_config, resume, progress, processes, device)
    if processes.distributed:
        # No rank returns before rank 0's last checkpoint is written. (Not after an error:
        # the failing rank exits, so that torchrun stops the others.)
        dist.barrier()
    return result


def _train(model, config, data_fn, model_config, resume, progress, processes, device):
    state = None
    if resume is not None:
        checkpoint = latest_checkpoint(resume)
        if checkpoint is None:
            raise ValueError(f"no checkpoint to resume from in {resume}")
        if model is None and model_config is not None:
            model = model_config.build()  # strict loading then checks it matches the checkpoint
        model, state = load_checkpoint(checkpoint, model=model)
        model_config = model_config or state.model_config
    elif model is None:
        if model_config is None:
            raise ValueError("train needs a model, a model_config or a checkpoint to resume")
        model = init_model(model_config, config.seed)
    if not callable(getattr(model, "loss", None)):
        raise TypeError(f"expected a model with a loss(x0, step=, generator=) method, got {model}")
    if config.batch_size % processes.world:
        raise ValueError(
            f"batch_size {config.batch_size} must be divisible by the {processes.world} processes"
        )
    local = config.batch_size // processes.world
    if local % config.micro_batches:
        raise ValueError(
            f"micro_batches ({config.micro_batches}) must divide the {local} rows of each of "
            f"the {processes.world} processes (batch_size {config.batch_size})"
        )
    fsdp = config.fsdp and processes.distributed
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    mesh = None
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (processes.world,))
        # `model` stays a plain module on the CPU (it receives the gathered weights at the
        # end); a copy of it is sharded and trained. The copy moves to the device before
        # sharding so that what FSDP does not manage follows it (an NTM's frozen teacher is
        # not a submodule: it is replicated, not sharded).
        broadcast_from_rank0(model, device)
        trained = copy.deepcopy(model).to(device)
    else:
        model = trained = model.to(device)
    data_fn = data_fn or _default_data(config)
    ema = ema_trained = None
    if config.ema_decay is not None:
        ema = copy.deepcopy(model).requires_grad_(False).eval()
    if state is not None:
        if ema is not None and state.ema is None:
            warnings.warn(
                "the checkpoint has no EMA: it starts from the loaded weights", stacklevel=2
            )
        if ema is not None and state.ema is not None:
            ema.load_state_dict(state.ema, strict=True)

    loss_module: nn.Module = LossModule(trained)
    ema_root = None
    if fsdp:
        fully_shard_layers(loss_module, mesh)
        if ema is not None:  # an EMA of the shards, sharded like the model
            ema_root = LossModule(copy.deepcopy(ema).to(device))
            fully_shard_layers(ema_root, mesh)
            ema_trained = ema_root.model
    else:
        ema_trained = ema
    parameters = [p for p in trained.parameters() if p.requires_grad]
    names = [FULL_PREFIX + n for n, p in trained.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    schedule = WarmupCosine(config.iterations, config.warmup_steps, config.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    start, skipped_at = 0, []
    if state is not None:
        if fsdp:
            if state.optimizer is None:
                raise ValueError("the checkpoint holds no optimizer state to restore")
            load_full_optimizer(loss_module, optimizer, state.optimizer, names)
        restore_training_state(state, None if fsdp else optimizer, scheduler, None, rng=True)
        # The loaded scheduler carries the saved schedule's settings; follow this config's,
        # which for the same config gives bitwise the same rates.
        scheduler.lr_lambdas = [schedule]
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * schedule(scheduler.last_epoch)
        start = state.step
        skipped_at = list(state.extra.get("skipped_at", []))

    ddp = None
    if processes.distributed and not fsdp:
        loss_module = ddp = nn.parallel.DistributedDataParallel(
            loss_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            # FlowMatching never uses its predictor's (t_out, T) path.
            find_unused_parameters=True,
        )
        if ema is not None and (state is None or state.ema is None):
            # DDP broadcast rank 0's weights into the model: average from those.
            ema.load_state_dict(model.state_dict())
    if config.compile:
        loss_module = torch.compile(loss_module)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if config.precision == "bf16"
        else contextlib.nullcontext()
    )
    micro = config.micro_batches
    rows = local // micro
    saves = config.out_dir is not None and (fsdp or processes.rank == 0)

    losses: list[float] = []
    history: list[dict[str, float]] = []
    checkpoints: list[Path] = []
    window: list[float] = []
    # A bar on a terminal, a line every 10% in a log (no carriage-return redraws).
    bar = progress_bar(
        config.iterations,
        desc=f"train {type(model).__name__}",
        initial=start,
        enabled=progress and processes.rank == 0,
    )
    began = time.perf_counter()
    trained.train()
    for step in range(start, config.iterations):
        batch = _local_batch(
            data_fn(step, config.batch_size),
            step,
            config.batch_size,
            processes,
            local,
            device,
            dtype,
        )
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        for index in range(micro):
            part = tuple(tensor[index * rows : (index + 1) * rows] for tensor in batch)
            # Global micro-batch j = rank · micro + index: its stream does not depend on how
            # the global batch is split between processes and micro-batches.
            generator = torch.Generator().manual_seed(
                step_seed(config.seed, step, f"model/{processes.rank * micro + index}")
            )
            # Under DDP only the last micro-batch all-reduces the accumulated gradients.
            last = index == micro - 1
            with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                with autocast:
                    part_loss = loss_module(*part, step=step, generator=generator).float()
                # Backward even when the loss is not finite: under DDP every rank must join the
                # gradient all-reduce; the update is skipped below.
                (part_loss / micro).backward()
            loss = loss + part_loss.detach() / micro
        norm = grad_norm(parameters, config.grad_clip).detach().float().to(loss.device)
        stats = torch.stack([loss, (~torch.isfinite(torch.stack([loss, norm]))).any().float()])
        if processes.distributed:  # the mean loss; a NaN on one rank skips the step everywhere
            dist.all_reduce(stats)
            stats = stats / torch.tensor([processes.world, 1.0], device=stats.device)
        loss_value, bad_value, norm_value = torch.cat([stats, norm[None]]).tolist()  # one sync
        if bad_value == 0:
            optimizer.step()
            if ema is not None:
                update_ema(ema_trained, trained, ema_decay_at(config, step))
            window.append(loss_value)
        else:
            skipped_at.append(step)
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():
            # After a skipped first step torch warns that the optimizer has not stepped yet;
            # advancing the schedule anyway is intended (it depends on the step index only).
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
            scheduler.step()
        losses.append(loss_value)
        done = step + 1
        bar.update(1)
        if done % config.log_every == 0 or done == config.iterations:
            mean = sum(window) / len(window) if window else math.nan
            history.append({"step": done, "loss": mean, "lr": lr, "grad_norm": norm_value})
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", skipped=len(skipped_at))
            window = []
        if saves and (
            done == config.iterations
            or (config.checkpoint_every is not None and done % config.checkpoint_every == 0)
        ):
            saved_optimizer: Any = optimizer
            if fsdp:  # every rank gathers, rank 0 writes the single-process format
                model_state, optimizer_state, ema_state = full_states(
                    loss_module, optimizer, ema_root
                )
                if processes.rank == 0:
                    model.load_state_dict(unprefixed(model_state))
                    if ema is not None:
                        ema.load_state_dict(unprefixed(ema_state))
                    saved_optimizer = SavedState(optimizer_by_index(optimizer_state, names))
            if processes.rank == 0:
                checkpoints.append(
                    save_checkpoint(
                        Path(config.out_dir) / checkpoint_name(done),
                        model,
                        model_config,
                        train_config=config,
                        optimizer=saved_optimizer,
                        scheduler=scheduler,
                        ema=ema,
                        step=done,
                        extra={"skipped_at": skipped_at},
                    )
                )
                # Only after the new checkpoint is safely in place.
                prune_checkpoints(config.out_dir, config.keep_last, done)
    bar.close()
    wall_time = time.perf_counter() - began
    if fsdp:  # the trained weights into the plain modules, on every rank
        gather_into(model, trained)
        model.cpu()  # with what it shares with the trained copy (a teacher)
        if ema is not None:
            gather_into(ema, ema_trained)
            ema.cpu()
    tail = [v for v in losses[-config.log_every :] if math.isfinite(v)]
    return TrainResult(
        model=model,
        ema=ema,
        step=max(start, config.iterations),
        losses=losses,
        skipped_steps=len(skipped_at),
        skipped_at=skipped_at,
        final_loss=sum(tail) / len(tail) if tail else math.nan,
        wall_time=wall_time,
        checkpoints=checkpoints,
        history=history,
    )
