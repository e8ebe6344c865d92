"""Loads the compiled C++ CPU backend (``kdfast._C``), built by ``setup.py``."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def load():
    """The extension module; raises ImportError with a build hint if it was not built.
    (torch is imported first, at module level: the extension links against libtorch.)"""
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(
            "kdfast's C++ CPU backend (kdfast._C) is not built: run "
            "`pip install -e . --no-build-isolation` (or `make build`) in the kdfast checkout"
        ) from e
    # the row kernel for the ISA ATen itself chose for this CPU (honours ATEN_CPU_CAPABILITY)
    _C.select_isa(torch.backends.cpu.get_cpu_capability())
    return _C


def isa() -> str:
    """The ISA whose kernel the CPU backend runs ("AVX512", "AVX2" or "DEFAULT")."""
    return load().isa()


@torch.compiler.assume_constant_result   # under torch.compile: evaluated once at trace time
def available() -> bool:
    try:
        load()
    except ImportError:
        return False
    return True
