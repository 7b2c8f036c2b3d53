"""Write your own block: a sinh-arcsinh coupling, checked, registered and trained in a flow.

Run from the repository root: ``python docs/examples/custom_block.py``. Running it twice in
one process is harmless: the registration is skipped when the name is already taken.
The docs page ``docs/tutorials/custom_block.md`` includes this file section by section.
"""

from __future__ import annotations

# --8<-- [start:imports]
import math

import torch
from torch import Tensor, nn

from trajflow import BLOCKS, Block, Context, NormalizingFlow, Sequential
from trajflow.blocks import Coupling, soft_clamp
from trajflow.core import check_features, logdet_dtype, sum_except_batch
from trajflow.data import sample_dataset
from trajflow.testing import BlockReport, cast_context, check_block, perturb_parameters

# --8<-- [end:imports]


# --8<-- [start:coupling]
def log_cosh(u: Tensor) -> Tensor:
    """``log cosh(u)`` without overflow for large ``|u|``."""
    u = u.abs()
    return u + torch.log1p(torch.exp(-2 * u)) - math.log(2)


class SinhArcsinhCoupling(Coupling):
    """Coupling with the sinh-arcsinh transform ``y = sinh(b · asinh(x) - a)``.

    Per transformed feature, the conditioner gives a skew ``a`` and a raw tail weight; the
    tail weight is ``b = exp(log_b)`` with a soft-clamped ``log_b``. ``b > 1`` gives heavier
    tails, ``b < 1`` lighter ones. Zero parameters mean ``a = 0, b = 1``: the identity.

    Args:
        features: See `Coupling`.
        tail_bound: ``log_b = tail_bound · tanh(raw / tail_bound)``.
        **kwargs: ``context_features``, ``hidden_features``, ``time_features``, ``parity``.
    """

    params_per_feature = 2  # a and raw log b, for every transformed feature

    def __init__(self, features: int, *, tail_bound: float = 1.0, **kwargs):
        self.tail_bound = tail_bound  # set before super().__init__, which builds the MLP
        super().__init__(features, **kwargs)

    def transform(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32 arithmetic under bf16
        skew, raw = params.to(dtype).chunk(2, dim=-1)
        log_b = soft_clamp(raw, self.tail_bound)
        x = x.to(dtype)
        if inverse:  # here x is the latent y: x = sinh((asinh(y) + a) / b)
            u = (torch.asinh(x) + skew) * torch.exp(-log_b)
            # log dx/dy = -log b + log cosh(u) - ½ log(1 + y²)
            return torch.sinh(u), -log_b + log_cosh(u) - 0.5 * torch.log1p(x**2)
        u = torch.exp(log_b) * torch.asinh(x) - skew
        # log dy/dx = log b + log cosh(u) - ½ log(1 + x²)
        return torch.sinh(u), log_b + log_cosh(u) - 0.5 * torch.log1p(x**2)


# --8<-- [end:coupling]

# --8<-- [start:register]
NAME = "sinh_arcsinh_coupling"
if NAME not in BLOCKS:  # a script or notebook cell may run twice; a name registers once
    BLOCKS.register(NAME)(SinhArcsinhCoupling)
# --8<-- [end:register]


# --8<-- [start:check]
def check(seed: int = 0) -> BlockReport:
    """Checks the block in float64 at a perturbed, non-identity point."""
    generator = torch.Generator().manual_seed(seed)
    block, x, ctx = SinhArcsinhCoupling.example(generator)  # inherited from Coupling
    block = perturb_parameters(block.double(), scale=0.3, seed=seed)  # leave the identity
    x = 3 * x.double()  # reach into the tails, where b matters most
    return check_block(block, x, cast_context(ctx, torch.float64), atol=1e-8)


# --8<-- [end:check]


# --8<-- [start:flow]
def build_flow(features: int = 2, layers: int = 4) -> Sequential:
    """ActNorm, then sinh-arcsinh couplings of alternating parity, built from specs."""
    specs = [{"name": "actnorm", "kwargs": {"features": features}}]
    for layer in range(layers):
        kwargs = {"features": features, "hidden_features": [32, 32], "parity": layer % 2 == 1}
        specs.append({"name": NAME, "kwargs": kwargs})
    return Sequential.from_specs(specs)


def train(iterations: int = 150, seed: int = 0) -> tuple[float, float]:
    """Fits the flow to a toy dataset; returns the held-out log-likelihood before and after."""
    torch.manual_seed(seed)
    flow = NormalizingFlow(build_flow(), shape=(2,))
    test = sample_dataset("two_moons", 2000, seed=1_000)
    with torch.no_grad():
        before = flow.log_prob(test).mean().item()  # the first call also initialises ActNorm
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for step in range(iterations):
        loss = -flow.log_prob(sample_dataset("two_moons", 256, seed=step)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = flow.log_prob(test).mean().item()
    return before, after


# --8<-- [end:flow]


# --8<-- [start:scratch]
class LeakyReLUBlock(Block):
    """``y = x`` where ``x >= 0`` and ``y = α x`` elsewhere, with a learned ``α > 0`` per feature.

    Args:
        features: Size of the last dimension.
    """

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self.log_alpha = nn.Parameter(torch.zeros(features))  # α = 1: the identity

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        check_features("leaky_relu", x, self.features)  # dtype, (B, D) or (B, L, C), size
        log_alpha = self.log_alpha.to(x.dtype)
        negative = x < 0
        y = torch.where(negative, x * torch.exp(log_alpha), x)
        log_derivative = torch.where(negative, log_alpha, torch.zeros_like(x))
        return y, sum_except_batch(log_derivative.to(logdet_dtype(x)))

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        check_features("leaky_relu", y, self.features)
        log_alpha = self.log_alpha.to(y.dtype)
        negative = y < 0  # α > 0 keeps the sign, so y < 0 exactly where x < 0
        x = torch.where(negative, y * torch.exp(-log_alpha), y)
        log_derivative = torch.where(negative, -log_alpha, torch.zeros_like(y))
        return x, sum_except_batch(log_derivative.to(logdet_dtype(y)))

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        return cls(features=4), torch.randn(3, 6, 4, generator=generator), None


def check_scratch(seed: int = 0) -> BlockReport:
    """The same check for the from-scratch block, on token sequences ``(B, L, C)``."""
    block, x, ctx = LeakyReLUBlock.example(torch.Generator().manual_seed(seed))
    block = perturb_parameters(block.double(), scale=0.5, seed=seed)
    return check_block(block, x.double(), ctx, atol=1e-10)


# --8<-- [end:scratch]


def main() -> dict[str, object]:
    """Runs every step of the tutorial and prints what it measured."""
    report, scratch = check(), check_scratch()
    before, after = train()
    print(f"{NAME}: {report}")
    print(f"leaky_relu: {scratch}")
    print(f"held-out log-likelihood: {before:.3f} before, {after:.3f} after training")
    return {"report": report, "scratch_report": scratch, "before": before, "after": after}


if __name__ == "__main__":
    main()
