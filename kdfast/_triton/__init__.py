"""Triton backend of kdfast: ``distill_forward`` (the calling contract is ``kdfast._spec``), the
fused multi-teacher ``multi_forward`` (the same kernel with M teacher rows per student row) and,
for the kinds of ``TRITON_PHASED_KINDS`` over a shard of the vocabulary, the two phases
``stats_forward`` / ``finish_forward`` (the same kernel again, ``PHASE`` 1 / 2, ``ROUND``).

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

from .._spec import (
    PHASED_KINDS, Divergence, KernelParams, Kind, Phase, TopkParams, stats_rounds, stats_width)
from .kernel import _distill_kernel
from .topk import _topk_kernel

__all__ = ["distill_forward", "multi_forward", "stats_forward", "finish_forward", "teacher_stride", "topk_forward",
           "block_size", "num_warps_for", "max_registers", "launch_config", "MAX_BLOCK"]

#: Upper bound of the column block. Register use grows with the elements each thread holds,
#: ``BLOCK / (32 * num_warps)`` (measured: ``python -m kdfast.aot``), and the register file
#: caps a thread at ``65536 / (32 * num_warps)`` registers: 16 elements per thread need ~80-120 registers for the
#: two-softmax kinds, which fits the 128 of a 16-warp program but not the 64 of a 32-warp one, so
#: the largest spill-free block is 16 x 32 x 16 = 8192 (``python -m kdfast.aot`` measured
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
    use grows with BLOCK / (32 * num_warps) (``python -m kdfast.aot``), so this keeps it about
    constant across blocks: BLOCK <= 2048 -> 4, 4096 -> 8, 8192 -> 16 (and 16 beyond, should
    MAX_BLOCK be raised)."""
    return int(min(max(block // 512, 4), 16))


#: 32-bit registers one thread block may use: 64K on every CUDA architecture Triton targets
#: (sm_70 .. sm_100), an architectural limit of CUDA, not a tuning constant.
REGISTERS_PER_BLOCK = 65536


def max_registers(num_warps: int) -> int:
    """The per-thread register budget a ``num_warps`` program can launch with (ptxas' 255 at most),
    passed to the compiler as ``maxnreg``. Without it ptxas sometimes settles on 64 registers and
    spills at 512 threads where 128 are available (measured: the LM kind, BLOCK 8192, sm_80)."""
    return int(min(255, REGISTERS_PER_BLOCK // (32 * num_warps)))


#: Triton's ``enable_fp_fusion`` (multiply + add contracted to an FMA), passed explicitly at every
#: launch and AOT compile: Triton 3.9 warns when it is left to the default, which changes in 3.10, and
#: the kernels must not change with Triton's default. On: the roundings the kernels rely on cancelling
#: (``d = 0`` exactly at the reference class, the label's logit recomputed as its lane was, ``x * hi +
#: x * lo`` for ``x / T``) come from the same expression evaluated for both operands, which the
#: compiler contracts the same way for both; contraction only removes roundings. Off was tried: dkd at
#: BLOCK 8192 then spills on sm_80 (tests/test_triton_aot.py). The interpreter, which runs the
#: randomised suite, does not contract: the compiled kernel is checked against float64 by
#: tests/test_cuda.py (``make gpu``).
FP_FUSION = True


#: Block cap for float64 rows: each element takes two registers, and ``python -m kdfast.aot
#: --dtypes fp64`` measured kd spilling ~1.2 KB per thread at BLOCK 8192 and dkd / jsd spilling at
#: 4096; 1024 is spill-free for every kind (fp64 is the gradcheck path, not a speed path).
MAX_BLOCK_FP64 = 1024


def launch_config(C: int, max_block: int | None = None, fp64: bool = False,
                  teachers: int = 1, vec: int = 1) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``C`` classes (``fp64``: float64 rows).

    Multi-teacher (``teachers`` = M > 1, ``multi_forward``): a program holds ``MB =
    next_power_of_2(M)`` teacher tiles of BLOCK columns, so the block is capped at ``cap // MB``
    (``MB * BLOCK`` within the single-teacher cap) and the warps follow the ``MB * BLOCK`` teacher
    elements (a thread holds as many teacher elements as one teacher at ``MB * BLOCK`` would give it,
    the student tile MB times fewer), but no more warps than leave each thread ``vec`` columns (the
    elements of one 128-bit access, 8 for bf16): with fewer, the compiler lays the teacher tile out
    across warps and loads narrower (``python -m kdfast.aot --teachers 4``: bf16 at 16 warps
    got 64-bit loads and an 8 KB shared-memory layout conversion). A thread then holds at least
    ``MB * vec`` teacher elements. Measured spill-free (``python -m kdfast.aot --teachers``,
    C = 32000): M <= 4 for every kind in fp32 / bf16 (sm_80, sm_90a), M <= 4 in fp64, M = 8 in fp32
    (kd, dkd, ls_kd, jsd at sm_80; jsd at 255 registers). 16-bit rows with M = 5..8 spill (dkd,
    ls_kd, jsd at sm_80: 4 to 600 bytes per thread): correct, slower."""
    cap = MAX_BLOCK if max_block is None else max_block
    if fp64:
        cap = min(cap, MAX_BLOCK_FP64)
    mb = triton.next_power_of_2(max(int(teachers), 1))
    b = block_size(C, max(cap // mb, 1))
    nw = num_warps_for(b * mb)
    if mb > 1:
        nw = min(nw, max(b // (32 * max(int(vec), 1)), 4))
    return b, nw


def vec_for(C: int, tensors, strides=()) -> int:
    """The largest VEC (elements per 16 bytes of the narrowest dtype, halved as needed) dividing C,
    the row stride of every (N, C) tensor given (strides of single-row tensors are never used) and
    the extra ``strides`` (elements: the teacher strides of ``multi_forward``): the kernels take C and
    the strides in VEC units, so the compiler can emit 128-bit accesses whenever the rows are 16-byte
    aligned."""
    vec = 16 // min(t.element_size() for t in tensors)
    strides = [t.stride(0) for t in tensors if t.shape[0] > 1] + [int(s) for s in strides]
    while vec > 1 and (C % vec or any(s % vec for s in strides)):
        vec //= 2
    return vec


def _split(x: float) -> tuple[float, float]:
    """x = hi + lo with hi the nearest float32: fp64 kernels rebuild x to ~48 bits."""
    hi = float(np.float32(x))
    return hi, float(x - hi)


def _launch(z, v, stride_vm, M, zp, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, grad_v,
            fparams, iparams, phase=Phase.FUSED, stats=None, coef=None, part=None, col0=0,
            vocab=0, round=0) -> None:
    """One launch of ``_distill_kernel`` over the N rows: ``v`` the first teacher's (N, C) rows,
    teacher m's at ``v + m * stride_vm`` elements; ``grad_v`` (M, N, C) (or (N, C) when M == 1).
    ``phase``: STATS writes ``stats`` (N, K) and takes no weights or outputs (None);
    FINISH reads ``stats`` = gstats (world, N, K) and writes ``coef`` / ``part`` too; STATS in a
    round > 0 reads ``stats`` = gprev (world, N, K_prev) and writes ``part`` (N, K_round)."""
    N, C = z.shape
    p = KernelParams.from_lists(fparams, iparams)
    kind = p.kind
    has_labels = labels is not None
    has_ce = p.has_ce and has_labels
    # CE's lse(z) equals the student lse at Ts when Ts == 1 (a Python float: no host sync)
    ce_shared = has_ce and kind in (Kind.KL, Kind.DKD, Kind.JSD) and p.t_student == 1.0
    mb = triton.next_power_of_2(M)
    acc = tl.float64 if z.dtype == torch.float64 else tl.float32
    # stands in for absent tensors (never read or written: constexpr flags)
    dummy = d_out if d_out is not None else stats
    if phase == Phase.STATS:
        kd_w = ce_w = grad_scale = d_out = ce_out = dummy
    world = stats.shape[0] if phase == Phase.FINISH or round > 0 else 0
    # the kernel's ts, tt, scale, rho, alpha, beta (each as hi + lo)
    hi_lo = [_split(x) for x in (p.t_student, p.t_teacher, p.scale, p.rho, p.alpha, p.beta)]
    gv_row, gv_m = 0, 0
    if grad_v is not None:
        gv_row = grad_v.stride(-2)
        gv_m = grad_v.stride(0) if (M > 1 and grad_v.dim() == 3) else 0
    gv_rows = grad_v[0] if grad_v is not None and grad_v.dim() == 3 else grad_v   # (N, C)
    rows = [t for t in (z, v, zp, grad_z, gv_rows) if t is not None]
    vec = vec_for(C, rows, [stride_vm if M > 1 else 0, gv_m])
    block, num_warps = launch_config(C, fp64=z.dtype == torch.float64, teachers=M,
                                     vec=16 // min(t.element_size() for t in rows))
    _distill_kernel[(N,)](
        z, v, zp if zp is not None else z, labels if has_labels else dummy, kd_w, ce_w, grad_scale,
        d_out, ce_out,
        grad_z if grad_z is not None else dummy, grad_v if grad_v is not None else dummy,
        C // vec, z.stride(0) // vec, v.stride(0) // vec, zp.stride(0) // vec if zp is not None else 0,
        grad_z.stride(0) // vec if grad_z is not None else 0, gv_row // vec,
        M, (stride_vm // vec) if M > 1 else 0, gv_m // vec, kd_w.stride(0) if M > 1 else 0,
        *[h for h, _ in hi_lo], *[lo for _, lo in hi_lo],
        p.ignore_index,
        stats if stats is not None else dummy, coef if coef is not None else dummy,
        part if part is not None else dummy, col0, vocab, world,
        KIND=int(kind), HAS_LABELS=has_labels, HAS_CE=has_ce, CE_SHARED=ce_shared,
        WTTM=p.wttm and kind == Kind.KL, REVERSE=p.reverse and kind == Kind.KL, HAS_ZP=zp is not None,
        CENTER=p.center and kind == Kind.LM, NEED_GZ=grad_z is not None, NEED_GV=grad_v is not None,
        ACC=acc, BLOCK=block, VEC=vec, MB=mb, PHASE=int(phase), ROUND=int(round),
        num_warps=num_warps,
        maxnreg=max_registers(num_warps), enable_fp_fusion=FP_FUSION,
    )


def distill_forward(z, v, zp, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, grad_v,
                    fparams, iparams) -> None:
    """One teacher: the contract of ``kdfast._spec``."""
    if z.shape[0] == 0:
        return
    _launch(z, v, 0, 1, zp, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, grad_v, fparams,
            iparams)


def teacher_stride(vs) -> int | None:
    """``d`` (elements) with ``vs[m].data_ptr() == vs[0].data_ptr() + m * d * element_size`` for
    every m, or None when the teachers are not equally spaced in memory (or differ in dtype, shape,
    strides or device). 0 for one teacher. ``stacked.unbind(0)`` of an (M, N, C) tensor gives its
    ``stride(0)``; any two same-layout tensors are "equally spaced" (d = their distance)."""
    v0 = vs[0]
    if len(vs) == 1:
        return 0
    es = v0.element_size()
    base = v0.data_ptr()
    for v in vs[1:]:
        if v.dtype != v0.dtype or v.shape != v0.shape or v.stride() != v0.stride() or v.device != v0.device:
            return None
    diff = vs[1].data_ptr() - base
    if diff % es:
        return None
    d = diff // es
    if any(vs[m].data_ptr() - base != m * d * es for m in range(2, len(vs))):
        return None
    return d


def multi_forward(z, vs, zp, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, grad_v,
                  fparams, iparams) -> None:
    """Fused multi-teacher distillation: per row i,
    ``loss_i = sum_m kd_w[m, i] * D(teacher m row i, student row i) + ce_w[i] * CE_i``, in ONE kernel
    launch (``_distill_kernel`` with ``MB = next_power_of_2(M)`` teacher slots): each program reads
    the student row once per pass and every teacher's row in the same pass.

    - ``z``, ``zp``, ``labels``, ``ce_w``, ``grad_scale``, ``ce_out``, ``grad_z``, ``fparams``,
      ``iparams``: as ``distill_forward`` (``kdfast._spec``): ignored rows -> 0, bad labels -> NaN,
      ``grad_z`` may alias ``z``. For retro_kd every teacher row is mixed with the same ``zp``:
      ``r_m = (1 - rho) v_m + rho zp``.
    - ``vs``: a list of M >= 1 teacher tensors (N, C), one dtype, ``stride(1) == 1``. When they are
      equally spaced in memory (same strides, ``data_ptr`` of ``vs[m]`` = that of ``vs[0]`` + m * d
      elements: the views of ``stacked.unbind(0)``, or any two teachers) the kernel reads them in
      place; otherwise they are first copied with ``torch.stack`` (M x N x C extra memory and traffic).
    - ``kd_w``: (M, N) contiguous, accumulation dtype: teacher m's weight on row i.
    - ``d_out``: (M, N) contiguous accumulation dtype: the UNWEIGHTED D of each teacher and row;
      ``ce_out`` (N,): CE once (0 without CE).
    - ``grad_z``: None or (N, C): ``grad_scale * (sum_m kd_w[m, i] dD_m/dz + ce_w[i] dCE/dz)``.
    - ``grad_v``: None or (M, N, C) in the teachers' dtype, ``stride(2) == 1``:
      ``grad_v[m] = grad_scale * kd_w[m, i] * dD_m/dv_m`` (times ``1 - rho`` for retro_kd).

    With M == 1 this is ``distill_forward`` (the same kernel specialisation, bit-identical results).
    """
    vs = list(vs)
    M = len(vs)
    if M == 0:
        raise ValueError("multi_forward needs at least one teacher")
    N, C = z.shape
    if tuple(kd_w.shape) != (M, N) or tuple(d_out.shape) != (M, N):
        raise ValueError(f"kd_w and d_out must be (M, N) = ({M}, {N}), got {tuple(kd_w.shape)} "
                         f"and {tuple(d_out.shape)}")
    if grad_v is not None and (grad_v.dim() != 3 or tuple(grad_v.shape) != (M, N, C) or grad_v.stride(2) != 1):
        raise ValueError(f"grad_v must be (M, N, C) = ({M}, {N}, {C}) with stride(2) == 1")
    if N == 0:
        return
    if not (kd_w.is_contiguous() and d_out.is_contiguous()):
        raise ValueError("kd_w and d_out must be contiguous")
    _launch_teachers(z, vs, zp, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, grad_v,
                     fparams, iparams)


def _launch_teachers(z, vs, zp, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, grad_v,
                     fparams, iparams, **phase) -> None:
    """``_launch`` for a list of M teachers (arguments checked): read in place when equally spaced,
    else stacked; M == 1 is the single-teacher launch (``kd_w``, ``d_out`` (M, N) and ``grad_v``
    (M, N, C), where given, taken at teacher 0)."""
    M = len(vs)
    d = teacher_stride(vs)
    if d is None:
        stacked = torch.stack(vs)   # a copy: the teachers are not equally spaced
        v0, d = stacked[0], stacked.stride(0)
    else:
        v0 = vs[0]
    if M == 1:
        grad_v1 = grad_v[0] if grad_v is not None else None
        kd_w1 = kd_w[0] if kd_w is not None else None
        d_out1 = d_out[0] if d_out is not None else None
        _launch(z, v0, 0, 1, zp, labels, kd_w1, ce_w, grad_scale, d_out1, ce_out, grad_z, grad_v1,
                fparams, iparams, **phase)
        return
    _launch(z, v0, d, M, zp, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, grad_v, fparams,
            iparams, **phase)


#: the kinds whose two phases this backend implements (of ``kdfast._spec.PHASED_KINDS``)
TRITON_PHASED_KINDS = frozenset({Kind.KL, Kind.DKD, Kind.LM, Kind.JSD, Kind.LS})


def _phase_check(z, vs, fparams, iparams, col0, vocab, what) -> tuple[list, KernelParams]:
    """The arguments both phases share: (the teachers as a list, the parameters)."""
    p = KernelParams.from_lists(fparams, iparams)
    if p.kind not in PHASED_KINDS or p.kind not in TRITON_PHASED_KINDS:
        raise ValueError(f"{what}: kind {p.kind.name} has no two-phase form in the Triton backend")
    vs = list(vs)
    if not vs:
        raise ValueError(f"{what} needs at least one teacher")
    C = z.shape[1]
    if not (0 <= int(col0) and int(col0) + C <= int(vocab)):
        raise ValueError(f"{what}: columns [col0, col0 + C) = [{col0}, {int(col0) + C}) are not "
                         f"within the vocabulary [0, {vocab})")
    return vs, p


def _f64_buffer(t, shape, name, what) -> None:
    if t.dtype != torch.float64 or tuple(t.shape) != tuple(shape) or not t.is_contiguous():
        raise ValueError(f"{what}: {name} must be float64 {tuple(shape)} contiguous, got "
                         f"{t.dtype} {tuple(t.shape)}")


def stats_forward(z, vs, zp, labels, stats, fparams, iparams, col0, vocab, round=0,
                  gprev=None) -> None:
    """Phase 1 over a shard of the vocabulary (``kdfast._spec``, "Two phases"): each row's
    statistics over this rank's columns ``[col0, col0 + C)`` into ``stats`` (N, K) float64 (the
    kind's layout in ``round``). ``labels``: global class ids. ``gprev``: for a round > 0 (JSD), the
    earlier rounds' gathered statistics (world, N, K_0 + ... + K_{round - 1})."""
    vs, p = _phase_check(z, vs, fparams, iparams, col0, vocab, "stats_forward")
    M, N = len(vs), z.shape[0]
    rounds = stats_rounds(p)
    if not 0 <= round < rounds or (round > 0) != (gprev is not None):
        raise ValueError(f"stats_forward: kind {p.kind.name} has {rounds} round(s) of statistics "
                         f"(gprev from round 1 on), got round {round}"
                         f"{' with' if gprev is not None else ' without'} gprev")
    _f64_buffer(stats, (N, stats_width(p, M, round)), "stats", "stats_forward")
    if gprev is not None:
        if gprev.dim() != 3 or gprev.shape[0] < 1:
            raise ValueError(f"stats_forward: gprev must be (world, N, K), got {tuple(gprev.shape)}")
        _f64_buffer(gprev, (gprev.shape[0], N, _width(p, M, round)), "gprev", "stats_forward")
    if N == 0:
        return
    if round == 0:
        _launch_teachers(z, vs, zp, labels, None, None, None, None, None, None, None, fparams,
                         iparams, phase=Phase.STATS, stats=stats, col0=int(col0), vocab=int(vocab))
    else:
        _launch_teachers(z, vs, zp, labels, None, None, None, None, None, None, None, fparams,
                         iparams, phase=Phase.STATS, stats=gprev, part=stats, col0=int(col0),
                         vocab=int(vocab), round=int(round))


def _width(p, M, rounds) -> int:
    """The columns of the first ``rounds`` rounds' statistics, concatenated."""
    return sum(stats_width(p, M, r) for r in range(rounds))


def finish_forward(z, vs, zp, labels, kd_w, ce_w, grad_scale, gstats, d_out, ce_out, coef, part,
                   grad_z, grad_v, fparams, iparams, col0, vocab) -> None:
    """Phase 2 (``kdfast._spec``, "Two phases"): the ranks' statistics ``gstats`` (world, N, K;
    every round's, concatenated) combined per row, then this rank's columns' gradients (as ``multi_forward`` writes
    those columns of the whole rows) and the loss terms as ``b + a log1p(X)``: ``b`` in ``d_out``
    (M, N) / ``ce_out`` (N,), ``a`` in ``coef`` and this rank's part of X in ``part`` ((M + 1, N)
    float64; sum ``part`` over the ranks, then ``kdfast._spec.finish_terms``)."""
    vs, p = _phase_check(z, vs, fparams, iparams, col0, vocab, "finish_forward")
    M = len(vs)
    N, C = z.shape
    if tuple(kd_w.shape) != (M, N) or tuple(d_out.shape) != (M, N):
        raise ValueError(f"kd_w and d_out must be (M, N) = ({M}, {N}), got {tuple(kd_w.shape)} "
                         f"and {tuple(d_out.shape)}")
    if not (kd_w.is_contiguous() and d_out.is_contiguous()):
        raise ValueError("kd_w and d_out must be contiguous")
    if grad_v is not None and (grad_v.dim() != 3 or tuple(grad_v.shape) != (M, N, C) or grad_v.stride(2) != 1):
        raise ValueError(f"grad_v must be (M, N, C) = ({M}, {N}, {C}) with stride(2) == 1")
    if gstats.dim() != 3 or gstats.shape[0] < 1:
        raise ValueError(f"finish_forward: gstats must be (world, N, K), got {tuple(gstats.shape)}")
    _f64_buffer(gstats, (gstats.shape[0], N, _width(p, M, stats_rounds(p))), "gstats",
                "finish_forward")
    _f64_buffer(coef, (M + 1, N), "coef", "finish_forward")
    _f64_buffer(part, (M + 1, N), "part", "finish_forward")
    if N == 0:
        return
    _launch_teachers(z, vs, zp, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, grad_v,
                     fparams, iparams, phase=Phase.FINISH, stats=gstats, coef=coef, part=part,
                     col0=int(col0), vocab=int(vocab))


def topk_forward(z, t_lp, t_idx, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z, fparams,
                 iparams) -> None:
    """The top-k teacher form (``kdfast._ops.topk_distill``): ``t_lp`` (N, k) accumulation-dtype
    log-probabilities, ``t_idx`` (N, k) int64 classes; ``fparams`` / ``iparams``: ``TopkParams``
    (``kdfast._spec``)."""
    N, C = z.shape
    if N == 0:
        return
    p = TopkParams.from_lists(fparams, iparams)
    if p.divergence != Divergence.FORWARD and not (p.renormalize or p.tail):
        raise ValueError("kdfast: topk reverse / JSD need renormalize or tail (a normalised support)")
    has_labels = labels is not None
    has_ce = p.has_ce and has_labels
    block, num_warps = launch_config(C, fp64=z.dtype == torch.float64)
    K = t_lp.shape[1]
    dummy = d_out
    (t_hi, t_lo), (s_hi, s_lo), (b_hi, b_lo) = _split(p.t), _split(p.scale), _split(p.beta)
    _topk_kernel[(N,)](
        z, t_lp, t_idx, labels if has_labels else dummy, kd_w, ce_w, grad_scale, d_out, ce_out,
        grad_z if grad_z is not None else dummy,
        C, K, z.stride(0), t_lp.stride(0), t_idx.stride(0),
        grad_z.stride(0) if grad_z is not None else 0,
        t_hi, t_lo, s_hi, s_lo, b_hi, b_lo, p.ignore_index,
        HAS_LABELS=has_labels, HAS_CE=has_ce, CE_SHARED=has_ce and p.t == 1.0, RENORM=p.renormalize,
        TAIL=p.tail, DIV=int(p.divergence),
        NEED_GZ=grad_z is not None, ACC=tl.float64 if z.dtype == torch.float64 else tl.float32,
        BLOCK=block, KBLOCK=max(16, triton.next_power_of_2(max(K, 1))), num_warps=num_warps,
        maxnreg=max_registers(num_warps), enable_fp_fusion=FP_FUSION,
    )
