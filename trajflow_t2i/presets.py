"""Text-to-image configs as pydantic models, and the named presets ``tiny`` to ``paper``.

A :class:`T2IConfig` says everything needed to rebuild a text-to-image NTM and to train it
with the paper's recipe: flow-matching pretraining of the predictor (stage ``fm``), then NTM
finetuning from it (stage ``ntm``, :meth:`trajflow.NTM.from_flow_matching` with the
auxiliary mean-alignment loss). Bad values fail with a message naming the field.

Example:
    >>> config = preset("tiny")
    >>> config.data.name, config.data.image_size, config.model.patch
    ('shapes', 16, 4)
    >>> config.model.tokens(config.data), config.model.token_features(config.data)
    (16, 48)
    >>> T2IConfig.model_validate_json(config.model_dump_json()) == config
    True
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trajflow.registry import Spec
from trajflow.schedules import ScheduleConfig

__all__ = [
    "PRESETS",
    "DataConfig",
    "ModelSettings",
    "StageConfig",
    "T2IConfig",
    "TrainSettings",
    "preset",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Which captioned data set to train on.

    Attributes:
        name: Registered data set (``trajflow_t2i.data.T2I_DATASETS``): ``shapes`` or ``digits``.
        image_size: Side of the square images (``shapes``: 16 or 32; ``digits``: 8).
        train_size: Images generated once for training (a deterministic function of ``seed``).
        seed: Seed of the generated training set.
    """

    name: str = "shapes"
    image_size: int = Field(16, ge=4)
    train_size: int = Field(20_000, ge=1)
    seed: int = Field(0, ge=0)

    @property
    def channels(self) -> int:
        """Image channels: 1 for digits, 3 (RGB) otherwise."""
        return 1 if self.name == "digits" else 3


class ModelSettings(_Strict):
    """The networks: text encoder, autoencoder, transporter and predictor.

    Attributes:
        text_encoder: Registered text encoder spec; its kwargs may omit the vocabulary
            (the data set's is used).
        autoencoder: Registered autoencoder spec (``identity`` = pixel space).
        patch: Patch side: tokens are ``patch × patch`` pixels of the latent.
        transporter_blocks: TarFlow blocks of the transporter (alternating scan direction).
        transporter_layers: Transformer layers per TarFlow block.
        transporter_dim: Width of the TarFlow blocks.
        predictor_layers: Depth of the trajectory transformer.
        predictor_dim: Width of the trajectory transformer.
        heads: Attention heads of both.
        time_features: Width of the sinusoidal time embeddings of both.
        level_attention: ``markov`` (the paper's sampler) or ``causal``.
    """

    text_encoder: Spec = Field(
        default_factory=lambda: Spec(
            name="builtin", kwargs={"features": 64, "layers": 2, "heads": 4}
        )
    )
    autoencoder: Spec = Field(default_factory=lambda: Spec(name="identity"))
    patch: int = Field(2, ge=1)
    transporter_blocks: int = Field(2, ge=1)
    transporter_layers: int = Field(4, ge=1)
    transporter_dim: int = Field(64, ge=8)
    predictor_layers: int = Field(4, ge=1)
    predictor_dim: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    time_features: int = Field(64, ge=2, multiple_of=2)
    level_attention: Literal["markov", "causal"] = "markov"

    @model_validator(mode="after")
    def _heads_divide_widths(self) -> ModelSettings:
        for name in ("transporter_dim", "predictor_dim"):
            if getattr(self, name) % self.heads:
                raise ValueError(f"heads ({self.heads}) must divide {name} ({getattr(self, name)})")
        return self

    def latent_side(self, data: DataConfig) -> int:
        """Side of the latent image (the identity autoencoder keeps the image's)."""
        factor = int(self.autoencoder.kwargs.get("downsample", 1))
        return data.image_size // factor

    def latent_channels(self, data: DataConfig) -> int:
        """Channels of the latent image."""
        return int(self.autoencoder.kwargs.get("latent_channels", data.channels))

    def tokens(self, data: DataConfig) -> int:
        """Tokens ``L`` per image."""
        return (self.latent_side(data) // self.patch) ** 2

    def token_features(self, data: DataConfig) -> int:
        """Channels ``C`` of a token: latent channels × patch²."""
        return self.latent_channels(data) * self.patch**2


class StageConfig(_Strict):
    """Optimisation of one training stage (flow-matching pretraining or NTM finetuning).

    Attributes:
        iterations: Optimisation steps. batch_size: Images per step. lr: Peak learning rate.
        warmup_steps: Linear warmup. weight_decay: AdamW decay. grad_clip: Norm clip.
        ema_decay: Parameter EMA (``None``: none); the EMA weights are the ones exported.
        micro_batches: Split each step's batch (each process's share under ``torchrun``)
            into this many micro-batches whose gradients accumulate: the same step in less
            memory. Each micro-batch draws its own randomness, so a run with ``M``
            micro-batches trains like ``M`` processes (see :mod:`trajflow.train`), not
            bitwise like one.
    """

    iterations: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    micro_batches: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _micro_batches_divide_the_batch(self) -> StageConfig:
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"micro_batches ({self.micro_batches}) must divide batch_size ({self.batch_size})"
            )
        return self


class TrainSettings(_Strict):
    """The paper's recipe: FM pretraining, then NTM finetuning with the auxiliary loss.

    Attributes:
        autoencoder: Reconstruction pretraining of a learned autoencoder (skipped for the
            parameter-free ``identity``); it is frozen before the generator trains, so the
            generator cannot lower its loss by shrinking the latents.
        fm: The flow-matching pretraining stage.
        ntm: The NTM finetuning stage.
        mode: NTM loss: ``pairwise`` (one random step per image, cheap) or ``end_to_end``.
        aux_weight: λ of the mean-alignment loss at the start of finetuning.
        aux_fraction: Fraction of the finetuning steps over which λ decays to 0 (cosine).
        cfg_dropout: Prompt dropout (the unconditional branch of guidance).
        checkpoint_every: Steps between checkpoints of each stage.
        seed: Seeds every random draw of training.
        bf16: Autocast to bfloat16 on CUDA (log-dets and losses stay float32).
        compile: ``torch.compile`` the loss.
        fsdp: Shard parameters with FSDP2 under torchrun (``base`` and larger).
    """

    autoencoder: StageConfig = Field(default_factory=lambda: StageConfig(iterations=1000))
    fm: StageConfig = Field(default_factory=StageConfig)
    ntm: StageConfig = Field(default_factory=StageConfig)
    mode: Literal["pairwise", "end_to_end"] = "pairwise"
    aux_weight: float = Field(2.5, ge=0)
    aux_fraction: float = Field(0.5, ge=0, le=1)
    cfg_dropout: float = Field(0.1, ge=0, lt=1)
    checkpoint_every: int | None = Field(500, ge=1)
    seed: int = Field(0, ge=0)
    bf16: bool = True
    compile: bool = False
    fsdp: bool = False


class T2IConfig(_Strict):
    """Everything that defines a text-to-image NTM and its training.

    Attributes:
        name: Preset name, or a label of your own.
        data: The captioned data set.
        model: The networks.
        schedule: Trajectory schedule (step counts drawn in training, ``t_min``).
        train: The two-stage training recipe.
    """

    name: str = "custom"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSettings = Field(default_factory=ModelSettings)
    schedule: ScheduleConfig = Field(
        default_factory=lambda: ScheduleConfig(grid="shifted", shift=0.0, steps=[4])
    )
    train: TrainSettings = Field(default_factory=TrainSettings)

    @model_validator(mode="after")
    def _patches_tile_the_latent(self) -> T2IConfig:
        side = self.model.latent_side(self.data)
        if side < 1 or side % self.model.patch:
            raise ValueError(
                f"model.patch ({self.model.patch}) must divide the latent side ({side}) of "
                f"{self.data.image_size}x{self.data.image_size} images"
            )
        return self


def _tiny() -> T2IConfig:
    return T2IConfig(
        name="tiny",
        data=DataConfig(name="shapes", image_size=16, train_size=512),
        model=ModelSettings(
            text_encoder=Spec(name="builtin", kwargs={"features": 16, "layers": 1, "heads": 2}),
            patch=4,
            transporter_layers=1,
            transporter_dim=16,
            predictor_layers=1,
            predictor_dim=32,
            heads=2,
            time_features=16,
        ),
        train=TrainSettings(
            fm=StageConfig(iterations=20, batch_size=16, lr=2e-3, warmup_steps=2),
            ntm=StageConfig(iterations=20, batch_size=16, lr=1e-3, warmup_steps=2),
            checkpoint_every=10,
            bf16=False,
        ),
    )


def _small() -> T2IConfig:
    return T2IConfig(
        name="small",
        data=DataConfig(name="shapes", image_size=16, train_size=30_000),
        model=ModelSettings(
            text_encoder=Spec(name="builtin", kwargs={"features": 64, "layers": 2, "heads": 4}),
            # Patches of 4x4 pixels: 16 tokens of 48 channels, about 3x cheaper per step
            # than 2x2 patches on 2 CPU cores, so many more steps fit in half an hour.
            patch=4,
            # 2 x 2 layers rather than the default 2 x 4, for the same reason (the method
            # notes: the paper's appendix also gives 2).
            transporter_layers=2,
            transporter_dim=64,
            predictor_layers=4,
            predictor_dim=128,
            heads=4,
            time_features=64,
        ),
        train=TrainSettings(
            fm=StageConfig(
                iterations=6000, batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.999
            ),
            ntm=StageConfig(
                iterations=1500, batch_size=64, lr=3e-4, warmup_steps=50, ema_decay=0.998
            ),
            checkpoint_every=500,
        ),
    )


def _base() -> T2IConfig:
    return T2IConfig(
        name="base",
        data=DataConfig(name="shapes", image_size=32, train_size=200_000),
        model=ModelSettings(
            text_encoder=Spec(name="builtin", kwargs={"features": 256, "layers": 4, "heads": 8}),
            patch=2,
            transporter_layers=4,
            transporter_dim=256,
            predictor_layers=12,
            predictor_dim=512,
            heads=8,
            time_features=128,
        ),
        schedule=ScheduleConfig(grid="shifted", shift=0.0, steps=[4, 8]),
        train=TrainSettings(
            fm=StageConfig(iterations=100_000, batch_size=256, lr=3e-4, ema_decay=0.9999),
            ntm=StageConfig(iterations=30_000, batch_size=256, lr=1e-4, ema_decay=0.9999),
            checkpoint_every=2000,
            fsdp=True,
        ),
    )


def _paper() -> T2IConfig:
    # The paper's scale (§8 of the method notes): width 3072, blocks [4, 4, 24], patch 1 on
    # 16x-compressed 32-channel latents of 256² images. It is built (on the meta device) to
    # report its size; it is not trained here.
    return T2IConfig(
        name="paper",
        data=DataConfig(name="shapes", image_size=256, train_size=1),
        model=ModelSettings(
            text_encoder=Spec(name="builtin", kwargs={"features": 1024, "layers": 4, "heads": 16}),
            autoencoder=Spec(name="conv", kwargs={"downsample": 16, "latent_channels": 32}),
            patch=1,
            transporter_blocks=2,
            transporter_layers=4,
            transporter_dim=3072,
            predictor_layers=24,
            predictor_dim=3072,
            heads=24,
            time_features=256,
        ),
        schedule=ScheduleConfig(grid="shifted", shift=0.5, steps=[4, 8, 16]),
        train=TrainSettings(
            fm=StageConfig(iterations=1, batch_size=1024, lr=1e-4, ema_decay=0.9999),
            ntm=StageConfig(iterations=1, batch_size=1024, lr=1e-4, ema_decay=0.9999),
            fsdp=True,
        ),
    )


#: Named presets: ``tiny`` (tests, seconds), ``small`` (2 CPU cores, about half an hour),
#: ``base`` (one GPU, hours), ``paper`` (the paper's size; built, not trained).
PRESETS = {"tiny": _tiny, "small": _small, "base": _base, "paper": _paper}


def preset(name: str) -> T2IConfig:
    """A fresh copy of the named preset.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()
