"""TRL drop-ins: GKD's generalised JSD loss on kdfast's fused kernel.

- :func:`generalized_jsd_loss`: the signature and the semantics of TRL's
  ``GKDTrainer.generalized_jsd_loss`` (a static method), computed by :func:`kdfast.jsd_loss`. Make
  TRL's own trainer use it with one line::

      from trl.experimental.gkd import GKDTrainer        # trl < 1: from trl import GKDTrainer
      from kdfast.integrations.trl import generalized_jsd_loss
      GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)

- :class:`GKDTrainer` (``from kdfast.integrations.trl import GKDTrainer``): TRL's ``GKDTrainer``
  whose ``compute_loss`` also hands the loss the *unsliced* ``(B, T, V)`` logits with the labels
  shifted instead of TRL's ``logits[:, :-1, :]`` views (which the kernel, needing one row stride,
  would copy: two ``(N, V)`` copies per step, and a slice backward writing a zero-filled full
  gradient). Same losses as TRL's trainer. Importing it needs TRL installed.

Only ``torch`` is imported by :func:`generalized_jsd_loss`; TRL only when :class:`GKDTrainer` is
asked for.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import jsd_loss

__all__ = ["generalized_jsd_loss", "GKDTrainer", "shift_labels"]

_IGNORE = -100   # TRL masks the positions whose label is -100 (and only those)


def shift_labels(labels: Tensor, ignore_index: int = _IGNORE) -> Tensor:
    """Causal-LM labels for the unshifted logits: ``out[..., t] = labels[..., t + 1]`` and
    ``ignore_index`` in the last position (the logits at position ``t`` predict token ``t + 1``;
    the last position predicts nothing). A ``(B, T)`` copy of the labels instead of two
    ``(B, T - 1, V)`` copies of the logits."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _count_args(student_logits: Tensor, labels: Optional[Tensor], reduction: str, num_items_in_batch):
    """TRL's reductions as kdfast's ``(reduction, num_items_in_batch)``; None for TRL's per-element
    result. Every divisor is folded into the kernel's gradient scale (kdfast's "mean" with a count):
    no scalar division after the loss, whose backward would make a second (N, V) buffer.

    - ``num_items_in_batch`` given (any reduction): ``sum / num_items_in_batch``;
    - ``"batchmean"``: ``sum / max(n_valid, 1)`` with labels (kdfast's own "mean"), else
      ``sum / max(B, 1)``, ``B = student_logits.size(0)`` (the batch, not the tokens: TRL's choice);
    - ``"sum"``: the sum;
    - ``"mean"``: ``sum / (n_valid * V)`` with labels, else ``sum / numel`` (the mean of the
      per-element terms), n_valid counted on the device;
    - anything else: per element (None here).
    """
    if num_items_in_batch is not None:
        return "mean", num_items_in_batch
    if reduction == "batchmean":
        return "mean", (None if labels is not None else max(student_logits.size(0), 1))
    if reduction == "sum":
        return "sum", None
    if reduction == "mean":
        v = student_logits.shape[-1]
        if labels is None:
            return "mean", student_logits.numel()
        return "mean", (labels != _IGNORE).sum() * v
    return None


def _per_element(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor],
                 beta: float, temperature: float) -> Tensor:
    """TRL's ``reduction="none"`` without a count: the ``(..., V)`` terms (rows of the masked
    positions dropped, ``(n_valid, V)``), in the logits' dtype. The fused kernel writes per-row
    terms only, so this is the eager computation (and autograd's gradient), as memory-hungry as TRL's.

    Per element, with ``q = softmax(z / T)``, ``p = softmax(v / T)``, ``m = beta p + (1 - beta) q``:
    ``beta p_j log(p_j / m_j) + (1 - beta) q_j log(q_j / m_j)``; ``p_j log(p_j / q_j)`` at
    ``beta = 0``, ``q_j log(q_j / p_j)`` at ``beta = 1``."""
    ls = torch.log_softmax(student_logits / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        out = lt.exp() * (lt - ls)
    elif beta == 1:
        out = ls.exp() * (ls - lt)
    else:
        lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))   # log m
        out = beta * lt.exp() * (lt - lm) + (1 - beta) * ls.exp() * (ls - lm)
    return out if labels is None else out[labels != _IGNORE]


def _jsd(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor], beta, temperature,
         reduction: str, num_items_in_batch, inplace_backward: bool) -> Tensor:
    beta, temperature = float(beta), float(temperature)
    how = _count_args(student_logits, labels, reduction, num_items_in_batch)
    if how is None:
        return _per_element(student_logits, teacher_logits, labels, beta, temperature)
    red, count = how
    # TRL's labels are a mask only: any value but -100 is a kept position (it need not be a class
    # id), so the kernel gets 0 there, and ce_weight=0 (kdfast would otherwise add CE on them).
    mask = None if labels is None else labels.masked_fill(labels != _IGNORE, 0)
    # The kernel's gradient (docs/kernel-math.md), for u = z / T, q = softmax(u), p = softmax(v / T),
    # m = beta p + (1 - beta) q, J = beta KL(p || m) + (1 - beta) KL(q || m): with q free,
    #   dJ/dq_j = -beta (1 - beta) p_j / m_j + (1 - beta) (log(q_j / m_j) + 1) - (1 - beta)^2 q_j / m_j
    #           = (1 - beta) (log(q_j / m_j) + 1 - (beta p_j + (1 - beta) q_j) / m_j)
    #           = (1 - beta) log(q_j / m_j);
    # through the softmax, dJ/du_j = q_j (g_j - sum_k q_k g_k), so
    #   dJ/dz_j = (1 - beta) / T * q_j (log(q_j / m_j) - KL(q || m))
    # (beta = 0: (q_j - p_j) / T; beta = 1: q_j (log(q_j / p_j) - KL(q || p)) / T), the teacher's
    # symmetrically with beta <-> 1 - beta; masked rows 0; times 1 / count for the reduction (the
    # count in the kernel's gradient scale: see _count_args).
    return jsd_loss(student_logits, teacher_logits, mask, beta=beta, temperature=temperature,
                    ce_weight=0.0, ignore_index=_IGNORE, reduction=red, num_items_in_batch=count,
                    inplace_backward=inplace_backward)


def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                         beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                         num_items_in_batch: Union[None, int, Tensor] = None) -> Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (same signature, same values and gradients) on
    kdfast's fused kernel: the generalised JSD of GKD (Agarwal et al., ICLR 2024),
    ``beta KL(p || m) + (1 - beta) KL(q || m)`` per position with ``m = beta p + (1 - beta) q``,
    ``p = softmax(teacher_logits / T)``, ``q = softmax(student_logits / T)``; exactly the forward KL
    ``KL(p || q)`` at ``beta = 0`` and the reverse KL ``KL(q || p)`` at ``beta = 1``; no ``T^2``.

    - ``student_logits``, ``teacher_logits``: ``(..., V)`` (TRL: ``(B, T, V)``). Rows laid out with
      one row stride are read in place; a ``[:, :-1, :]`` slice of ``(B, T, V)`` logits is copied
      (use :class:`GKDTrainer`, or :func:`shift_labels` on the unsliced logits).
    - ``labels``: the leading shape; positions whose label is ``-100`` are masked (dropped). They are
      a mask only: no cross-entropy is added (``kdfast.jsd_loss`` would add it with its default
      ``ce_weight=1``; this passes ``ce_weight=0``).
    - ``reduction`` (TRL's): ``"batchmean"`` = sum / number of unmasked positions (clamped to 1),
      or / ``student_logits.size(0)`` (the batch size) without labels; ``"sum"``; ``"mean"`` = the
      mean of the per-element terms, sum / (unmasked positions x V); anything else (``"none"``):
      the per-element terms, ``(n_unmasked, V)`` with labels, the logits' shape without.
    - ``num_items_in_batch``: when given, whatever ``reduction`` is, sum / ``num_items_in_batch``
      (gradient-accumulation-correct normalisation; a tensor is never read on the host).

    Differences from TRL, all outside GKDTrainer's use: the loss comes back in float32 for
    float16 / bfloat16 logits (TRL's is in the logits' dtype, computed in it); a count of 0
    (``num_items_in_batch=0``, or ``"mean"`` with every position masked) gives 0 where TRL gives
    NaN or inf; per-element ``"none"`` (no count) is not fused: it runs an eager computation (the
    kernel writes per-row terms only), as memory-hungry as TRL's; ``beta`` and ``temperature`` must
    be Python numbers (``beta`` in [0, 1], ``temperature > 0``).
    """
    return _jsd(student_logits, teacher_logits, labels, beta, temperature, reduction,
                num_items_in_batch, inplace_backward=False)


def _gkd_base():
    try:
        from trl.experimental.gkd import GKDTrainer as base   # trl >= 1 (experimental since 0.2x)
    except ImportError:
        from trl import GKDTrainer as base                    # older trl
    return base


def _make_gkd_trainer():
    base = _gkd_base()

    class GKDTrainer(base):
        """TRL's ``GKDTrainer`` with kdfast's fused generalised JSD (:func:`generalized_jsd_loss`)
        on the unsliced logits.

        Its ``compute_loss`` runs the student and (in eval mode, without grad) the teacher as TRL's
        does, then hands the loss the whole ``(B, T, V)`` logits with :func:`shift_labels` (the
        label of position ``t`` is token ``t + 1``; -100 in the last position and wherever TRL's
        collator masked the prompt or padding) instead of ``[:, :-1, :]`` slices: no copy of either
        logits tensor. The mask, the ``beta`` (``self.beta``; the temperature is 1, as in TRL's
        ``compute_loss``, which uses ``args.temperature`` for generation only) and the
        normalisation (``num_items_in_batch`` when the Trainer passes it, else the unmasked count)
        are TRL's: the losses equal TRL's trainer's. The gradient is scaled in place in backward
        (``inplace_backward``: the Trainer runs one backward per loss).

        ``generalized_jsd_loss`` is kdfast's drop-in too, for code that calls it directly.
        """

        generalized_jsd_loss = staticmethod(generalized_jsd_loss)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            feed = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            student_outputs = model(**feed)
            self.teacher_model.eval()
            with torch.no_grad():
                teacher_outputs = self.teacher_model(**feed)
            loss = _jsd(student_outputs.logits, teacher_outputs.logits, shift_labels(inputs["labels"]),
                        self.beta, 1.0, "batchmean", num_items_in_batch, inplace_backward=True)
            return (loss, student_outputs) if return_outputs else loss

    GKDTrainer.__module__ = __name__
    return GKDTrainer


_LAZY = {}


def __getattr__(name: str):
    """``GKDTrainer`` is built (and TRL imported) on first access."""
    if name == "GKDTrainer":
        if name not in _LAZY:
            _LAZY[name] = _make_gkd_trainer()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
