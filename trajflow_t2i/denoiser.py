"""The learned denoiser of a text-to-image NTM: ``g_φ(u_{t_0}, y) → x̂_0`` (method notes §7).

An NTM sample stops at ``u_{t_0}``, slightly noisy. The *score* path
(:func:`trajflow.denoise.sample_denoised`) inverts the transporter at every level and takes a
trajectory-Tweedie step with a backward pass. A :class:`~trajflow.denoise.LearnedDenoiser`
reads ``u_{t_0}`` and the prompt's text-encoder tokens (as a prefix) and returns ``x̂_0``
directly: no transporter inverse, no backward pass.

It is trained *after* the main model, which stays frozen (text encoder included):

1. :func:`denoiser_pairs` draws real captioned images of the model's training split,
   dequantises them, draws their forward trajectories on the model's grid from ``t_0`` and
   computes, with the frozen NTM, ``u_{t_0}`` (the input) and the trajectory-score-denoised
   ``x̂_0`` (the target), plus the prompt's tokens. These targets are the expensive part, so
   they are computed once, as a pool of :attr:`DenoiserTrainConfig.pairs` pairs.
2. :func:`train_denoiser` fits the denoiser to the pool by MSE and reports its error on
   held-out pairs next to the error of the identity ``x̂_0 = u_{t_0}`` (the untrained
   denoiser's output).

The checkpoint (:func:`save_t2i_denoiser`) is a trajflow checkpoint folder (``config.json``
with checksums + ``weights.safetensors``, no pickle) readable by
:func:`trajflow.denoise.load_denoiser`; it also records the training settings, the held-out
metrics and a fingerprint of the model it was trained against, which
:func:`load_t2i_denoiser` checks. An exported model folder may hold it as ``denoiser/``
(:data:`DENOISER_DIR`): :meth:`~trajflow_t2i.pipeline.Pipeline.from_pretrained` loads it
from there.

Example:
    >>> import tempfile, torch
    >>> from trajflow_t2i.model import TextToImage
    >>> from trajflow_t2i.presets import preset
    >>> model = TextToImage(preset("tiny"), stage="ntm")
    >>> config = DenoiserTrainConfig(steps=2, pairs=8, batch_size=4, holdout=4)
    >>> result = train_denoiser(model, config, progress=False)
    >>> sorted(result.metrics)
    ['holdout_identity_mse', 'holdout_mse', 'train_mse']
    >>> images = model.generate(["a red circle"], steps=2, denoiser="learned",
    ...                         learned_denoiser=result.denoiser)
    >>> images.shape
    torch.Size([1, 3, 16, 16])
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _ = save_t2i_denoiser(folder, result.denoiser, model, config, result.metrics)
    ...     again = load_t2i_denoiser(folder, model)
    >>> type(again).__name__
    'LearnedDenoiser'
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from trajflow.checkpoint import read_checkpoint_config, save_checkpoint
from trajflow.denoise import DENOISERS, LearnedDenoiser, denoiser_loss, denoiser_targets
from trajflow.denoise import load_denoiser as _load_denoiser
from trajflow.progress import progress_bar
from trajflow.train import WarmupCosine, step_seed
from trajflow_t2i.data import dequantize
from trajflow_t2i.model import TextToImage
from trajflow_t2i.training import caption_batches

__all__ = [
    "DENOISER_DIR",
    "DenoiserPairs",
    "DenoiserResult",
    "DenoiserTrainConfig",
    "build_denoiser",
    "check_denoiser",
    "denoiser_pairs",
    "load_t2i_denoiser",
    "model_fingerprint",
    "save_t2i_denoiser",
    "train_denoiser",
    "training_rows",
]

#: Name of the denoiser's folder inside an exported model folder.
DENOISER_DIR = "denoiser"


class DenoiserTrainConfig(BaseModel):
    """How to build and train the learned denoiser of a frozen text-to-image NTM.

    Attributes:
        steps: Optimisation steps. batch_size: Pairs per step (and per target batch).
        pairs: Training pairs computed once with the frozen model (each costs one
            trajectory-score pass: the expensive part); steps draw minibatches from them.
        holdout: Further pairs kept out of training to report the held-out error (other
            draws of images, dequantisation and trajectory noise from the same split).
        lr: Peak learning rate (AdamW, linear warmup then cosine to 0).
        warmup_steps: Linear warmup. weight_decay: AdamW decay. grad_clip: Norm clip.
        seed: Seeds the images drawn, their noise, the initial weights and the minibatches.
        t0: Level where sampling ends and the denoiser reads (``None``: the schedule's
            ``t_min_eval``, the default of sampling).
        sampling_steps: Values of ``T`` the targets are computed with, one drawn per target
            batch (``None``: the model's ``schedule.steps``, those it was trained with).
        dim: Width (``None``: the model's ``transporter_dim``). layers: Depth.
        heads: Attention heads (``None``: the model's).
    """

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    pairs: int = Field(4096, ge=1)
    holdout: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    t0: float | None = Field(None, gt=0, lt=1)
    sampling_steps: list[int] | None = Field(None, min_length=1)
    dim: int | None = Field(None, ge=8)
    layers: int = Field(2, ge=1)
    heads: int | None = Field(None, ge=1)


@dataclass
class DenoiserPairs:
    """Training pairs: ``u_{t_0}`` and its score-denoised ``x̂_0`` ``(N, L, C)``, with the
    prompt's text-encoder tokens ``y`` ``(N, M, F)`` and mask ``(N, M)``."""

    u_t0: Tensor
    target: Tensor
    y: Tensor
    y_mask: Tensor

    def __len__(self) -> int:
        return self.u_t0.shape[0]

    def rows(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The pairs at ``index``: ``(u_t0, target, y, y_mask)``."""
        return self.u_t0[index], self.target[index], self.y[index], self.y_mask[index]


@dataclass
class DenoiserResult:
    """A trained denoiser (eval mode) and its errors: ``train_mse`` (last steps), ``holdout_mse``
    and ``holdout_identity_mse`` (``x̂_0 = u_{t_0}``, the untrained output), per coordinate."""

    denoiser: LearnedDenoiser
    metrics: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------ building
def _require_ntm(owner: str, model: object) -> TextToImage:
    if not isinstance(model, TextToImage):
        raise TypeError(f"{owner} expected a TextToImage model, got {type(model).__name__}")
    if model.stage != "ntm":
        raise ValueError(
            f"{owner} needs the NTM stage (its trajectory score gives the targets), "
            f"got a model of stage {model.stage!r}"
        )
    return model


def build_denoiser(
    model: TextToImage, dim: int | None = None, layers: int = 2, heads: int | None = None
) -> LearnedDenoiser:
    """A fresh :class:`~trajflow.denoise.LearnedDenoiser` fitting ``model``.

    It reads the model's tokens ``(L, C)`` and the text encoder's tokens (width ``F``) as a
    prefix. Light by default: the transporter's width and two layers, far cheaper than one
    predictor step.
    """
    _require_ntm("build_denoiser", model)
    settings, data = model.config.model, model.config.data
    like = next(model.parameters())
    return DENOISERS.build(
        "transformer",
        features=settings.token_features(data),
        tokens=settings.tokens(data),
        dim=settings.transporter_dim if dim is None else dim,
        layers=layers,
        heads=settings.heads if heads is None else heads,
        cond_features=model.text_encoder.features,
    ).to(device=like.device, dtype=like.dtype)


def check_denoiser(model: TextToImage, denoiser: object) -> nn.Module:
    """``denoiser`` if it fits ``model`` (token shape, prompt width), else a clear error.

    Raises:
        TypeError: If ``denoiser`` is not a module.
        ValueError: If it reads other tokens than the model's or another prompt width.
    """
    if not isinstance(denoiser, nn.Module):
        raise TypeError(
            f"expected a learned denoiser module (see trajflow.denoise.DENOISERS), "
            f"got {type(denoiser).__name__}"
        )
    settings, data = model.config.model, model.config.data
    expected = (settings.tokens(data), settings.token_features(data))
    shape = tuple(getattr(denoiser, "event_shape", ()))
    if shape != expected:
        raise ValueError(
            f"the learned denoiser reads tokens of shape {shape}, the model's are {expected}"
        )
    width = getattr(denoiser, "cond_features", None)
    if width != model.text_encoder.features:
        raise ValueError(
            f"the learned denoiser reads prompt tokens of width {width}, the model's text "
            f"encoder gives {model.text_encoder.features}"
        )
    return denoiser


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, dtypes, shapes and bytes): which model a denoiser
    was trained against. Equal for the same weights on any device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------ targets
def training_rows(
    model: TextToImage, seed: int = 0
) -> Callable[[int, int], tuple[Tensor, Tensor, Tensor]]:
    """``(key, size) → (images, ids, mask)``: rows of the model's training split (integer
    images, tokenised captions) drawn with a generator seeded from ``(seed, key)``; the split
    is built once (:func:`~trajflow_t2i.training.caption_batches`)."""
    config = model.config.model_copy(deep=True)
    config.train.seed = seed
    return caption_batches(config, model)


def denoiser_pairs(
    model: TextToImage,
    n: int,
    batch_size: int = 64,
    seed: int = 0,
    t0: float | None = None,
    sampling_steps: list[int] | None = None,
    stream: str = "train",
    progress: bool = False,
    data_fn: Callable[[int, int], tuple[Tensor, Tensor, Tensor]] | None = None,
) -> DenoiserPairs:
    """``n`` training pairs from real captioned images and the frozen model's score.

    Batch ``b`` draws images and captions from the model's training split (as
    :func:`~trajflow_t2i.training.caption_batches` does, with ``seed`` in place of the
    training seed), dequantises them, encodes the captions with the frozen text encoder and
    calls :func:`trajflow.denoise.denoiser_targets` on the tokens, with ``T`` drawn from
    ``sampling_steps``. Every draw is seeded from ``(seed, stream, b)``: other ``stream``
    names give disjoint noise (e.g. held-out pairs). ``data_fn`` (``(key, size) → (images,
    ids, mask)``) replaces the training split, e.g. to build it only once for several calls.
    """
    owner = "denoiser_pairs"
    model = _require_ntm(owner, model)
    if n < 1 or batch_size < 1:
        raise ValueError(f"{owner} expected n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    steps_set = list(sampling_steps or model.config.schedule.steps)
    if any(not isinstance(s, int) or s < 1 for s in steps_set):
        raise ValueError(f"{owner} expected sampling_steps of positive integers, got {steps_set}")
    data_fn = data_fn or training_rows(model, seed)
    like = next(model.parameters())
    parts: list[tuple[Tensor, ...]] = []
    batches = -(-n // batch_size)
    with progress_bar(batches, "denoiser targets", enabled=progress) as bar:
        for b in range(batches):
            size = min(batch_size, n - b * batch_size)
            # The key seeds the rows drawn: one stream per purpose keeps the training and the
            # held-out pairs' draws apart.
            images, ids, mask = data_fn(step_seed(seed, b, f"t2i/denoiser/{stream}/rows"), size)
            generator = torch.Generator().manual_seed(step_seed(seed, b, f"t2i/denoiser/{stream}"))
            choice = torch.randint(len(steps_set), (), generator=generator).item()
            x = dequantize(images, generator, model.levels).to(like)
            ids, mask = ids.to(like.device), mask.to(like.device)
            with torch.no_grad():
                tokens, token_mask = model.text_encoder(ids, mask)
                x0 = model.to_tokens(x)
            u_t0, target = denoiser_targets(
                model.generator, x0, steps_set[choice], tokens, token_mask, generator, t0
            )
            parts.append((u_t0, target, tokens, token_mask))
            bar.update()
    return DenoiserPairs(*(torch.cat(column) for column in zip(*parts, strict=True)))


# ------------------------------------------------------------------------------ training
def train_denoiser(
    model: TextToImage,
    config: DenoiserTrainConfig | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> DenoiserResult:
    """Trains a learned denoiser against the frozen ``model`` and optionally saves it.

    The model is frozen while the targets are computed (eval mode, no parameter gradients,
    text encoder included); its weights, mode and gradient flags are left as they were.
    See the module docstring for the recipe.

    Args:
        model: The text-to-image NTM.
        config: Settings (default :class:`DenoiserTrainConfig`).
        out: If given, the checkpoint folder to write (:func:`save_t2i_denoiser`).
        progress: Show progress (lines when stdout is not a terminal).

    Returns:
        The denoiser (eval mode) and its metrics.
    """
    owner = "train_denoiser"
    model = _require_ntm(owner, model)
    config = config or DenoiserTrainConfig()
    if not isinstance(config, DenoiserTrainConfig):
        raise TypeError(f"{owner} expected a DenoiserTrainConfig, got {type(config).__name__}")
    was_training = model.training
    flags = [parameter.requires_grad for parameter in model.parameters()]
    model.eval().requires_grad_(False)  # frozen: the score needs no parameter gradients
    try:
        rows = training_rows(model, config.seed)
        settings = (config.batch_size, config.seed, config.t0, config.sampling_steps)
        pool = denoiser_pairs(
            model, config.pairs, *settings, "train", progress=progress, data_fn=rows
        )
        held = denoiser_pairs(model, config.holdout, *settings, "holdout", data_fn=rows)
    finally:
        model.train(was_training)
        for parameter, flag in zip(model.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)

    with torch.random.fork_rng(devices=[]):  # seeded weights, no global side effect
        torch.manual_seed(step_seed(config.seed, 0, "t2i/denoiser/init"))
        denoiser = build_denoiser(model, config.dim, config.layers, config.heads)
    denoiser.train()
    optimizer = torch.optim.AdamW(
        denoiser.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.steps, min(config.warmup_steps, config.steps))
    )
    recent: list[float] = []
    with progress_bar(config.steps, "train denoiser", enabled=progress) as bar:
        for step in range(config.steps):
            generator = torch.Generator().manual_seed(step_seed(config.seed, step, "t2i/denoiser"))
            index = torch.randint(len(pool), (config.batch_size,), generator=generator)
            loss = denoiser_loss(denoiser, *pool.rows(index.to(pool.u_t0.device)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(denoiser.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            recent = [*recent[-49:], loss.item()]
            bar.update()
            bar.set_postfix(loss=f"{recent[-1]:.3e}")
    denoiser.eval()
    with torch.no_grad():
        u_t0, target, y, y_mask = held.rows(torch.arange(len(held)))
        metrics = {
            "train_mse": sum(recent) / len(recent),
            "holdout_mse": denoiser_loss(denoiser, u_t0, target, y, y_mask).item(),
            "holdout_identity_mse": (u_t0 - target).square().mean().item(),
        }
    if out is not None:
        save_t2i_denoiser(out, denoiser, model, config, metrics)
    return DenoiserResult(denoiser, metrics)


# ------------------------------------------------------------------------------ checkpoints
def save_t2i_denoiser(
    folder: str | os.PathLike,
    denoiser: LearnedDenoiser,
    model: TextToImage,
    config: DenoiserTrainConfig | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Writes the denoiser's checkpoint folder (atomic, checksummed, safetensors + JSON).

    The format is :func:`trajflow.denoise.save_denoiser`'s (the spec under
    ``extra.denoiser``), plus the fingerprint of ``model``, the training settings and the
    metrics.
    """
    model = _require_ntm("save_t2i_denoiser", model)
    check_denoiser(model, denoiser)
    extra: dict[str, Any] = {
        "denoiser": denoiser.spec.model_dump(mode="json"),
        "model_fingerprint": model_fingerprint(model),
        "metrics": dict(metrics or {}),
    }
    steps = 0 if config is None else config.steps
    return save_checkpoint(
        folder, denoiser, None, train_config=config, step=steps, extra=extra, rng=False
    )


def load_t2i_denoiser(
    folder: str | os.PathLike,
    model: TextToImage | None = None,
    device: str | torch.device | None = None,
    check_fingerprint: bool = True,
) -> LearnedDenoiser:
    """Loads a denoiser checkpoint, checked against ``model`` when given.

    Args:
        folder: The checkpoint folder (:func:`save_t2i_denoiser`).
        model: The model it will denoise: its token shape and prompt width must fit, and
            (with ``check_fingerprint``) its weights must be the ones it was trained against.
        device: Where to load it (default: the model's device, else the CPU).
        check_fingerprint: Refuse a denoiser trained against other weights.

    Raises:
        FileNotFoundError, CheckpointError: For a missing or damaged checkpoint.
        ValueError: If it does not fit ``model`` or was trained against another model.
    """
    if device is None and model is not None:
        device = next(model.parameters()).device
    denoiser = _load_denoiser(folder, device=device).eval()
    if model is None:
        return denoiser
    check_denoiser(model, denoiser)
    if check_fingerprint:
        saved = read_checkpoint_config(folder).get("extra", {}).get("model_fingerprint")
        if saved is not None and saved != model_fingerprint(model):
            raise ValueError(
                f"the denoiser in {folder} was trained against other model weights (its "
                f"fingerprint differs); retrain it with `trajflow-t2i train-denoiser`"
            )
    like = next(model.parameters())
    return denoiser.to(dtype=like.dtype)
