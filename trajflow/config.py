"""Model configs: everything needed to rebuild an NTM or a flow-matching model from JSON.

Example:
    >>> config = ModelConfig(
    ...     kind="ntm",
    ...     predictor={"name": "mlp", "kwargs": {"features": 2, "hidden_features": [32]}},
    ...     transporter=[
    ...         {"name": "affine_coupling", "kwargs": {"features": 2, "time_features": 16}}
    ...     ],
    ... )
    >>> type(config.build()).__name__
    'NTM'
    >>> ModelConfig.model_validate_json(config.model_dump_json()) == config
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from trajflow.core import BLOCKS, Sequential
from trajflow.flow_matching import FlowMatching
from trajflow.ntm import NTM
from trajflow.predictors import PREDICTORS
from trajflow.registry import Registry, Spec
from trajflow.schedules import ScheduleConfig, StepsWeighting

__all__ = ["FinetuneConfig", "ModelConfig", "toy_flow_matching_config", "toy_ntm_config"]


def _check_spec(registry: Registry, spec: Spec) -> Spec:
    """``spec`` if its name is registered and its kwargs fit the entry's signature."""
    registry.check(spec.name)
    entry = registry.get(spec.name)
    try:
        signature = inspect.signature(entry)
    except ValueError:  # no signature to check against: the build decides
        return spec
    try:
        signature.bind(**spec.kwargs)
    except TypeError as error:
        raise ValueError(
            f"{registry.kind} {spec.name!r} does not take {sorted(spec.kwargs)} ({error}); "
            f"expected {spec.name}{signature}"
        ) from None
    return spec


class FinetuneConfig(BaseModel):
    """How an NTM was initialised from flow matching (:meth:`NTM.from_flow_matching`).

    A finetuned NTM's checkpoint holds no teacher: rebuilding it from the config gives the
    NTM with the same architecture and the same frozen parameters (``no_delta_mean``), with
    the auxiliary loss off. See :meth:`ModelConfig.finetuned_from`.

    Attributes:
        no_delta_mean: Only the δ head of the predictor (and the transporter) train.
        aux_weight: λ of the mean-alignment loss at step 0 (a record: no teacher on reload).
        aux_steps: Steps of its cosine decay (a record, likewise).
    """

    model_config = ConfigDict(extra="forbid")

    no_delta_mean: bool = False
    aux_weight: float = Field(2.5, ge=0, allow_inf_nan=False)
    aux_steps: int = Field(1000, ge=0)


class ModelConfig(BaseModel):
    """An NTM (``kind="ntm"``) or a flow-matching model (``kind="flow_matching"``).

    Attributes:
        kind: Which model.
        predictor: Registered predictor spec (``PREDICTORS``).
        transporter: Block specs of the NTM transporter (``BLOCKS``); empty = identity.
        schedule: Trajectory schedule.
        mode: NTM training mode.
        cfg_dropout: Condition dropout in training.
        time_independent_transporter: Accept a transporter that ignores time (see
            :class:`~trajflow.ntm.NTM`).
        x0_mse_weight: Weight of the NTM's x̂₀ regression term (see
            :class:`~trajflow.ntm.NTM`); ``0`` is the pure trajectory NLL.
        finetune: Set for an NTM finetuned from flow matching (its predictor is the FM
            velocity network); ``None`` for a model trained from scratch.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["ntm", "flow_matching"] = "ntm"
    predictor: Spec
    transporter: list[Spec] = Field(default_factory=list)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    mode: Literal["end_to_end", "pairwise"] = "end_to_end"
    cfg_dropout: float = Field(0.1, ge=0, lt=1)
    time_independent_transporter: bool = False
    x0_mse_weight: float = Field(0.0, ge=0, allow_inf_nan=False)
    finetune: FinetuneConfig | None = None

    @field_validator("predictor")
    @classmethod
    def _known_predictor(cls, spec: Spec) -> Spec:
        return _check_spec(PREDICTORS, spec)

    @field_validator("transporter")
    @classmethod
    def _known_blocks(cls, specs: list[Spec]) -> list[Spec]:
        for spec in specs:
            _check_spec(BLOCKS, spec)
        return specs

    @model_validator(mode="after")
    def _ntm_only_fields(self) -> ModelConfig:
        if self.kind == "flow_matching":
            for name in ("transporter", "finetune", "x0_mse_weight"):
                if getattr(self, name):
                    raise ValueError(f"{name} is an NTM setting; kind='flow_matching' has none")
        return self

    @classmethod
    def finetuned_from(
        cls,
        flow_matching: ModelConfig,
        transporter: Sequence[Spec | dict] = (),
        schedule: ScheduleConfig | None = None,
        no_delta_mean: bool = False,
        aux_weight: float = 2.5,
        aux_steps: int = 1000,
        **fields,
    ) -> ModelConfig:
        """The config of ``NTM.from_flow_matching(fm, transporter, ...)`` for the FM model of
        ``flow_matching``: what a checkpoint of the finetuned model is reloaded from.

        Example:
            >>> fm = toy_flow_matching_config(predictor_hidden=[16])
            >>> config = ModelConfig.finetuned_from(fm, no_delta_mean=True)
            >>> model = config.build()
            >>> model.teacher is None, model.no_delta_mean, model.predictor.target
            (True, True, 'velocity')
        """
        if flow_matching.kind != "flow_matching":
            raise ValueError(
                f"finetuned_from expected a kind='flow_matching' config, got {flow_matching.kind!r}"
            )
        finetune = FinetuneConfig(
            no_delta_mean=no_delta_mean, aux_weight=aux_weight, aux_steps=aux_steps
        )
        return cls(
            kind="ntm",
            predictor=flow_matching.predictor,
            transporter=list(transporter),
            schedule=flow_matching.schedule if schedule is None else schedule,
            finetune=finetune,
            **fields,
        )

    def build(self) -> nn.Module:
        """Instantiates the model with fresh parameters.

        A finetuned NTM (``finetune`` set) is built without its teacher: load its weights
        from the checkpoint; the auxiliary loss stays off.
        """
        predictor = PREDICTORS.build(self.predictor)
        if self.kind == "flow_matching":
            return FlowMatching(predictor, self.schedule, cfg_dropout=self.cfg_dropout)
        transporter = Sequential.from_specs(self.transporter)
        model = NTM(
            transporter,
            predictor,
            self.schedule,
            mode=self.mode,
            cfg_dropout=self.cfg_dropout,
            time_independent_transporter=self.time_independent_transporter,
            x0_mse_weight=self.x0_mse_weight,
        )
        if self.finetune is not None:
            model.prepare_finetuning(**self.finetune.model_dump())
        return model


def toy_ntm_config(
    features: int = 2,
    predictor_hidden: Sequence[int] = (256, 256, 256),
    transporter_layers: int = 4,
    transporter_hidden: Sequence[int] = (32, 32),
    steps: Sequence[int] = (2, 4, 8),
    mode: Literal["end_to_end", "pairwise"] = "pairwise",
    steps_weighting: StepsWeighting = "uniform",
    x0_mse_weight: float = 0.0,
) -> ModelConfig:
    """An NTM for low-dimensional vector data: spline couplings and an MLP predictor.

    The transporter is ``transporter_layers`` rational-quadratic spline couplings, conditioned
    on the level's time and ``T``, alternating which half moves; each starts as the identity,
    so the untrained model is a Gaussian reverse chain. ``transporter_layers=0`` *is* that
    chain (the paper's no-transporter ablation). One model serves every ``T`` in ``steps``.
    ``steps_weighting="transitions"`` draws ``T`` with probability ``∝ T`` (every transition
    equally often) instead of uniformly; on the toy benchmark it made ``T = 4`` worse, so the
    default stays uniform (see the toy results page). ``x0_mse_weight`` adds the NTM's x̂₀
    regression term to the loss (see :class:`~trajflow.ntm.NTM`).

    Example:
        >>> config = toy_ntm_config(transporter_layers=2)
        >>> config.kind, [spec.name for spec in config.transporter], config.schedule.steps
        ('ntm', ['spline_coupling', 'spline_coupling'], [2, 4, 8])
    """
    coupling = {"features": features, "hidden_features": list(transporter_hidden),
                "time_features": 16, "bins": 8, "bound": 4.0}  # fmt: skip
    return ModelConfig(
        kind="ntm",
        predictor={
            "name": "mlp",
            "kwargs": {"features": features, "hidden_features": list(predictor_hidden)},
        },
        transporter=[
            {"name": "spline_coupling", "kwargs": {**coupling, "parity": layer % 2 == 1}}
            for layer in range(transporter_layers)
        ],
        schedule={"steps": list(steps), "steps_weighting": steps_weighting},
        mode=mode,
        x0_mse_weight=x0_mse_weight,
    )


def toy_flow_matching_config(
    features: int = 2, predictor_hidden: Sequence[int] = (256, 256, 256)
) -> ModelConfig:
    """Flow matching with the MLP of :func:`toy_ntm_config` as its velocity network.

    Example:
        >>> toy_flow_matching_config().predictor.kwargs["target"]
        'velocity'
    """
    kwargs = {"features": features, "hidden_features": list(predictor_hidden), "target": "velocity"}
    return ModelConfig(kind="flow_matching", predictor={"name": "mlp", "kwargs": kwargs})
