"""Loads the compiled C++ CPU backend (``kdfast._C``), built by ``setup.py``."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def load():
    """The extension module; raises ImportError with a build hint if it was not built."""
    import torch  # noqa: F401  (the extension links against libtorch: load it first)
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(
            "kdfast's C++ CPU backend (kdfast._C) is not built: run "
            "`pip install -e . --no-build-isolation` (or `make build`) in the kdfast checkout"
        ) from e
    return _C


def available() -> bool:
    try:
        load()
    except ImportError:
        return False
    return True
