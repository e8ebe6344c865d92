"""Fused linear head + distillation loss: the ``(N, V)`` logits are never materialised.

:func:`fused_linear_distill_loss` takes the student's hidden states ``h`` ``(..., H)`` and its output
head ``W`` ``(V, H)`` (+ ``bias``) instead of its logits, and the teacher's logits, or the teacher's
hidden states and head. The rows are processed in chunks of ``chunk_size`` rows; per chunk:

1. ``z = h_c @ W.T (+ b)``: one matmul into a reused ``(chunk, V)`` buffer, in ``h``'s dtype; the
   teacher's chunk ``v`` is a view of ``teacher_logits`` or ``h_t,c @ W_t.T (+ b_t)`` (no gradient);
2. the fused loss kernel of the chosen backend (the same one the logits losses use) writes the
   per-row terms and, *in place over* ``z``, the logit gradient
   ``grad_scale * (kd_w * dD/dz + ce_w * dCE/dz)`` (the backend contract allows ``grad_z`` to alias
   ``z``: the kernel's last sweep reads each element before writing it);
3. ``grad_h[c] = g @ W``, ``grad_W += g.T @ h_c``, ``grad_b += g.sum(0)`` (``grad_W`` and ``grad_b``
   accumulate in float32, float64 for float64 inputs).

Memory beyond the inputs and the gradients is one ``(chunk, V)`` student buffer, plus one for the
teacher when it comes from hidden states (and one for a past student given as hidden states);
for fp16 / bf16 heads also the float32 ``grad_W`` accumulator and one ``(V, H)`` product per chunk.

Reductions. ``"mean"`` divides by the number of non-ignored rows of the *whole* batch, counted
once up front (a device tensor: no host sync), and ``"sum"``: the gradients are complete after the
forward and backward only multiplies them by the (scalar) upstream gradient, as the logits losses
do. ``"none"``: the per-row gradient depends on the upstream gradient ``g_i``, unknown in the
forward. So the forward computes the losses only, and backward runs the chunk loop again with the row
weights multiplied by ``g_i`` (the gradient is linear in the row weights): one more student and
teacher matmul per chunk, the memory stays the same.

Default chunk size (``chunk_size=None``): ``memory_budget // bytes_per_row`` rows, rounded down to a
multiple of 32 and clamped to ``[32, N]``, where ``bytes_per_row = V * (student itemsize + the
itemsize of every source computed from hidden states)`` is what the chunk buffers cost per row, and
``memory_budget`` defaults to 256 MiB. E.g. V = 32000 fp32, teacher from hidden: 1024 rows (2 x 125
MiB); teacher given as logits: 2080 rows. The 32-row floor keeps the matmuls efficient for huge V.

Column-parallel head (tensor parallelism: ``process_group=``, with ``vocab_start`` / ``vocab_size``
for uneven shards as in :mod:`kdfast.vocab_parallel`; every method). Each rank holds the vocabulary rows
``[vocab_start, vocab_start + V_local)`` of the student's head (and bias), and of the teacher's head
or the matching columns of the teacher's logits; the hidden states and the labels (global class ids)
are the same on every rank. Per chunk, step 2 becomes the two-phase kernels (kdfast/_spec.py, "Two
phases"): the chunk's statistics, **one all-gather** of them (``(world, chunk, 12)`` float64), the
finish (the local logit gradient, in place over the chunk). After the chunks, **one all_reduce** of
the loss parts (``(2, N)`` float64) and, when ``h`` needs a gradient, **one all_reduce** of
``grad_h`` (``h`` is replicated: each rank's ``g_local @ W_local`` is one shard's part of the sum
over the vocabulary); ``grad_W`` / ``grad_b`` stay local. So a call runs ``ceil(N / chunk)``
all-gathers and at most 2 all_reduces; backward runs none, except with ``reduction="none"``: it
reruns the chunks with the statistics the forward gathered (kept: ``world x N x 12`` float64; no
all-gather) and runs the one all_reduce of ``grad_h``. The default chunk size is computed from the
*global* vocabulary, so a rank's chunk buffers are ``1 / world`` of the single-device ones (and the
chunks, hence the all-gathers, as many). Whether ``h`` requires grad must agree over the ranks.

The teacher (and the past student of ``retro_kd``) are constants: no gradient flows to them, even
when they require grad (online distillation needs the logits losses). Any loss of the family works
through ``method``; its hyperparameters are keyword arguments whose ``None`` means the named loss's
default (``kdfast.kd_loss`` & co.), and passing one the method does not take is a ``ValueError``.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from ._ops import phase_fns, run_linear, source_buffer, source_rows
from ._spec import PHASED_KINDS, KernelParams
from .functional import _check_reduction, prepare
from .losses import REGISTRY, define

__all__ = ["fused_linear_distill_loss", "FusedLinearDistillLoss", "default_chunk_size", "METHODS",
           "DEFAULT_MEMORY_BUDGET"]

DEFAULT_MEMORY_BUDGET = 256 << 20   # bytes for the chunk logits buffers
_MIN_CHUNK, _CHUNK_ALIGN = 32, 32
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- the methods
#: method name -> builder of its KernelParams: the losses of a dense teacher (kdfast.losses.REGISTRY)
METHODS = {name: loss.params for name, loss in REGISTRY.items() if loss.dense}


def _hyperparameters() -> list[inspect.Parameter]:
    """Every method's hyperparameters, in order of first declaration, keyword-only, default None
    (the method's own default), annotated ``Optional[<the declaration's annotation>]``."""
    out = {}
    for name, build in METHODS.items():
        for k, p in inspect.signature(build).parameters.items():
            if k not in out:
                ann = p.annotation if p.annotation is not p.empty else "Any"
                out[k] = inspect.Parameter(k, p.KEYWORD_ONLY, default=None, annotation=f"Optional[{ann}]")
    return list(out.values())


def _method_params(method: str, hyper: dict) -> tuple[KernelParams, dict]:
    """(kernel params, the full hyperparameters with the method's defaults) for ``method``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    loss = REGISTRY[method]
    given = {k: v for k, v in hyper.items() if v is not None}
    extra = sorted(set(given) - set(loss.hyperparameters))
    if extra:
        raise ValueError(f"method {method!r} takes the hyperparameters {loss.hyperparameters}, "
                         f"got {extra}")
    return loss.params(**given), loss.defaults() | given


# ----------------------------------------------------------------------------- chunk size
def default_chunk_size(n_rows: int, bytes_per_row: int,
                       memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Rows per chunk: ``memory_budget // bytes_per_row`` rounded down to a multiple of 32, clamped
    to ``[32, n_rows]`` (at least 1)."""
    rows = memory_budget // max(int(bytes_per_row), 1)
    rows = max(_MIN_CHUNK, rows // _CHUNK_ALIGN * _CHUNK_ALIGN)
    return max(1, min(rows, int(n_rows)))


# ----------------------------------------------------------------------------- constant logits
def _check_float(name: str, x, dim: Optional[int] = None) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    if dim is None and x.dim() < 1:
        raise ValueError(f"{name} must have a feature dimension (shape (..., D)), got a 0-d tensor")


class _Source:
    """Constant (no-gradient) logits given as ``{name}_logits`` ``(..., V)``, or as
    ``{name}_hidden`` ``(..., H)`` and ``{name}_weight`` ``(V, H)`` (+ ``{name}_bias``): the
    argument checks, and ``src``, the ``(x, weight, bias)`` rows the op computes them from
    (``kdfast._ops.source_rows``)."""

    def __init__(self, name: str, logits, hidden, weight, bias, lead, v: int, device):
        self.name = name
        if logits is not None:
            if hidden is not None or weight is not None or bias is not None:
                raise ValueError(f"give either {name}_logits or {name}_hidden and {name}_weight, "
                                 "not both")
            _check_float(f"{name}_logits", logits)
            if logits.shape != lead + (v,):
                raise ValueError(f"{name}_logits must have shape {tuple(lead + (v,))} (the student's "
                                 f"rows, V = student_weight.shape[0]), got {tuple(logits.shape)}")
            self.src = (logits.detach().reshape(-1, v), None, None)
            self.device = logits.device
        else:
            if hidden is None or weight is None:
                raise ValueError(f"{name}: give {name}_logits, or both {name}_hidden and {name}_weight")
            _check_float(f"{name}_hidden", hidden)
            _check_float(f"{name}_weight", weight, 2)
            if hidden.shape[:-1] != lead:
                raise ValueError(f"{name}_hidden must have the student's leading shape {tuple(lead)}, "
                                 f"got {tuple(hidden.shape)}")
            if weight.shape != (v, hidden.shape[-1]):
                raise ValueError(f"{name}_weight must have shape {(v, hidden.shape[-1])} (V classes, "
                                 f"{name}_hidden's width), got {tuple(weight.shape)}")
            if weight.dtype != hidden.dtype:
                raise ValueError(f"{name}_weight dtype {weight.dtype} != {name}_hidden dtype "
                                 f"{hidden.dtype}")
            if bias is not None:
                _check_float(f"{name}_bias", bias, 1)
                if bias.shape != (v,) or bias.dtype != hidden.dtype:
                    raise ValueError(f"{name}_bias must be ({v},) {hidden.dtype}, got "
                                     f"{tuple(bias.shape)} {bias.dtype}")
            self.src = (hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach(),
                        None if bias is None else bias.detach())
            self.device = hidden.device
            if weight.device != hidden.device or (bias is not None and bias.device != hidden.device):
                raise ValueError(f"{name}_hidden, {name}_weight and {name}_bias must be on one device")
        if self.device != device:
            raise ValueError(f"the {name} tensors are on {self.device}, student_hidden on {device}")
        self.dtype = self.src[0].dtype
        self.v = v

    def bytes_per_row(self) -> int:
        return 0 if self.src[1] is None else self.v * self.dtype.itemsize

    def all_rows(self, n: int, dtype: torch.dtype) -> Tensor:
        """The whole ``(N, V)`` logits (the eager ``backend="torch"`` path)."""
        return source_rows(self.src, 0, n, source_buffer(self.src, n, self.v), dtype)


# ----------------------------------------------------------------------------- the public API
def _fused_linear_distill_loss(
        student_hidden: Tensor, student_weight: Tensor, labels: Optional[Tensor] = None, *,
        teacher_logits: Optional[Tensor] = None, teacher_hidden: Optional[Tensor] = None,
        teacher_weight: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
        method: str = "kd", student_bias: Optional[Tensor] = None,
        past_student_logits: Optional[Tensor] = None, past_student_hidden: Optional[Tensor] = None,
        past_student_weight: Optional[Tensor] = None, past_student_bias: Optional[Tensor] = None,
        kd_weight=1.0, ce_weight=1.0, ignore_index: int = -100, reduction: str = "mean",
        chunk_size: Optional[int] = None, memory_budget: Optional[int] = None, backend: str = "auto",
        num_items_in_batch=None, process_group=None, vocab_start: Optional[int] = None,
        vocab_size: Optional[int] = None, **hyperparameters) -> Tensor:
    """The distillation loss ``method`` of the student logits ``student_hidden @ student_weight.T
    (+ student_bias)`` against the teacher's, without materialising either ``(N, V)`` logits tensor.

    - ``student_hidden`` ``(..., H)``, ``student_weight`` ``(V, H)``, ``student_bias`` ``(V,)``, one
      dtype (float32 / bfloat16 / float16, float64 for gradcheck); each gets its gradient.
    - teacher: ``teacher_logits`` ``(..., V)``, or ``teacher_hidden`` ``(..., H_t)`` with
      ``teacher_weight`` ``(V, H_t)`` (+ ``teacher_bias``). A constant: no gradient.
    - ``method``: ``"kd"``, ``"ttm"``, ``"wttm"``, ``"dkd"``, ``"logit_matching"``, ``"ls_kd"``,
      ``"jsd"``, ``"retro_kd"``; its hyperparameters (``temperature``, ``alpha``, ``beta``,
      ``center``, ``past_weight``) default (``None``) to those of ``kdfast.<method>_loss``.
      ``retro_kd`` also takes the past student as ``past_student_logits`` or
      ``past_student_hidden`` + ``past_student_weight`` (+ ``past_student_bias``) (a constant).
    - ``labels``, ``kd_weight``, ``ce_weight``, ``ignore_index``, ``reduction``, ``backend`` as in
      :mod:`kdfast.functional` (``backend="torch"`` materialises the logits and runs the eager
      reference).
    - ``num_items_in_batch``: an int or a 0-d tensor; ``reduction="mean"`` divides by it instead of
      the number of valid rows (as in :mod:`kdfast.functional`; folded into the row weights, so into
      the gradients of the hidden states, the head and its bias; never read on the host).
    - ``chunk_size``: rows per chunk; default from ``memory_budget`` (bytes, default 256 MiB) for
      the chunk logits buffers: see :func:`default_chunk_size` and the module docstring.
    - ``process_group`` (``vocab_start``, ``vocab_size``): a column-parallel head; the student's
      (and the teacher's) head rows, bias and teacher logits are this rank's vocabulary shard,
      ``student_hidden`` and ``labels`` (global class ids) are replicated. Fused kernels only; the collectives are listed in the module docstring.

    Example::

        loss = kdfast.fused_linear_distill_loss(h, lm_head.weight, labels, teacher_hidden=h_t,
                                                teacher_weight=teacher_head.weight, method="kd",
                                                temperature=2.0)
    """
    params, hyper = _method_params(method, hyperparameters)
    loss = REGISTRY[method]
    h, w, b = student_hidden, student_weight, student_bias
    _check_float("student_hidden", h)
    _check_float("student_weight", w, 2)
    if w.shape[1] != h.shape[-1]:
        raise ValueError(f"student_weight must be (V, {h.shape[-1]}) (H = student_hidden's last dim), "
                         f"got {tuple(w.shape)}")
    if process_group is None and w.shape[0] < loss.min_classes:
        raise ValueError(f"{method} needs at least {loss.min_classes} classes, "
                         f"student_weight has V = {w.shape[0]}")
    if w.dtype != h.dtype:
        raise ValueError(f"student_weight dtype {w.dtype} != student_hidden dtype {h.dtype}")
    if b is not None:
        _check_float("student_bias", b, 1)
        if b.shape != (w.shape[0],) or b.dtype != h.dtype:
            raise ValueError(f"student_bias must be ({w.shape[0]},) {h.dtype}, got "
                             f"{tuple(b.shape)} {b.dtype}")
    if w.device != h.device or (b is not None and b.device != h.device):
        raise ValueError("student_hidden, student_weight and student_bias must be on one device")
    _check_reduction(ignore_index, reduction)
    for name, x in (("chunk_size", chunk_size), ("memory_budget", memory_budget)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
            raise ValueError(f"{name} must be a positive int or None, got {x!r}")
    lead, v = h.shape[:-1], w.shape[0]
    n = lead.numel()
    teacher = _Source("teacher", teacher_logits, teacher_hidden, teacher_weight, teacher_bias, lead,
                      v, h.device)
    past = None
    if loss.past_student:
        past = _Source("past_student", past_student_logits, past_student_hidden,
                       past_student_weight, past_student_bias, lead, v, h.device)
    elif any(x is not None for x in (past_student_logits, past_student_hidden, past_student_weight,
                                     past_student_bias)):
        takes = " or ".join(f"method={k!r}" for k, x in REGISTRY.items() if x.past_student)
        raise ValueError(f"past_student_* tensors are for {takes}, not {method!r}")
    if loss.needs_labels and labels is None:
        raise ValueError(f"method {method!r} needs labels ({loss.needs_labels})")
    layout, vocab, shard = None, v, {}
    if process_group is not None:
        layout = _column_parallel(method, params, backend, h.device, process_group, v, vocab_start,
                                  vocab_size)
        vocab, shard = layout[3], dict(num_classes=layout[3], what="global class ids")
        if vocab < loss.min_classes:
            raise ValueError(f"{method} needs at least {loss.min_classes} classes, the vocabulary "
                             f"has {vocab}")
    elif vocab_start is not None or vocab_size is not None:
        raise ValueError("vocab_start / vocab_size describe a vocabulary shard: they need process_group")
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    # (..., V) stand-in for the logits (no memory): the labels are checked against its shape
    a = prepare(params, torch.empty((), device=h.device).expand(*lead, v), labels, kd_weight=kd_weight,
                ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction, backend=backend,
                acc=acc, num_items_in_batch=num_items_in_batch, **shard)

    if a.backend == "torch":   # the eager reference on materialised logits
        z = torch.nn.functional.linear(h, w, b)
        with torch.no_grad():
            vt = teacher.all_rows(n, teacher.dtype).reshape(lead + (v,))
            extra = () if past is None else (past.all_rows(n, h.dtype).reshape(z.shape),)
        if acc == torch.float64 or vt.dtype == torch.float64:
            z, vt = z.to(acc), vt.to(acc)
        return a.rescale(loss.reference(z, vt, *extra, a.labels, **hyper, kd_weight=kd_weight,
                                        ce_weight=ce_weight, ignore_index=ignore_index,
                                        reduction=a.reduction))

    if past is not None and params.rho == 0:
        past = None
    if chunk_size is None:   # (column-parallel: the rows of the global vocabulary's budget)
        per_row = v * h.dtype.itemsize + teacher.bytes_per_row() + (past.bytes_per_row() if past else 0)
        chunk_size = default_chunk_size(n, per_row * vocab // v, memory_budget or DEFAULT_MEMORY_BUDGET)
    out = run_linear(h.reshape(n, h.shape[-1]), w, b, teacher.src, None if past is None else past.src,
                     a.y, a.kd_w, a.ce_w, a.params, a.reduction, a.backend, chunk_size,
                     "" if layout is None else process_group.group_name, layout)
    return out.view(lead) if a.reduction == "none" else out


def _column_parallel(method: str, params: KernelParams, backend: str, device, process_group,
                     v_local: int, vocab_start, vocab_size) -> list[int]:
    """The checks of a column-parallel call (raised on every rank before any collective) and its
    layout ``[rank, world, vocab_start, vocab_size]``."""
    if params.kind not in PHASED_KINDS:
        raise ValueError(f"fused_linear_distill_loss with process_group: no two-phase kernel yet for "
                         f"{params.kind.name} (method {method!r}); every other method has one")
    from .functional import _resolve_backend
    from .vocab_parallel import _layout   # lazy: vocab_parallel imports functional
    resolved = _resolve_backend(backend, device)
    if resolved == "torch":
        raise ValueError("fused_linear_distill_loss with process_group runs the fused two-phase "
                         "kernels: backend='torch' (the eager reference) is not supported")
    phase_fns(resolved, params.kind)
    return list(_layout(process_group, v_local, vocab_start, vocab_size))


def _with_hyperparameters(impl, after: str):
    """``impl`` (whose ``**hyperparameters`` take the methods' hyperparameters) as a function whose
    signature lists every method's hyperparameters (:func:`_hyperparameters`) after the parameter
    ``after``: the public signature follows the declarations in kdfast/losses.py."""
    params = [p for p in inspect.signature(impl).parameters.values() if p.kind != p.VAR_KEYWORD]
    i = [p.name for p in params].index(after) + 1
    sig = inspect.signature(impl).replace(parameters=params[:i] + _hyperparameters() + params[i:])
    return define(impl.__name__.lstrip("_"), sig, impl, module=__name__, doc=impl.__doc__)


fused_linear_distill_loss = _with_hyperparameters(_fused_linear_distill_loss, after="past_student_bias")


class FusedLinearDistillLoss(nn.Module):
    """Module form of :func:`fused_linear_distill_loss`: ``method``, its hyperparameters and the
    loss options in the constructor; ``forward(student_hidden, student_weight, labels=None, *,
    student_bias=None, teacher_logits=None, teacher_hidden=None, teacher_weight=None, ...)``.

    Example::

        crit = kdfast.FusedLinearDistillLoss("jsd", beta=0.5, temperature=1.0)
        loss = crit(h, student.lm_head.weight, labels, teacher_hidden=h_t,
                    teacher_weight=teacher.lm_head.weight)
    """

    def __init__(self, method: str = "kd", *, chunk_size: Optional[int] = None,
                 memory_budget: Optional[int] = None, kd_weight=1.0, ce_weight=1.0,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto",
                 process_group=None, vocab_start: Optional[int] = None,
                 vocab_size: Optional[int] = None, **hyperparameters):
        super().__init__()
        _method_params(method, hyperparameters)   # unknown method / bad hyperparameter: fail now
        self.method = method
        self.options = dict(chunk_size=chunk_size, memory_budget=memory_budget, kd_weight=kd_weight,
                            ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
                            backend=backend, **hyperparameters)
        if process_group is not None or vocab_start is not None or vocab_size is not None:
            # (a column-parallel head: fused_linear_distill_loss's process_group=)
            self.options.update(process_group=process_group, vocab_start=vocab_start,
                                vocab_size=vocab_size)

    def forward(self, student_hidden: Tensor, student_weight: Tensor,
                labels: Optional[Tensor] = None, *, student_bias: Optional[Tensor] = None,
                teacher_logits: Optional[Tensor] = None, teacher_hidden: Optional[Tensor] = None,
                teacher_weight: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                past_student_logits: Optional[Tensor] = None,
                past_student_hidden: Optional[Tensor] = None,
                past_student_weight: Optional[Tensor] = None,
                past_student_bias: Optional[Tensor] = None, num_items_in_batch=None) -> Tensor:
        return fused_linear_distill_loss(
            student_hidden, student_weight, labels, method=self.method, student_bias=student_bias,
            teacher_logits=teacher_logits, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, teacher_bias=teacher_bias,
            past_student_logits=past_student_logits, past_student_hidden=past_student_hidden,
            past_student_weight=past_student_weight, past_student_bias=past_student_bias,
            num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join([repr(self.method)] + [f"{k}={v!r}" for k, v in self.options.items()])

