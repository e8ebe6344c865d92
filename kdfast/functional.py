"""Fused knowledge-distillation losses (the functional API).

Every loss takes student logits ``z`` and teacher logits ``v`` shaped ``(..., C)`` (each leading
index is a row: a sample or a token), optional integer ``labels`` shaped like the leading dims, and

- ``kd_weight``, ``ce_weight``: floats or tensors broadcastable to the leading shape; the per-row loss is
  ``ce_weight * CE + kd_weight * D`` (CE only with labels). Tensor weights that require grad get
  gradients (instance-wise loss mixing).
- ``ignore_index``: rows whose label equals it contribute nothing.
- ``reduction``: ``"mean"`` (alias ``"batchmean"``: sum over valid rows / their number, 0 when none is
  valid), ``"sum"`` or ``"none"`` (per row, leading shape).
- ``backend``: ``"auto"`` (the C++ kernel for CPU tensors, Triton for CUDA; ``KDFAST_BACKEND``
  overrides it), ``"cpu"``, ``"triton"`` or ``"torch"`` (the eager reference).

The student's gradient (and the teacher's, when ``teacher_logits.requires_grad``) is computed in the
forward pass and saved; backward only scales it by the upstream gradient (on the CPU, a plain
``loss.backward()`` hands the saved buffer over as ``.grad`` without a copy). With
``inplace_backward=True`` the scaling happens in the saved buffer itself (no second (N, C) buffer on
any device); a second backward through that graph then raises instead of returning a wrong result.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import _cpu, reference
from ._ops import REDUCTIONS, acc_dtype, run, topk_distill
from ._spec import KernelParams, Kind

__all__ = ["kd_loss", "ttm_loss", "wttm_loss", "dkd_loss", "logit_matching_loss", "ls_kd_loss",
           "jsd_loss", "retro_kd_loss", "topk_kd_loss"]

Weight = Union[float, Tensor]
BACKENDS = ("auto", "cpu", "triton", "torch")
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned_fallback = False


# ----------------------------------------------------------------------------- argument checks
def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a class dimension (shape (..., C)), got a 0-d tensor")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} has an empty class dimension (C = 0)")


def _check_temperature(t: float, name: str = "temperature") -> float:
    if isinstance(t, Tensor) or not isinstance(t, (int, float)) or isinstance(t, bool):
        raise ValueError(f"{name} must be a Python float, got {type(t).__name__}")
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {t}")
    return float(t)


def _check_unit(x: float, name: str) -> float:
    if isinstance(x, Tensor) or not isinstance(x, (int, float)) or isinstance(x, bool):
        raise ValueError(f"{name} must be a Python float, got {type(x).__name__}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return float(x)


def _check_finite(x: float, name: str) -> float:
    if isinstance(x, Tensor) or not isinstance(x, (int, float)) or isinstance(x, bool):
        raise ValueError(f"{name} must be a Python float, got {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return float(x)


def _check_reduction(ignore_index, reduction: str) -> str:
    """``ignore_index`` an int, ``reduction`` one of REDUCTIONS (``"batchmean"`` -> ``"mean"``)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction == "batchmean":
        reduction = "mean"
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'batchmean', 'sum', 'none', got {reduction!r}")
    return reduction


def _check_labels(labels, z: Tensor, ignore_index: int, num_classes: Optional[int] = None,
                  what: str = "") -> Optional[Tensor]:
    """Labels shaped like the leading dims of ``z``, in [0, num_classes) (default: z's last dim)
    or ``ignore_index``; ``what`` qualifies the class ids in the error (e.g. "global class ids")."""
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != z.shape[:-1]:
        raise ValueError(f"labels must have the leading shape of the logits {tuple(z.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != z.device:
        raise ValueError(f"labels are on {labels.device}, the logits on {z.device}")
    # The range check reads the labels on the host: free on the CPU, skipped on CUDA (the kernel
    # masks a bad label and makes its row NaN) and while torch.compile traces (no data-dependent
    # Python branching in a graph).
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        c = z.shape[-1] if num_classes is None else num_classes
        ok = ((labels >= 0) & (labels < c)) | (labels == ignore_index)
        if not bool(ok.all()):
            bad = labels[~ok][0].item()
            raise ValueError(f"labels must be {what + ' ' if what else ''}in [0, {c}) or "
                             f"ignore_index={ignore_index}, got {bad}")
    return labels


def _rows_weight(w: Weight, name: str, lead: torch.Size, n: int, dtype, device) -> Tensor:
    """A float or a tensor broadcastable to the leading shape -> a (N,) tensor (keeps autograd)."""
    if isinstance(w, Tensor):
        if w.dtype.is_complex or not (w.dtype.is_floating_point or w.numel() == 0):
            raise ValueError(f"{name} must be a float or a floating-point tensor, got {w.dtype}")
        if w.device != device:
            raise ValueError(f"{name} is on {w.device}, the logits on {device}")
        try:
            shape = torch.broadcast_shapes(w.shape, lead)
        except RuntimeError:
            shape = None
        if shape != lead:
            raise ValueError(f"{name} of shape {tuple(w.shape)} does not broadcast to the leading "
                             f"shape of the logits {tuple(lead)}")
        return w.to(dtype).expand(lead).reshape(n)
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise ValueError(f"{name} must be a float or a tensor, got {type(w).__name__}")
    return torch.full((n,), float(w), dtype=dtype, device=device)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("KDFAST_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"KDFAST_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and _cpu.available():
            return "cpu"
        global _warned_fallback
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"kdfast: no fused kernel for {device.type} tensors here (C++ extension "
                          "not built?); using the eager reference", RuntimeWarning, stacklevel=4)
        return "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {device.type}")
        if not _cpu.available():
            _cpu.load()   # raises ImportError with a build hint
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return backend


def _as_rows(x: Tensor, c: int) -> Tensor:
    """(..., C) -> (N, C) with unit column stride: a view whenever one exists, a copy otherwise."""
    x2 = x.reshape(-1, c)
    return x2 if x2.stride(-1) == 1 or c == 1 else x2.contiguous()


# ----------------------------------------------------------------------------- the declarations
# Each named loss is a choice of kernel parameters: one builder per loss, from its hyperparameters
# (their defaults are the loss's), checking them. The functional losses below, fused_linear and
# vocab_parallel all take their parameters from here.
def _kd(temperature=4.0):
    t = _check_temperature(temperature)
    return KernelParams(Kind.KL, t, t, t * t)


def _ttm(temperature=2.0):
    t = _check_temperature(temperature)
    return KernelParams(Kind.KL, 1.0, t, 1.0)


def _wttm(temperature=2.0):
    t = _check_temperature(temperature)
    return KernelParams(Kind.KL, 1.0, t, 1.0, wttm=True)


def _dkd(temperature=4.0, alpha=1.0, beta=8.0):
    t = _check_temperature(temperature)
    return KernelParams(Kind.DKD, t, t, t * t, alpha=_check_finite(alpha, "alpha"),
                        beta=_check_finite(beta, "beta"))


def _logit_matching(center=True):
    if not isinstance(center, bool):
        raise ValueError(f"center must be a bool, got {type(center).__name__}")
    return KernelParams(Kind.LM, center=center)


def _ls_kd(temperature=2.0):
    t = _check_temperature(temperature)
    return KernelParams(Kind.LS, t, t, t * t)


def _jsd(beta=0.5, temperature=1.0):
    t, b = _check_temperature(temperature), _check_unit(beta, "beta")
    if b in (0.0, 1.0):   # exactly forward / reverse KL
        return KernelParams(Kind.KL, t, t, 1.0, reverse=b == 1.0)
    return KernelParams(Kind.JSD, t, t, 1.0, beta=b)


def _retro_kd(temperature=4.0, past_weight=0.5):
    t = _check_temperature(temperature)
    return KernelParams(Kind.KL, t, t, t * t, rho=_check_unit(past_weight, "past_weight"))


#: method name -> builder of its KernelParams (keyword arguments: the loss's hyperparameters)
METHODS = {"kd": _kd, "ttm": _ttm, "wttm": _wttm, "dkd": _dkd, "logit_matching": _logit_matching,
           "ls_kd": _ls_kd, "jsd": _jsd, "retro_kd": _retro_kd}


# ----------------------------------------------------------------------------- the common path
def _common_args(z, labels, ignore_index, reduction, kd_weight, ce_weight, acc, backend):
    """Checks of the arguments every loss has; returns (labels, reduction, kd_w, ce_w, backend)."""
    reduction = _check_reduction(ignore_index, reduction)
    labels = _check_labels(labels, z, ignore_index)
    lead = z.shape[:-1]
    n = lead.numel()
    kd_w = _rows_weight(kd_weight, "kd_weight", lead, n, acc, z.device)
    ce_w = _rows_weight(ce_weight, "ce_weight", lead, n, acc, z.device)
    return labels, reduction, kd_w, ce_w, _resolve_backend(backend, z.device)


def _distill(params: KernelParams, ref: Callable[..., Tensor], hyper: dict, z, v, labels, *,
             kd_weight, ce_weight, ignore_index, reduction, backend, inplace_backward,
             zp=None, tp=None, min_classes: int = 1, what: str = "") -> Tensor:
    """Check the arguments, pick the backend, call the fused op (or ``ref``, the eager reference,
    with ``hyper`` as its loss hyperparameters). ``tp = (process_group, vocab_start, vocab_size)``
    with a group: the logits are vocabulary shards (:func:`kdfast.vocab_parallel._run`; the global
    vocabulary needs ``min_classes`` classes)."""
    if tp is not None and tp[0] is not None:
        from . import vocab_parallel   # lazy: vocab_parallel imports this module
        return vocab_parallel._run(params, z, v, labels, process_group=tp[0], vocab_start=tp[1],
                                   vocab_size=tp[2], kd_weight=kd_weight, ce_weight=ce_weight,
                                   ignore_index=ignore_index, reduction=reduction, backend=backend,
                                   inplace_backward=inplace_backward, zp=zp,
                                   min_classes=min_classes, what=what)
    _check_logits("student_logits", z)
    _check_logits("teacher_logits", v)
    if v.shape != z.shape:
        raise ValueError(f"teacher_logits shape {tuple(v.shape)} != student_logits shape "
                         f"{tuple(z.shape)} (same rows and number of classes required)")
    if v.device != z.device:
        raise ValueError(f"teacher_logits are on {v.device}, student_logits on {z.device}")
    if zp is not None:
        if zp.shape != z.shape:
            raise ValueError("past_student_logits must be a tensor of the student logits' shape "
                             f"{tuple(z.shape)}, got {getattr(zp, 'shape', type(zp).__name__)}")
        _check_logits("past_student_logits", zp)
        if zp.device != z.device:
            raise ValueError(f"past_student_logits are on {zp.device}, student_logits on {z.device}")
    acc = acc_dtype(z.dtype, v.dtype)
    labels, reduction, kd_w, ce_w, backend = _common_args(z, labels, ignore_index, reduction,
                                                          kd_weight, ce_weight, acc, backend)
    lead, c = z.shape[:-1], z.shape[-1]
    n = lead.numel()
    if backend == "torch":
        extra = () if zp is None else (zp,)
        return ref(z, v, *extra, labels, **hyper, kd_weight=kd_weight, ce_weight=ce_weight,
                   ignore_index=ignore_index, reduction=reduction)

    z2, v2 = _as_rows(z, c), _as_rows(v, c)
    if acc == torch.float64:            # the kernels never mix float64 with another dtype
        z2, v2 = z2.to(acc), v2.to(acc)
    zp2 = None if zp is None or params.rho == 0 else _as_rows(zp.detach(), c).to(z2.dtype)
    y2 = None if labels is None else labels.reshape(n).to(torch.int64).contiguous()
    has_ce = labels is not None and not (not isinstance(ce_weight, Tensor) and ce_weight == 0)
    params = dataclasses.replace(params, has_ce=has_ce, ignore_index=ignore_index)
    loss = run(z2, v2, zp2, y2, kd_w, ce_w, params, reduction, backend, inplace_backward)
    return loss.view(lead) if reduction == "none" else loss


_COMMON_DOC = """
    Common arguments (see :mod:`kdfast.functional`): ``labels`` (adds ``ce_weight * CE``),
    ``kd_weight``, ``ce_weight`` (floats or tensors broadcastable to the leading shape, with
    gradients), ``ignore_index``, ``reduction`` ("mean"/"batchmean", "sum", "none"), ``backend``
    ("auto", "cpu", "triton", "torch") and ``inplace_backward`` (scale the saved gradient in place in
    backward: saves one (N, C) buffer, forbids a second backward through the graph).
    ``process_group`` (with ``vocab_start`` / ``vocab_size`` for uneven shards): the logits are this
    rank's shard of the vocabulary (tensor parallelism); see :mod:`kdfast.vocab_parallel`.
"""


def _declare(f):
    f.__doc__ = (f.__doc__ or "") + _COMMON_DOC
    return f


# ----------------------------------------------------------------------------- the named losses
@_declare
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
            temperature: float = 4.0, kd_weight: Weight = 1.0, ce_weight: Weight = 1.0,
            ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
            inplace_backward: bool = False,
            process_group=None, vocab_start: Optional[int] = None,
            vocab_size: Optional[int] = None) -> Tensor:
    """Hinton et al. (2015): ``T^2 * KL(softmax(v/T) || softmax(z/T))`` per row, plus CE with labels.

    Example::

        loss = kdfast.kd_loss(student(x), teacher(x).detach(), y, temperature=4.0)
    """
    return _distill(_kd(temperature), reference.kd_loss, {"temperature": temperature},
                    student_logits, teacher_logits, labels, kd_weight=kd_weight,
                    ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
                    backend=backend, inplace_backward=inplace_backward,
                    tp=(process_group, vocab_start, vocab_size))


@_declare
def ttm_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
             temperature: float = 2.0, kd_weight: Weight = 1.0, ce_weight: Weight = 1.0,
             ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
             inplace_backward: bool = False,
             process_group=None, vocab_start: Optional[int] = None,
             vocab_size: Optional[int] = None) -> Tensor:
    """Transformed teacher matching (Zheng & Yang, 2024): ``KL(softmax(v/T) || softmax(z))``.

    The temperature acts on the teacher only and there is no ``T^2``. The default ``T = 2``
    (``gamma = 1/T = 0.5``) sits in the middle of the range the paper tunes (gamma in 0.1-0.8).
    """
    return _distill(_ttm(temperature), reference.ttm_loss, {"temperature": temperature},
                    student_logits, teacher_logits, labels, kd_weight=kd_weight,
                    ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
                    backend=backend, inplace_backward=inplace_backward,
                    tp=(process_group, vocab_start, vocab_size))


@_declare
def wttm_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
              temperature: float = 2.0, kd_weight: Weight = 1.0, ce_weight: Weight = 1.0,
              ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
              inplace_backward: bool = False,
              process_group=None, vocab_start: Optional[int] = None,
              vocab_size: Optional[int] = None) -> Tensor:
    """Weighted TTM (Zheng & Yang, 2024): ``U * KL(softmax(v/T) || softmax(z))`` per row with
    ``U = sum_j softmax(v)_j^(1/T)`` (a constant: no gradient flows through it). Default ``T = 2``
    as for :func:`ttm_loss`.
    """
    return _distill(_wttm(temperature), reference.wttm_loss,
                    {"temperature": temperature}, student_logits, teacher_logits, labels,
                    kd_weight=kd_weight, ce_weight=ce_weight, ignore_index=ignore_index,
                    reduction=reduction, backend=backend, inplace_backward=inplace_backward,
                    tp=(process_group, vocab_start, vocab_size))


def _check_classes(z: Tensor, least: int, what: str) -> None:
    if isinstance(z, Tensor) and z.dim() >= 1 and z.shape[-1] < least:
        raise ValueError(f"{what} needs at least {least} classes, student_logits has C = {z.shape[-1]}")


@_declare
def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *,
             temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0,
             kd_weight: Weight = 1.0, ce_weight: Weight = 1.0, ignore_index: int = -100,
             reduction: str = "mean", backend: str = "auto", inplace_backward: bool = False,
             process_group=None, vocab_start: Optional[int] = None,
             vocab_size: Optional[int] = None) -> Tensor:
    """Decoupled KD (Zhao et al., 2022): ``T^2 (alpha * TCKD + beta * NCKD)`` per row, where TCKD is the
    KL of the binary target / non-target split and NCKD the KL among the non-target classes.
    Needs labels and C >= 2. Defaults as in mdistiller (T = 4, alpha = 1, beta = 8).
    """
    params = _dkd(temperature, alpha, beta)
    if labels is None:
        raise ValueError("dkd_loss needs labels (the target class splits the distribution)")
    if process_group is None:   # sharded: the global vocabulary is checked in vocab_parallel
        _check_classes(student_logits, 2, "dkd_loss")
    return _distill(params, reference.dkd_loss,
                    {"temperature": temperature, "alpha": alpha, "beta": beta}, student_logits, teacher_logits,
                    labels, kd_weight=kd_weight, ce_weight=ce_weight, ignore_index=ignore_index,
                    reduction=reduction, backend=backend, inplace_backward=inplace_backward,
                    tp=(process_group, vocab_start, vocab_size), min_classes=2, what="dkd_loss")


@_declare
def logit_matching_loss(student_logits: Tensor, teacher_logits: Tensor,
                        labels: Optional[Tensor] = None, *, center: bool = True,
                        kd_weight: Weight = 1.0, ce_weight: Weight = 1.0, ignore_index: int = -100,
                        reduction: str = "mean", backend: str = "auto",
                        inplace_backward: bool = False,
                        process_group=None, vocab_start: Optional[int] = None,
                        vocab_size: Optional[int] = None) -> Tensor:
    """Logit matching, the T -> infinity limit of KD: ``(1/2C) ||(z - mean z) - (v - mean v)||^2``
    per row (``center=False``: ``(1/2C) ||z - v||^2``)."""
    return _distill(_logit_matching(center), reference.logit_matching_loss,
                    {"center": center}, student_logits, teacher_logits, labels,
                    kd_weight=kd_weight, ce_weight=ce_weight, ignore_index=ignore_index,
                    reduction=reduction, backend=backend, inplace_backward=inplace_backward,
                    tp=(process_group, vocab_start, vocab_size))


@_declare
def ls_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
               temperature: float = 2.0, kd_weight: Weight = 1.0, ce_weight: Weight = 1.0,
               ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
               inplace_backward: bool = False,
               process_group=None, vocab_start: Optional[int] = None,
               vocab_size: Optional[int] = None) -> Tensor:
    """KD on standardised logits (Sun et al., 2024): each row becomes ``(x - mean) / (1e-7 + std)``
    (unbiased std) before ``T^2 KL`` at temperature T; the gradient flows through the student's mean
    and std. Needs C >= 2.
    """
    params = _ls_kd(temperature)
    if process_group is None:
        _check_classes(student_logits, 2, "ls_kd_loss")
    return _distill(params, reference.ls_kd_loss, {"temperature": temperature},
                    student_logits, teacher_logits, labels, kd_weight=kd_weight,
                    ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
                    backend=backend, inplace_backward=inplace_backward,
                    tp=(process_group, vocab_start, vocab_size), min_classes=2, what="ls_kd_loss")


@_declare
def jsd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
             beta: float = 0.5, temperature: float = 1.0, kd_weight: Weight = 1.0,
             ce_weight: Weight = 1.0, ignore_index: int = -100, reduction: str = "mean",
             backend: str = "auto", inplace_backward: bool = False,
             process_group=None, vocab_start: Optional[int] = None,
             vocab_size: Optional[int] = None) -> Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al., 2023):
    ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``, ``p`` the teacher's and
    ``q`` the student's softmax at T (no T^2). Exactly forward KL ``KL(p || q)`` at beta = 0 and
    reverse KL ``KL(q || p)`` at beta = 1 (as TRL's ``generalized_jsd_loss``).
    """
    return _distill(_jsd(beta, temperature), reference.jsd_loss,
                    {"beta": beta, "temperature": temperature}, student_logits, teacher_logits, labels, kd_weight=kd_weight, ce_weight=ce_weight,
                    ignore_index=ignore_index, reduction=reduction, backend=backend,
                    inplace_backward=inplace_backward,
                    tp=(process_group, vocab_start, vocab_size))


@_declare
def retro_kd_loss(student_logits: Tensor, teacher_logits: Tensor, past_student_logits: Tensor,
                  labels: Optional[Tensor] = None, *, temperature: float = 4.0,
                  past_weight: float = 0.5, kd_weight: Weight = 1.0, ce_weight: Weight = 1.0,
                  ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
                  inplace_backward: bool = False,
                  process_group=None, vocab_start: Optional[int] = None,
                  vocab_size: Optional[int] = None) -> Tensor:
    """RetroKD (Jandial et al., 2023): KD towards ``r = (1 - rho) v + rho z_past``, ``z_past`` the
    logits of a past state of the student (a constant; see :class:`kdfast.PastLogits` for a cache),
    ``rho = past_weight`` in [0, 1]. The teacher's gradient, when it requires grad, is
    ``(1 - rho)`` times the gradient with respect to ``r``.
    """
    params = _retro_kd(temperature, past_weight)
    if not isinstance(past_student_logits, Tensor):
        raise ValueError("past_student_logits must be a tensor of the student logits' shape")
    return _distill(params, reference.retro_kd_loss,
                    {"temperature": temperature, "past_weight": past_weight}, student_logits, teacher_logits, labels,
                    kd_weight=kd_weight, ce_weight=ce_weight, ignore_index=ignore_index,
                    reduction=reduction, backend=backend, inplace_backward=inplace_backward,
                    zp=past_student_logits, tp=(process_group, vocab_start, vocab_size))


@_declare
def topk_kd_loss(student_logits: Tensor, teacher_topk_logprobs: Tensor, teacher_topk_indices: Tensor,
                 labels: Optional[Tensor] = None, *, temperature: float = 1.0, renormalize: bool = True,
                 kd_weight: Weight = 1.0, ce_weight: Weight = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", backend: str = "auto", inplace_backward: bool = False) -> Tensor:
    """KD against a sparse teacher that kept only its top-k log-probabilities (offline teachers, k = 8..128):
    ``T^2 * sum_k p_k (log p_k - log q_{i_k})`` per row, ``q = softmax(z / T)`` over all C classes.

    - ``teacher_topk_logprobs``: ``(..., k)`` floats, the teacher's log-probabilities (or logits) on
      the classes ``teacher_topk_indices`` (``(..., k)`` integers in ``[0, C)``, distinct within a
      row; pad a short row with any unused class and ``-inf``).
    - ``renormalize=True``: the teacher is ``softmax(logprobs / T)`` over its k classes.
      ``renormalize=False``: ``p_k = exp(logprobs_k)`` as given (its mass may be below 1; only
      ``temperature=1``); the loss is then the KL restricted to the k classes.

    No dense teacher tensor is built: the kernel sweeps the student row (its log-sum-exp) and gathers
    the k columns. The teacher gets no gradient (it is data). Equal to :func:`kd_loss` with the
    teacher scattered into a row of ``-inf`` logits (``kdfast.reference.topk_kd_loss``).
    """
    t = _check_temperature(temperature)
    if not isinstance(renormalize, bool):
        raise ValueError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    if not renormalize and t != 1.0:
        raise ValueError("renormalize=False takes the teacher's probabilities as given: temperature must be 1")
    z, lp, idx = student_logits, teacher_topk_logprobs, teacher_topk_indices
    _check_logits("student_logits", z)
    _check_logits("teacher_topk_logprobs", lp)
    if not isinstance(idx, Tensor) or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError("teacher_topk_indices must be an integer tensor")
    if lp.shape[:-1] != z.shape[:-1] or idx.shape != lp.shape:
        raise ValueError(f"teacher_topk_logprobs {tuple(lp.shape)} and teacher_topk_indices "
                         f"{tuple(idx.shape)} must both be (..., k) with the student's leading shape "
                         f"{tuple(z.shape[:-1])}")
    if lp.device != z.device or idx.device != z.device:
        raise ValueError("the teacher's top-k tensors must be on the student logits' device")
    c = z.shape[-1]
    if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
        if not bool(((idx >= 0) & (idx < c)).all()):   # CUDA: the kernel makes such a row NaN
            raise ValueError(f"teacher_topk_indices must be in [0, {c})")
    acc = acc_dtype(z.dtype, lp.dtype)
    labels, reduction, kd_w, ce_w, backend = _common_args(z, labels, ignore_index, reduction,
                                                          kd_weight, ce_weight, acc, backend)
    if backend == "torch":
        return reference.topk_kd_loss(z, lp.detach(), idx, labels, temperature=t, renormalize=renormalize,
                                      kd_weight=kd_weight, ce_weight=ce_weight,
                                      ignore_index=ignore_index, reduction=reduction)
    lead, k = z.shape[:-1], lp.shape[-1]
    n = lead.numel()
    z2 = _as_rows(z, c).to(acc) if acc == torch.float64 else _as_rows(z, c)
    lp2 = lp.detach().reshape(n, k).to(acc).contiguous()
    idx2 = idx.reshape(n, k).to(torch.int64).contiguous()
    y2 = None if labels is None else labels.reshape(n).to(torch.int64).contiguous()
    has_ce = labels is not None and not (not isinstance(ce_weight, Tensor) and ce_weight == 0)
    need_gz = torch.is_grad_enabled() and z2.requires_grad
    loss = topk_distill(z2, lp2, idx2, y2, kd_w, ce_w, [t, t * t],
                        [int(renormalize), int(has_ce), ignore_index], reduction, backend, need_gz,
                        False, inplace_backward)[0]
    return loss.view(lead) if reduction == "none" else loss
