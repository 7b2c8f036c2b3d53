"""The quick example of the home page: a spline flow from specs, its density and samples."""

# --8<-- [start:quickstart]
import torch

from trajflow import NormalizingFlow, Sequential

specs = [
    {"name": "actnorm", "kwargs": {"features": 2}},
    {"name": "spline_coupling", "kwargs": {"features": 2, "bins": 8}},
    {"name": "spline_coupling", "kwargs": {"features": 2, "bins": 8, "parity": True}},
]
flow = NormalizingFlow(Sequential.from_specs(specs), shape=(2,))
x = torch.randn(256, 2)
loss = -flow.log_prob(x).mean()  # exact log-density; the first call initialises ActNorm
loss.backward()
z, logdet = flow.transform(x)  # data -> latent, log|det dz/dx| of shape (256,)
samples = flow.sample(16, generator=torch.Generator().manual_seed(0))  # latent -> data
# --8<-- [end:quickstart]

assert logdet.shape == (256,) and samples.shape == (16, 2)
