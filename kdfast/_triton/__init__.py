"""Triton backend of kdfast: ``distill_forward`` (the calling contract is ``kdfast._spec``).

One kernel family (``kernel._distill_kernel``), specialised by ``tl.constexpr`` flags per loss kind.
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
No host synchronisation: nothing here reads a tensor's value.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from .kernel import _distill_kernel
from .topk import _topk_kernel

__all__ = ["distill_forward", "topk_forward", "block_size", "num_warps_for", "max_registers", "launch_config",
           "MAX_BLOCK"]

#: Upper bound of the column block. Register use grows with the elements each thread holds,
#: ``BLOCK / (32 * num_warps)`` (PERF-NOTES), and the register file caps a thread at
#: ``65536 / (32 * num_warps)`` registers: 16 elements per thread need ~80-120 registers for the
#: two-softmax kinds, which fits the 128 of a 16-warp program but not the 64 of a 32-warp one, so
#: the largest spill-free block is 16 x 32 x 16 = 8192 (``python -m kdfast.inspect`` measured
#: BLOCK = 16384 spilling at 32 warps for every softmax kind, and at 16 warps for DKD / LS / JSD /
#: WTTM). Longer rows loop over blocks. Override with the environment variable
#: ``KDFAST_TRITON_MAX_BLOCK`` (a power of two; tests use tiny values to exercise multi-block rows at
#: small C) or by assigning this attribute.
MAX_BLOCK = int(os.environ.get("KDFAST_TRITON_MAX_BLOCK", 8192))

_MIN_BLOCK = 16


def block_size(C: int, max_block: int | None = None) -> int:
    """BLOCK = next_power_of_2(C), clamped to [16, max_block]."""
    cap = MAX_BLOCK if max_block is None else max_block
    if cap & (cap - 1) or cap < 1:
        raise ValueError(f"KDFAST_TRITON_MAX_BLOCK must be a power of two, got {cap}")
    return max(min(triton.next_power_of_2(max(int(C), 1)), cap), min(_MIN_BLOCK, cap))


def num_warps_for(block: int) -> int:
    """Warps per row program: 16 elements of each input per thread, i.e. ``BLOCK / (32 * 16)``
    warps, clamped to [4, 16] (<= 512 threads, so a thread may use up to 128 registers). Register
    use grows with BLOCK / (32 * num_warps) (PERF-NOTES), so this keeps it about constant across
    blocks: BLOCK <= 2048 -> 4, 4096 -> 8, 8192 -> 16 (and 16 beyond, should MAX_BLOCK be raised)."""
    return int(min(max(block // 512, 4), 16))


#: 32-bit registers one thread block may use: 64K on every CUDA architecture Triton targets
#: (sm_70 .. sm_100), an architectural limit of CUDA, not a tuning constant.
REGISTERS_PER_BLOCK = 65536


def max_registers(num_warps: int) -> int:
    """The per-thread register budget a ``num_warps`` program can launch with (ptxas' 255 at most),
    passed to the compiler as ``maxnreg``. Without it ptxas sometimes settles on 64 registers and
    spills at 512 threads where 128 are available (measured: the LM kind, BLOCK 8192, sm_80)."""
    return int(min(255, REGISTERS_PER_BLOCK // (32 * num_warps)))


#: Block cap for float64 rows: each element takes two registers, and ``python -m kdfast.inspect
#: --dtypes fp64`` measured kd spilling ~1.2 KB per thread at BLOCK 8192 and dkd / jsd spilling at
#: 4096; 1024 is spill-free for every kind (fp64 is the gradcheck path, not a speed path).
MAX_BLOCK_FP64 = 1024


def launch_config(C: int, max_block: int | None = None, fp64: bool = False) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``C`` classes (``fp64``: float64 rows)."""
    cap = MAX_BLOCK if max_block is None else max_block
    b = block_size(C, min(cap, MAX_BLOCK_FP64) if fp64 else cap)
    return b, num_warps_for(b)


def vec_for(C: int, tensors) -> int:
    """The largest VEC (elements per 16 bytes of the narrowest dtype, halved as needed) dividing C
    and the row stride of every (N, C) tensor given (strides of single-row tensors are never used):
    the kernels take C and the strides in VEC units, so the compiler can emit 128-bit accesses
    whenever the rows are 16-byte aligned."""
    vec = 16 // min(t.element_size() for t in tensors)
    strides = [t.stride(0) for t in tensors if t.shape[0] > 1]
    while vec > 1 and (C % vec or any(s % vec for s in strides)):
        vec //= 2
    return vec


def _split(x: float) -> tuple[float, float]:
    """x = hi + lo with hi the nearest float32: fp64 kernels rebuild x to ~48 bits."""
    hi = float(np.float32(x))
    return hi, float(x - hi)


def distill_forward(z, v, zp, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, grad_v,
                    fparams, iparams) -> None:
    N, C = z.shape
    if N == 0:
        return
    kind, wttm, reverse, center, has_ce, ignore_index = (int(x) for x in iparams)
    ts, tt, scale, rho, alpha, beta = (float(x) for x in fparams)
    has_labels = labels is not None
    has_ce = bool(has_ce) and has_labels
    # CE's lse(z) equals the student lse at Ts when Ts == 1 (a Python float: no host sync)
    ce_shared = has_ce and kind in (0, 1, 4) and ts == 1.0
    block, num_warps = launch_config(C, fp64=z.dtype == torch.float64)
    acc = tl.float64 if z.dtype == torch.float64 else tl.float32
    dummy = d_out  # stands in for absent tensors (never read or written: constexpr flags)
    hi_lo = [_split(x) for x in (ts, tt, scale, rho, alpha, beta)]
    rows = [t for t in (z, v, zp, grad_z, grad_v) if t is not None]
    vec = vec_for(C, rows)
    _distill_kernel[(N,)](
        z, v, zp if zp is not None else z, labels if has_labels else dummy, kd_w, ce_w, grad_scale,
        d_out, ce_out,
        grad_z if grad_z is not None else dummy, grad_v if grad_v is not None else dummy,
        C // vec, z.stride(0) // vec, v.stride(0) // vec, zp.stride(0) // vec if zp is not None else 0,
        grad_z.stride(0) // vec if grad_z is not None else 0,
        grad_v.stride(0) // vec if grad_v is not None else 0,
        *[h for h, _ in hi_lo], *[lo for _, lo in hi_lo],
        ignore_index,
        KIND=kind, HAS_LABELS=has_labels, HAS_CE=has_ce, CE_SHARED=ce_shared,
        WTTM=bool(wttm) and kind == 0, REVERSE=bool(reverse) and kind == 0, HAS_ZP=zp is not None,
        CENTER=bool(center) and kind == 2, NEED_GZ=grad_z is not None, NEED_GV=grad_v is not None,
        ACC=acc, BLOCK=block, VEC=vec, num_warps=num_warps, maxnreg=max_registers(num_warps),
    )


def topk_forward(z, t_lp, t_idx, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, fparams,
                 iparams) -> None:
    """The top-k teacher form (``kdfast._ops.topk_distill``): ``t_lp`` (N, k) accumulation-dtype
    log-probabilities, ``t_idx`` (N, k) int64 classes; ``fparams = [T, scale]``,
    ``iparams = [renormalize, has_ce, ignore_index]``."""
    N, C = z.shape
    if N == 0:
        return
    renorm, has_ce, ignore_index = (int(x) for x in iparams)
    t, scale = (float(x) for x in fparams)
    has_labels = labels is not None
    has_ce = bool(has_ce) and has_labels
    block, num_warps = launch_config(C, fp64=z.dtype == torch.float64)
    K = t_lp.shape[1]
    dummy = d_out
    (t_hi, t_lo), (s_hi, s_lo) = _split(t), _split(scale)
    _topk_kernel[(N,)](
        z, t_lp, t_idx, labels if has_labels else dummy, kd_w, ce_w, grad_scale, d_out, ce_out,
        grad_z if grad_z is not None else dummy,
        C, K, z.stride(0), t_lp.stride(0), t_idx.stride(0),
        grad_z.stride(0) if grad_z is not None else 0,
        t_hi, t_lo, s_hi, s_lo, ignore_index,
        HAS_LABELS=has_labels, HAS_CE=has_ce, CE_SHARED=has_ce and t == 1.0, RENORM=bool(renorm),
        NEED_GZ=grad_z is not None, ACC=tl.float64 if z.dtype == torch.float64 else tl.float32,
        BLOCK=block, KBLOCK=max(16, triton.next_power_of_2(max(K, 1))), num_warps=num_warps,
        maxnreg=max_registers(num_warps),
    )
