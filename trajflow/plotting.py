"""Plot helpers (matplotlib is optional: ``pip install trajflow[plot]``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

__all__ = ["scatter_grid"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'trajflow[plot]'") from error
    return plt


def scatter_grid(
    panels: Mapping[str, Tensor],
    path: str | Path,
    *,
    columns: int = 4,
    limit: float = 4.0,
    title: str | None = None,
) -> Path:
    """Writes a grid of 2-D scatter plots, one panel per entry, to ``path`` (PNG).

    Args:
        panels: Titles mapped to ``(n, 2)`` point clouds.
        path: Output file; parent folders are created.
        columns: Panels per row.
        limit: Axes span ``[-limit, limit]``.
        title: Optional figure title.

    Returns:
        The path written.
    """
    plt = _pyplot()
    rows = -(-len(panels) // columns)
    columns = min(columns, len(panels))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for axis, (name, points) in zip(axes.flat, panels.items(), strict=False):
        points = points.detach().cpu().float()
        axis.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4, linewidths=0)
        axis.set_xlim(-limit, limit)
        axis.set_ylim(-limit, limit)
        axis.set_aspect("equal")
        axis.set_title(name, fontsize=9)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=110)  # write then rename: never a half-written PNG
    plt.close(figure)
    temporary.replace(path)
    return path
