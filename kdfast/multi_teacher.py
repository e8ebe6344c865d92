"""Multi-teacher distillation: ``sum_m w_m * D(teacher_m, student) (+ ce_weight * CE)`` for any loss of
the family.

Status: correct for every loss and backend, but **not fused across teachers**: it calls the fused
loss once per teacher, so each pass reads the student row M times and autograd holds M student
gradients until it sums them. A kernel that reads the student once per pass whatever M is (issue 7)
is not written yet.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from torch import Tensor

from . import functional as F

__all__ = ["multi_teacher_loss"]

_BY_NAME = {"kd": F.kd_loss, "ttm": F.ttm_loss, "wttm": F.wttm_loss, "dkd": F.dkd_loss,
            "logit_matching": F.logit_matching_loss, "ls_kd": F.ls_kd_loss, "jsd": F.jsd_loss}


def multi_teacher_loss(method: Union[str, Callable[..., Tensor]], student_logits: Tensor,
                       teacher_logits: Union[Tensor, Sequence[Tensor]], labels: Optional[Tensor] = None, *,
                       teacher_weights: Union[None, Sequence[float], Tensor] = None,
                       kd_weight: Union[float, Tensor] = 1.0, ce_weight: Union[float, Tensor] = 1.0,
                       reduction: str = "mean", **hyperparameters) -> Tensor:
    """``sum_m w_m * kd_weight * D_m + ce_weight * CE`` per row, then the reduction.

    - ``method``: a loss name (``"kd"``, ``"ttm"``, ``"wttm"``, ``"dkd"``, ``"logit_matching"``,
      ``"ls_kd"``, ``"jsd"``) or one of kdfast's loss functions; ``hyperparameters`` go to it
      (``temperature=``, ``backend=``, ``ignore_index=``, ...).
    - ``teacher_logits``: a sequence of M tensors shaped like the student's, or one ``(M, ..., C)``
      tensor. Teachers that require grad get gradients.
    - ``teacher_weights``: ``None`` (``1 / M`` each), M floats, or a ``(M, ...)`` tensor of per-row
      weights (broadcastable to ``(M,) + leading shape``; gradients flow into it, as in ALM-KD's
      learnt multi-teacher mixing).

    The CE term (with labels) is counted once, not once per teacher.
    """
    fn = _BY_NAME.get(method) if isinstance(method, str) else method
    if fn is None:
        raise ValueError(f"unknown method {method!r}; one of {sorted(_BY_NAME)} or a kdfast loss function")
    if isinstance(teacher_logits, Tensor):
        if teacher_logits.dim() != student_logits.dim() + 1:
            raise ValueError(f"a stacked teacher tensor must be (M, ...) over the student's shape "
                             f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
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
    total = None
    for i, (v, w) in enumerate(zip(teachers, weights)):
        kw = kd_weight * w if isinstance(w, Tensor) or isinstance(kd_weight, Tensor) else float(kd_weight) * w
        term = fn(student_logits, v, labels, kd_weight=kw, ce_weight=ce_weight if i == 0 else 0.0,
                  reduction=reduction, **hyperparameters)
        total = term if total is None else total + term
    return total
