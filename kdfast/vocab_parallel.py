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

This module holds the collectives and their bookkeeping; the loss math is the kernels'. The
``backend`` of the functional losses picks the kernels (``"cpu"``, ``"triton"``); ``"torch"`` (the
eager reference, also what ``"auto"`` falls back to without the C++ extension) has no two-phase form
and raises ``ValueError``.

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
teacher columns for a row).

Data parallelism composes without anything special: each data-parallel rank has whole rows and the
loss is per row. With tensor and data parallelism together, pass the tensor-parallel group as
``process_group``. See ``docs/vocab-parallel.md``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as _F
from . import _ops
from ._ops import _reduce, acc_dtype, grad_scale, run_vocab_parallel
from ._spec import KernelParams, finish_terms, stats_rounds, stats_width
from .losses import REGISTRY

__all__ = ["vocab_parallel_loss", "shard_bounds", "METHODS"]   # + every <name>_loss of METHODS

_SUM = dist.ReduceOp.SUM


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
             backend: str):
    """``kdfast::vocab_parallel_distill`` (kdfast/_ops.py): the row terms, the reduction and the local
    gradients (already multiplied by the row weights and the reduction's 1 / n_valid). Returns
    ``(loss, d, ce, grad_z, grad_v, grad_scale)`` (gradients empty when not asked for)."""
    pg = dist.distributed_c10d._resolve_process_group(group)
    return _phased(z, [v], zp, y, kd_w, ce_w, p, reduction, pg, layout, need_gz, need_gv, backend)


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
    _ops.phase_fns(a.backend, a.params.kind)   # (raises on every rank before any collective)
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
