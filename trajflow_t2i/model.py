"""The text-to-image NTM: text encoder, autoencoder, patchify, transporter and predictor.

Reads top to bottom, like TarFlow's ``transformer_flow.py``:

1. **Autoencoders** map images ``(B, C, H, W)`` in ``[-1, 1]`` to latents and back. The
   default ``identity`` keeps pixel space, so likelihoods are exact in pixels; ``conv`` is a
   small learned (strided-convolution) autoencoder for when pixels are too many.
2. **Patchify** (einops) turns a latent into tokens ``(B, L, C·p²)`` at the model boundary.
3. :class:`TextToImage` holds a text encoder (prefix tokens for the predictor), the
   autoencoder, and a generator over tokens: a :class:`~trajflow.FlowMatching` model in the
   pretraining stage, an :class:`~trajflow.NTM` (time-conditioned ``tarflow`` transporter +
   ``trajectory_transformer`` predictor) after finetuning with :meth:`TextToImage.finetune`.

Example:
    >>> import torch
    >>> from trajflow_t2i.presets import preset
    >>> config = preset("tiny")
    >>> fm = TextToImage(config, stage="fm")
    >>> ntm = TextToImage.finetune(fm)
    >>> ntm.stage, ntm.transporter_reads_time()
    ('ntm', True)
    >>> images = ntm.generate(["a red circle"], steps=2, generator=torch.Generator().manual_seed(0))
    >>> images.shape, bool(images.abs().max() <= 1)
    (torch.Size([1, 3, 16, 16]), True)
"""

from __future__ import annotations

import copy
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from trajflow import NTM, PREDICTORS, FlowMatching, Registry, Sequential
from trajflow.blocks.tarflow import TarFlowBlock
from trajflow.denoise import sample_denoised, sample_with_denoiser
from trajflow_t2i.data import dequantize, make_split
from trajflow_t2i.presets import T2IConfig
from trajflow_t2i.text import TEXT_ENCODERS, TextEncoder

__all__ = [
    "AUTOENCODERS",
    "Autoencoder",
    "ConvAutoencoder",
    "IdentityAutoencoder",
    "TextToImage",
    "patchify",
    "unpatchify",
]

Stage = Literal["fm", "ntm"]


# ------------------------------------------------------------------------------ autoencoders
class Autoencoder(nn.Module, ABC):
    """Maps images ``(B, C, H, W)`` in ``[-1, 1]`` to latents ``(B, C', H/f, W/f)`` and back."""

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Images to latents."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents to images."""


#: Registered autoencoders.
AUTOENCODERS: Registry[type[Autoencoder]] = Registry("autoencoder")


@AUTOENCODERS.register("identity")
class IdentityAutoencoder(Autoencoder):
    """Pixel space: latents are the images, so the NTM's likelihood is a pixel likelihood."""

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents


@AUTOENCODERS.register("conv")
class ConvAutoencoder(Autoencoder):
    """A small learned autoencoder: strided 4×4 convolutions down, transposed ones up.

    Train it first by minimising :meth:`reconstruction_loss`, freeze it, then train the NTM
    on its latents (likelihoods are then of latents, not pixels: say so when reporting).

    Args:
        channels: Image channels.
        latent_channels: Latent channels.
        downsample: Spatial factor, a power of two.
        hidden: Channels of the hidden layers.
    """

    def __init__(
        self, channels: int = 3, latent_channels: int = 4, downsample: int = 2, hidden: int = 32
    ):
        super().__init__()
        if downsample < 2 or downsample & (downsample - 1):
            raise ValueError(
                f"conv autoencoder needs a power-of-two downsample >= 2, got {downsample}"
            )
        levels = int(math.log2(downsample))
        down: list[nn.Module] = []
        up: list[nn.Module] = []
        width = channels
        for _ in range(levels):
            down += [nn.Conv2d(width, hidden, 4, stride=2, padding=1), nn.SiLU()]
            width = hidden
        down.append(nn.Conv2d(hidden, latent_channels, 3, padding=1))
        up.append(nn.Conv2d(latent_channels, hidden, 3, padding=1))
        for index in range(levels):
            up += [
                nn.SiLU(),
                nn.ConvTranspose2d(
                    hidden, hidden if index < levels - 1 else channels, 4, stride=2, padding=1
                ),
            ]
        self.encoder, self.decoder = nn.Sequential(*down), nn.Sequential(*up)

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def decode(self, latents: Tensor) -> Tensor:
        return torch.tanh(self.decoder(latents))

    def reconstruction_loss(self, images: Tensor) -> Tensor:
        """Mean squared reconstruction error."""
        return (self.decode(self.encode(images)) - images).square().mean()


# ------------------------------------------------------------------------------ patchify
def patchify(latents: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W)`` to tokens ``(B, (H/p)(W/p), C p²)``, row-major over patches."""
    return rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=patch, q=patch)


def unpatchify(tokens: Tensor, patch: int, channels: int) -> Tensor:
    """Inverse of :func:`patchify` for square latents."""
    side = math.isqrt(tokens.shape[1])
    return rearrange(
        tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=side, w=side, c=channels, p=patch, q=patch
    )


# ------------------------------------------------------------------------------ the model
class TextToImage(nn.Module):
    """A text-to-image NTM (or its flow-matching pretraining stage) built from a config.

    Args:
        config: The :class:`~trajflow_t2i.presets.T2IConfig`.
        stage: ``"fm"`` (flow-matching velocity model) or ``"ntm"`` (the finetuned NTM).
        text_encoder: Use this encoder instead of building the configured one.
    """

    def __init__(
        self, config: T2IConfig, stage: Stage = "ntm", text_encoder: TextEncoder | None = None
    ):
        super().__init__()
        if stage not in ("fm", "ntm"):
            raise ValueError(f"stage must be 'fm' or 'ntm', got {stage!r}")
        self.config, self.stage = config, stage
        data, settings = config.data, config.model
        self.levels = make_split(data.name, "train", n=1).levels  # K of the pixel levels
        self.channels = settings.latent_channels(data)
        self.patch = settings.patch
        self.text_encoder = text_encoder or self._build_text_encoder()
        self.autoencoder = AUTOENCODERS.build(settings.autoencoder, **self._autoencoder_kwargs())
        predictor = self._build_predictor()
        schedule, dropout = config.schedule, config.train.cfg_dropout
        if stage == "fm":
            self.generator = FlowMatching(predictor, schedule, cfg_dropout=dropout)
        else:
            self.generator = NTM(
                self._build_transporter(), predictor, schedule, config.train.mode, dropout
            )

    # ----------------------------------------------------------------- building
    def _build_text_encoder(self) -> TextEncoder:
        return TEXT_ENCODERS.build(self.config.model.text_encoder)

    def _autoencoder_kwargs(self) -> dict:
        spec = self.config.model.autoencoder
        if spec.name == "identity":
            return {}
        return {"channels": self.config.data.channels}

    def _build_predictor(self):
        data, settings = self.config.data, self.config.model
        return PREDICTORS.build(
            "trajectory_transformer",
            features=settings.token_features(data),
            tokens=settings.tokens(data),
            dim=settings.predictor_dim,
            layers=settings.predictor_layers,
            heads=settings.heads,
            level_attention=settings.level_attention,
            cond_features=self.text_encoder.features,
            time_features=settings.time_features,
            target="velocity",
        )

    def _build_transporter(self) -> Sequential:
        data, settings = self.config.data, self.config.model
        return Sequential(
            *(
                TarFlowBlock(
                    features=settings.token_features(data),
                    tokens=settings.tokens(data),
                    dim=settings.transporter_dim,
                    layers=settings.transporter_layers,
                    heads=settings.heads,
                    flip=index % 2 == 1,  # alternate the scan direction
                    time_features=settings.time_features,
                )
                for index in range(settings.transporter_blocks)
            )
        )

    @classmethod
    def finetune(cls, fm: TextToImage, aux_steps: int | None = None) -> TextToImage:
        """The NTM stage initialised from a trained flow-matching stage (paper §3.3).

        The transporter starts as the identity and ``δ`` at zero, so the result samples
        exactly like the FM model's Gaussian ancestral sampler; the text encoder and the
        autoencoder are copied. A frozen copy of the velocity network gives the auxiliary
        mean-alignment loss, weight ``train.aux_weight`` cosine-decayed over ``aux_steps``
        (default: ``aux_fraction`` of the finetuning steps).
        """
        if fm.stage != "fm":
            raise ValueError(f"finetune expects a model of stage 'fm', got {fm.stage!r}")
        config = fm.config
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config, model.stage = config, "ntm"
        model.levels, model.channels, model.patch = fm.levels, fm.channels, fm.patch
        model.text_encoder = copy.deepcopy(fm.text_encoder)
        model.autoencoder = copy.deepcopy(fm.autoencoder)
        if aux_steps is None:
            aux_steps = max(1, round(config.train.aux_fraction * config.train.ntm.iterations))
        like = next(fm.parameters())
        model.generator = NTM.from_flow_matching(
            fm.generator,
            model._build_transporter().to(device=like.device, dtype=like.dtype),
            aux_weight=config.train.aux_weight,
            aux_steps=aux_steps,
            mode=config.train.mode,
            cfg_dropout=config.train.cfg_dropout,
        )
        return model

    def transporter_reads_time(self) -> bool:
        """Whether every transporter block is conditioned on the level's time."""
        if self.stage != "ntm":
            return False
        return all(block.uses_time for block in self.generator.transporter)

    # ----------------------------------------------------------------- data <-> tokens
    def to_tokens(self, images: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` in ``[-1, 1]`` to model tokens ``(B, L, C')``."""
        return patchify(self.autoencoder.encode(images), self.patch)

    def to_images(self, tokens: Tensor) -> Tensor:
        """Model tokens back to images in ``[-1, 1]``."""
        return self.autoencoder.decode(unpatchify(tokens, self.patch, self.channels)).clamp(-1, 1)

    def encode_text(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Prompts to ``(ids, mask)`` and the encoder's tokens: ``(tokens, mask, ids)``."""
        ids, mask = self.text_encoder.tokenize(list(prompts))
        device = next(self.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        tokens, mask = self.text_encoder(ids, mask)
        return tokens, mask, ids

    # ----------------------------------------------------------------- training
    def loss(
        self,
        images: Tensor,
        ids: Tensor,
        mask: Tensor,
        step: int = 0,
        generator: torch.Generator | None = None,
    ):
        """The stage's training loss on integer images and tokenised captions.

        Args:
            images: Pixel levels ``(B, C, H, W)``, integers in ``[0, K)``; uniformly
                dequantised here with ``generator``, so a step's randomness is its seed.
            ids, mask: Caption token ids and mask ``(B, M)`` from the text encoder's
                ``tokenize``.
            step: Training step (drives the decay of the auxiliary loss weight).
            generator: Seeds every random draw.
        """
        if images.is_floating_point():
            raise TypeError(
                f"TextToImage.loss expected integer pixel levels in [0, {self.levels}), "
                f"got dtype {images.dtype}"
            )
        dtype = next(self.generator.parameters()).dtype
        x = dequantize(images, generator, self.levels).to(device=ids.device, dtype=dtype)
        tokens, text_mask = self.text_encoder(ids, mask)
        # FlowMatching.loss and NTM.loss share (x0, y, y_mask, step=, generator=).
        return self.generator.loss(
            self.to_tokens(x), tokens, text_mask, step=step, generator=generator
        )

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        steps: int = 4,
        cfg: float = 0.0,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        denoiser: Literal["none", "score", "learned"] = "none",
        learned_denoiser: nn.Module | None = None,
    ) -> Tensor:
        """One image per prompt, in ``[-1, 1]``, shape ``(len(prompts), C, H, W)``.

        The NTM runs ``steps`` Gaussian steps in u-space and inverts the transporter once;
        the FM stage integrates its ODE with ``steps`` Euler steps. ``cfg`` is the guidance
        weight ``w`` (0: conditional), on ``(μ, σ)`` for the NTM and on the velocity for FM.

        ``denoiser`` (NTM stage only) turns the slightly noisy end of the chain into ``x̂_0``
        (see :mod:`trajflow.denoise`): ``"score"`` inverts the transporter at every level and
        takes a trajectory-score step; ``"learned"`` hands ``u_{t_0}`` and the prompt to
        ``learned_denoiser`` (e.g. from :func:`trajflow_t2i.denoiser.train_denoiser`), with no
        inverse at all. All three draw the same chain for the same ``generator``.
        """
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        if not (math.isfinite(cfg) and cfg >= 0):
            raise ValueError(f"cfg must be a finite weight >= 0, got {cfg}")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if denoiser not in ("none", "score", "learned"):
            raise ValueError(f"denoiser must be 'none', 'score' or 'learned', got {denoiser!r}")
        if denoiser != "none" and self.stage != "ntm":
            raise ValueError(f"denoiser={denoiser!r} needs the NTM stage, got {self.stage!r}")
        if denoiser == "learned":
            # Imported here: trajflow_t2i.denoiser builds on this module.
            from trajflow_t2i.denoiser import check_denoiser

            if learned_denoiser is None:
                raise ValueError(
                    "denoiser='learned' needs learned_denoiser (train one with "
                    "trajflow_t2i.denoiser.train_denoiser or `trajflow-t2i train-denoiser`)"
                )
            check_denoiser(self, learned_denoiser)
        tokens, mask, _ = self.encode_text(prompts)
        n = len(prompts)
        chain = (n, steps, cfg, tokens, mask, temperature, generator)
        if denoiser == "score":
            out = sample_denoised(self.generator, *chain)
        elif denoiser == "learned":
            out = sample_with_denoiser(self.generator, learned_denoiser, *chain)
        elif self.stage == "ntm":
            out = self.generator.sample(
                n,
                steps=steps,
                cfg=cfg,
                y=tokens,
                y_mask=mask,
                temperature=temperature,
                generator=generator,
            )
        else:
            out = self._euler(n, steps, cfg, tokens, mask, generator, temperature)
        return self.to_images(out)

    def _euler(self, n, steps, cfg, y, y_mask, generator, temperature) -> Tensor:
        """Euler integration of the FM ODE from 1 to 0 with guidance on the velocity."""
        fm = self.generator
        parameter = next(fm.parameters())
        x = temperature * torch.randn(
            (n, *fm.event_shape), generator=generator, dtype=parameter.dtype
        ).to(parameter.device)
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        for t, s in itertools.pairwise(grid):
            t_batch = torch.full((n,), t, dtype=x.dtype, device=x.device)
            if cfg:
                drop = torch.arange(2 * n, device=x.device) >= n
                twice = lambda v: torch.cat([v, v])  # noqa: E731
                v_c, v_u = fm.velocity(
                    twice(x), twice(t_batch), twice(y), twice(y_mask), drop
                ).chunk(2)
                v = (1 + cfg) * v_c - cfg * v_u
            else:
                v = fm.velocity(x, t_batch, y, y_mask)
            x = x + (s - t) * v
        return x

    # ----------------------------------------------------------------- likelihood
    @torch.no_grad()
    def bits_per_dim(
        self,
        images: Tensor,
        captions: Sequence[str],
        steps: int = 4,
        t0: float | None = None,
        generator: torch.Generator | None = None,
    ):
        """Bits/dim bound of the NTM on dequantised ``images`` (integer levels) given captions.

        Returns a :class:`trajflow.ntm.DataBound` whose ``variable`` states ``t_0``, ``T``,
        ``K`` and the dequantisation. Only the NTM stage with the identity autoencoder gives
        a pixel likelihood.
        """
        if self.stage != "ntm":
            raise ValueError("bits_per_dim needs the NTM stage (the FM stage has no bound here)")
        tokens, mask, _ = self.encode_text(captions)
        x = dequantize(images, generator, self.levels).to(tokens.dtype)
        return self.generator.data_bound(
            self.to_tokens(x),
            steps=steps,
            t0=t0,
            y=tokens,
            y_mask=mask,
            quantization_levels=self.levels,
            generator=generator,
        )

    def parameter_count(self) -> dict[str, int]:
        """Parameters per component (the frozen FM teacher excluded)."""
        counts = {
            "text_encoder": _count(self.text_encoder),
            "autoencoder": _count(self.autoencoder),
        }
        if self.stage == "ntm":
            counts["transporter"] = _count(self.generator.transporter)
            counts["predictor"] = _count(self.generator.predictor)
        else:
            counts["predictor"] = _count(self.generator.net)
        counts["total"] = sum(counts.values())
        return counts


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
