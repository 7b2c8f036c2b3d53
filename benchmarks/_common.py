"""Shared pieces of the benchmark scripts: fingerprint, timing, JSON, tables, charts, targets.

Every benchmark script writes a JSON file holding a hardware/software :func:`fingerprint`
next to its records, prints a markdown table, and saves a PNG chart with the same stem
when matplotlib is available. Timings are medians of wall-clock repeats, synchronising
CUDA around each call so queued kernels are counted.

Example:
    >>> seconds = timeit(lambda: sum(range(1000)), warmup=1, repeats=3)
    >>> seconds > 0
    True
    >>> print(markdown_table([{"op": "sum", "ms": 1.5}], ["op", "ms"]))
    | op  | ms  |
    | --- | --- |
    | sum | 1.5 |
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Target",
    "device_name",
    "fingerprint",
    "format_value",
    "markdown_table",
    "pyplot",
    "resolve_devices",
    "synchronize",
    "timeit",
    "timeit_interleaved",
    "write_json",
]


def device_name(device: torch.device | str) -> str:
    """A human-readable name of ``device``: the GPU model, or the CPU's."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model() or platform.processor() or platform.machine() or "cpu"


def _cpu_model() -> str | None:
    """The CPU model from ``/proc/cpuinfo`` (Linux), or None."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else None


def fingerprint(devices: Sequence[torch.device | str] = ("cpu",)) -> dict[str, Any]:
    """What a result depends on: devices, library versions, threads, interpreter, OS, date.

    Args:
        devices: The devices the benchmark ran on.

    Returns:
        A JSON-serialisable dict.
    """
    return {
        "devices": {str(device): device_name(device) for device in devices},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # At the end of the run. Other processes skew timings: a load above cpu_count means
        # the run was contended.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def resolve_devices(choice: str) -> list[torch.device]:
    """Devices to run on: ``"auto"`` means the CPU, plus CUDA when it is available.

    Raises:
        SystemExit: If CUDA is asked for but not available.
    """
    if choice == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {choice}: CUDA is not available here")
    return [device]


def synchronize() -> None:
    """Waits for queued CUDA work, if CUDA is in use; a no-op on CPU-only runs."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], warmup: int = 2, repeats: int = 10) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` calls.

    Args:
        fn: The work to time, without arguments.
        warmup: Untimed calls first (allocator, caches, lazy initialisation, compilation).
        repeats: Timed calls; the median is robust to a stray slow one.

    Returns:
        The median duration in seconds.
    """
    return timeit_interleaved([fn], warmup, repeats)[0]


def timeit_interleaved(
    fns: Sequence[Callable[[], object]], warmup: int = 2, repeats: int = 10
) -> list[float]:
    """Like :func:`timeit` for several functions, calling them in turn within each repeat.

    Interleaving makes ratios between the functions robust to load that changes during the
    run (other processes, thermal throttling): each one sees the same conditions.

    Returns:
        The median seconds of each function, in the order given.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"timing needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        for fn in fns:
            fn()
    synchronize()
    durations: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, durations, strict=True):
            start = time.perf_counter()
            fn()
            synchronize()
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in durations]


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` as indented JSON, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, allow_nan=True) + "\n"
    # Through a temporary file: an interrupted run never leaves a half-written result.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def format_value(value: object) -> str:
    """Formats a table cell: floats to 4 significant digits, ``None`` as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def summarize(names: Sequence[str], table: Callable[[list[dict[str, Any]]], str]) -> dict:
    """Prints ``table`` of the JSON result files ``names`` (a script's ``--summarize``)."""
    results = [json.loads(Path(name).read_text()) for name in names]
    print(table(results))
    return {"summary": results}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` with the given ``columns`` (missing cells are dashes)."""
    cells = [[format_value(row.get(column)) for column in columns] for row in rows]
    widths = [
        max([len(column), 3, *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)
    ]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    return "\n".join(
        [line(columns), line(["-" * w for w in widths]), *(line(values) for values in cells)]
    )


class Target:
    """A performance target: a measured value against a limit, ``at most`` or ``at least``.

    Args:
        name: What is measured, e.g. ``"spline forward / floor (cpu)"``.
        value: The measured value.
        limit: The bound it must respect.
        at_most: True if the value must not exceed ``limit``, False if it must reach it.
        note: How to read the verdict, e.g. that a GPU target was measured on a CPU.

    Example:
        >>> Target("ratio", 1.3, 1.5).line()
        'PASS  ratio: 1.3 (target <= 1.5)'
    """

    def __init__(
        self,
        name: str,
        value: float,
        limit: float,
        *,
        at_most: bool = True,
        note: str | None = None,
    ):
        self.name = name
        self.value = value
        self.limit = limit
        self.at_most = at_most
        self.note = note

    @property
    def passed(self) -> bool:
        """Whether the value respects the limit."""
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def line(self) -> str:
        """A one-line ``PASS``/``MISS`` verdict."""
        verdict = "PASS" if self.passed else "MISS"
        sign = "<=" if self.at_most else ">="
        line = f"{verdict}  {self.name}: {format_value(self.value)} (target {sign} {self.limit})"
        return line if self.note is None else f"{line} [{self.note}]"

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of the target and its verdict."""
        result = {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "at_most": self.at_most,
            "passed": self.passed,
        }
        return result if self.note is None else {**result, "note": self.note}


def pyplot() -> Any | None:
    """matplotlib's pyplot on the non-interactive Agg backend, or None if not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
