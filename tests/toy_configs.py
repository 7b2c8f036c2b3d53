"""Small model configs shared by the training, checkpoint, CLI, distributed and t2i tests."""

from __future__ import annotations

from trajflow.config import ModelConfig


def tiny_ntm(mode: str = "end_to_end") -> ModelConfig:
    """A 2-D NTM small enough to train for a few steps inside a test: two time-conditioned
    affine couplings and a 16-wide MLP predictor, trained with ``T`` in {2, 3}."""
    coupling = {"features": 2, "time_features": 8, "hidden_features": [8]}
    return ModelConfig(
        predictor={
            "name": "mlp",
            "kwargs": {"features": 2, "hidden_features": [16], "time_features": 8},
        },
        transporter=[
            {"name": "affine_coupling", "kwargs": {**coupling, "parity": layer == 1}}
            for layer in range(2)
        ],
        schedule={"steps": [2, 3]},
        mode=mode,
    )


def tiny_digits_t2i():
    """The ``tiny`` text-to-image preset on 8×8 digits (64 training images)."""
    from trajflow_t2i.presets import DataConfig, preset

    config = preset("tiny")
    config.data = DataConfig(name="digits", image_size=8, train_size=64)
    return config
