"""``nn.Module`` wrappers: hyperparameters in the constructor, ``forward(student, teacher, labels)``."""
from __future__ import annotations

from torch import Tensor, nn

from . import functional as F

__all__ = ["KDLoss", "TTMLoss", "WTTMLoss", "DKDLoss", "LogitMatchingLoss", "LSKDLoss", "JSDLoss",
           "RetroKDLoss", "TopKKDLoss"]


class _DistillLoss(nn.Module):
    """Holds a loss's keyword arguments and calls its functional form."""

    _fn = None   # the functional loss, set by each subclass

    def __init__(self, **hparams):
        super().__init__()
        self.hparams = hparams

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        return type(self)._fn(student_logits, teacher_logits, labels, **self.hparams)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


class KDLoss(_DistillLoss):
    """Module form of :func:`kdfast.kd_loss`."""

    _fn = staticmethod(F.kd_loss)

    def __init__(self, temperature=4.0, kd_weight=1.0, ce_weight=1.0, ignore_index=-100,
                 reduction="mean", backend="auto"):
        super().__init__(temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
                         ignore_index=ignore_index, reduction=reduction, backend=backend)


class TTMLoss(_DistillLoss):
    """Module form of :func:`kdfast.ttm_loss`."""

    _fn = staticmethod(F.ttm_loss)

    def __init__(self, temperature=2.0, kd_weight=1.0, ce_weight=1.0, ignore_index=-100,
                 reduction="mean", backend="auto"):
        super().__init__(temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
                         ignore_index=ignore_index, reduction=reduction, backend=backend)


class WTTMLoss(_DistillLoss):
    """Module form of :func:`kdfast.wttm_loss`."""

    _fn = staticmethod(F.wttm_loss)

    def __init__(self, temperature=2.0, kd_weight=1.0, ce_weight=1.0, ignore_index=-100,
                 reduction="mean", backend="auto"):
        super().__init__(temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
                         ignore_index=ignore_index, reduction=reduction, backend=backend)


class DKDLoss(_DistillLoss):
    """Module form of :func:`kdfast.dkd_loss` (``forward(student, teacher, labels)``, labels required)."""

    _fn = staticmethod(F.dkd_loss)

    def __init__(self, temperature=4.0, alpha=1.0, beta=8.0, kd_weight=1.0, ce_weight=1.0,
                 ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__(temperature=temperature, alpha=alpha, beta=beta, kd_weight=kd_weight,
                         ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
                         backend=backend)


class LogitMatchingLoss(_DistillLoss):
    """Module form of :func:`kdfast.logit_matching_loss`."""

    _fn = staticmethod(F.logit_matching_loss)

    def __init__(self, center=True, kd_weight=1.0, ce_weight=1.0, ignore_index=-100,
                 reduction="mean", backend="auto"):
        super().__init__(center=center, kd_weight=kd_weight, ce_weight=ce_weight,
                         ignore_index=ignore_index, reduction=reduction, backend=backend)


class LSKDLoss(_DistillLoss):
    """Module form of :func:`kdfast.ls_kd_loss`."""

    _fn = staticmethod(F.ls_kd_loss)

    def __init__(self, temperature=2.0, kd_weight=1.0, ce_weight=1.0, ignore_index=-100,
                 reduction="mean", backend="auto"):
        super().__init__(temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
                         ignore_index=ignore_index, reduction=reduction, backend=backend)


class JSDLoss(_DistillLoss):
    """Module form of :func:`kdfast.jsd_loss`."""

    _fn = staticmethod(F.jsd_loss)

    def __init__(self, beta=0.5, temperature=1.0, kd_weight=1.0, ce_weight=1.0, ignore_index=-100,
                 reduction="mean", backend="auto"):
        super().__init__(beta=beta, temperature=temperature, kd_weight=kd_weight,
                         ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
                         backend=backend)


class RetroKDLoss(_DistillLoss):
    """Module form of :func:`kdfast.retro_kd_loss`: ``forward(student, teacher, past_student, labels)``."""

    _fn = staticmethod(F.retro_kd_loss)

    def __init__(self, temperature=4.0, past_weight=0.5, kd_weight=1.0, ce_weight=1.0,
                 ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__(temperature=temperature, past_weight=past_weight, kd_weight=kd_weight,
                         ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
                         backend=backend)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, past_student_logits: Tensor,
                labels: Tensor | None = None) -> Tensor:
        return F.retro_kd_loss(student_logits, teacher_logits, past_student_logits, labels,
                               **self.hparams)


class TopKKDLoss(_DistillLoss):
    """Module form of :func:`kdfast.topk_kd_loss`:
    ``forward(student, teacher_topk_logprobs, teacher_topk_indices, labels)``."""

    _fn = staticmethod(F.topk_kd_loss)

    def __init__(self, temperature=1.0, renormalize=True, kd_weight=1.0, ce_weight=1.0,
                 ignore_index=-100, reduction="mean", backend="auto"):
        super().__init__(temperature=temperature, renormalize=renormalize, kd_weight=kd_weight,
                         ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
                         backend=backend)

    def forward(self, student_logits: Tensor, teacher_topk_logprobs: Tensor,
                teacher_topk_indices: Tensor, labels: Tensor | None = None) -> Tensor:
        return F.topk_kd_loss(student_logits, teacher_topk_logprobs, teacher_topk_indices, labels,
                              **self.hparams)
