"""Progress reports that suit where the output goes: a bar on a terminal, plain lines in a log.

tqdm redraws its bar with a carriage return many times a second. On a terminal that is what
you want; in a log file, a pipe or CI every redraw becomes text, and a two-minute run leaves
hundreds of them. :func:`progress_bar` returns a tqdm bar when its stream is a terminal (or
the code runs in a Jupyter notebook) and otherwise a :class:`LineProgress`, which prints one
plain line each time another ``every`` of the total is done (and at least every ``seconds``),
never a carriage return. Both have tqdm's ``update`` / ``set_postfix`` / ``set_description``
/ ``close`` API and work as context managers, so a loop needs no branch.

Example:
    >>> import io
    >>> log = io.StringIO()
    >>> with progress_bar(100, desc="train", file=log, every=0.5) as bar:
    ...     for step in range(100):
    ...         bar.update()
    ...         bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
    >>> print(log.getvalue(), end="")
    train: 50/100 (50%) ... loss=0.020
    train: 100/100 (100%) ... loss=0.010
    >>> "\\r" in log.getvalue()
    False
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Protocol, TextIO

__all__ = ["LineProgress", "ProgressBar", "is_interactive", "progress_bar"]


class ProgressBar(Protocol):
    """What :func:`progress_bar` returns: the part of tqdm's API the loops use."""

    n: int

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, **kwargs: Any) -> Any: ...

    def set_description(self, desc: str | None = None) -> Any: ...

    def close(self) -> Any: ...

    def __enter__(self) -> ProgressBar: ...

    def __exit__(self, *exc: object) -> Any: ...


def _in_notebook() -> bool:
    # A notebook's stderr is not a terminal, yet it renders tqdm's widget well.
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def is_interactive(file: TextIO | None = None) -> bool:
    """Whether ``file`` (default ``sys.stderr``) is a terminal or the cell output of a notebook.

    Example:
        >>> import io
        >>> is_interactive(io.StringIO())
        False
    """
    if file is None and _in_notebook():
        return True
    stream = sys.stderr if file is None else file
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class LineProgress:
    """Progress as plain lines: ``desc: n/total (p%) elapsed, rate, postfix``.

    A line is printed when ``n`` crosses another multiple of ``every · total``, when
    ``seconds`` have passed since the last line, and at :meth:`close` if the last count was
    not printed yet. A run of ``total`` steps therefore prints at most ``1/every + 1`` lines
    plus one per ``seconds`` of wall time.

    Args:
        total: Expected number of updates (``None``: unknown; lines come by time only).
        desc: Prefix of every line.
        initial: Starting count (e.g. the step a resumed run starts from).
        file: Where to print (default ``sys.stderr``).
        every: Fraction of ``total`` between two lines, in ``(0, 1]``.
        seconds: Also print when this many seconds passed since the last line (``None``:
            only by count).
        enabled: ``False`` prints nothing (the counts are still kept).

    Example:
        >>> import io
        >>> log = io.StringIO()
        >>> bar = LineProgress(4, desc="eval", file=log, every=0.5, initial=1)
        >>> bar.update(3)
        >>> bar.close()
        >>> log.getvalue().splitlines()[0].startswith("eval: 4/4 (100%)")
        True
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        initial: int = 0,
        file: TextIO | None = None,
        every: float = 0.1,
        seconds: float | None = 60.0,
        enabled: bool = True,
    ):
        if not 0 < every <= 1:
            raise ValueError(f"expected every in (0, 1], got {every}")
        if seconds is not None and seconds <= 0:
            raise ValueError(f"expected seconds > 0 or None, got {seconds}")
        self.total, self.desc, self.n, self.initial = total, desc, initial, initial
        self.file, self.seconds, self.enabled = file, seconds, enabled
        self.interval = max(1, math.ceil(every * total)) if total else None
        self.postfix: dict[str, Any] = {}
        self._start = self._last_time = time.perf_counter()
        self._last_n = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Adds ``n`` to the count; prints a line if an interval has passed."""
        self.n += n
        now = time.perf_counter()
        crossed = self.interval is not None and (
            self.n // self.interval > self._last_n // self.interval
            or (self.total is not None and self.n >= self.total > self._last_n)
        )
        timed = self.seconds is not None and now - self._last_time >= self.seconds
        if crossed or (timed and self.n != self._last_n):
            self._print(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Sets the ``key=value`` pairs shown at the end of the next lines."""
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str | None = None) -> None:
        """Sets the prefix of the next lines."""
        self.desc = desc or ""

    def close(self) -> None:
        """Prints the last count if no line showed it yet; further calls do nothing."""
        if not self._closed and self.n != self._last_n:
            self._print(time.perf_counter())
        self._closed = True

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _print(self, now: float) -> None:
        self._last_n, self._last_time = self.n, now
        if not self.enabled:
            return
        elapsed = now - self._start
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        if self.total:
            count += f" ({100 * self.n // self.total}%)"
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{elapsed:.1f}s", f"{rate:.3g} it/s"]
        parts += [f"{key}={_format_value(value)}" for key, value in self.postfix.items()]
        prefix = f"{self.desc}: " if self.desc else ""
        file = sys.stderr if self.file is None else self.file
        print(f"{prefix}{count} " + ", ".join(parts), file=file, flush=True)


def progress_bar(
    total: int | None,
    desc: str = "",
    initial: int = 0,
    enabled: bool = True,
    file: TextIO | None = None,
    every: float = 0.1,
    seconds: float | None = 60.0,
) -> ProgressBar:
    """A tqdm bar on a terminal or in a notebook, else a :class:`LineProgress`.

    Args:
        total: Expected number of updates.
        desc: Label of the bar or prefix of the lines.
        initial: Starting count.
        enabled: ``False`` shows nothing.
        file: Stream to write to (default ``sys.stderr``, as tqdm).
        every: For lines: fraction of ``total`` between two lines.
        seconds: For lines: at most this many seconds between two lines (``None``: no limit).

    Example:
        >>> import io
        >>> type(progress_bar(10, file=io.StringIO())).__name__
        'LineProgress'
    """
    if enabled and is_interactive(file):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, initial=initial, file=file, dynamic_ncols=True)
    return LineProgress(
        total, desc, initial=initial, file=file, every=every, seconds=seconds, enabled=enabled
    )
