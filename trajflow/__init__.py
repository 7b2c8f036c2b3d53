"""trajflow: Normalizing Trajectory Models and the invertible blocks they are built from.

Example:
    >>> import trajflow
    >>> "spline_coupling" in trajflow.BLOCKS.names()
    True
"""

from trajflow import blocks
from trajflow.core import BLOCKS, Block, Context, Inverse, Sequential, sum_except_batch
from trajflow.flow import NormalizingFlow
from trajflow.registry import BlockSpec, Registry, Spec

__version__ = "0.1.0"

__all__ = [
    "BLOCKS",
    "Block",
    "BlockSpec",
    "Context",
    "Inverse",
    "NormalizingFlow",
    "Registry",
    "Sequential",
    "Spec",
    "blocks",
    "sum_except_batch",
]
