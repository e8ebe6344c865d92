"""Loads the compiled C++ CPU backend (``kdfast._C``), built by ``setup.py``."""
from __future__ import annotations

import functools
import os

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
    _C.pool_set_cap(pool_cap_bytes())
    return _C


def pool_cap_bytes() -> int:
    """The gradient pool's bound (``KDFAST_GRAD_POOL_MB``, default 4096; 0 turns the pool off).

    kdfast's CPU gradient buffers (and the fused linear chunk buffers) of 8 MiB and more come from a
    pool of its own (csrc/grad_pool.cpp): when autograd frees one, its memory returns to the pool and
    the next call of that size reuses its pages instead of faulting in fresh ones (on the 2-core dev
    machine a fresh 500 MB buffer costs ~100 ms to first touch, a reused one ~25 ms). The pool keeps at
    most this many bytes of free blocks; :func:`empty_pool` releases them."""
    return int(os.environ.get("KDFAST_GRAD_POOL_MB", "4096")) << 20


def pool_stats() -> dict:
    """The gradient pool's counters: hits, misses, evictions, free_blocks, free_bytes, cap."""
    keys = ("hits", "misses", "evictions", "free_blocks", "free_bytes", "cap")
    return dict(zip(keys, load().pool_stats()))


def empty_pool() -> None:
    """Release the gradient pool's free blocks to the system (buffers in use are not affected)."""
    load().pool_clear()


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
