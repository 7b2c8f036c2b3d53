"""Argument checks of the public entry points: each failure names what was expected.

Bad input must end in a ValueError or TypeError that says which argument, what it should be
and what it was, never in NaN output or an error from deep inside torch.

Example:
    >>> check_count("NTM.sample", "n", 3)
    3
    >>> check_count("NTM.sample", "n", 0)
    Traceback (most recent call last):
    ...
    ValueError: NTM.sample expected n to be an integer >= 1, got 0
    >>> check_number("NTM.sample", "cfg", float("nan"), low=0.0)
    Traceback (most recent call last):
    ...
    ValueError: NTM.sample expected cfg to be a finite number >= 0, got nan
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor

__all__ = ["check_count", "check_data", "check_finite", "check_first_level", "check_number"]


def check_count(owner: str, name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integer ``>= minimum`` (``bool`` is not one).

    Raises:
        TypeError: If ``value`` is not an integer.
        ValueError: If it is below ``minimum``.
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{owner} expected {name} to be an integer >= {minimum}, "
            f"got {type(value).__name__} {value!r}"
        ) from None
    if count < minimum:
        raise ValueError(f"{owner} expected {name} to be an integer >= {minimum}, got {count}")
    return count


def check_number(
    owner: str,
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """``value`` as a ``float`` if it is a finite real number in the given range.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is not finite or lies outside the range.
    """
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if open_low else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if open_high else '<='} {high:g}")
    expected = f"{owner} expected {name} to be a finite number {' and '.join(bounds)}".rstrip()
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{expected}, got {type(value).__name__} {value!r}")
    number = float(value)
    below = low is not None and (number <= low if open_low else number < low)
    above = high is not None and (number >= high if open_high else number > high)
    if not math.isfinite(number) or below or above:
        raise ValueError(f"{expected}, got {number!r}")
    return number


def check_first_level(owner: str, name: str, value: object, grid, steps: int) -> float:
    """``value`` as a ``float`` if it lies in ``(0, t_1)`` of ``grid`` with ``steps`` steps:
    the cleanest level of a trajectory must lie below the first level of the grid."""
    value = check_number(owner, name, value, 0.0, 1.0, open_low=True, open_high=True)
    first = grid.levels(steps)[0].item()
    if value >= first:
        raise ValueError(
            f"{owner} expected {name} below t_1 = {first:.4g}, the first level of the "
            f"{steps}-step grid, got {value!r}"
        )
    return value


def check_finite(owner: str, name: str, x: Tensor) -> None:
    """Raises a ValueError counting the NaN and infinite entries of ``x``, if any."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        nan = int(torch.isnan(x).sum())
        inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{owner} expected finite values in {name}, got {nan} NaN and {inf} infinite "
            f"entries in a tensor of shape {tuple(x.shape)}"
        )


def check_data(
    owner: str,
    name: str,
    x: object,
    event_shape: tuple[int, ...],
    dtype: torch.dtype | None = None,
) -> None:
    """Validates a data batch ``(B, *event_shape)``: a finite floating tensor with ``B >= 1``.

    Args:
        owner: Who checks (used in the message). name: The argument's name.
        x: The batch. event_shape: The per-sample shape expected.
        dtype: The dtype expected (the model's), or ``None`` for any floating dtype.

    Raises:
        TypeError: If ``x`` is not a tensor, not floating-point, or not of ``dtype``.
        ValueError: For a wrong shape, an empty batch or NaN/infinite entries.
    """
    event = ", ".join(map(str, event_shape))
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner} expected {name} to be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner} expected floating-point {name}, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(
            f"{owner} expected {name} of dtype {dtype} (the model's), got {x.dtype}; "
            f"convert it with .to({dtype})"
        )
    if x.dim() != 1 + len(event_shape) or tuple(x.shape[1:]) != tuple(event_shape):
        raise ValueError(f"{owner} expected {name} of shape (B, {event}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{owner} expected at least one sample in {name}, got an empty batch")
    check_finite(owner, name, x)
