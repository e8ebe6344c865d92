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

The teacher (and the past student of ``retro_kd``) are constants: no gradient flows to them, even
when they require grad (online distillation needs the logits losses). Any loss of the family works
through ``method``; its hyperparameters are keyword arguments whose ``None`` means the named loss's
default (``kdfast.kd_loss`` & co.), and passing one the method does not take is a ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import _cpu, reference
from ._ops import _backend_fn
from ._spec import KernelParams
from .functional import METHODS, _check_labels, _check_reduction, _resolve_backend, _rows_weight

__all__ = ["fused_linear_distill_loss", "FusedLinearDistillLoss", "default_chunk_size", "METHODS",
           "DEFAULT_MEMORY_BUDGET"]

DEFAULT_MEMORY_BUDGET = 256 << 20   # bytes for the chunk logits buffers
_MIN_CHUNK, _CHUNK_ALIGN = 32, 32
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- the methods
# The kernel parameters of each named loss come from its declaration in functional.py (METHODS).
_MIN_CLASSES = {"dkd": 2, "ls_kd": 2}


def _method_params(method: str, hyper: dict) -> tuple[KernelParams, dict]:
    """(kernel params, the full hyperparameters with the method's defaults) for ``method``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    build = METHODS[method]
    sig = inspect.signature(build)
    given = {k: v for k, v in hyper.items() if v is not None}
    extra = sorted(set(given) - set(sig.parameters))
    if extra:
        raise ValueError(f"method {method!r} takes the hyperparameters {tuple(sig.parameters)}, "
                         f"got {extra}")
    full = {k: p.default for k, p in sig.parameters.items()} | given
    return build(**given), full


# ----------------------------------------------------------------------------- chunk size
def default_chunk_size(n_rows: int, bytes_per_row: int,
                       memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Rows per chunk: ``memory_budget // bytes_per_row`` rounded down to a multiple of 32, clamped
    to ``[32, n_rows]`` (at least 1)."""
    rows = memory_budget // max(int(bytes_per_row), 1)
    rows = max(_MIN_CHUNK, rows // _CHUNK_ALIGN * _CHUNK_ALIGN)
    return max(1, min(rows, int(n_rows)))


def _empty(shape, dtype, device) -> Tensor:
    """A buffer; a large CPU one is advised to use transparent huge pages before its first touch
    (one page fault per 2 MiB instead of per 4 KiB, as the logits losses' gradient buffers)."""
    buf = torch.empty(shape, dtype=dtype, device=device)
    big = buf.numel() * buf.element_size() >= (8 << 20)
    if buf.device.type == "cpu" and big and _cpu.available():
        _cpu.load().advise_huge_pages(buf)
    return buf


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
    """Constant (no-gradient) logits, chunk by chunk: ``logits[rows]`` of a ``(..., V)`` tensor, or
    ``hidden[rows] @ weight.T (+ bias)`` into a reused buffer. ``name`` is the argument prefix."""

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
            x = logits.detach().reshape(-1, v)
            self.logits, self.hidden = x, None
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
            self.logits = None
            self.hidden = hidden.detach().reshape(-1, hidden.shape[-1])
            self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
            self.device = hidden.device
            if weight.device != hidden.device or (bias is not None and bias.device != hidden.device):
                raise ValueError(f"{name}_hidden, {name}_weight and {name}_bias must be on one device")
        if self.device != device:
            raise ValueError(f"the {name} tensors are on {self.device}, student_hidden on {device}")
        self.dtype = (self.logits if self.logits is not None else self.hidden).dtype
        self.v = v

    def bytes_per_row(self) -> int:
        return 0 if self.hidden is None else self.v * self.dtype.itemsize

    def buffer(self, rows: int) -> Optional[Tensor]:
        return None if self.hidden is None else _empty((rows, self.v), self.dtype, self.device)

    def chunk(self, s: int, e: int, buf: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        """Rows ``s:e`` with unit column stride, in ``dtype`` (a copy only when converting)."""
        if self.hidden is None:
            x = self.logits[s:e]
            if x.stride(-1) != 1 and self.v > 1:
                x = x.contiguous()
        else:
            x = buf[:e - s]
            if self.bias is None:
                torch.mm(self.hidden[s:e], self.weight.t(), out=x)
            else:
                torch.addmm(self.bias, self.hidden[s:e], self.weight.t(), out=x)
        return x if x.dtype == dtype else x.to(dtype)


# ----------------------------------------------------------------------------- the chunk loop
@dataclasses.dataclass
class _Plan:
    params: KernelParams
    backend: str
    reduction: str
    chunk: int
    labels: Optional[Tensor]       # (N,) int64 contiguous
    teacher: _Source
    past: Optional[_Source]        # retro_kd with past_weight > 0
    acc: torch.dtype               # loss / row-weight dtype: float64 for float64 students
    grad_scale: Tensor             # (1,) acc: 1 / n_valid for "mean", else 1
    grad_on: bool                  # grad mode at the call (forward itself runs without it)


def _scaled(saved: Optional[Tensor], g: Tensor) -> Optional[Tensor]:
    """``saved * g`` for a scalar upstream ``g``; the saved buffer itself when ``g == 1`` on the CPU
    (a plain ``loss.backward()``: no copy; autograd clones it only if the graph is retained)."""
    if saved is None:
        return None
    if saved.device.type == "cpu" and g.numel() == 1 and float(g) == 1.0:
        return saved
    return saved * g.to(saved.dtype)


def _sweep(plan: _Plan, h: Tensor, w: Tensor, b: Optional[Tensor], kd_w: Tensor, ce_w: Tensor,
           want: tuple[bool, bool, bool], grad_scale: Tensor):
    """One pass over the chunks. Returns ``(d, ce, grad_h, grad_w, grad_b)``: the per-row terms and
    the gradients asked for by ``want`` (``None`` otherwise), already weighted and scaled."""
    n, v = h.shape[0], w.shape[0]
    want_h, want_w, want_b = want
    need_g = want_h or want_w or want_b
    d = torch.empty(n, dtype=plan.acc, device=h.device)
    ce = torch.empty(n, dtype=plan.acc, device=h.device)
    gh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if want_h else None
    gw_acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    gw = None   # the first chunk's product initialises it (zeros when there is no chunk)
    if want_w:
        gw = (_empty(w.shape, gw_acc, w.device) if n
              else torch.zeros(w.shape, dtype=gw_acc, device=w.device))
    gb = torch.zeros(v, dtype=gw_acc, device=h.device) if want_b else None
    rows = min(plan.chunk, n)
    zbuf = _empty((rows, v), h.dtype, h.device)
    tbuf = plan.teacher.buffer(rows)
    pbuf = plan.past.buffer(rows) if plan.past is not None else None
    # float64 students run float64 kernels; the kernels never mix float64 with another dtype
    t_dtype = torch.float64 if h.dtype == torch.float64 else (
        torch.float32 if plan.teacher.dtype == torch.float64 else plan.teacher.dtype)
    fn = _backend_fn(plan.backend)
    fp, ip = plan.params.fparams(), plan.params.iparams()
    for s in range(0, n, plan.chunk):
        e = min(s + plan.chunk, n)
        hc, z = h[s:e], zbuf[:e - s]
        if b is None:
            torch.mm(hc, w.t(), out=z)
        else:
            torch.addmm(b, hc, w.t(), out=z)
        vc = plan.teacher.chunk(s, e, tbuf, t_dtype)
        zp = plan.past.chunk(s, e, pbuf, h.dtype) if plan.past is not None else None
        y = plan.labels[s:e] if plan.labels is not None else None
        # grad_z aliases z: the chunk's logits become d loss / d logits
        fn(z, vc, zp, y, kd_w[s:e], ce_w[s:e], grad_scale, d[s:e], ce[s:e],
           z if need_g else None, None, fp, ip)
        if want_h:
            torch.mm(z, w, out=gh[s:e])
        if want_w:
            if z.dtype == gw.dtype:
                if s == 0:
                    torch.mm(z.t(), hc, out=gw)
                else:
                    gw.addmm_(z.t(), hc)
            else:   # fp16 / bf16: each chunk's product is rounded once, the sum is in fp32
                part = torch.mm(z.t(), hc)
                if s == 0:
                    gw.copy_(part)
                else:
                    gw.add_(part)
        if want_b:
            gb.add_(z.sum(0, dtype=gw_acc))
    if gw is not None and gw.dtype != w.dtype:
        gw = gw.to(w.dtype)
    if gb is not None and gb.dtype != b.dtype:
        gb = gb.to(b.dtype)
    return d, ce, gh, gw, gb


class _FusedLinearDistill(torch.autograd.Function):
    """Inputs ``(h (N, H), W, b or None, kd_w (N,), ce_w (N,), plan)``; output the loss."""

    @staticmethod
    def forward(ctx, h, w, b, kd_w, ce_w, plan: _Plan):
        want = tuple(bool(x) and plan.grad_on for x in ctx.needs_input_grad[:3])
        early = plan.reduction != "none"   # gradients computed now; "none" recomputes in backward
        d, ce, gh, gw, gb = _sweep(plan, h, w, b, kd_w.detach(), ce_w.detach(),
                                   want if early else (False, False, False), plan.grad_scale)
        rows = kd_w * d + ce_w * ce
        loss = rows if plan.reduction == "none" else rows.sum() * plan.grad_scale[0]
        ctx.plan = plan
        if early:
            ctx.save_for_backward(gh, gw, gb, d, ce)
        else:
            ctx.save_for_backward(h, w, b, kd_w, ce_w, d, ce)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        plan, need = ctx.plan, ctx.needs_input_grad
        if plan.reduction == "none":
            h, w, b, kd_w, ce_w, d, ce = ctx.saved_tensors
            g = g.to(d.dtype)
            gh = gw = gb = None
            if any(need[:3]):   # the gradient is linear in the row weights: fold g_i into them
                ones = torch.ones(1, dtype=plan.acc, device=h.device)
                _, _, gh, gw, gb = _sweep(plan, h, w, b, (kd_w * g).contiguous(),
                                          (ce_w * g).contiguous(), tuple(need[:3]), ones)
            g_rows = g
        else:
            gh, gw, gb, d, ce = ctx.saved_tensors
            gh, gw, gb = (_scaled(x, g) if need[i] else None for i, x in enumerate((gh, gw, gb)))
            g_rows = g.to(d.dtype) * plan.grad_scale[0]
        g_kd = g_rows * d if need[3] else None   # d loss / d kd_w_i = D_i (times the reduction's scale)
        g_ce = g_rows * ce if need[4] else None
        return gh, gw, gb, g_kd, g_ce, None


# ----------------------------------------------------------------------------- the public API
def fused_linear_distill_loss(
        student_hidden: Tensor, student_weight: Tensor, labels: Optional[Tensor] = None, *,
        teacher_logits: Optional[Tensor] = None, teacher_hidden: Optional[Tensor] = None,
        teacher_weight: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
        method: str = "kd", student_bias: Optional[Tensor] = None,
        past_student_logits: Optional[Tensor] = None, past_student_hidden: Optional[Tensor] = None,
        past_student_weight: Optional[Tensor] = None, past_student_bias: Optional[Tensor] = None,
        temperature: Optional[float] = None, alpha: Optional[float] = None,
        beta: Optional[float] = None, center: Optional[bool] = None,
        past_weight: Optional[float] = None, kd_weight=1.0, ce_weight=1.0,
        ignore_index: int = -100, reduction: str = "mean", chunk_size: Optional[int] = None,
        memory_budget: Optional[int] = None, backend: str = "auto") -> Tensor:
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
    - ``chunk_size``: rows per chunk; default from ``memory_budget`` (bytes, default 256 MiB) for
      the chunk logits buffers: see :func:`default_chunk_size` and the module docstring.

    Example::

        loss = kdfast.fused_linear_distill_loss(h, lm_head.weight, labels, teacher_hidden=h_t,
                                                teacher_weight=teacher_head.weight, method="kd",
                                                temperature=2.0)
    """
    params, hyper = _method_params(method, {"temperature": temperature, "alpha": alpha,
                                            "beta": beta, "center": center,
                                            "past_weight": past_weight})
    h, w, b = student_hidden, student_weight, student_bias
    _check_float("student_hidden", h)
    _check_float("student_weight", w, 2)
    if w.shape[1] != h.shape[-1]:
        raise ValueError(f"student_weight must be (V, {h.shape[-1]}) (H = student_hidden's last dim), "
                         f"got {tuple(w.shape)}")
    if w.shape[0] < _MIN_CLASSES.get(method, 1):
        raise ValueError(f"{method} needs at least {_MIN_CLASSES.get(method, 1)} classes, "
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
    reduction = _check_reduction(ignore_index, reduction)
    for name, x in (("chunk_size", chunk_size), ("memory_budget", memory_budget)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
            raise ValueError(f"{name} must be a positive int or None, got {x!r}")
    lead, v = h.shape[:-1], w.shape[0]
    n = lead.numel()
    teacher = _Source("teacher", teacher_logits, teacher_hidden, teacher_weight, teacher_bias, lead,
                      v, h.device)
    past = None
    if method == "retro_kd":
        past = _Source("past_student", past_student_logits, past_student_hidden,
                       past_student_weight, past_student_bias, lead, v, h.device)
    elif any(x is not None for x in (past_student_logits, past_student_hidden, past_student_weight,
                                     past_student_bias)):
        raise ValueError(f"past_student_* tensors are for method='retro_kd', not {method!r}")
    if method == "dkd" and labels is None:
        raise ValueError("method 'dkd' needs labels (the target class splits the distribution)")
    # (..., V) stand-in for the logits (no memory): the labels are checked against its shape
    labels = _check_labels(labels, torch.empty((), device=h.device).expand(*lead, v), ignore_index)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    kd_w = _rows_weight(kd_weight, "kd_weight", lead, n, acc, h.device)
    ce_w = _rows_weight(ce_weight, "ce_weight", lead, n, acc, h.device)
    backend = _resolve_backend(backend, h.device)

    if backend == "torch":   # the eager reference on materialised logits
        z = torch.nn.functional.linear(h, w, b)
        with torch.no_grad():
            vt = teacher.chunk(0, n, teacher.buffer(n), teacher.dtype).reshape(lead + (v,))
            extra = () if past is None else (past.chunk(0, n, past.buffer(n), h.dtype).reshape(z.shape),)
        if acc == torch.float64 or vt.dtype == torch.float64:
            z, vt = z.to(acc), vt.to(acc)
        return getattr(reference, f"{method}_loss")(
            z, vt, *extra, labels, **hyper, kd_weight=kd_weight, ce_weight=ce_weight,
            ignore_index=ignore_index, reduction=reduction)

    h2 = h.reshape(n, h.shape[-1])
    y = None if labels is None else labels.reshape(n).to(torch.int64).contiguous()
    has_ce = labels is not None and not (not isinstance(ce_weight, Tensor) and ce_weight == 0)
    params = dataclasses.replace(params, has_ce=has_ce, ignore_index=ignore_index)
    if past is not None and params.rho == 0:
        past = None
    if reduction == "mean":   # 1 / n_valid over the whole batch, once, as a device tensor
        n_valid = (y != ignore_index).sum() if y is not None else torch.tensor(n, device=h.device)
        grad_scale = n_valid.to(acc).clamp_min(1).reciprocal().reshape(1)
    else:
        grad_scale = torch.ones(1, dtype=acc, device=h.device)
    if chunk_size is None:
        per_row = v * h.dtype.itemsize + teacher.bytes_per_row() + (past.bytes_per_row() if past else 0)
        chunk_size = default_chunk_size(n, per_row, memory_budget or DEFAULT_MEMORY_BUDGET)
    plan = _Plan(params, backend, reduction, chunk_size, y, teacher, past, acc, grad_scale,
                 torch.is_grad_enabled())
    loss = _FusedLinearDistill.apply(h2, w, b, kd_w.contiguous(), ce_w.contiguous(), plan)
    return loss.view(lead) if reduction == "none" else loss


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
                 **hyperparameters):
        super().__init__()
        _method_params(method, hyperparameters)   # unknown method / bad hyperparameter: fail now
        self.method = method
        self.options = dict(chunk_size=chunk_size, memory_budget=memory_budget, kd_weight=kd_weight,
                            ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction,
                            backend=backend, **hyperparameters)

    def forward(self, student_hidden: Tensor, student_weight: Tensor,
                labels: Optional[Tensor] = None, *, student_bias: Optional[Tensor] = None,
                teacher_logits: Optional[Tensor] = None, teacher_hidden: Optional[Tensor] = None,
                teacher_weight: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                past_student_logits: Optional[Tensor] = None,
                past_student_hidden: Optional[Tensor] = None,
                past_student_weight: Optional[Tensor] = None,
                past_student_bias: Optional[Tensor] = None) -> Tensor:
        return fused_linear_distill_loss(
            student_hidden, student_weight, labels, method=self.method, student_bias=student_bias,
            teacher_logits=teacher_logits, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, teacher_bias=teacher_bias,
            past_student_logits=past_student_logits, past_student_hidden=past_student_hidden,
            past_student_weight=past_student_weight, past_student_bias=past_student_bias,
            **self.options)

    def extra_repr(self) -> str:
        return ", ".join([repr(self.method)] + [f"{k}={v!r}" for k, v in self.options.items()])

