"""Progress bars on stderr for long phases (tqdm, imported only when a bar is shown).

Every CLI phase that can take more than a few seconds shows one; ``--no-progress`` turns them
off. Without tqdm installed (it comes with the ``data`` and ``train`` extras) work goes on
without a bar.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any


class _NoBar:
    """Stands in for a tqdm bar when bars are off."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


def progress_bar(
    *, total: int | None, desc: str, enabled: bool = True, unit: str = "it", initial: int = 0
) -> Any:
    """A tqdm bar on stderr (``update`` / ``close`` / ``set_postfix_str``) starting at ``initial``
    (a resumed job), or a no-op stand-in when ``enabled`` is false or tqdm is missing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(
        total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True
    )


def progress(
    items: Iterable, *, desc: str, enabled: bool = True, total: int | None = None, unit: str = "it"
) -> Iterator:
    """Iterate ``items`` with a bar (see :func:`progress_bar`); the bar closes at the end."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = progress_bar(total=total, desc=desc, enabled=enabled, unit=unit)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
