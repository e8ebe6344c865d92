"""The fused loss as one ``torch.library`` custom op, with its fake (meta) kernel and autograd.

``kdfast::distill`` runs a backend kernel that writes the per-row terms and the gradients in one
call (the gradients are computed in the forward, already multiplied by the row weights and by the
reduction's ``1 / n_valid``); backward only multiplies the saved gradients by the upstream gradient.
Registering it as a custom op lets ``torch.compile`` trace a training step through the loss without a
graph break.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ._spec import KernelParams

REDUCTIONS = ("mean", "sum", "none")


@functools.lru_cache(maxsize=None)
def _backend_fn(name: str, entry: str = "distill_forward"):
    """The backend's kernel entry point ``entry`` (``distill_forward``, ``topk_forward`` or
    ``multi_forward``: kdfast._C and kdfast._triton export the same names)."""
    if name == "cpu":
        from ._cpu import load
        return getattr(load(), entry)
    if name == "triton":
        from . import _triton
        return getattr(_triton, entry)
    raise ValueError(f"unknown kernel backend {name!r}")


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation (and loss) dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _grad_buffer(x: Tensor, shape: Optional[tuple] = None) -> Tensor:
    """The (N, C) gradient buffer the kernel writes. On the CPU, a large buffer is advised to use
    transparent huge pages before its first touch: the kernel's first write into fresh memory
    otherwise costs a page fault per 4 KiB, which on the 2-core dev machine took longer than the
    whole fused kernel at 4096 x 32000 fp32 (torch's own THP_MEM_ALLOC_ENABLE=1 does the same for
    every allocation). ``shape``: another shape in ``x``'s dtype (the multi-teacher (M, N, C) buffer)."""
    buf = torch.empty(x.shape if shape is None else shape, dtype=x.dtype, device=x.device)
    if buf.device.type == "cpu" and buf.numel() * buf.element_size() >= (8 << 20):
        from . import _cpu
        if _cpu.available():
            _cpu.load().advise_huge_pages(buf)
    return buf


@torch.library.custom_op("kdfast::distill", mutates_args=())
def distill(z: Tensor, v: Tensor, zp: Optional[Tensor], labels: Optional[Tensor], kd_w: Tensor,
            ce_w: Tensor, fparams: list[float], iparams: list[int], reduction: str, backend: str,
            need_grad_z: bool, need_grad_v: bool, inplace_backward: bool = False
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss, d, ce, grad_z, grad_v, grad_scale)``; see ``kdfast/_spec.py``.

    ``grad_z`` / ``grad_v`` are empty when not asked for. ``loss`` is a scalar, or per row for
    ``reduction="none"``.
    """
    d, ce, grad_scale = _row_outputs(z, labels, kd_w, iparams[5], reduction)
    grad_z = _grad_buffer(z) if need_grad_z else z.new_empty(0)
    grad_v = _grad_buffer(v) if need_grad_v else v.new_empty(0)
    _backend_fn(backend)(z, v, zp, labels, kd_w, ce_w, grad_scale, d, ce,
                         grad_z if need_grad_z else None, grad_v if need_grad_v else None,
                         fparams, iparams)
    return _reduce(kd_w, d, ce_w, ce, reduction, grad_scale), d, ce, grad_z, grad_v, grad_scale


def _row_outputs(z: Tensor, labels: Optional[Tensor], kd_w: Tensor, ignore_index: int, reduction: str):
    """The per-row outputs (D_i, CE_i) and the gradient scale (1 / n_valid for "mean")."""
    n = z.shape[0]
    acc = kd_w.dtype
    d = torch.empty(kd_w.shape, dtype=acc, device=z.device)   # (N,), or (M, N) for M teachers
    ce = torch.empty(n, dtype=acc, device=z.device)
    if reduction == "mean":   # 1 / n_valid as a device tensor: no host synchronisation
        n_valid = (labels != ignore_index).sum() if labels is not None else torch.tensor(n, device=z.device)
        grad_scale = n_valid.to(acc).clamp_min(1).reciprocal().reshape(1)  # in acc: exact 1/n
    else:
        grad_scale = torch.ones(1, dtype=acc, device=z.device)
    return d, ce, grad_scale


def _reduce(kd_w: Tensor, d: Tensor, ce_w: Tensor, ce: Tensor, reduction: str, grad_scale: Tensor) -> Tensor:
    """Per row ``kd_w * d + ce_w * ce`` (with M teachers, (M, N) ``kd_w * d`` summed over them), then the
    reduction."""
    kd = kd_w * d
    rows = (kd if kd.dim() == 1 else kd.sum(0)) + ce_w * ce
    return rows if reduction == "none" else rows.sum() * grad_scale[0]


def _fake_outputs(z: Tensor, kd_w: Tensor, reduction: str, need_grad_z: bool, grad_v: Tensor) -> tuple:
    """The ops' outputs as meta tensors (``d`` shaped like ``kd_w``; ``grad_v`` given by the op)."""
    acc = kd_w.dtype
    loss = z.new_empty(z.shape[0] if reduction == "none" else (), dtype=acc)
    grad_z = torch.empty_like(z, memory_format=torch.contiguous_format) if need_grad_z else z.new_empty(0)
    return (loss, kd_w.new_empty(kd_w.shape), z.new_empty(z.shape[0], dtype=acc), grad_z, grad_v,
            z.new_empty(1, dtype=acc))


@distill.register_fake
def _(z, v, zp, labels, kd_w, ce_w, fparams, iparams, reduction, backend, need_grad_z, need_grad_v,
      inplace_backward=False):
    grad_v = torch.empty_like(v, memory_format=torch.contiguous_format) if need_grad_v else v.new_empty(0)
    return _fake_outputs(z, kd_w, reduction, need_grad_z, grad_v)


def _setup_context(ctx, inputs, output):
    loss, d, ce, grad_z, grad_v, grad_scale = output
    ctx.reduction = inputs[8]
    ctx.inplace = inputs[12] if len(inputs) > 12 else False
    ctx.save_for_backward(grad_z, grad_v, d, ce, grad_scale)
    ctx.mark_non_differentiable(d, ce, grad_z, grad_v, grad_scale)
    # only the loss is differentiable: without this, autograd would build zero (N, C) upstream
    # gradients for the grad_z / grad_v outputs before every backward
    ctx.set_materialize_grads(False)


def _scaled(saved: Tensor, g: Tensor, inplace: bool) -> Tensor:
    """The upstream gradient ``g`` times the gradient saved by the forward.

    - ``inplace``: scale the saved buffer in place: no second (N, C) buffer on any device. A second
      backward through the same graph (``retain_graph=True``) then fails autograd's version check
      instead of returning a wrong gradient.
    - otherwise, on the CPU with ``g == 1`` (the usual ``loss.backward()``; checking costs nothing
      there): return the saved buffer itself. Autograd frees its saved copy after this node, so the
      buffer becomes ``.grad`` without a copy (it clones it only when the graph is retained).
    - otherwise ``saved * g`` in a new buffer (CUDA never reads ``g`` on the host).
    """
    g = g.to(saved.dtype)
    if torch.compiler.is_compiling():
        return saved * g
    if inplace:
        return saved.mul_(g)
    if saved.device.type == "cpu" and g.numel() == 1 and g.item() == 1.0:
        return saved
    return saved * g


def _backward(ctx, g_loss, _gd, _gce, _ggz, _ggv, _gscale):
    grad_z, grad_v, d, ce, grad_scale = ctx.saved_tensors
    if g_loss is None:   # grads are not materialised: nothing flowed into the loss
        return (None,) * 13
    need = ctx.needs_input_grad
    if ctx.reduction == "none":
        g_rows, g_mat = g_loss, g_loss.unsqueeze(-1)
    else:
        g_rows, g_mat = g_loss * grad_scale[0], g_loss
    # need[i] implies the forward computed that gradient (run() asks for it when the input requires grad)
    gz = _scaled(grad_z, g_mat, ctx.inplace) if need[0] else None
    gv = _scaled(grad_v, g_mat, ctx.inplace) if need[1] else None
    g_kd = g_rows * d if need[4] else None      # d loss / d kd_w_i = D_i (times the reduction's scale)
    g_ce = g_rows * ce if need[5] else None     # d loss / d ce_w_i = CE_i
    return gz, gv, None, None, g_kd, g_ce, None, None, None, None, None, None, None


distill.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# The top-k (sparse teacher) op: the same positional layout as ``distill`` with the teacher's (N, k)
# log-probabilities in ``v``'s place and their int64 classes in ``zp``'s, so that the fake shapes,
# the saved tensors and the backward are shared. The teacher gets no gradient (it is data).
@torch.library.custom_op("kdfast::topk_distill", mutates_args=())
def topk_distill(z: Tensor, t_lp: Tensor, t_idx: Tensor, labels: Optional[Tensor], kd_w: Tensor,
                 ce_w: Tensor, fparams: list[float], iparams: list[int], reduction: str, backend: str,
                 need_grad_z: bool, need_grad_v: bool, inplace_backward: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``fparams = [T, scale]``, ``iparams = [renormalize, has_ce, ignore_index]``; returns
    ``(loss, d, ce, grad_z, empty, grad_scale)``; the API is ``kdfast.functional.topk_kd_loss``,
    the kernels ``kdfast/_triton/topk.py`` and ``csrc/row_kernel_more.h`` (``row_topk``)."""
    d, ce, grad_scale = _row_outputs(z, labels, kd_w, iparams[2], reduction)
    grad_z = _grad_buffer(z) if need_grad_z else z.new_empty(0)
    _backend_fn(backend, "topk_forward")(z, t_lp, t_idx, labels, kd_w, ce_w, grad_scale, d, ce,
                              grad_z if need_grad_z else None, fparams, iparams)
    return (_reduce(kd_w, d, ce_w, ce, reduction, grad_scale), d, ce, grad_z, t_lp.new_empty(0),
            grad_scale)


@topk_distill.register_fake
def _(z, t_lp, t_idx, labels, kd_w, ce_w, fparams, iparams, reduction, backend, need_grad_z,
      need_grad_v, inplace_backward=False):
    return _fake_outputs(z, kd_w, reduction, need_grad_z, t_lp.new_empty(0))


topk_distill.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# The multi-teacher op: M teachers in one kernel call (the student row read once per pass whatever M
# is). ``kd_w`` and ``d`` are (M, N) (teacher m's row weights and unweighted per-row terms), ``grad_v``
# is one (M, N, C) buffer (teacher m's gradient is ``grad_v[m]``), the rest as in ``distill``.
@torch.library.custom_op("kdfast::multi_distill", mutates_args=())
def multi_distill(z: Tensor, vs: list[Tensor], zp: Optional[Tensor], labels: Optional[Tensor], kd_w: Tensor,
                  ce_w: Tensor, fparams: list[float], iparams: list[int], reduction: str, backend: str,
                  need_grad_z: bool, need_grad_v: bool, inplace_backward: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss, d (M, N), ce, grad_z, grad_v (M, N, C), grad_scale)``; see ``kdfast/_spec.py``."""
    d, ce, grad_scale = _row_outputs(z, labels, kd_w, iparams[5], reduction)
    grad_z = _grad_buffer(z) if need_grad_z else z.new_empty(0)
    grad_v = _grad_buffer(vs[0], (len(vs), *z.shape)) if need_grad_v else vs[0].new_empty(0)
    _backend_fn(backend, "multi_forward")(z, vs, zp, labels, kd_w, ce_w, grad_scale, d, ce,
                               grad_z if need_grad_z else None, grad_v if need_grad_v else None,
                               fparams, iparams)
    return _reduce(kd_w, d, ce_w, ce, reduction, grad_scale), d, ce, grad_z, grad_v, grad_scale


@multi_distill.register_fake
def _(z, vs, zp, labels, kd_w, ce_w, fparams, iparams, reduction, backend, need_grad_z, need_grad_v,
      inplace_backward=False):
    grad_v = vs[0].new_empty(len(vs), *z.shape) if need_grad_v else vs[0].new_empty(0)
    return _fake_outputs(z, kd_w, reduction, need_grad_z, grad_v)


def _multi_backward(ctx, g_loss, _gd, _gce, _ggz, _ggv, _gscale):
    grad_z, grad_v, d, ce, grad_scale = ctx.saved_tensors
    need = ctx.needs_input_grad   # as many entries as the op got arguments (a trailing default is dropped)
    rest = (None,) * (len(need) - 6)
    if g_loss is None:
        return (None, [None] * len(need[1]), None, None, None, None) + rest
    if ctx.reduction == "none":
        g_rows, g_mat = g_loss, g_loss.unsqueeze(-1)
    else:
        g_rows, g_mat = g_loss * grad_scale[0], g_loss
    gz = _scaled(grad_z, g_mat, ctx.inplace) if need[0] else None
    # (the forward computed grad_v when any teacher requires grad; the others get None)
    gv = [None] * len(need[1])
    if grad_v.numel():
        gv = [g if n else None for g, n in zip(_scaled(grad_v, g_mat, ctx.inplace).unbind(0), need[1])]
    g_kd = g_rows * d if need[4] else None      # d loss / d kd_w_{m,i} = D_{m,i}
    g_ce = g_rows * ce if need[5] else None
    return (gz, gv, None, None, g_kd, g_ce) + rest


multi_distill.register_autograd(_multi_backward, setup_context=_setup_context)


def run(z: Tensor, v: Tensor, zp: Optional[Tensor], labels: Optional[Tensor], kd_w: Tensor,
        ce_w: Tensor, params: KernelParams, reduction: str, backend: str,
        inplace_backward: bool = False) -> Tensor:
    """Call the op with the gradients the inputs need; returns the loss."""
    grad_on = torch.is_grad_enabled()
    need_gz = grad_on and z.requires_grad
    need_gv = grad_on and v.requires_grad
    out = torch.ops.kdfast.distill(z, v, zp, labels, kd_w, ce_w, params.fparams(), params.iparams(),
                                   reduction, backend, need_gz, need_gv, inplace_backward)
    return out[0]


def run_multi(z: Tensor, vs: list[Tensor], zp: Optional[Tensor], labels: Optional[Tensor], kd_w: Tensor,
              ce_w: Tensor, params: KernelParams, reduction: str, backend: str,
              inplace_backward: bool = False) -> Tensor:
    """The multi-teacher op with the gradients the inputs need; returns the loss."""
    grad_on = torch.is_grad_enabled()
    need_gz = grad_on and z.requires_grad
    need_gv = grad_on and any(v.requires_grad for v in vs)
    out = torch.ops.kdfast.multi_distill(z, vs, zp, labels, kd_w, ce_w, params.fparams(), params.iparams(),
                                         reduction, backend, need_gz, need_gv, inplace_backward)
    return out[0]
