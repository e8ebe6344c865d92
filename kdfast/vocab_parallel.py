"""Vocabulary-parallel (tensor-parallel) distillation losses on ``torch.distributed``.

When the output layer is split along the vocabulary across the ranks of a process group
(Megatron-style tensor parallelism), each rank holds, for *every* row, only the columns
``[vocab_start, vocab_start + C_local)`` of the student and teacher logits. The losses here compute
the exact loss of :mod:`kdfast.functional` on the (never materialised) full rows with the fused
kernels split in two phases (kdfast/_spec.py, "Two phases"; :func:`_phased`):

- phase 1 (the backend's ``stats_forward``) reduces this rank's columns of every row to a few
  float64 statistics; **one all-gather** per round of statistics (one round; JSD at 0 < beta < 1
  two, ``ls_kd`` three) hands every rank every rank's;
- phase 2 (``finish_forward``) combines them, writes this rank's gradient columns and each row's
  loss terms in parts that sum over the ranks; **one all_reduce** sums the parts;
- the loss (a scalar, or per row with ``reduction="none"``) comes out **identical on every rank of
  the group**; the gradients were computed in the forward and stay local; backward only scales them
  by the upstream gradient and runs no collective.

This module holds the collectives and their bookkeeping; the loss math is the kernels'. The eager
path below (``_Shard`` and the ``_<kind>_kind`` functions: plain PyTorch on row chunks, 1 to 3
``all_reduce`` calls) remains only as the fallback where the backend has no two-phase kernel for
the kind (``backend="torch"``; Triton for the kinds other than KL, for now), to be removed when
Triton has them all.

Layout of the shards. Rank ``r`` (its rank *in the group*) holds the columns
``[vocab_start, vocab_start + C_local)``; ``C_local`` is the last dim of its tensors. With
``vocab_start=None`` and ``vocab_size=None`` the shards are taken to be equal:
``vocab_start = r * C_local`` and ``vocab_size = world * C_local`` (no communication). Uneven shards
(for example 37 classes as 10/9/9/9): pass ``vocab_start`` and ``vocab_size``, which
:func:`shard_bounds` computes once (one ``all_gather`` at setup time, not per call). The shards must
tile ``[0, vocab_size)`` exactly; that is not checked per call (it would cost a collective).

Replicated arguments. Labels (global class ids in ``[0, vocab_size)`` or ``ignore_index``),
``kd_weight`` / ``ce_weight`` tensors and the hyperparameters must be the same on every rank of the
group, as must the leading shape of the logits. With ``reduction="none"`` the upstream gradient of
the per-row losses must be the same on every rank too (it is, when every rank computes the same
function of the replicated loss, which is what tensor-parallel training does). The gradients of
``kd_weight`` / ``ce_weight`` are then the same on every rank (the weights are replicated
parameters, not sharded ones).

Arithmetic. The kernels' (float32 accumulation, float64 for float64 inputs; the statistics and the
loss parts in float64); the loss in the accumulation dtype, the gradients in the dtype of their
input. ``-inf`` teacher logits are classes of probability 0 (a rank may even hold only ``-inf``
teacher columns for a row). The eager fallback works on row chunks of at most ``_CHUNK_ELEMS``
local elements.

Data parallelism composes without anything special: each data-parallel rank has whole rows and the
loss is per row. With tensor and data parallelism together, pass the tensor-parallel group as
``process_group``. See ``docs/vocab-parallel.md``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as _F
from . import _ops
from ._ops import _reduce, acc_dtype, grad_scale, run_vocab_parallel
from ._spec import KernelParams, Kind, finish_terms, stats_rounds, stats_width
from .losses import REGISTRY

__all__ = ["vocab_parallel_loss", "shard_bounds", "METHODS"]   # + every <name>_loss of METHODS

_CHUNK_ELEMS = 1 << 18          # local elements per row chunk (bounds the temporaries)
_NEG_INF = float("-inf")
_MAX, _SUM = dist.ReduceOp.MAX, dist.ReduceOp.SUM


# ----------------------------------------------------------------------------- setup helpers
def shard_bounds(local_size: int, process_group) -> tuple[int, int]:
    """``(vocab_start, vocab_size)`` of this rank's shard from every rank's ``local_size`` (shards
    in rank order), with one ``all_gather``. Call it once at setup (the sizes do not change between
    steps) and pass the result to the losses::

        start, vocab = kdfast.vocab_parallel.shard_bounds(logits_shard.shape[-1], tp_group)
    """
    if isinstance(local_size, bool) or not isinstance(local_size, int) or local_size < 1:
        raise ValueError(f"local_size must be an int >= 1, got {local_size!r}")
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    sizes = [None] * world
    dist.all_gather_object(sizes, int(local_size), group=process_group)
    return int(sum(sizes[:rank])), int(sum(sizes))


def _layout(process_group, c_local: int, vocab_start, vocab_size) -> tuple[int, int, int, int]:
    """(rank, world, vocab_start, vocab_size), with the argument checks."""
    if process_group is None:
        raise ValueError("process_group is required (torch.distributed.group.WORLD for all ranks)")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocabulary-parallel losses need an initialised torch.distributed process group")
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    for name, x in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, int)):
            raise ValueError(f"{name} must be an int or None, got {type(x).__name__}")
    if vocab_start is None:
        if vocab_size is not None and vocab_size != world * c_local:
            raise ValueError(f"vocab_size={vocab_size} is not world_size * C_local = {world} * {c_local}: "
                             "uneven shards need vocab_start too (see shard_bounds)")
        return rank, world, rank * c_local, world * c_local
    if vocab_size is None:
        raise ValueError("vocab_start needs vocab_size (the global number of classes; see shard_bounds)")
    if vocab_start < 0 or vocab_start + c_local > vocab_size:
        raise ValueError(f"the shard [{vocab_start}, {vocab_start + c_local}) is not inside "
                         f"[0, vocab_size={vocab_size})")
    return rank, world, vocab_start, vocab_size


# ----------------------------------------------------------------------------- the per-call state
class _Shard:
    """The local rows of one call and what every loss kind shares (row chunks, labels, CE)."""

    def __init__(self, z, v, zp, y, kd_w, ce_w, p: KernelParams, reduction, group, rank, world,
                 start, vocab, need_gz, need_gv):
        self.z, self.v, self.zp, self.p = z, v, zp, p
        self.group, self.rank, self.world = group, rank, world
        self.n, self.cl = z.shape
        self.start, self.vocab = start, vocab
        self.acc = acc_dtype(z.dtype, v.dtype)
        dev = z.device
        self.has_ce = p.has_ce   # (prepare: labels given and ce_weight not the constant 0)
        if y is not None:
            self.valid = y != p.ignore_index
            yl = y - start
            self.own = self.valid & (yl >= 0) & (yl < self.cl)       # this rank holds the label column
            self.yl = yl.clamp(0, self.cl - 1).unsqueeze(1)           # (N, 1) local column (clamped)
        else:
            self.valid = self.own = self.yl = None
        self.gs = grad_scale(y, p.ignore_index, self.n, reduction, self.acc, dev)
        ck, cc = self.gs * kd_w, self.gs * ce_w        # the gradient's row coefficients
        if self.valid is not None:
            ck, cc = ck.masked_fill(~self.valid, 0.0), cc.masked_fill(~self.valid, 0.0)
        self.ck, self.cc = ck, cc
        self.gz = torch.empty(z.shape, dtype=z.dtype, device=dev) if need_gz else None
        self.gv = torch.empty(v.shape, dtype=v.dtype, device=dev) if need_gv else None
        step = max(1, _CHUNK_ELEMS // max(self.cl, 1))
        self.chunks = [slice(i, min(i + step, self.n)) for i in range(0, self.n, step)]

    # -- loading (upcast per chunk; the teacher row of retro_kd is the mix with the past student)
    def zc(self, sl):
        return self.z[sl].to(self.acc)

    def rc(self, sl):
        r = self.v[sl].to(self.acc)
        if self.zp is not None:
            r = (1 - self.p.rho) * r + self.p.rho * self.zp[sl].to(self.acc)
        return r

    def new(self, k: int, fill=0.0):
        return torch.full((self.n, k), fill, dtype=self.acc, device=self.z.device)

    def reduce(self, t: Tensor, op) -> Tensor:
        # looked up on the module at call time (the tests count the collectives by wrapping it)
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def at_label(self, x: Tensor, sl) -> Tensor:
        """x[i, y_i] on the rank owning the label column, 0 elsewhere (summed over ranks: exact)."""
        val = x.gather(1, self.yl[sl]).squeeze(1)
        return torch.where(self.own[sl], val, torch.zeros_like(val))

    def target_mask(self, sl) -> Tensor:
        cols = torch.arange(self.cl, device=self.z.device)
        return self.own[sl].unsqueeze(1) & (cols == self.yl[sl])

    # -- cross-entropy on the raw student logits (T = 1)
    def ce_grad_(self, g: Tensor, zc: Tensor, lse_z: Tensor, sl, sz: Optional[Tensor] = None) -> Tensor:
        """g += cc_i * (softmax(z) - onehot(y)) on this chunk, in place (``sz``: softmax(z) if known)."""
        cc = self.cc[sl].unsqueeze(1)
        if sz is None:
            sz = (zc - lse_z[sl].unsqueeze(1)).exp_()
        g.addcmul_(sz, cc)
        return g.scatter_add_(1, self.yl[sl], -(cc * self.own[sl].unsqueeze(1)))

    def store(self, buf: Optional[Tensor], g: Tensor, sl) -> None:
        """buf[sl] = g (g is a temporary: ignored rows are zeroed in it, NaN-safe)."""
        if self.valid is not None:
            g.masked_fill_(~self.valid[sl].unsqueeze(1), 0.0)
        buf[sl] = g


def _lse(m: Tensor, s: Tensor) -> Tensor:
    return m + torch.log(s)


def _rowsum(x: Tensor) -> Tensor:
    return x.sum(1)


def _finite_(x: Tensor) -> Tensor:
    """-inf -> the lowest finite value, in place (NaN stays NaN): a difference that is -inf only
    where its probability factor is exactly 0 then gives 0 * finite = 0, not NaN."""
    return x.clamp_min_(torch.finfo(x.dtype).min)


def _dot_(x: Tensor, e: Tensor) -> Tensor:
    """Row sums of e * x over the entries of nonzero e (-inf entries of x under e = 0 count 0);
    overwrites x."""
    return _finite_(x).mul_(e).sum(1)


def _masked(x: Tensor, zero: Tensor) -> Tensor:
    """x with the entries where ``zero`` holds set to 0 (0 * log 0 = 0 terms)."""
    return torch.where(zero, torch.zeros((), dtype=x.dtype), x)


# ----------------------------------------------------------------------------- the loss kinds
def _kl_kind(s: _Shard):
    """s * KL(p || q) (or KL(q || p) with ``reverse``), p = softmax(r / Tt), q = softmax(z / Ts);
    wttm: the factor U = exp(lse(v / T) - lse(v) / T). MAX + SUM."""
    p = s.p
    ts, tt = p.t_student, p.t_teacher
    mx = s.new(2)
    for sl in s.chunks:
        mx[sl, 0] = s.zc(sl).amax(1)
        mx[sl, 1] = s.rc(sl).amax(1)
    s.reduce(mx, _MAX)
    mz, mr = mx[:, 0], mx[:, 1]
    ma, mc = mz / ts, mr / tt        # x -> x / T is monotone: the maxima of z / Ts and r / Tt
    ce_sep = s.has_ce and ts != 1.0
    sv = p.wttm and tt != 1.0
    k = 3 + ce_sep + s.has_ce + sv
    acc = s.new(k)
    for sl in s.chunks:
        zc, rc = s.zc(sl), s.rc(sl)
        a, c = zc / ts, rc / tt                      # temporaries: modified in place below
        ea = (a - ma[sl, None]).exp_()
        ec = (c - mc[sl, None]).exp_()
        acc[sl, 0], acc[sl, 1] = ea.sum(1), ec.sum(1)
        if p.reverse:                                # sum_j e^{a_j} (a_j - c_j)
            acc[sl, 2] = _dot_(torch.sub(a, c, out=c), ea)
        else:                                        # sum_j e^{c_j} (c_j - a_j)
            acc[sl, 2] = _dot_(torch.sub(c, a, out=a), ec)
        j = 3
        if ce_sep:
            acc[sl, j] = (zc - mz[sl, None]).exp_().sum(1); j += 1
        if s.has_ce:
            acc[sl, j] = s.at_label(zc, sl); j += 1
        if sv:
            acc[sl, j] = (rc - mr[sl, None]).exp_().sum(1)
    s.reduce(acc, _SUM)
    lse_a, lse_c = _lse(ma, acc[:, 0]), _lse(mc, acc[:, 1])
    if p.reverse:
        e = acc[:, 2] / acc[:, 0]               # E_q[a - c]
        kl = e - lse_a + lse_c
    else:
        e = acc[:, 2] / acc[:, 1]               # E_p[c - a]
        kl = e - lse_c + lse_a
    if p.wttm:
        scale = torch.exp(lse_c - _lse(mr, acc[:, -1]) / tt) if sv else torch.ones_like(kl)
    else:
        scale = torch.full_like(kl, p.scale)
    d = scale * kl
    ce = lse_z = None
    if s.has_ce:
        lse_z = _lse(mz, acc[:, 3]) if ce_sep else lse_a
        ce = lse_z - acc[:, 3 + ce_sep]
    if s.gz is not None or s.gv is not None:
        ck = s.ck * scale
        cv = ck * (1 - p.rho) if s.zp is not None else ck      # retro_kd: d r / d v = 1 - rho
        for sl in s.chunks:
            zc, rc = s.zc(sl), s.rc(sl)
            a, c = zc / ts, rc / tt
            cz, cvs = ck[sl, None] / ts, cv[sl, None] / tt
            # the differences the gradients need, before a and c become q and p in place
            dv = torch.sub(c, a) if s.gv is not None and not p.reverse else None
            dz = torch.sub(a, c) if s.gz is not None and p.reverse else None
            q = a.sub_(lse_a[sl, None]).exp_()
            pp = c.sub_(lse_c[sl, None]).exp_()
            if s.gv is not None:
                if p.reverse:                                    # (s / T) (p - q)
                    g = torch.sub(pp, q).mul_(cvs)
                else:                                            # (s / T) p ((c - a) - E_p[c - a])
                    g = _finite_(dv.sub_(e[sl, None])).mul_(pp).mul_(cvs)
                s.store(s.gv, g, sl)
            if s.gz is not None:
                if p.reverse:                                    # (s / T) q ((a - c) - E_q[a - c])
                    g = _finite_(dz.sub_(e[sl, None])).mul_(q).mul_(cz)
                    if s.has_ce:
                        g = s.ce_grad_(g, zc, lse_z, sl, sz=None if ce_sep else q)
                elif s.has_ce and not ce_sep:                    # softmax(z) = q: (cz + cc) q - cz p
                    g = q.mul_(cz + s.cc[sl, None]).sub_(pp.mul_(cz))
                    g.scatter_add_(1, s.yl[sl], -(s.cc[sl, None] * s.own[sl].unsqueeze(1)))
                else:                                            # (s / T) (q - p)
                    g = q.sub_(pp).mul_(cz)
                    if s.has_ce:
                        g = s.ce_grad_(g, zc, lse_z, sl)
                s.store(s.gz, g, sl)
    return d, ce


def _dkd_kind(s: _Shard):
    """Decoupled KD; the target column lives on one rank (it contributes z_y and v_y, the others
    0). MAX + SUM."""
    p = s.p
    t, al, be = p.t_student, p.alpha, p.beta
    mx = s.new(2)
    for sl in s.chunks:
        mx[sl, 0] = s.zc(sl).amax(1)
        mx[sl, 1] = s.rc(sl).amax(1)
    s.reduce(mx, _MAX)
    mz, mr = mx[:, 0], mx[:, 1]
    ma, mc = mz / t, mr / t
    ce_sep = s.has_ce and t != 1.0
    acc = s.new(5 + ce_sep)   # non-target sums of exp(a), exp(c), exp(c)(c - a); z_y, v_y; [sum exp(z)]
    for sl in s.chunks:
        zc, rc = s.zc(sl), s.rc(sl)
        a, c = zc / t, rc / t
        tm = s.target_mask(sl)
        ea = _masked(torch.exp(a - ma[sl, None]), tm)
        ec = _masked(torch.exp(c - mc[sl, None]), tm)
        acc[sl, 0], acc[sl, 1] = _rowsum(ea), _rowsum(ec)
        acc[sl, 2] = _rowsum(_masked(ec * (c - a), tm | (c == _NEG_INF)))
        acc[sl, 3], acc[sl, 4] = s.at_label(zc, sl), s.at_label(rc, sl)
        if ce_sep:
            acc[sl, 5] = _rowsum(torch.exp(zc - mz[sl, None]))
    s.reduce(acc, _SUM)
    a_y, c_y = acc[:, 3] / t, acc[:, 4] / t
    lsen_a, lsen_c = _lse(ma, acc[:, 0]), _lse(mc, acc[:, 1])        # over the non-target classes
    lse_a = _lse(ma, acc[:, 0] + torch.exp(a_y - ma))
    lse_c = _lse(mc, acc[:, 1] + torch.exp(c_y - mc))
    lq_y, lq_n = a_y - lse_a, lsen_a - lse_a        # log q_y, log(1 - q_y)
    lp_y, lp_n = c_y - lse_c, lsen_c - lse_c
    p_y, p_n = torch.exp(lp_y), torch.exp(lp_n)
    zero_y, zero_n = lp_y == _NEG_INF, lp_n == _NEG_INF
    tckd = _masked(p_y * (lp_y - lq_y), zero_y) + _masked(p_n * (lp_n - lq_n), zero_n)
    e_n = acc[:, 2] / acc[:, 1]                     # E_phat[c - a] over the non-target classes
    nckd = e_n - lsen_c + lsen_a
    d = (t * t) * (al * tckd + be * nckd)
    ce = lse_z = None
    if s.has_ce:
        lse_z = _lse(mz, acc[:, 5]) if ce_sep else lse_a
        ce = lse_z - acc[:, 3]
    if s.gz is not None or s.gv is not None:
        ck = s.ck * t                               # T^2 * (1 / T)
        ratio = torch.exp(lp_n - lq_n)              # (1 - p_y) / (1 - q_y)
        g_t = _masked((lp_y - lq_y) - (lp_n - lq_n), zero_y | zero_n)   # d TCKD / d p_y
        for sl in s.chunks:
            zc, rc = s.zc(sl), s.rc(sl)
            a, c = zc / t, rc / t
            tm = s.target_mask(sl)
            cks = ck[sl, None]
            ph = torch.exp(c - lsen_c[sl, None])    # non-target distributions (unused at the target)
            if s.gz is not None:
                q = torch.exp(a - lse_a[sl, None])
                qh = torch.exp(a - lsen_a[sl, None])
                g_nt = al * q * (1 - ratio[sl, None]) + be * (qh - ph)
                g_tg = (al * (torch.exp(lq_y) - p_y))[sl, None]
                g = cks * torch.where(tm, g_tg, g_nt)
                if s.has_ce:
                    g = s.ce_grad_(g, zc, lse_z, sl)
                s.store(s.gz, g, sl)
            if s.gv is not None:
                pc = torch.exp(c - lse_c[sl, None])
                gpy = (al * g_t * p_y)[sl, None]
                g_nt = -gpy * pc + be * _masked(ph * ((c - a) - e_n[sl, None]), c == _NEG_INF)
                g_tg = gpy * p_n[sl, None]
                s.store(s.gv, cks * torch.where(tm, g_tg, g_nt), sl)
    return d, ce


def _jsd_kind(s: _Shard):
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, 0 < beta < 1: log m needs
    the global log-sum-exps, so the KL sums are a third reduction. MAX + SUM + SUM."""
    p = s.p
    t, b = p.t_student, p.beta
    lb, l1b = math.log(b), math.log1p(-b)
    mx = s.new(2)
    for sl in s.chunks:
        mx[sl, 0] = s.zc(sl).amax(1)
        mx[sl, 1] = s.rc(sl).amax(1)
    s.reduce(mx, _MAX)
    mz, mr = mx[:, 0], mx[:, 1]
    ma, mc = mz / t, mr / t
    ce_sep = s.has_ce and t != 1.0
    acc = s.new(2 + ce_sep + s.has_ce)
    for sl in s.chunks:
        zc, rc = s.zc(sl), s.rc(sl)
        acc[sl, 0] = (zc / t).sub_(ma[sl, None]).exp_().sum(1)
        acc[sl, 1] = (rc / t).sub_(mc[sl, None]).exp_().sum(1)
        if ce_sep:
            acc[sl, 2] = (zc - mz[sl, None]).exp_().sum(1)
        if s.has_ce:
            acc[sl, 2 + ce_sep] = s.at_label(zc, sl)
    s.reduce(acc, _SUM)
    lse_a, lse_c = _lse(ma, acc[:, 0]), _lse(mc, acc[:, 1])

    def logs(sl):
        """log q, log p, log m on a chunk (fresh temporaries)."""
        zc, rc = s.zc(sl), s.rc(sl)
        lq, lp = (zc / t).sub_(lse_a[sl, None]), (rc / t).sub_(lse_c[sl, None])
        lm = torch.add(lp, lb)
        return zc, lq, lp, torch.logaddexp(lm, lq + l1b, out=lm)

    kls = s.new(2)                                   # KL(p || m), KL(q || m)
    for sl in s.chunks:
        _, lq, lp, lm = logs(sl)
        ep, eq = lp.exp(), lq.exp()
        kls[sl, 0] = _dot_(torch.sub(lp, lm, out=lp), ep)
        kls[sl, 1] = _dot_(torch.sub(lq, lm, out=lq), eq)
    s.reduce(kls, _SUM)
    d = b * kls[:, 0] + (1 - b) * kls[:, 1]
    ce = lse_z = None
    if s.has_ce:
        lse_z = _lse(mz, acc[:, 2]) if ce_sep else lse_a
        ce = lse_z - acc[:, 2 + ce_sep]
    if s.gz is not None or s.gv is not None:
        for sl in s.chunks:
            zc, lq, lp, lm = logs(sl)
            cks = s.ck[sl, None] / t
            if s.gv is not None:                     # (beta / T) p ((log p - log m) - KL(p || m))
                g = _finite_(torch.sub(lp, lm).sub_(kls[sl, 0:1])).mul_(lp.exp_()).mul_(cks * b)
                s.store(s.gv, g, sl)
            if s.gz is not None:                     # ((1 - beta) / T) q ((log q - log m) - KL(q || m))
                eq = lq.exp()
                g = _finite_(torch.sub(lq, lm, out=lm).sub_(kls[sl, 1:2])).mul_(eq).mul_(cks * (1 - b))
                if s.has_ce:
                    g = s.ce_grad_(g, zc, lse_z, sl, sz=None if ce_sep else eq)
                s.store(s.gz, g, sl)
    return d, ce


def _slots(s: _Shard, mx: Tensor, col: int, local_sum: Tensor, sl) -> None:
    """Put this rank's row sums in its own column of a block of ``world`` columns filled with -inf:
    after the MAX reduction every rank holds every rank's sum (an all-gather through all_reduce)."""
    mx[sl, col + s.rank] = local_sum


def _lm_kind(s: _Shard):
    """(1 / 2C) sum_j ((z_j - zbar) - (v_j - vbar))^2; centring: the row sums of d = z - v are
    gathered exactly through the MAX reduction (one slot per rank), then one SUM of the centred
    squares. Without centring and CE: one SUM."""
    p, w = s.p, s.world
    vocab = float(s.vocab)
    k = s.has_ce + (w if p.center else 0)
    mean = mz = None
    if k:
        mx = s.new(k, _NEG_INF)
        for sl in s.chunks:
            zc = s.zc(sl)
            if s.has_ce:
                mx[sl, 0] = zc.amax(1)
            if p.center:
                _slots(s, mx, int(s.has_ce), _rowsum(zc - s.rc(sl)), sl)
        s.reduce(mx, _MAX)
        if s.has_ce:
            mz = mx[:, 0]
        if p.center:
            mean = mx[:, int(s.has_ce):].sum(1) / vocab
    acc = s.new(1 + 2 * s.has_ce)

    def diff(sl):
        dd = s.zc(sl) - s.rc(sl)
        return dd - mean[sl, None] if p.center else dd

    for sl in s.chunks:
        dd = diff(sl)
        acc[sl, 0] = _rowsum(dd * dd)
        if s.has_ce:
            zc = s.zc(sl)
            acc[sl, 1] = _rowsum(torch.exp(zc - mz[sl, None]))
            acc[sl, 2] = s.at_label(zc, sl)
    s.reduce(acc, _SUM)
    d = acc[:, 0] / (2 * vocab)
    ce = lse_z = None
    if s.has_ce:
        lse_z = _lse(mz, acc[:, 1])
        ce = lse_z - acc[:, 2]
    if s.gz is not None or s.gv is not None:
        for sl in s.chunks:
            g = (s.ck[sl, None] / vocab) * diff(sl)
            if s.gv is not None:
                s.store(s.gv, -g, sl)
            if s.gz is not None:
                s.store(s.gz, s.ce_grad_(g, s.zc(sl), lse_z, sl) if s.has_ce else g, sl)
    return d, ce


def _ls_kind(s: _Shard):
    """KD (T^2 KL at T) on standardised rows x_hat = (x - mean) / (1e-7 + std), std unbiased.
    MAX (raw maxima; row sums gathered in slots -> exact means), SUM (centred squares -> std; CE),
    SUM (sums of exponentials, the KL partial, and the moments sum_j q_j u_j, sum_j p_j u_j the
    gradient through the std needs, u = x - mean). The gradient's mean term vanishes
    (sum_j (q_j - p_j) = 0) and is not computed."""
    p, w = s.p, s.world
    t = p.t_student
    vocab = float(s.vocab)
    mx = s.new(2 + 2 * w, _NEG_INF)
    for sl in s.chunks:
        zc, vc = s.zc(sl), s.rc(sl)
        mx[sl, 0], mx[sl, 1] = zc.amax(1), vc.amax(1)
        _slots(s, mx, 2, _rowsum(zc), sl)
        _slots(s, mx, 2 + w, _rowsum(vc), sl)
    s.reduce(mx, _MAX)
    mz, mv = mx[:, 0], mx[:, 1]
    mu_z, mu_v = mx[:, 2:2 + w].sum(1) / vocab, mx[:, 2 + w:].sum(1) / vocab
    acc = s.new(2 + 2 * s.has_ce)
    for sl in s.chunks:
        zc, vc = s.zc(sl), s.rc(sl)
        uz, uv = zc - mu_z[sl, None], vc - mu_v[sl, None]
        acc[sl, 0], acc[sl, 1] = _rowsum(uz * uz), _rowsum(uv * uv)
        if s.has_ce:
            acc[sl, 2] = _rowsum(torch.exp(zc - mz[sl, None]))
            acc[sl, 3] = s.at_label(zc, sl)
    s.reduce(acc, _SUM)
    sd_z, sd_v = torch.sqrt(acc[:, 0] / (vocab - 1)), torch.sqrt(acc[:, 1] / (vocab - 1))
    den_z, den_v = 1e-7 + sd_z, 1e-7 + sd_v
    ma, mc = (mz - mu_z) / den_z / t, (mv - mu_v) / den_v / t      # monotone maps of the maxima

    def std_rows(sl):
        zc, vc = s.zc(sl), s.rc(sl)
        uz, uv = zc - mu_z[sl, None], vc - mu_v[sl, None]
        return zc, uz, uv, uz / den_z[sl, None] / t, uv / den_v[sl, None] / t

    tgrad = s.gv is not None
    mom = s.new(5 + 2 * tgrad)
    for sl in s.chunks:
        _, uz, uv, a, c = std_rows(sl)
        ea, ec = torch.exp(a - ma[sl, None]), torch.exp(c - mc[sl, None])
        mom[sl, 0], mom[sl, 1] = _rowsum(ea), _rowsum(ec)
        ca = ec * (c - a)
        mom[sl, 2] = _rowsum(ca)
        mom[sl, 3], mom[sl, 4] = _rowsum(ea * uz), _rowsum(ec * uz)
        if tgrad:
            mom[sl, 5], mom[sl, 6] = _rowsum(ca * uv), _rowsum(ec * uv)
    s.reduce(mom, _SUM)
    lse_a, lse_c = _lse(ma, mom[:, 0]), _lse(mc, mom[:, 1])
    e = mom[:, 2] / mom[:, 1]                        # E_p[c - a]
    d = (t * t) * (e - lse_c + lse_a)
    ce = lse_z = None
    if s.has_ce:
        lse_z = _lse(mz, acc[:, 2])
        ce = lse_z - acc[:, 3]
    if s.gz is not None or tgrad:
        # d D / d x_hat: T (q - p) for the student, T p ((c - a) - E_p[c - a]) for the teacher;
        # through the standardisation: (g - mean g) / den - (sum_j g_j u_j) u / ((C - 1) std den^2)
        gu_z = t * (mom[:, 3] / mom[:, 0] - mom[:, 4] / mom[:, 1])
        kz = gu_z / ((vocab - 1) * sd_z * den_z * den_z)
        if tgrad:
            gu_v = t * (mom[:, 5] / mom[:, 1] - e * mom[:, 6] / mom[:, 1])
            kv = gu_v / ((vocab - 1) * sd_v * den_v * den_v)
        for sl in s.chunks:
            zc, uz, uv, a, c = std_rows(sl)
            q, pp = torch.exp(a - lse_a[sl, None]), torch.exp(c - lse_c[sl, None])
            cks = s.ck[sl, None]
            if s.gz is not None:
                g = cks * (t * (q - pp) / den_z[sl, None] - kz[sl, None] * uz)
                if s.has_ce:
                    g = s.ce_grad_(g, zc, lse_z, sl)
                s.store(s.gz, g, sl)
            if tgrad:
                h = t * pp * ((c - a) - e[sl, None])
                s.store(s.gv, cks * (h / den_v[sl, None] - kv[sl, None] * uv), sl)
    return d, ce


_KINDS = {Kind.KL: _kl_kind, Kind.DKD: _dkd_kind, Kind.JSD: _jsd_kind, Kind.LM: _lm_kind,
          Kind.LS: _ls_kind}


# ----------------------------------------------------------------------------- the collectives
def _all_gather(x: Tensor, group) -> Tensor:
    """Every rank's ``x`` (N, K), stacked: (world, N, K) (one all-gather into one tensor)."""
    world = dist.get_world_size(group)
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    # (looked up on the module at call time: the tests count the collectives by wrapping them)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous(), group=group)
    return out.view((world,) + tuple(x.shape))


def _sum(x: Tensor, group) -> Tensor:
    dist.all_reduce(x, op=_SUM, group=group)
    return x


# ----------------------------------------------------------------------------- the op's forward
def _phased(z, vs, zp, y, kd_w, ce_w, p: KernelParams, reduction, pg, layout, need_gz, need_gv, backend):
    """The two-phase kernels (kdfast/_spec.py "Two phases"): the local statistics, one all-gather of
    them, the finish over the local columns, one all-reduce of the loss terms' parts."""
    _rank, world, start, vocab = layout
    stats_fn = _ops._backend_fn(backend, "stats_forward")
    finish_fn = _ops._backend_fn(backend, "finish_forward")
    n, cl = z.shape
    m = len(vs)
    dev = z.device
    acc = acc_dtype(z.dtype, vs[0].dtype)
    fp, ip = p.lists()
    gathered = []                   # per round: (world, N, K_round)
    for rnd in range(stats_rounds(p)):
        stats = torch.empty((n, stats_width(p, m, rnd)), dtype=torch.float64, device=dev)
        gprev = None if rnd == 0 else gathered[0] if rnd == 1 else torch.cat(gathered, dim=2)
        stats_fn(z, vs, zp, y, stats, fp, ip, start, vocab, rnd, gprev)
        gathered.append(_all_gather(stats, pg))
    gstats = gathered[0] if len(gathered) == 1 else torch.cat(gathered, dim=2)
    gs = grad_scale(y, p.ignore_index, n, reduction, acc, dev)
    kd_w2 = kd_w.reshape(m, n)
    d = torch.empty((m, n), dtype=acc, device=dev)
    ce = torch.empty(n, dtype=acc, device=dev)
    coef = torch.empty((m + 1, n), dtype=torch.float64, device=dev)
    part = torch.empty((m + 1, n), dtype=torch.float64, device=dev)
    gz = _ops.buffer(z.shape, z.dtype, dev) if need_gz else None
    gv = _ops.buffer((m, n, cl), vs[0].dtype, dev) if need_gv else None
    finish_fn(z, vs, zp, y, kd_w2, ce_w, gs, gstats, d, ce, coef, part, gz, gv, fp, ip, start, vocab)
    _sum(part, pg)
    d = finish_terms(d, coef[:m], part[:m]).to(acc).reshape(kd_w.shape)   # (separate tensors: outputs
    ce = finish_terms(ce, coef[m], part[m]).to(acc)                        # of the op must not alias)
    return (_reduce(kd_w, d, ce_w, ce, reduction, gs), d, ce,
            gz if gz is not None else z.new_empty(0),
            (gv[0] if m == 1 else gv) if gv is not None else vs[0].new_empty(0), gs)


def _forward(z, v, zp, y, kd_w, ce_w, p: KernelParams, reduction, group: str, layout, need_gz, need_gv,
             backend: str = "torch"):
    """``kdfast::vocab_parallel_distill`` (kdfast/_ops.py): the row terms, the reduction and the local
    gradients (already multiplied by the row weights and the reduction's 1 / n_valid). Returns
    ``(loss, d, ce, grad_z, grad_v, grad_scale)`` (gradients empty when not asked for)."""
    rank, world, start, vocab = layout
    pg = dist.distributed_c10d._resolve_process_group(group)
    if p.kind in _ops.phased_kinds(backend):   # (else the eager path below: backend="torch", or a
                                                # backend without that kind's two-phase kernel yet)
        return _phased(z, [v], zp, y, kd_w, ce_w, p, reduction, pg, layout, need_gz, need_gv, backend)
    s = _Shard(z, v, zp, y, kd_w, ce_w, p, reduction, pg, rank, world, start, vocab, need_gz, need_gv)
    if s.n:
        d, ce = _KINDS[p.kind](s)
    else:
        d = torch.zeros(0, dtype=s.acc, device=z.device)
        ce = None
    if ce is None:
        ce = torch.zeros_like(d)
    if s.valid is not None:         # ignored rows: 0 (NaN-safe), and no weight gradient
        d, ce = d.masked_fill(~s.valid, 0.0), ce.masked_fill(~s.valid, 0.0)
    return (_reduce(kd_w, d, ce_w, ce, reduction, s.gs), d, ce,
            s.gz if s.gz is not None else z.new_empty(0), s.gv if s.gv is not None else v.new_empty(0),
            s.gs)


# ----------------------------------------------------------------------------- the entry point
def _run(params: KernelParams, z, v, labels, *, process_group, vocab_start, vocab_size,
         kd_weight, ce_weight, ignore_index, reduction, backend, inplace_backward, zp=None,
         min_classes: int = 1, what: str = "", num_items_in_batch=None):
    _F._check_logits("student_logits", z)
    _F._check_logits("teacher_logits", v)
    if v.shape != z.shape:
        raise ValueError(f"teacher_logits shape {tuple(v.shape)} != student_logits shape "
                         f"{tuple(z.shape)} (the same rows and the same vocabulary shard required)")
    if v.device != z.device:
        raise ValueError(f"teacher_logits are on {v.device}, student_logits on {z.device}")
    if zp is not None:
        _F._check_past(zp, z)
    if backend not in _F.BACKENDS:
        raise ValueError(f"backend must be one of {_F.BACKENDS}, got {backend!r}")
    _F._check_reduction(ignore_index, reduction)
    lead, cl = z.shape[:-1], z.shape[-1]
    layout = _layout(process_group, cl, vocab_start, vocab_size)
    if layout[3] < min_classes:
        raise ValueError(f"{what} needs at least {min_classes} classes, the vocabulary has {layout[3]}")
    a = _F.prepare(params, z, labels, kd_weight=kd_weight, ce_weight=ce_weight,
                   ignore_index=ignore_index, reduction=reduction, backend=backend,
                   acc=acc_dtype(z.dtype, v.dtype), num_classes=layout[3], what="global class ids",
                   num_items_in_batch=num_items_in_batch)
    z2, v2 = z.reshape(a.n, cl), v.reshape(a.n, cl)
    zp2 = None if zp is None or a.params.rho == 0 else zp.detach().reshape(a.n, cl)
    if acc_dtype(z.dtype, v.dtype) == torch.float64:   # the kernels never mix float64 with another dtype
        z2, v2 = z2.to(torch.float64), v2.to(torch.float64)
        zp2 = None if zp2 is None else zp2.to(torch.float64)
    loss = run_vocab_parallel(z2, v2, zp2, a.y, a.kd_w, a.ce_w, a.params, a.reduction,
                              process_group.group_name, list(layout), a.backend, bool(inplace_backward))
    return loss.view(lead) if a.reduction == "none" else loss


def _sharded(name: str):
    """``kdfast.<name>_loss`` with ``process_group`` required: the named loss is declared once, in
    :mod:`kdfast.functional`, whose ``process_group=`` path calls :func:`_run` here."""
    fn = getattr(_F, f"{name}_loss")

    def loss(*args, process_group, **kwargs) -> Tensor:
        if process_group is None:
            raise ValueError(f"vocab_parallel.{name}_loss needs a process_group (the tensor-parallel "
                             f"group); use kdfast.{name}_loss for whole rows")
        return fn(*args, process_group=process_group, **kwargs)

    loss.__name__ = loss.__qualname__ = f"{name}_loss"
    loss.__doc__ = (f"Vocabulary-parallel :func:`kdfast.{name}_loss` (the same arguments; "
                    "``process_group`` required). The shards: the logits are ``(..., C_local)``, this "
                    "rank's columns ``[vocab_start, vocab_start + C_local)`` of every row; ``labels`` "
                    "are global class ids; ``vocab_start`` / ``vocab_size``: ``None`` for equal shards "
                    "in rank order, else see :func:`shard_bounds`. ``backend`` is ignored (eager torch "
                    "ops). The module docstring lists the collectives per call.")
    return loss


#: method name -> its vocabulary-parallel function (every loss of a dense teacher in
#: kdfast.losses.REGISTRY), also a module attribute ``<name>_loss``
METHODS = {name: _sharded(name) for name, loss in REGISTRY.items() if loss.dense}
globals().update({fn.__name__: fn for fn in METHODS.values()})
__all__ += [fn.__name__ for fn in METHODS.values()]


def vocab_parallel_loss(method: str, student_logits: Tensor, teacher_logits: Tensor,
                        labels: Optional[Tensor] = None, *, process_group,
                        vocab_start: Optional[int] = None, vocab_size: Optional[int] = None,
                        past_student_logits: Optional[Tensor] = None, **kwargs) -> Tensor:
    """The loss ``method`` (``"kd"``, ``"ttm"``, ``"wttm"``, ``"dkd"``, ``"logit_matching"``,
    ``"ls_kd"``, ``"jsd"``, ``"retro_kd"``) on vocabulary-sharded logits; ``kwargs`` are that loss's
    hyperparameters and common arguments (``temperature=``, ``kd_weight=``, ``reduction=``, ...).
    ``retro_kd`` takes ``past_student_logits`` (this rank's shard).

    Example (tensor-parallel group ``tp``, equal shards)::

        loss = kdfast.vocab_parallel.vocab_parallel_loss(
            "kd", student_shard, teacher_shard.detach(), labels, process_group=tp, temperature=2.0)
        loss.backward()     # student_shard.grad: this rank's columns of the full gradient
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    common = dict(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size)
    if REGISTRY[method].past_student:
        if past_student_logits is None:
            raise ValueError(f"{method} needs past_student_logits (this rank's shard)")
        return METHODS[method](student_logits, teacher_logits, past_student_logits, labels,
                               **common, **kwargs)
    if past_student_logits is not None:
        takes = ", ".join(k for k, x in REGISTRY.items() if x.past_student)
        raise ValueError(f"past_student_logits is only used by {takes}, not {method!r}")
    return METHODS[method](student_logits, teacher_logits, labels, **common, **kwargs)
