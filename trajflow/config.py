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

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from trajflow.core import BLOCKS, Sequential
from trajflow.flow_matching import FlowMatching
from trajflow.ntm import NTM
from trajflow.predictors import PREDICTORS
from trajflow.registry import Spec
from trajflow.schedules import ScheduleConfig

__all__ = ["ModelConfig", "toy_flow_matching_config", "toy_ntm_config"]


class ModelConfig(BaseModel):
    """An NTM (``kind="ntm"``) or a flow-matching model (``kind="flow_matching"``).

    Attributes:
        kind: Which model.
        predictor: Registered predictor spec (``PREDICTORS``).
        transporter: Block specs of the NTM transporter (``BLOCKS``); empty = identity.
        schedule: Trajectory schedule.
        mode: NTM training mode.
        cfg_dropout: Condition dropout in training.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["ntm", "flow_matching"] = "ntm"
    predictor: Spec
    transporter: list[Spec] = Field(default_factory=list)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    mode: Literal["end_to_end", "pairwise"] = "end_to_end"
    cfg_dropout: float = Field(0.1, ge=0, lt=1)

    @field_validator("predictor")
    @classmethod
    def _known_predictor(cls, spec: Spec) -> Spec:
        PREDICTORS.check(spec.name)
        return spec

    @field_validator("transporter")
    @classmethod
    def _known_blocks(cls, specs: list[Spec]) -> list[Spec]:
        for spec in specs:
            BLOCKS.check(spec.name)
        return specs

    def build(self) -> nn.Module:
        """Instantiates the model with fresh parameters."""
        predictor = PREDICTORS.build(self.predictor)
        if self.kind == "flow_matching":
            return FlowMatching(predictor, self.schedule, cfg_dropout=self.cfg_dropout)
        transporter = Sequential.from_specs(self.transporter)
        return NTM(
            transporter, predictor, self.schedule, mode=self.mode, cfg_dropout=self.cfg_dropout
        )


def toy_ntm_config(
    features: int = 2,
    predictor_hidden: Sequence[int] = (256, 256, 256),
    transporter_layers: int = 4,
    transporter_hidden: Sequence[int] = (32, 32),
    steps: Sequence[int] = (2, 4, 8),
    mode: Literal["end_to_end", "pairwise"] = "pairwise",
) -> ModelConfig:
    """An NTM for low-dimensional vector data: spline couplings and an MLP predictor.

    The transporter is ``transporter_layers`` rational-quadratic spline couplings, conditioned
    on the level's time and ``T``, alternating which half moves; each starts as the identity,
    so the untrained model is a Gaussian reverse chain. ``transporter_layers=0`` *is* that
    chain (the paper's no-transporter ablation). One model serves every ``T`` in ``steps``.

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
        schedule={"steps": list(steps)},
        mode=mode,
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
