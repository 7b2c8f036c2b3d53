"""Flow-matching networks, transporters and configs shared by the FM and finetuning tests."""

from __future__ import annotations

import torch
from ntm_helpers import TINY_MLP, TINY_TRANSFORMER
from torch import nn

from trajflow import BLOCKS, PREDICTORS, Sequential
from trajflow.predictors import Predictor
from trajflow.testing import perturb_parameters

F64 = torch.float64
D = 2


#: Parts of a predictor that flow-matching training never reaches (no t_out, T or δ in FM).
UNUSED_BY_FM = ("target_time.", "delta_head.")


def as_if_fm_trained(net: Predictor, seed: int) -> Predictor:
    """Perturbs what FM training moves; the (t_out, T) and δ heads keep their zero init
    (test_fm_training_never_reaches_the_ntm_only_heads checks they get no gradient)."""
    perturb_parameters(net, scale=0.2, seed=seed)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.startswith(UNUSED_BY_FM):
                parameter.zero_()
    return net


def velocity_mlp(seed: int = 0, cond_features: int = 0) -> Predictor:
    torch.manual_seed(seed)
    net = PREDICTORS.build(
        "mlp", features=D, **TINY_MLP, target="velocity", cond_features=cond_features
    ).double()
    return as_if_fm_trained(net, seed)


def velocity_transformer(seed: int = 0) -> Predictor:
    torch.manual_seed(seed)
    net = PREDICTORS.build("trajectory_transformer", **TINY_TRANSFORMER, target="velocity").double()
    return as_if_fm_trained(net, seed)


def identity_transporter(features: int = D) -> Sequential:
    """Identity-initialised, time-conditioned couplings (zero output layers)."""
    return Sequential(
        BLOCKS.build("affine_coupling", features=features, hidden_features=[8], time_features=8),
        BLOCKS.build(
            "affine_coupling", features=features, hidden_features=[8], time_features=8, parity=True
        ),
    ).double()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


#: An NTM and a flow-matching ModelConfig, as JSON.
NTM_CONFIG = {
    "kind": "ntm",
    "predictor": {"name": "mlp", "kwargs": {"features": 2, "hidden_features": [8]}},
    "transporter": [
        {"name": "affine_coupling", "kwargs": {"features": 2, "time_features": 8}},
        {"name": "reverse"},
    ],
    "schedule": {"grid": "shifted", "shift": 0.3, "steps": [2, 4]},
    "mode": "pairwise",
    "cfg_dropout": 0.2,
}
FM_CONFIG = {
    "kind": "flow_matching",
    "predictor": {
        "name": "mlp",
        "kwargs": {"features": 2, "hidden_features": [8], "target": "velocity"},
    },
    "schedule": {"t_min_eval": 0.01},
}


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}
