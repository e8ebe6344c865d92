"""Multi-teacher distillation: ``sum_m w_m * D(teacher_m, student) (+ ce_weight * CE)`` for any loss of
the family, fused: one kernel call per row block reads the student row once per pass whatever the
number of teachers M is, keeps each teacher's statistics beside the student's, writes one student
gradient (the weighted sum over the teachers) and each teacher's gradient (op ``kdfast::multi_distill``;
the kernels' multi-teacher sweeps are described in docs/kernel-math.md).

The CPU kernel handles up to ``MAX_TEACHERS`` (8) teachers per call; more are split into groups of 8
(the student is then read once per group). A callable ``method`` that is not one of kdfast's named
losses, and ``backend="torch"``, run the unfused sum of single-teacher losses.

Tensor parallelism (``process_group=``, with ``vocab_start`` / ``vocab_size`` for uneven shards, as
in :mod:`kdfast.vocab_parallel`): the student and every teacher are this rank's vocabulary columns,
the labels global class ids. Every named method runs the two-phase kernels (op
``kdfast::vocab_parallel_multi``): per group of ``MAX_TEACHERS`` teachers one statistics call and
**one all-gather** of the float64 statistics per round (``_spec.stats_rounds``: JSD at 0 < beta < 1
has two), one finish call and **one all_reduce** of the ``(M + 1, N)`` loss parts; backward runs no
collective. ``backend="torch"`` sums the eager single-teacher vocabulary-parallel losses.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from . import functional as F
from ._ops import acc_dtype, phase_fns, run_multi, run_vocab_parallel_multi
from ._spec import PHASED_KINDS
from .losses import REGISTRY

__all__ = ["multi_teacher_loss", "MAX_TEACHERS"]

#: teachers per kernel call (csrc/kernel_api.h kMaxTeachers; the Triton kernel has no limit of its own)
MAX_TEACHERS = 8

#: the methods: the losses of a dense teacher (kdfast.losses.REGISTRY); name -> declaration
_LOSSES = {name: loss for name, loss in REGISTRY.items() if loss.dense}
_NAME_OF = {loss.function: name for name, loss in _LOSSES.items()}
_COMMON = ("backend", "ignore_index", "inplace_backward", "num_items_in_batch")


def multi_teacher_loss(method: Union[str, Callable[..., Tensor]], student_logits: Tensor,
                       teacher_logits: Union[Tensor, Sequence[Tensor]], labels: Optional[Tensor] = None, *,
                       teacher_weights: Union[None, Sequence[float], Tensor] = None,
                       kd_weight: Union[float, Tensor] = 1.0, ce_weight: Union[float, Tensor] = 1.0,
                       reduction: str = "mean", past_student_logits: Optional[Tensor] = None,
                       process_group=None, vocab_start: Optional[int] = None,
                       vocab_size: Optional[int] = None, **hyperparameters) -> Tensor:
    """``sum_m w_m * kd_weight * D_m + ce_weight * CE`` per row, then the reduction.

    - ``method``: a loss name (``"kd"``, ``"ttm"``, ``"wttm"``, ``"dkd"``, ``"logit_matching"``,
      ``"ls_kd"``, ``"jsd"``, ``"retro_kd"``: every loss of ``kdfast.losses.REGISTRY`` with a dense
      teacher) or one of kdfast's loss functions (fused), or any other
      loss function with kdfast's signature (unfused: called once per teacher). ``hyperparameters`` are
      the loss's (``temperature=``, ``beta=``, ...) and the common ``backend=``, ``ignore_index=``,
      ``inplace_backward=``, ``num_items_in_batch=`` (``"mean"`` divides by it instead of the
      number of valid rows; see :mod:`kdfast.functional`).
    - ``teacher_logits``: a sequence of M tensors shaped like the student's, or one ``(M, ..., C)``
      tensor (read in place: no copy on the CPU; Triton copies a list whose tensors are not equally
      spaced in memory). Teachers that require grad get gradients.
    - ``teacher_weights``: ``None`` (``1 / M`` each), M floats, or a ``(M, ...)`` tensor of per-row
      weights (each ``[m]`` broadcastable to the leading shape; gradients flow into it, as in
      ALM-KD's learnt multi-teacher mixing).
    - ``past_student_logits``: retro_kd's past student (every teacher row is mixed with it).
    - ``process_group`` (``vocab_start``, ``vocab_size``): the logits (student, teachers, past
      student) are this rank's vocabulary shard; the labels are global class ids (see the module
      docstring); the loss is the same on every rank of the group.

    The CE term (with labels) is counted once, not once per teacher.

    Example::

        loss = kdfast.multi_teacher_loss("kd", student(x), [big(x), small(x)], y,
                                         teacher_weights=[0.7, 0.3], temperature=4.0)
    """
    name = method if isinstance(method, str) else _NAME_OF.get(method)
    if isinstance(method, str) and name not in _LOSSES:
        raise ValueError(f"unknown method {method!r}; one of {sorted(_LOSSES)} or a kdfast loss function")
    if name is None and not callable(method):
        raise ValueError(f"method must be a loss name or a loss function, got {type(method).__name__}")
    z = student_logits
    if isinstance(teacher_logits, Tensor):
        if teacher_logits.dim() != z.dim() + 1:
            raise ValueError(f"a stacked teacher tensor must be (M, ...) over the student's shape "
                             f"{tuple(z.shape)}, got {tuple(teacher_logits.shape)}")
        teachers = list(teacher_logits.unbind(0))
    else:
        teachers = list(teacher_logits)
    m = len(teachers)
    if m == 0:
        raise ValueError("teacher_logits must hold at least one teacher")
    if teacher_weights is None:
        weights = [1.0 / m] * m
    elif isinstance(teacher_weights, Tensor):
        if teacher_weights.shape[:1] != (m,):
            raise ValueError(f"teacher_weights must have {m} entries along dim 0, got {tuple(teacher_weights.shape)}")
        weights = list(teacher_weights.unbind(0))
    else:
        weights = [float(w) for w in teacher_weights]
        if len(weights) != m:
            raise ValueError(f"teacher_weights must have {m} entries, got {len(weights)}")
    if (name == "retro_kd") != (past_student_logits is not None):
        raise ValueError("past_student_logits is retro_kd's (and retro_kd needs it)")

    common = {k: hyperparameters.pop(k) for k in _COMMON if k in hyperparameters}
    backend = F._resolve_backend(common.get("backend", "auto"), z.device) if isinstance(z, Tensor) else "torch"
    tp = None
    if process_group is not None:
        tp = (process_group, vocab_start, vocab_size)
        _check_phased(name, hyperparameters, backend)
    elif vocab_start is not None or vocab_size is not None:
        raise ValueError("vocab_start / vocab_size describe a vocabulary shard: they need process_group")
    if name is None or backend == "torch":
        tp_kw = {} if tp is None else dict(zip(("process_group", "vocab_start", "vocab_size"), tp))
        return _unfused(_LOSSES[name].function if name is not None else method, z, teachers, weights, labels, kd_weight, ce_weight,
                        reduction, past_student_logits, {**hyperparameters, **common, **tp_kw})
    return _fused(name, z, teachers, weights, labels, kd_weight, ce_weight, reduction, past_student_logits,
                  hyperparameters, backend, common.get("ignore_index", -100),
                  common.get("inplace_backward", False), common.get("num_items_in_batch"), tp)


def _check_phased(name, hyper: dict, backend: str) -> None:
    """``process_group=``: a named method of a kind with the two-phase form, a backend with its
    kernels (raised on every rank before any collective)."""
    if name is None:
        raise ValueError("multi_teacher_loss with process_group needs a kdfast method (a loss name or "
                         "a kdfast loss function), not an arbitrary callable")
    try:
        kind = _LOSSES[name].params(**hyper).kind
    except TypeError as e:   # an argument the loss does not have
        raise ValueError(f"{name}: {e}") from None
    if kind not in PHASED_KINDS:
        raise ValueError(f"multi_teacher_loss with process_group: no two-phase kernel yet for "
                         f"{kind.name} (method {name!r}); every other method has one")
    phase_fns(backend, kind)   # (backend="torch", the eager reference, has no two-phase form)


def _unfused(fn, z, teachers, weights, labels, kd_weight, ce_weight, reduction, zp, kwargs) -> Tensor:
    """The sum of single-teacher losses (CE in the first term only)."""
    total = None
    extra = () if zp is None else (zp,)
    for i, (v, w) in enumerate(zip(teachers, weights)):
        kw = kd_weight * w if isinstance(w, Tensor) or isinstance(kd_weight, Tensor) else float(kd_weight) * w
        term = fn(z, v, *extra, labels, kd_weight=kw, ce_weight=ce_weight if i == 0 else 0.0,
                  reduction=reduction, **kwargs)
        total = term if total is None else total + term
    return total


def _fused(name, z, teachers, weights, labels, kd_weight, ce_weight, reduction, zp, hyper, backend,
           ignore_index, inplace_backward, num_items_in_batch=None, tp=None) -> Tensor:
    """The fused path; ``tp = (process_group, vocab_start, vocab_size)``: the logits are vocabulary
    shards (``kdfast::vocab_parallel_multi``)."""
    loss = _LOSSES[name]
    try:
        params = loss.params(**hyper)
    except TypeError as e:   # an argument the loss does not have
        raise ValueError(f"{name}: {e}") from None
    F._check_logits("student_logits", z)
    for i, v in enumerate(teachers):
        F._check_logits(f"teacher_logits[{i}]", v)
        if v.shape != z.shape:
            raise ValueError(f"teacher_logits[{i}] shape {tuple(v.shape)} != student_logits shape "
                             f"{tuple(z.shape)} (same rows and number of classes required)")
        if v.device != z.device:
            raise ValueError(f"teacher_logits[{i}] are on {v.device}, student_logits on {z.device}")
    if loss.needs_labels and labels is None:
        raise ValueError(f"{name} needs labels ({loss.needs_labels})")
    layout, shard = None, {}
    if tp is None:
        F._check_classes(z, loss.min_classes, f"{name} multi_teacher_loss")
    else:
        from . import vocab_parallel   # lazy: vocab_parallel imports functional
        layout = vocab_parallel._layout(tp[0], z.shape[-1], tp[1], tp[2])
        if layout[3] < loss.min_classes:
            raise ValueError(f"{name} multi_teacher_loss needs at least {loss.min_classes} classes, "
                             f"the vocabulary has {layout[3]}")
        shard = dict(num_classes=layout[3], what="global class ids")
    if zp is not None:
        F._check_past(zp, z)
    acc = acc_dtype(z.dtype, *(v.dtype for v in teachers))
    a = F.prepare(params, z, labels, kd_weight=kd_weight, ce_weight=ce_weight, ignore_index=ignore_index,
                  reduction=reduction, backend=backend, acc=acc, num_items_in_batch=num_items_in_batch,
                  **shard)
    # (M, N) row weights of the teachers: teacher weight x kd_weight (gradients flow into both)
    kd_w = torch.stack([a.kd_w * F._rows_weight(w, f"teacher_weights[{i}]", a.lead, a.n, acc, z.device)
                        for i, w in enumerate(weights)])
    c = z.shape[-1]
    z2 = F._as_rows(z, c)
    vs = [F._as_rows(v, c) for v in teachers]
    tv = vs[0].dtype
    for v in vs[1:]:
        tv = torch.promote_types(tv, v.dtype)
    if acc == torch.float64:            # the kernels never mix float64 with another dtype
        z2, tv = z2.to(acc), acc
    vs = [v.to(tv) for v in vs]         # (no-ops when the teachers share a dtype)
    zp2 = None if zp is None or params.rho == 0 else F._as_rows(zp.detach(), c).to(z2.dtype)
    out = None
    for g in range(0, len(vs), MAX_TEACHERS):   # groups of MAX_TEACHERS (CE with the first)
        p = a.params if g == 0 else dataclasses.replace(a.params, has_ce=False)
        cw = a.ce_w if g == 0 else torch.zeros_like(a.ce_w)
        if tp is None:
            part = run_multi(z2, vs[g:g + MAX_TEACHERS], zp2, a.y, kd_w[g:g + MAX_TEACHERS], cw, p,
                             a.reduction, a.backend, inplace_backward)
        else:   # one stats call, one all-gather, one finish call, one all_reduce per group
            part = run_vocab_parallel_multi(z2, vs[g:g + MAX_TEACHERS], zp2, a.y, kd_w[g:g + MAX_TEACHERS],
                                            cw, p, a.reduction, tp[0].group_name, layout, a.backend,
                                            inplace_backward)
        out = part if out is None else out + part
    return out.view(a.lead) if a.reduction == "none" else out
