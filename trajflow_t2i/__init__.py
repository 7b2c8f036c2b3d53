"""trajflow_t2i: text-to-image Normalizing Trajectory Models built from trajflow components.

Example:
    >>> import trajflow_t2i
    >>> sorted(trajflow_t2i.PRESETS)
    ['base', 'paper', 'small', 'tiny']
    >>> "shapes" in trajflow_t2i.T2I_DATASETS and "builtin" in trajflow_t2i.TEXT_ENCODERS
    True
"""

from trajflow_t2i.data import T2I_DATASETS, make_split
from trajflow_t2i.model import AUTOENCODERS, TextToImage
from trajflow_t2i.pipeline import Pipeline
from trajflow_t2i.presets import PRESETS, T2IConfig, preset
from trajflow_t2i.text import TEXT_ENCODERS
from trajflow_t2i.weights import export_model, load_model

__all__ = [
    "AUTOENCODERS",
    "PRESETS",
    "T2I_DATASETS",
    "TEXT_ENCODERS",
    "Pipeline",
    "T2IConfig",
    "TextToImage",
    "export_model",
    "load_model",
    "make_split",
    "preset",
]
