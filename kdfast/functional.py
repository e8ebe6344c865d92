"""Fused knowledge-distillation losses (the functional API).

Every loss takes student logits ``z`` and teacher logits ``v`` shaped ``(..., C)`` (each leading
index is a row: a sample or a token), optional integer ``labels`` shaped like the leading dims, and

- ``kd_weight``, ``ce_weight``: floats or tensors broadcastable to the leading shape; the per-row loss is
  ``ce_weight * CE + kd_weight * D`` (CE only with labels). Tensor weights that require grad get
  gradients (instance-wise loss mixing).
- ``ignore_index``: rows whose label equals it contribute nothing.
- ``reduction``: ``"mean"`` (alias ``"batchmean"``: sum over valid rows / their number, 0 when none is
  valid), ``"sum"`` or ``"none"`` (per row, leading shape).
- ``num_items_in_batch``: an int or a 0-d tensor; ``"mean"`` then divides by ``max(it, 1)`` instead
  of the local number of valid rows (token-count normalisation across gradient-accumulation steps
  and ranks, as Hugging Face's ``Trainer`` passes it). Never read on the host.
- ``backend``: ``"auto"`` (the C++ kernel for CPU tensors, Triton for CUDA; ``KDFAST_BACKEND``
  overrides it), ``"cpu"``, ``"triton"`` or ``"torch"`` (the eager reference).

The student's gradient (and the teacher's, when ``teacher_logits.requires_grad``) is computed in the
forward pass and saved; backward only scales it by the upstream gradient (on the CPU, a plain
``loss.backward()`` hands the saved buffer over as ``.grad`` without a copy). With
``inplace_backward=True`` the scaling happens in the saved buffer itself (no second (N, C) buffer on
any device); a second backward through that graph then raises instead of returning a wrong result.

The named losses (``kd_loss``, ...) are generated from their declarations in :mod:`kdfast.losses`
(each a real function: positional tensors, the loss's hyperparameters, the options of
:func:`_options`), and call one shared path. Every entry point of the package (these losses, the
fused linear head, multi-teacher, vocabulary-parallel) prepares its arguments with :func:`prepare`
and calls a custom op of :mod:`kdfast._ops`.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import sys
import warnings
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _cpu
from ._ops import REDUCTIONS, acc_dtype, run, run_topk
from ._spec import KernelParams, TopkParams
from .losses import REGISTRY, Loss, define

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
        # contiguous: the kernels read (N,) weights densely (a broadcast tensor is a stride-0 view)
        return w.to(dtype).expand(lead).reshape(n).contiguous()
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


def _check_classes(z: Tensor, least: int, what: str) -> None:
    if least > 1 and isinstance(z, Tensor) and z.dim() >= 1 and z.shape[-1] < least:
        raise ValueError(f"{what} needs at least {least} classes, student_logits has C = {z.shape[-1]}")


def _check_past(zp, z: Tensor) -> None:
    """retro_kd's past student logits: a float tensor of the student's shape, on its device."""
    if not isinstance(zp, Tensor) or zp.shape != z.shape:
        raise ValueError("past_student_logits must be a tensor of the student logits' shape "
                         f"{tuple(z.shape)}, got {getattr(zp, 'shape', type(zp).__name__)}")
    _check_logits("past_student_logits", zp)
    if zp.device != z.device:
        raise ValueError(f"past_student_logits are on {zp.device}, student_logits on {z.device}")


# ----------------------------------------------------------------------------- the one normalised call
class Prepared(NamedTuple):
    """The arguments every entry point hands its custom op, normalised by :func:`prepare`."""

    params: Union[KernelParams, TopkParams]   # ``has_ce`` and ``ignore_index`` filled in
    labels: Optional[Tensor]   # as given (checked): the eager reference takes them so
    y: Optional[Tensor]        # (N,) int64 contiguous, or None
    kd_w: Tensor               # (N,) contiguous, accumulation dtype (keeps autograd)
    ce_w: Tensor
    reduction: str             # "mean", "sum" or "none"
    backend: str               # resolved: "cpu", "triton" or "torch"
    lead: torch.Size           # the leading (row) shape
    n: int                     # rows
    #: ``1 / max(num_items_in_batch, 1)`` when it was folded into the row weights (``reduction``
    #: then reads "sum"), else None: the eager reference paths multiply their "sum" by it
    item_scale: Union[None, float, Tensor] = None

    def rescale(self, loss: Tensor) -> Tensor:
        """A loss computed with ``self.reduction`` from the *unscaled* weights (the eager reference
        paths) -> the loss asked for."""
        return loss if self.item_scale is None else loss * self.item_scale


def _item_scale(num_items_in_batch, acc: torch.dtype, device: torch.device) -> Union[float, Tensor]:
    """``1 / max(num_items_in_batch, 1)``: a Python float for a Python number; for a tensor, a 0-d
    ``acc`` tensor computed where the count lives (the logits' device, or a CPU scalar, which device
    kernels take as an argument): the count is never read on the host (no synchronisation, no graph
    break under ``torch.compile``)."""
    x = num_items_in_batch
    if isinstance(x, Tensor):
        if x.numel() != 1 or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError("num_items_in_batch must be an int or a one-element real tensor, got "
                             f"a {x.dtype} tensor of shape {tuple(x.shape)}")
        if x.device != device and x.device.type != "cpu":
            raise ValueError(f"num_items_in_batch is on {x.device}, the logits on {device}")
        return x.detach().reshape(()).to(acc).clamp_min(1).reciprocal()
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 or x == float("inf"):
        raise ValueError(f"num_items_in_batch must be an int >= 0 or a 0-d tensor, got {x!r}")
    return 1.0 / max(x, 1)


@functools.lru_cache(maxsize=256)
def _with_ce(params, has_ce: bool, ignore_index: int):
    """``params`` with ``has_ce`` and ``ignore_index`` set (cached: a training loop asks for the same
    ones every step)."""
    return dataclasses.replace(params, has_ce=has_ce, ignore_index=ignore_index)


def prepare(params, like: Tensor, labels, *, kd_weight, ce_weight, ignore_index, reduction, backend,
            acc: torch.dtype, num_classes: Optional[int] = None, what: str = "",
            resolve_backend: bool = True, num_items_in_batch=None) -> Prepared:
    """The argument preparation every entry point (the losses, :mod:`~kdfast.fused_linear`,
    :mod:`~kdfast.multi_teacher`, :mod:`~kdfast.vocab_parallel`) shares, after checking its own
    tensors: ``ignore_index`` and ``reduction``, the labels against ``like`` (the ``(..., C)``
    logits, or a stand-in of their shape; ``num_classes``: the classes when not ``like``'s last dim),
    the row weights in ``acc``, the backend (``resolve_backend=False``: only its name is checked),
    and the kernel parameters' ``has_ce`` (labels given and ``ce_weight`` not the constant 0) and
    ``ignore_index``.

    ``num_items_in_batch`` (token-count normalisation) is applied here, once for every entry point:
    with ``reduction="mean"`` the row weights are multiplied by ``s = 1 / max(num_items_in_batch, 1)``
    and the reduction becomes ``"sum"``, so ``loss = sum_i (s kd_w_i D_i + s ce_w_i CE_i)`` =
    ``sum_i loss_i / num_items_in_batch``. The kernels already multiply each row's gradient by its
    weights (``d loss / d z_i = kd_w_i dD_i/dz_i + ce_w_i dCE_i/dz_i``, times the reduction's scale,
    here 1), so the count lands in the kernel's gradient scale: no (N, C) division, no extra buffer;
    the only new autograd node is the (N,) product with ``s``, whose gradient to a weight tensor is
    ``s D_i`` (resp. ``s CE_i``). Other reductions ignore the count."""
    reduction = _check_reduction(ignore_index, reduction)
    labels = _check_labels(labels, like, ignore_index, num_classes, what)
    lead = like.shape[:-1]
    n = lead.numel()
    kd_w = _rows_weight(kd_weight, "kd_weight", lead, n, acc, like.device)
    ce_w = _rows_weight(ce_weight, "ce_weight", lead, n, acc, like.device)
    if resolve_backend:
        backend = _resolve_backend(backend, like.device)
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    y = None if labels is None else labels.reshape(n).to(torch.int64).contiguous()
    has_ce = labels is not None and not (not isinstance(ce_weight, Tensor) and ce_weight == 0)
    params = _with_ce(params, has_ce, ignore_index)
    scale = None
    if num_items_in_batch is not None:
        scale = _item_scale(num_items_in_batch, acc, like.device)   # checked whatever the reduction
        if reduction == "mean":
            kd_w, ce_w, reduction = kd_w * scale, ce_w * scale, "sum"
        else:
            scale = None
    return Prepared(params, labels, y, kd_w, ce_w, reduction, backend, lead, n, scale)


def _distill(params: KernelParams, ref: Callable[..., Tensor], hyper: dict, z, v, labels, *,
             kd_weight, ce_weight, ignore_index, reduction, backend, inplace_backward,
             num_items_in_batch=None, zp=None, tp=None, min_classes: int = 1, what: str = "") -> Tensor:
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
                                   min_classes=min_classes, what=what,
                                   num_items_in_batch=num_items_in_batch)
    _check_logits("student_logits", z)
    _check_logits("teacher_logits", v)
    if v.shape != z.shape:
        raise ValueError(f"teacher_logits shape {tuple(v.shape)} != student_logits shape "
                         f"{tuple(z.shape)} (same rows and number of classes required)")
    if v.device != z.device:
        raise ValueError(f"teacher_logits are on {v.device}, student_logits on {z.device}")
    if zp is not None:
        _check_past(zp, z)
    acc = acc_dtype(z.dtype, v.dtype)
    a = prepare(params, z, labels, kd_weight=kd_weight, ce_weight=ce_weight, ignore_index=ignore_index,
                reduction=reduction, backend=backend, acc=acc, num_items_in_batch=num_items_in_batch)
    if a.backend == "torch":
        extra = () if zp is None else (zp,)
        return a.rescale(ref(z, v, *extra, a.labels, **hyper, kd_weight=kd_weight, ce_weight=ce_weight,
                             ignore_index=ignore_index, reduction=a.reduction))
    c = z.shape[-1]
    z2, v2 = _as_rows(z, c), _as_rows(v, c)
    if acc == torch.float64:            # the kernels never mix float64 with another dtype
        z2, v2 = z2.to(acc), v2.to(acc)
    zp2 = None if zp is None or params.rho == 0 else _as_rows(zp.detach(), c).to(z2.dtype)
    loss = run(z2, v2, zp2, a.y, a.kd_w, a.ce_w, a.params, a.reduction, a.backend, inplace_backward)
    return loss.view(a.lead) if a.reduction == "none" else loss


def _topk(params: TopkParams, ref: Callable[..., Tensor], hyper: dict, z, lp, idx, labels, *,
          kd_weight, ce_weight, ignore_index, reduction, backend, inplace_backward,
          num_items_in_batch=None) -> Tensor:
    """:func:`_distill` for a top-k teacher (``kdfast::topk_distill``)."""
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
    validate = hyper.get("validate")
    if (validate if validate is not None else idx.device.type == "cpu") and not torch.compiler.is_compiling():
        validate_topk(lp, idx, c, as_given=not params.renormalize)
    acc = acc_dtype(z.dtype, lp.dtype)
    a = prepare(params, z, labels, kd_weight=kd_weight, ce_weight=ce_weight, ignore_index=ignore_index,
                reduction=reduction, backend=backend, acc=acc, num_items_in_batch=num_items_in_batch)
    if a.backend == "torch":
        return a.rescale(ref(z, lp.detach(), idx, a.labels, **hyper, kd_weight=kd_weight,
                             ce_weight=ce_weight, ignore_index=ignore_index, reduction=a.reduction))
    k = lp.shape[-1]
    z2 = _as_rows(z, c).to(acc) if acc == torch.float64 else _as_rows(z, c)
    lp2 = lp.detach().reshape(a.n, k).to(acc).contiguous()
    idx2 = idx.reshape(a.n, k).to(torch.int64).contiguous()
    loss = run_topk(z2, lp2, idx2, a.y, a.kd_w, a.ce_w, a.params, a.reduction, a.backend,
                    inplace_backward)
    return loss.view(a.lead) if a.reduction == "none" else loss


def validate_topk(lp: Tensor, idx: Tensor, num_classes: int, *, as_given: bool = True) -> None:
    """Check a top-k teacher (``topk_kd_loss(..., validate=...)``; :mod:`kdfast.teacher_store` on
    read): ``ValueError`` for a class outside ``[0, num_classes)``, a class twice in a row, a NaN
    log-probability, and with ``as_given`` (log-probabilities used as given, ``renormalize=False``)
    a log-probability above 0 or a row whose ``sum_k exp(lp_k)`` exceeds 1, beyond rounding
    (``4 eps`` of ``lp``'s dtype on each value, ``eps (4 + log k)`` on the sum: a stored value's
    relative rounding moves ``p_k`` by ``eps |lp_k|``, and ``sum_k p_k |lp_k|`` is at most about
    ``log k + 1``). Cost: a few elementwise passes and a sort over the ``(N, k)`` tensors, and one
    host synchronisation (the ``bool`` of each check) when they are on a GPU."""
    if not idx.numel():
        return
    if not bool(((idx >= 0) & (idx < num_classes)).all()):
        raise ValueError(f"teacher_topk_indices must be in [0, {num_classes})")
    k = idx.shape[-1]
    if k > 1:
        srt = idx.reshape(-1, k).sort(dim=-1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("teacher_topk_indices must be distinct within a row (a class appears twice)")
    if bool(torch.isnan(lp).any()):
        raise ValueError("teacher_topk_logprobs contain NaN")
    if as_given:
        eps = torch.finfo(lp.dtype).eps
        if bool((lp > 4 * eps).any()):
            raise ValueError("teacher_topk_logprobs must be log-probabilities (<= 0) with "
                             "renormalize=False; found a value above 0")
        mass = torch.logsumexp(lp.double().reshape(-1, k), dim=-1).exp()
        if bool((mass > 1 + eps * (4 + math.log(k))).any()):
            raise ValueError("teacher_topk_logprobs: a row's probabilities sum_k exp(lp_k) exceed 1 "
                             "(renormalize=False takes them as given)")


def _has_dtensor(args: dict) -> bool:
    """DTensor logits (student or teacher). No DTensor exists before torch.distributed.tensor is
    imported: until then this is one dict look-up (nothing imported); then two isinstance."""
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and (isinstance(args["student_logits"], cls)
                                or isinstance(args.get("teacher_logits"), cls))


def _call(loss: Loss, args: dict) -> Tensor:
    """The body of every named loss function: ``args`` its arguments by name."""
    if _has_dtensor(args):   # DTensor logits -> local tensors (kdfast/_dtensor.py)
        from . import _dtensor
        return _dtensor.call(loss, args)
    hyper = {k: args[k] for k in loss.hyperparameters}
    params = loss.params(**hyper)            # checks the hyperparameters
    z, labels = args["student_logits"], args["labels"]
    group = args.get("process_group")
    if loss.needs_labels and labels is None:
        raise ValueError(f"{loss.function_name} needs labels ({loss.needs_labels})")
    if group is None:   # sharded: the global vocabulary is checked in vocab_parallel
        _check_classes(z, loss.min_classes, loss.function_name)
    if loss.past_student and not isinstance(args["past_student_logits"], Tensor):
        raise ValueError("past_student_logits must be a tensor of the student logits' shape")
    common = {k: args[k] for k in _COMMON}
    if not loss.dense:
        return _topk(params, loss.reference, hyper, z, args["teacher_topk_logprobs"],
                     args["teacher_topk_indices"], labels, **common)
    return _distill(params, loss.reference, hyper, z, args["teacher_logits"], labels, **common,
                    zp=args.get("past_student_logits"), tp=(group, args["vocab_start"], args["vocab_size"]),
                    min_classes=loss.min_classes, what=loss.function_name)


# ----------------------------------------------------------------------------- the named losses
def _options(*, kd_weight: Weight = 1.0, ce_weight: Weight = 1.0, ignore_index: int = -100,
             reduction: str = "mean", backend: str = "auto", inplace_backward: bool = False,
             num_items_in_batch: Union[None, int, Tensor] = None, process_group=None, vocab_start: Optional[int] = None, vocab_size: Optional[int] = None):
    """The options every loss takes after its hyperparameters, with their defaults (the last three,
    the vocabulary shard layout, only the losses of a dense teacher)."""


_OPTIONS = inspect.signature(_options).parameters
_SHARDED = ("process_group", "vocab_start", "vocab_size")
_COMMON = tuple(k for k in _OPTIONS if k not in _SHARDED)

_COMMON_DOC = """
    Common arguments (see :mod:`kdfast.functional`): ``labels`` (adds ``ce_weight * CE``),
    ``kd_weight``, ``ce_weight`` (floats or tensors broadcastable to the leading shape, with
    gradients), ``ignore_index``, ``reduction`` ("mean"/"batchmean", "sum", "none"), ``backend``
    ("auto", "cpu", "triton", "torch") and ``inplace_backward`` (scale the saved gradient in place in
    backward: saves one (N, C) buffer, forbids a second backward through the graph).
    ``num_items_in_batch`` (an int or a 0-d tensor, as Hugging Face's ``Trainer`` passes it):
    ``reduction="mean"`` divides the sum by ``max(num_items_in_batch, 1)`` instead of the number of
    valid rows here (the count of the whole batch over gradient-accumulation steps and data-parallel
    ranks); read on the device, never on the host; folded into the kernel's gradient scale. Other
    reductions ignore it.
    ``process_group`` (with ``vocab_start`` / ``vocab_size`` for uneven shards): the logits are this
    rank's shard of the vocabulary (tensor parallelism); see :mod:`kdfast.vocab_parallel`.
    DTensor logits on a 1-D mesh (``Shard(-1)``, ``Replicate()`` or sharded rows) need no
    ``process_group``; see :mod:`kdfast._dtensor` and ``docs/vocab-parallel.md``.
"""


def options(loss: Loss) -> list[inspect.Parameter]:
    """The options ``loss`` takes (keyword-only, after its hyperparameters)."""
    return [p for k, p in _OPTIONS.items() if loss.dense or k not in _SHARDED]


def signature(loss: Loss) -> inspect.Signature:
    """``kdfast.<name>_loss``'s signature: the positional tensors, then (keyword-only) the
    hyperparameters of the declaration and the options."""
    hyper = [p.replace(kind=p.KEYWORD_ONLY) for p in loss.signature().parameters.values()]
    return inspect.Signature(loss.positional() + hyper + options(loss), return_annotation="Tensor")


def _function(loss: Loss) -> Callable[..., Tensor]:
    return define(loss.function_name, signature(loss), functools.partial(_call_kw, loss),
                  module=__name__, doc=(loss.params.__doc__ or "") + _COMMON_DOC)


def _call_kw(loss: Loss, **args) -> Tensor:
    return _call(loss, args)


for _loss in REGISTRY.values():
    globals()[_loss.function_name] = _function(_loss)
del _loss

#: every named loss function (``kdfast.kd_loss``, ...), in declaration order
__all__ = [loss.function_name for loss in REGISTRY.values()]
#: method name -> builder of its KernelParams (keyword arguments: the loss's hyperparameters), for
#: the losses of a dense teacher (derived from ``kdfast.losses.REGISTRY``)
METHODS = {name: loss.params for name, loss in REGISTRY.items() if loss.dense}
