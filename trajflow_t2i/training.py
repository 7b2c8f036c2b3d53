"""Two-stage training of a text-to-image NTM with :func:`trajflow.train.train`.

The paper's recipe (§3.3): stage ``fm`` pretrains the predictor as a flow-matching velocity
network on the captioned images; stage ``ntm`` finetunes an NTM initialised from it
(:meth:`~trajflow_t2i.model.TextToImage.finetune`, identity transporter, auxiliary
mean-alignment loss). Both stages run through trajflow's training loop, so checkpoints,
EMA, exact resume, NaN-step skipping and ``torchrun`` come for free. The result is exported
as ``final/config.json`` + ``final/model.safetensors`` (EMA weights when there are some),
the format of the checkpoint shipped inside the package.

Layout of ``out_dir``::

    autoencoder/    checkpoints of the autoencoder stage (learned autoencoders only)
    fm/step_*/      checkpoints of the flow-matching stage
    ntm/step_*/     checkpoints of the NTM stage
    final/          the exported model

Example:
    >>> import tempfile
    >>> from trajflow_t2i.presets import preset
    >>> config = preset("tiny")
    >>> config.train.fm.iterations = config.train.ntm.iterations = 2
    >>> with tempfile.TemporaryDirectory() as out:
    ...     model = train_t2i(config, out, progress=False)
    ...     sorted(p.name for p in (Path(out) / "final").iterdir())
    ['config.json', 'model.safetensors']
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from trajflow.checkpoint import latest_checkpoint, load_checkpoint
from trajflow.train import TrainConfig, step_seed, train
from trajflow_t2i.data import dequantize, make_split
from trajflow_t2i.model import TextToImage
from trajflow_t2i.presets import StageConfig, T2IConfig
from trajflow_t2i.weights import export_model

__all__ = ["caption_batches", "stage_train_config", "train_t2i"]

Batch = tuple[Tensor, Tensor, Tensor]


def caption_batches(config: T2IConfig, model: TextToImage) -> Callable[[int, int], Batch]:
    """The ``data_fn`` of both stages: ``(images, ids, mask)`` drawn with a per-step seed.

    The training set (``config.data.train_size`` images) is generated once from
    ``config.data.seed`` and its captions tokenised once; step ``i`` draws its rows with a
    generator seeded from ``(train.seed, i)``, so resuming reproduces the batches exactly.
    """
    data = config.data
    split = make_split(data.name, "train", n=data.train_size, seed=data.seed, size=data.image_size)
    ids, mask = model.text_encoder.tokenize(split.captions)
    images = split.images

    def data_fn(step: int, batch_size: int) -> Batch:
        generator = torch.Generator().manual_seed(step_seed(config.train.seed, step, "t2i/rows"))
        rows = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        return images[rows], ids[rows], mask[rows]

    return data_fn


def stage_train_config(
    config: T2IConfig, stage: StageConfig, out_dir: Path, device: str = "cpu"
) -> TrainConfig:
    """trajflow's :class:`~trajflow.train.TrainConfig` for one stage."""
    train = config.train
    return TrainConfig(
        iterations=stage.iterations,
        batch_size=stage.batch_size,
        lr=stage.lr,
        weight_decay=stage.weight_decay,
        warmup_steps=min(stage.warmup_steps, stage.iterations),
        grad_clip=stage.grad_clip,
        ema_decay=stage.ema_decay,
        micro_batches=stage.micro_batches,
        checkpoint_every=train.checkpoint_every,
        out_dir=str(out_dir),
        seed=train.seed,
        log_every=max(1, min(50, stage.iterations // 20)),
        device=device,
        # bf16 autocast where it pays (CUDA); CPU runs stay float32.
        precision="bf16" if train.bf16 and _on_cuda(device) else "float32",
        compile=train.compile,
        # Shards under torchrun only; a single process trains the whole model as before.
        fsdp=train.fsdp,
    )


def _on_cuda(device: str) -> bool:
    if device == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def _newest(folder: Path) -> Path | None:
    return latest_checkpoint(folder) if folder.exists() else None


def train_t2i(
    config: T2IConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> TextToImage:
    """Runs both stages and exports the NTM to ``out_dir/final``.

    Args:
        config: The model and the recipe.
        out_dir: Run folder (see the module docstring for its layout).
        resume: Continue from the newest checkpoint of the run folder: a finished FM stage
            is not rerun, an unfinished stage continues exactly where it stopped.
        progress: Show progress (one line per interval when stdout is not a terminal).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Returns:
        The trained NTM (EMA weights when the NTM stage keeps an EMA).

    Raises:
        FileExistsError: If ``out_dir`` already holds checkpoints and ``resume`` is False.
    """
    out = Path(out_dir)
    fm_dir, ntm_dir = out / "fm", out / "ntm"
    if not resume and (_newest(fm_dir) or _newest(ntm_dir)):
        raise FileExistsError(f"{out} already holds checkpoints: pass resume=True or a new folder")

    fm = TextToImage(config, stage="fm")
    data_fn = caption_batches(config, fm)
    if any(True for _ in fm.autoencoder.parameters()):
        _pretrain_autoencoder(fm, config, data_fn, out / "autoencoder", resume, progress, device)
    fm_config = stage_train_config(config, config.train.fm, fm_dir, device)
    state = None
    if resume and _newest(fm_dir) is not None:
        _, state = load_checkpoint(_newest(fm_dir), model=fm)
    if state is not None and state.step >= config.train.fm.iterations:
        if state.ema is not None:  # a finished stage: its EMA weights start the next one
            fm.load_state_dict(state.ema)
    else:
        result = train(
            fm,
            fm_config,
            data_fn,
            model_config=config,
            resume=fm_dir if state is not None else None,
            progress=progress,
        )
        fm = _exported_weights(result.model, result.ema)

    ntm = TextToImage.finetune(fm.cpu())
    ntm_config = stage_train_config(config, config.train.ntm, ntm_dir, device)
    result = train(
        ntm,
        ntm_config,
        data_fn,
        model_config=config,
        resume=ntm_dir if resume and _newest(ntm_dir) is not None else None,
        progress=progress,
    )
    model = _exported_weights(result.model, result.ema)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank holds the same model
        export_model(model, out / "final")
    return model


class _Reconstruction(nn.Module):
    """The loss of the autoencoder stage: reconstruction of the dequantised images."""

    def __init__(self, model: TextToImage):
        super().__init__()
        self.autoencoder, self.levels = model.autoencoder, model.levels

    def loss(self, images: Tensor, ids: Tensor, mask: Tensor, step: int = 0, generator=None):
        x = dequantize(images, generator, self.levels).to(ids.device)
        return SimpleNamespace(loss=self.autoencoder.reconstruction_loss(x))


def _pretrain_autoencoder(model, config, data_fn, folder, resume, progress, device) -> None:
    """Trains the learned autoencoder by reconstruction (or loads it), then freezes it."""
    wrapper = _Reconstruction(model)
    stage = config.train.autoencoder
    checkpoint = _newest(folder) if resume else None
    state = load_checkpoint(checkpoint, model=wrapper)[1] if checkpoint is not None else None
    if state is None or state.step < stage.iterations:
        train(
            wrapper,
            stage_train_config(config, stage, folder, device),
            data_fn,
            model_config=config,
            resume=folder if state is not None else None,
            progress=progress,
        )
    model.autoencoder.requires_grad_(False).eval()


def _exported_weights(model: TextToImage, ema: TextToImage | None) -> TextToImage:
    """The EMA weights when there are some, loaded into the trained model object."""
    if ema is not None:
        model.load_state_dict(ema.state_dict())
    return model
