"""One way for tests and benches to change os.environ for a block and get it back as it was."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def environ(values: Mapping[str, str | None], replace: bool = False) -> Iterator[None]:
    """os.environ changed by `values` for the block (None: unset), each of those names given back its
    value (or its absence) afterwards. With `replace`, the environment is `values` alone for the block and
    is restored whole afterwards (load_settings reads the environment: settings of another stack)."""
    saved = dict(os.environ) if replace else {name: os.environ.get(name) for name in values}
    if replace:
        os.environ.clear()
    _apply(values)
    try:
        yield
    finally:
        if replace:
            os.environ.clear()
        _apply(saved)


def _apply(values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
