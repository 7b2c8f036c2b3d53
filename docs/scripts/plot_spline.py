"""Draws docs/assets/spline.png: a random rational-quadratic spline, its inverse and log-slope.

Run from the repository root: ``python docs/scripts/plot_spline.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from trajflow.blocks import rational_quadratic_spline, spline_knots

BINS, BOUND = 8, 3.0
OUT = Path(__file__).resolve().parents[1] / "assets" / "spline.png"


def main() -> Path:
    generator = torch.Generator().manual_seed(4)
    # Unconstrained parameters, as a conditioner would output them.
    raw = 0.8 * torch.randn(3 * BINS - 1, generator=generator, dtype=torch.float64)
    widths, heights, derivatives = raw.split([BINS, BINS, BINS - 1])
    knots = spline_knots(widths, heights, derivatives, bound=BOUND)

    def spline(points: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        expand = [k.expand(points.shape[0], -1) for k in knots]
        return rational_quadratic_spline(points, *expand, inverse=inverse)

    grid = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    y, log_slope = spline(grid)
    x_back, _ = spline(y, inverse=True)
    assert (x_back - grid).abs().max() < 1e-9
    inverse, _ = spline(grid, inverse=True)

    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax in axes:
        ax.axvspan(-5, -BOUND, color="0.92")
        ax.axvspan(BOUND, 5, color="0.92")
        ax.grid(alpha=0.3)
        ax.set_xlim(-5, 5)
    axes[0].plot(grid, y, color="tab:blue", label="spline f")
    axes[0].plot(knots.x, knots.y, "o", color="tab:red", label=f"knots ({BINS} bins)")
    axes[0].plot(grid, grid, ":", color="0.5", label="identity")
    axes[0].set(title="forward y = f(x); identity tails (grey)", xlabel="x", ylabel="y")
    axes[1].plot(grid, inverse, color="tab:green", label="inverse f⁻¹")
    axes[1].plot(knots.y, knots.x, "o", color="tab:red", label="knots")
    axes[1].plot(grid, grid, ":", color="0.5")
    axes[1].set(title="inverse x = f⁻¹(y) (quadratic root)", xlabel="y", ylabel="x")
    axes[2].plot(grid, log_slope, color="tab:purple")
    axes[2].axhline(0, color="0.5", linestyle=":")
    axes[2].set(title="log f'(x): continuous, 0 on the tails", xlabel="x", ylabel="log f'(x)")
    for ax in axes[:2]:
        ax.legend(loc="upper left")
    figure.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(OUT, dpi=100)
    plt.close(figure)
    return OUT


if __name__ == "__main__":
    print(f"wrote {main()}")
