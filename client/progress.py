"""Progress bars for the CLI's long commands, on stderr and only when stderr is a terminal:
piped or logged output stays free of carriage returns and redraws."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def bar(total: int | None = None, *, desc: str, unit: str, quiet: bool = False, **kw: Any) -> Any:
    """A tqdm bar on stderr; a silent one (same methods, draws nothing) when `quiet` or when
    stderr is not a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=quiet or not on_terminal(),
        dynamic_ncols=True,
        **kw,
    )
