"""Prompt in, images out: the Python entry point of the text-to-image NTM.

Example:
    >>> import torch
    >>> from trajflow_t2i.model import TextToImage
    >>> from trajflow_t2i.presets import preset
    >>> pipe = Pipeline(TextToImage(preset("tiny"), stage="ntm"))
    >>> images = pipe(["a red circle", "two blue squares"], n=3, steps=4, cfg=1.0, seed=0)
    >>> images.shape, images.dtype
    (torch.Size([2, 3, 3, 16, 16]), torch.uint8)
    >>> grid = image_grid(images)
    >>> grid.shape  # (rows·(side + gap) + gap, cols·(side + gap) + gap, channels), scaled
    (140, 208, 3)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from trajflow_t2i.denoiser import DENOISER_DIR, check_denoiser, load_t2i_denoiser
from trajflow_t2i.weights import DEFAULT_WEIGHTS, load_model

__all__ = ["Pipeline", "image_grid", "save_png", "to_uint8"]


def to_uint8(images: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` to 8-bit pixel values (the inverse of the data's mapping)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class Pipeline:
    """Samples images for prompts from a :class:`~trajflow_t2i.model.TextToImage`.

    Args:
        model: The text-to-image model (NTM or FM stage).
        denoiser: A learned denoiser for ``denoiser="learned"``
            (:mod:`trajflow_t2i.denoiser`), or ``None``.

    Use :meth:`from_pretrained` for the checkpoint shipped inside the package.
    """

    def __init__(self, model, denoiser: torch.nn.Module | None = None):
        self.model = model.eval()
        if denoiser is not None:
            denoiser = check_denoiser(model, denoiser).eval()
        self.denoiser = denoiser

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike | None = None, device: str = "cpu"
    ) -> Pipeline:
        """The pipeline of an exported model (``None``: the shipped default checkpoint).

        A learned denoiser saved in the folder's ``denoiser/`` subfolder
        (:data:`~trajflow_t2i.denoiser.DENOISER_DIR`) is loaded too, and must have been
        trained against these weights.
        """
        model = load_model(folder, device=device)
        learned = Path(DEFAULT_WEIGHTS if folder is None else folder) / DENOISER_DIR
        denoiser = load_t2i_denoiser(learned, model) if learned.is_dir() else None
        return cls(model, denoiser)

    def __call__(
        self,
        prompts: str | Sequence[str],
        n: int = 1,
        steps: int = 4,
        cfg: float = 3.0,
        seed: int = 0,
        temperature: float = 1.0,
        denoiser: Literal["none", "score", "learned"] = "none",
    ) -> Tensor:
        """``n`` images per prompt as 8-bit pixels, shape ``(P, n, C, H, W)``.

        Args:
            prompts: One prompt or a list of them.
            n: Images per prompt.
            steps: ``T``: Gaussian steps of the NTM (Euler steps of an FM-stage model).
            cfg: Classifier-free guidance weight ``w >= 0`` (0: plain conditional).
            seed: Seeds the noise; the same seed gives the same images on the same machine.
            temperature: Scales every step's noise.
            denoiser: ``"none"`` (one transporter inverse), ``"score"`` (trajectory score
                denoising) or ``"learned"`` (the pipeline's learned denoiser, no inverse);
                see :meth:`~trajflow_t2i.model.TextToImage.generate`.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("Pipeline needs at least one prompt")
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"n (images per prompt) must be a positive integer, got {n!r}")
        repeated = [prompt for prompt in prompts for _ in range(n)]
        generator = torch.Generator().manual_seed(seed)
        if denoiser == "learned" and self.denoiser is None:
            raise ValueError(
                "denoiser='learned' needs a pipeline with a learned denoiser: pass one to "
                "Pipeline(model, denoiser) or save one as <model folder>/denoiser "
                "(`trajflow-t2i train-denoiser`)"
            )
        images = self.model.generate(
            repeated,
            steps=steps,
            cfg=cfg,
            generator=generator,
            temperature=temperature,
            denoiser=denoiser,
            learned_denoiser=self.denoiser,
        )
        return to_uint8(images).cpu().reshape(len(prompts), n, *images.shape[1:])


def image_grid(images: Tensor, scale: int = 4, gap: int = 1) -> np.ndarray:
    """Lays ``(rows, cols, C, H, W)`` 8-bit images out as one ``(Y, X, 3)`` array.

    Pixels are repeated ``scale`` times (nearest neighbour: tiny images stay crisp) and
    separated by ``gap`` grey pixels (before scaling).
    """
    if images.dim() != 5 or images.dtype != torch.uint8:
        raise ValueError(
            f"image_grid expected uint8 images (rows, cols, C, H, W), got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    rows, cols, channels, height, width = images.shape
    if channels == 1:
        images = images.expand(-1, -1, 3, -1, -1)
    canvas = np.full(
        (rows * (height + gap) + gap, cols * (width + gap) + gap, 3), 64, dtype=np.uint8
    )
    for r in range(rows):
        for c in range(cols):
            top, left = gap + r * (height + gap), gap + c * (width + gap)
            canvas[top : top + height, left : left + width] = images[r, c].permute(1, 2, 0).numpy()
    return canvas.repeat(scale, axis=0).repeat(scale, axis=1)


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Writes an 8-bit ``(Y, X, 3)`` array as PNG atomically (no partial file on error)."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"expected an output path ending in .png, got {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder of {path} does not exist")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(handle)
    os.chmod(temporary, 0o644)  # mkstemp makes the file private; an image is for everyone
    try:
        Image.fromarray(array).save(temporary, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
