"""How long loops report their progress: a ``Progress`` wraps an iterable, given a description and
the number of items (the CLI passes a tqdm bar, the API a callable of the caller's);
``no_progress`` is the silent default."""
from __future__ import annotations

from collections.abc import Callable, Iterable

Progress = Callable[[Iterable, str, int], Iterable]


def no_progress(iterable: Iterable, desc: str, total: int) -> Iterable:
    return iterable
