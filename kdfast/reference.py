"""Eager PyTorch versions of every kdfast loss: the ground truth of the tests and the baseline of the
benchmarks.

They are written the way a careful user writes them in eager PyTorch (``log_softmax``, ``kl_div``,
``cross_entropy``, ``mse_loss``), not as a copy of the fused algorithm, and they take the same
arguments as the fused losses in :mod:`kdfast.functional` (without ``backend``). They compute in the
dtype they are given (call them on float64 tensors for a ground truth). Argument checking is done by
:mod:`kdfast.functional`; these functions assume valid input.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kd_loss", "ttm_loss", "wttm_loss", "dkd_loss", "logit_matching_loss", "ls_kd_loss",
           "jsd_loss", "retro_kd_loss", "topk_kd_loss", "topk_reverse_kd_loss", "topk_jsd_loss"]


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dim from log-probabilities, with 0 * log 0 = 0.

    ``F.kl_div(log_q, log_p, log_target=True)`` would give NaN for classes of probability 0
    (``-inf`` teacher logits) in the loss or in the teacher's gradient, so those terms are masked
    before the product.
    """
    zero = log_p == float("-inf")
    return (log_p.exp() * (log_p - log_q).masked_fill(zero, 0.0)).sum(-1)


def _finish(d: Tensor, z: Tensor, labels, kd_weight, ce_weight, ignore_index: int,
            reduction: str) -> Tensor:
    """loss_i = ce_weight_i * CE_i + kd_weight_i * D_i over the valid rows, then the reduction."""
    loss = kd_weight * d
    if labels is not None:
        valid = labels != ignore_index
        ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1).long(),
                             ignore_index=ignore_index, reduction="none").view(labels.shape)
        loss = (loss + ce_weight * ce).masked_fill(~valid, 0.0)
        n_valid = valid.sum()
    else:
        n_valid = torch.tensor(loss.numel(), device=loss.device)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / n_valid.clamp_min(1)   # "mean" / "batchmean": 0 valid rows -> 0.0


def _kd_term(z: Tensor, v: Tensor, temperature: float) -> Tensor:
    log_q = F.log_softmax(z / temperature, dim=-1)
    log_p = F.log_softmax(v / temperature, dim=-1)
    return temperature * temperature * _kl(log_p, log_q)


def kd_loss(student_logits, teacher_logits, labels=None, *, temperature=4.0, kd_weight=1.0,
            ce_weight=1.0, ignore_index=-100, reduction="mean"):
    """Hinton KD: T^2 * KL(softmax(v/T) || softmax(z/T)) (+ CE)."""
    d = _kd_term(student_logits, teacher_logits, temperature)
    return _finish(d, student_logits, labels, kd_weight, ce_weight, ignore_index, reduction)


def reverse_kd_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, kd_weight=1.0,
                    ce_weight=1.0, ignore_index=-100, reduction="mean"):
    """Reverse KD: T^2 * KL(softmax(z/T) || softmax(v/T)) (+ CE)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    d = temperature * temperature * _kl(log_q, log_p)
    return _finish(d, student_logits, labels, kd_weight, ce_weight, ignore_index, reduction)


def ttm_loss(student_logits, teacher_logits, labels=None, *, temperature=2.0, kd_weight=1.0,
             ce_weight=1.0, ignore_index=-100, reduction="mean"):
    """TTM: KL(softmax(v/T) || softmax(z)), temperature on the teacher only, no T^2."""
    d = _kl(F.log_softmax(teacher_logits / temperature, dim=-1),
            F.log_softmax(student_logits, dim=-1))
    return _finish(d, student_logits, labels, kd_weight, ce_weight, ignore_index, reduction)


def wttm_loss(student_logits, teacher_logits, labels=None, *, temperature=2.0, kd_weight=1.0,
              ce_weight=1.0, ignore_index=-100, reduction="mean"):
    """WTTM: U * KL(softmax(v/T) || softmax(z)), U = sum_j softmax(v)_j^(1/T) (no gradient)."""
    with torch.no_grad():
        u = torch.exp(torch.logsumexp(teacher_logits / temperature, dim=-1)
                      - torch.logsumexp(teacher_logits, dim=-1) / temperature)
    d = u * _kl(F.log_softmax(teacher_logits / temperature, dim=-1),
                F.log_softmax(student_logits, dim=-1))
    return _finish(d, student_logits, labels, kd_weight, ce_weight, ignore_index, reduction)


def dkd_loss(student_logits, teacher_logits, labels, *, temperature=4.0, alpha=1.0, beta=8.0,
             ce_weight=1.0, kd_weight=1.0, ignore_index=-100, reduction="mean"):
    """Decoupled KD: T^2 (alpha * TCKD + beta * NCKD) (Zhao et al., 2022)."""
    t = temperature
    safe = labels.masked_fill(labels == ignore_index, 0).long()
    target = F.one_hot(safe, student_logits.shape[-1]).bool()
    log_q = F.log_softmax(student_logits / t, dim=-1)
    log_p = F.log_softmax(teacher_logits / t, dim=-1)
    # binary target / non-target distributions: [p_y, 1 - p_y], log(1 - p_y) = lse over j != y
    def binary(log_prob):
        log_y = log_prob.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        log_rest = torch.logsumexp(log_prob.masked_fill(target, float("-inf")), dim=-1)
        return torch.stack([log_y, log_rest], dim=-1)
    tckd = _kl(binary(log_p), binary(log_q))
    # distributions over the non-target classes alone
    nckd = _kl(F.log_softmax((teacher_logits / t).masked_fill(target, float("-inf")), dim=-1),
               F.log_softmax((student_logits / t).masked_fill(target, float("-inf")), dim=-1))
    d = t * t * (alpha * tckd + beta * nckd)
    return _finish(d, student_logits, labels, kd_weight, ce_weight, ignore_index, reduction)


def logit_matching_loss(student_logits, teacher_logits, labels=None, *, center=True,
                        kd_weight=1.0, ce_weight=1.0, ignore_index=-100, reduction="mean"):
    """(1 / 2C) * ||(z - mean z) - (v - mean v)||^2 per row (no centering with center=False)."""
    z, v = student_logits, teacher_logits
    if center:
        z = z - z.mean(-1, keepdim=True)
        v = v - v.mean(-1, keepdim=True)
    d = 0.5 * F.mse_loss(z, v, reduction="none").mean(-1)
    return _finish(d, student_logits, labels, kd_weight, ce_weight, ignore_index, reduction)


def _standardize(x: Tensor) -> Tensor:
    """(x - mean) / (1e-7 + std), std unbiased, as in the logit-standardisation paper's code."""
    return (x - x.mean(-1, keepdim=True)) / (1e-7 + x.std(-1, keepdim=True))


def ls_kd_loss(student_logits, teacher_logits, labels=None, *, temperature=2.0, kd_weight=1.0,
               ce_weight=1.0, ignore_index=-100, reduction="mean"):
    """KD on standardised logits (Sun et al., 2024); gradient through the student's mean and std."""
    d = _kd_term(_standardize(student_logits), _standardize(teacher_logits), temperature)
    return _finish(d, student_logits, labels, kd_weight, ce_weight, ignore_index, reduction)


def jsd_loss(student_logits, teacher_logits, labels=None, *, beta=0.5, temperature=1.0,
             kd_weight=1.0, ce_weight=1.0, ignore_index=-100, reduction="mean"):
    """Generalised JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q;
    exactly KL(p || q) at beta = 0 and KL(q || p) at beta = 1 (as TRL's generalized_jsd_loss)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        d = _kl(log_p, log_q)
    elif beta == 1:
        d = _kl(log_q, log_p)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]),
                                dim=0)
        d = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    return _finish(d, student_logits, labels, kd_weight, ce_weight, ignore_index, reduction)


def retro_kd_loss(student_logits, teacher_logits, past_student_logits, labels=None, *,
                  temperature=4.0, past_weight=0.5, kd_weight=1.0, ce_weight=1.0,
                  ignore_index=-100, reduction="mean"):
    """KD towards r = (1 - rho) v + rho z_past (RetroKD), z_past a past student's logits (constant)."""
    r = (1 - past_weight) * teacher_logits + past_weight * past_student_logits.detach()
    d = _kd_term(student_logits, r, temperature)
    return _finish(d, student_logits, labels, kd_weight, ce_weight, ignore_index, reduction)


def _topk_forward(z, lp, idx, temperature, renormalize, tail):
    """topk_kd's per-row KL (without T^2): the teacher scattered into a row of -inf, KL(p || q)."""
    ninf = float("-inf")
    dense = torch.full_like(z, ninf).scatter(-1, idx.long(), lp)
    log_p = F.log_softmax(dense / temperature, dim=-1) if renormalize else dense
    log_p = log_p.masked_fill(dense == ninf, ninf)  # a row of padding only: p = 0
    log_q = F.log_softmax(z / temperature, dim=-1)
    d = _kl(log_p, log_q)
    if tail:
        p_tail = (-torch.expm1(torch.logsumexp(lp, dim=-1))).clamp_min(0)
        out = dense == ninf                      # the student's classes outside the teacher's k
        has = out.any(-1, keepdim=True)          # (rows without one: Q_tail = 0, no gradient path)
        log_qt = torch.where(has, log_q.masked_fill(~out, ninf), 0.0).logsumexp(-1)
        log_qt = torch.where(has.squeeze(-1), log_qt, ninf)
        # (no class outside the k: no tail bucket; a leftover P_tail there is the values' rounding)
        d = d + torch.where((p_tail > 0) & has.squeeze(-1), p_tail * (torch.log(p_tail) - log_qt), 0.0)
    return d


def topk_kd_loss(student_logits, teacher_topk_logprobs, teacher_topk_indices, labels=None, *,
                 temperature=1.0, renormalize=True, tail=False, validate=None, kd_weight=1.0,
                 ce_weight=1.0, ignore_index=-100, reduction="mean"):
    """KD against a top-k teacher, densely: the k log-probabilities scattered into a row of -inf,
    then T^2 * KL(p || softmax(z/T)) with p = softmax(row / T) (renormalize) or exp(row) (as given).
    ``tail``: plus T^2 * P_tail (log P_tail - log Q_tail), P_tail = 1 - sum_k p_k (from the
    log-sum-exp of the k log-probabilities), Q_tail the student's mass outside the k classes (the
    log-sum-exp of its log-probabilities there); padding entries (-inf) belong to the tail; a row
    whose k classes are all C has no tail bucket.
    (``validate`` is checked and acted on by ``kdfast.topk_kd_loss``, not here.)"""
    z = student_logits
    lp = teacher_topk_logprobs.to(z.dtype)
    d = temperature * temperature * _topk_forward(z, lp, teacher_topk_indices, temperature, renormalize, tail)
    return _finish(d, z, labels, kd_weight, ce_weight, ignore_index, reduction)


def _topk_buckets(z, lp, idx, temperature, renormalize, tail):
    """The support of the top-k reverse KL and JSD as (log P, log Q) over buckets (last dim), a bucket
    that is -inf on both sides adding nothing:

    - ``renormalize``: the k entries, padding (-inf) left out: log P = log_softmax(lp / T) and
      log Q = log_softmax(z_k / T) over the finite entries (the student renormalised there too);
    - ``tail``: the k entries with log P = lp as given and log Q = log_softmax(z / T) at their
      classes, then one bucket of the rest: log P_tail = log(1 - sum_k p_k) (clamped at 0), log Q_tail
      = the log-sum-exp of the student's log-probabilities outside the k classes (none when no class
      is outside them)."""
    ninf = float("-inf")
    pad = lp == ninf
    none = pad.all(-1, keepdim=True)   # (a row of padding only: 0 in place of -inf, then masked)
    if renormalize:
        log_p = F.log_softmax(torch.where(none, 0.0, lp / temperature), dim=-1).masked_fill(pad, ninf)
        zk = z.gather(-1, idx.long()) / temperature
        log_q = F.log_softmax(torch.where(pad & ~none, ninf, zk), dim=-1).masked_fill(pad, ninf)
        return log_p, log_q
    log_qz = F.log_softmax(z / temperature, dim=-1)
    log_q = log_qz.gather(-1, idx.long()).masked_fill(pad, ninf)
    dense = torch.full_like(z, ninf).scatter(-1, idx.long(), lp)
    out = dense == ninf                          # the student's classes outside the teacher's k
    has = out.any(-1, keepdim=True)
    log_qt = torch.where(has, log_qz.masked_fill(~out, ninf), 0.0).logsumexp(-1, keepdim=True)
    p_tail = (-torch.expm1(torch.logsumexp(lp, dim=-1, keepdim=True))).clamp_min(0)
    log_pt = torch.where(has, torch.log(p_tail), ninf)
    log_qt = torch.where(has, log_qt, ninf)
    return torch.cat([lp, log_pt], -1), torch.cat([log_q, log_qt], -1)


def topk_reverse_kd_loss(student_logits, teacher_topk_logprobs, teacher_topk_indices, labels=None, *,
                         temperature=1.0, renormalize=True, tail=False, validate=None, kd_weight=1.0,
                         ce_weight=1.0, ignore_index=-100, reduction="mean"):
    """Reverse KD against a top-k teacher: T^2 * KL(Q || P) over the support buckets of
    ``_topk_buckets`` (the k entries renormalised on both sides, or the k + 1 buckets of ``tail``)."""
    z = student_logits
    log_p, log_q = _topk_buckets(z, teacher_topk_logprobs.to(z.dtype), teacher_topk_indices,
                                 temperature, renormalize, tail)
    d = temperature * temperature * _kl(log_q, log_p)
    return _finish(d, z, labels, kd_weight, ce_weight, ignore_index, reduction)


def topk_jsd_loss(student_logits, teacher_topk_logprobs, teacher_topk_indices, labels=None, *,
                  beta=0.5, temperature=1.0, renormalize=True, tail=False, validate=None,
                  kd_weight=1.0, ce_weight=1.0, ignore_index=-100, reduction="mean"):
    """Generalised JSD against a top-k teacher (no T^2), as ``jsd_loss``: beta KL(P || M) +
    (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q over the buckets of ``_topk_buckets``; at
    beta = 0 exactly topk_kd's forward KL (``_topk_forward``), at beta = 1 the reverse KL(Q || P)."""
    z = student_logits
    lp = teacher_topk_logprobs.to(z.dtype)
    if beta == 0:
        d = _topk_forward(z, lp, teacher_topk_indices, temperature, renormalize, tail)
    else:
        log_p, log_q = _topk_buckets(z, lp, teacher_topk_indices, temperature, renormalize, tail)
        if beta == 1:
            d = _kl(log_q, log_p)
        else:
            # (a bucket empty on both sides: 0 in place of -inf before the logsumexp, whose backward
            # is NaN at an all -inf input, then -inf again)
            empty = (log_p == float("-inf")) & (log_q == float("-inf"))
            log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)])
                                    .masked_fill(empty, 0.0), dim=0).masked_fill(empty, float("-inf"))
            d = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    return _finish(d, z, labels, kd_weight, ce_weight, ignore_index, reduction)
