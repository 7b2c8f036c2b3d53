"""Registered invertible blocks. Importing this package registers all of them in BLOCKS."""

from trajflow.blocks.coupling import AdditiveCoupling, AffineCoupling, Coupling, soft_clamp
from trajflow.blocks.image import Conv1x1, ImageActNorm, Squeeze
from trajflow.blocks.image_coupling import ConvAffineCoupling
from trajflow.blocks.linear import ActNorm, FixedPermutation, LULinear, Reverse
from trajflow.blocks.multiscale import MultiScale, glow_levels
from trajflow.blocks.spline import (
    SplineCoupling,
    SplineKnots,
    rational_quadratic_spline,
    spline_knots,
)
from trajflow.blocks.tarflow import TarFlowBlock

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "Conv1x1",
    "ConvAffineCoupling",
    "Coupling",
    "FixedPermutation",
    "ImageActNorm",
    "LULinear",
    "MultiScale",
    "Reverse",
    "SplineCoupling",
    "SplineKnots",
    "Squeeze",
    "TarFlowBlock",
    "glow_levels",
    "rational_quadratic_spline",
    "soft_clamp",
    "spline_knots",
]
