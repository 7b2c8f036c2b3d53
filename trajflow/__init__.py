"""trajflow: Normalizing Trajectory Models and the invertible blocks they are built from.

Example:
    >>> import trajflow
    >>> "spline_coupling" in trajflow.BLOCKS.names()
    True
"""

from trajflow import blocks
from trajflow.core import BLOCKS, Block, Context, Inverse, Sequential, sum_except_batch
from trajflow.data import DATASETS, sample_dataset
from trajflow.flow import NormalizingFlow
from trajflow.flow_matching import FlowMatching
from trajflow.ntm import NTM
from trajflow.predictors import PREDICTORS
from trajflow.registry import BlockSpec, Registry, Spec
from trajflow.schedules import SCHEDULES, ScheduleConfig

__version__ = "0.1.0"

__all__ = [
    "BLOCKS",
    "DATASETS",
    "NTM",
    "PREDICTORS",
    "SCHEDULES",
    "Block",
    "BlockSpec",
    "Context",
    "FlowMatching",
    "Inverse",
    "NormalizingFlow",
    "Registry",
    "ScheduleConfig",
    "Sequential",
    "Spec",
    "blocks",
    "sample_dataset",
    "sum_except_batch",
]
