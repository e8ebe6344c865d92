"""The fused losses as ``torch.library`` custom ops, with their fake (meta) kernels and autograd.
Every entry point of the package calls one of them:

- ``kdfast::distill``: the logits losses (``kdfast.kd_loss`` & co.);
- ``kdfast::topk_distill``: ``kdfast.topk_kd_loss`` (a sparse top-k teacher);
- ``kdfast::multi_distill``: ``kdfast.multi_teacher_loss`` (M teachers, one kernel call);
- ``kdfast::linear_distill``: ``kdfast.fused_linear_distill_loss`` (the head's matmuls and the kernel
  chunk by chunk: the logits are never materialised; with ``process_group=``, a column-parallel
  head through the two-phase kernels);
- ``kdfast::vocab_parallel_distill``: the ``process_group=`` losses (vocabulary shards; the
  collectives run inside the op);
- ``kdfast::vocab_parallel_multi``: ``kdfast.multi_teacher_loss(..., process_group=)`` (M teachers
  on vocabulary shards, the two-phase kernels).

Each runs a backend kernel (``kdfast._C`` or ``kdfast._triton``; vocabulary-parallel: eager torch
ops and collectives) that writes the per-row terms and the gradients in one call (the gradients are
computed in the forward, already multiplied by the row weights and by the reduction's
``1 / n_valid``); backward only multiplies the saved gradients by the upstream gradient (the fused
linear op with ``reduction="none"`` excepted: it runs its chunk loop again). Registering them as
custom ops lets ``torch.compile`` trace a training step through the loss without a graph break.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from ._spec import PHASED_KINDS, IParam, KernelParams, TopkIParam, finish_terms, stats_rounds, stats_width

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


def buffer(shape, dtype: torch.dtype, device) -> Tensor:
    """A buffer the kernels (or the fused linear chunk loop) write. On the CPU a large one (8 MiB and
    more) comes from kdfast's gradient pool (:func:`kdfast._cpu.pool_cap_bytes`): a training loop
    then reuses the pages its previous step freed instead of faulting in fresh memory every step
    (PyTorch's CPU allocator caches nothing)."""
    if (torch.device(device).type == "cpu" and math.prod(shape) * dtype.itemsize >= (8 << 20)):
        from . import _cpu
        if _cpu.available():
            return _cpu.load().pool_empty(list(shape), _like(dtype))
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _like(dtype: torch.dtype) -> Tensor:
    return torch.empty(0, dtype=dtype)


def _grad_buffer(x: Tensor, shape: Optional[tuple] = None) -> Tensor:
    """The (N, C) gradient buffer of ``x`` (``shape``: another shape in ``x``'s dtype, the
    multi-teacher (M, N, C) buffer)."""
    return buffer(x.shape if shape is None else shape, x.dtype, x.device)


def grad_scale(labels: Optional[Tensor], ignore_index: int, n: int, reduction: str, acc: torch.dtype,
               device) -> Tensor:
    """The factor folded into the gradients, a (1,) ``acc`` tensor: ``1 / max(n_valid, 1)`` for
    ``reduction="mean"`` (``n_valid``: the rows whose label is not ``ignore_index``; all ``n``
    without labels), else 1. Computed on the device: no host synchronisation (``n`` is a Python
    int: filled in by a kernel, not copied from the host)."""
    if reduction == "mean":
        if labels is None:
            return torch.full((1,), max(n, 1), dtype=acc, device=device).reciprocal()
        n_valid = (labels != ignore_index).sum()
        return n_valid.to(acc).clamp_min(1).reciprocal().reshape(1)  # in acc: exact 1/n
    return torch.ones(1, dtype=acc, device=device)


def _distill_impl(z: Tensor, v: Tensor, zp: Optional[Tensor], labels: Optional[Tensor], kd_w: Tensor,
            ce_w: Tensor, fparams: list[float], iparams: list[int], reduction: str, backend: str,
            need_grad_z: bool, need_grad_v: bool, inplace_backward: bool = False
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss, d, ce, grad_z, grad_v, grad_scale)``; see ``kdfast/_spec.py``.

    ``grad_z`` / ``grad_v`` are empty when not asked for. ``loss`` is a scalar, or per row for
    ``reduction="none"``.
    """
    d, ce, grad_scale = _row_outputs(z, labels, kd_w, iparams[IParam.IGNORE_INDEX], reduction)
    grad_z = _grad_buffer(z) if need_grad_z else z.new_empty(0)
    grad_v = _grad_buffer(v) if need_grad_v else v.new_empty(0)
    _backend_fn(backend)(z, v, zp, labels, kd_w, ce_w, grad_scale, d, ce,
                         grad_z if need_grad_z else None, grad_v if need_grad_v else None,
                         fparams, iparams)
    return _reduce(kd_w, d, ce_w, ce, reduction, grad_scale), d, ce, grad_z, grad_v, grad_scale


distill = torch.library.custom_op("kdfast::distill", mutates_args=())(_distill_impl)


def _row_outputs(z: Tensor, labels: Optional[Tensor], kd_w: Tensor, ignore_index: int, reduction: str):
    """The per-row outputs (D_i, CE_i) and the gradient scale (1 / n_valid for "mean")."""
    n = z.shape[0]
    acc = kd_w.dtype
    d = torch.empty(kd_w.shape, dtype=acc, device=z.device)   # (N,), or (M, N) for M teachers
    ce = torch.empty(n, dtype=acc, device=z.device)
    return d, ce, grad_scale(labels, ignore_index, n, reduction, acc, z.device)


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


# The positions of the ops' arguments that autograd reads (the same in distill, topk_distill,
# multi_distill and vocab_parallel_distill): the inputs with a gradient, the reduction and the
# inplace_backward flag.
_Z, _V, _KD_W, _CE_W, _REDUCTION, _INPLACE = 0, 1, 4, 5, 8, 12


def _setup_context(ctx, inputs, output):
    loss, d, ce, grad_z, grad_v, grad_scale = output
    ctx.reduction = inputs[_REDUCTION]
    ctx.inplace = inputs[_INPLACE] if len(inputs) > _INPLACE else False
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


def _upstream(g_loss: Tensor, reduction: str, grad_scale: Tensor) -> tuple[Tensor, Tensor]:
    """(factor of the per-row terms, factor of the saved (N, C) gradients) for the upstream
    gradient ``g_loss`` of the loss."""
    if reduction == "none":
        return g_loss, g_loss.unsqueeze(-1)
    return g_loss * grad_scale[0], g_loss


def _backward(ctx, g_loss, _gd, _gce, _ggz, _ggv, _gscale):
    grad_z, grad_v, d, ce, grad_scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = [None] * len(need)
    if g_loss is None:   # grads are not materialised: nothing flowed into the loss
        return tuple(grads)
    g_rows, g_mat = _upstream(g_loss, ctx.reduction, grad_scale)
    # need[i] implies the forward computed that gradient (run() asks for it when the input requires grad)
    if need[_Z]:
        grads[_Z] = _scaled(grad_z, g_mat, ctx.inplace)
    if need[_V] and grad_v.dim() > 1:   # computed (a 1-D empty placeholder otherwise; N = 0 rows: (0, C))
        grads[_V] = _scaled(grad_v, g_mat, ctx.inplace)
    if need[_KD_W]:
        grads[_KD_W] = g_rows * d      # d loss / d kd_w_i = D_i (times the reduction's scale)
    if need[_CE_W]:
        grads[_CE_W] = g_rows * ce     # d loss / d ce_w_i = CE_i
    return tuple(grads)


distill.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# The top-k (sparse teacher) op: the same positional layout as ``distill`` with the teacher's (N, k)
# log-probabilities in ``v``'s place and their int64 classes in ``zp``'s, so that the fake shapes,
# the saved tensors and the backward are shared. The teacher gets no gradient (it is data).
def _topk_impl(z: Tensor, t_lp: Tensor, t_idx: Tensor, labels: Optional[Tensor], kd_w: Tensor,
                 ce_w: Tensor, fparams: list[float], iparams: list[int], reduction: str, backend: str,
                 need_grad_z: bool, need_grad_v: bool, inplace_backward: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``fparams`` / ``iparams``: ``kdfast._spec.TopkParams``; returns
    ``(loss, d, ce, grad_z, empty, grad_scale)``; the API is ``kdfast.topk_kd_loss``, the kernels
    ``kdfast/_triton/topk.py`` and ``csrc/kinds/topk.h`` (``row_topk``)."""
    d, ce, grad_scale = _row_outputs(z, labels, kd_w, iparams[TopkIParam.IGNORE_INDEX], reduction)
    grad_z = _grad_buffer(z) if need_grad_z else z.new_empty(0)
    _backend_fn(backend, "topk_forward")(z, t_lp, t_idx, labels, kd_w, ce_w, grad_scale, d, ce,
                              grad_z if need_grad_z else None, fparams, iparams)
    return (_reduce(kd_w, d, ce_w, ce, reduction, grad_scale), d, ce, grad_z, t_lp.new_empty(0),
            grad_scale)


topk_distill = torch.library.custom_op("kdfast::topk_distill", mutates_args=())(_topk_impl)

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
    d, ce, grad_scale = _row_outputs(z, labels, kd_w, iparams[IParam.IGNORE_INDEX], reduction)
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
    grads = [None] * len(need)
    grads[_V] = [None] * len(need[_V])
    if g_loss is None:
        return tuple(grads)
    g_rows, g_mat = _upstream(g_loss, ctx.reduction, grad_scale)
    if need[_Z]:
        grads[_Z] = _scaled(grad_z, g_mat, ctx.inplace)
    # (the forward computed grad_v when any teacher requires grad; the others get None)
    if grad_v.dim() > 1:   # computed: (M, N, C), also with N = 0 rows
        grads[_V] = [g if n else None
                     for g, n in zip(_scaled(grad_v, g_mat, ctx.inplace).unbind(0), need[_V])]
    if need[_KD_W]:
        grads[_KD_W] = g_rows * d      # d loss / d kd_w_{m,i} = D_{m,i}
    if need[_CE_W]:
        grads[_CE_W] = g_rows * ce
    return tuple(grads)


multi_distill.register_autograd(_multi_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# The fused linear op: the student's head ``z = h @ w.T (+ b)`` and the loss, chunk by chunk of rows,
# the logits never materialised. The teacher (and retro_kd's past student) are constants given as
# logits ``t`` (``t_w`` None) or as hidden states ``t`` with a head ``t_w`` (+ ``t_b``). See
# kdfast/fused_linear.py for the algorithm and the memory it needs.
#
# Column-parallel head (tensor parallelism; ``group`` a process group's name, ``layout`` [rank, world,
# vocab_start, vocab_size]): ``w`` / ``b`` (and ``t_w`` / ``t_b``, or the teacher logits ``t``) are
# this rank's vocabulary rows [vocab_start, vocab_start + V_local); ``h`` is replicated. Each chunk
# runs the two-phase kernels (:class:`_ColumnShard`); ``gstats`` (an input: reduction="none"'s
# backward) replays the statistics a forward gathered, and the last output returns them.
@torch.library.custom_op("kdfast::linear_distill", mutates_args=())
def linear_distill(h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, t_w: Optional[Tensor],
                   t_b: Optional[Tensor], p: Optional[Tensor], p_w: Optional[Tensor], p_b: Optional[Tensor],
                   labels: Optional[Tensor], kd_w: Tensor, ce_w: Tensor, fparams: list[float],
                   iparams: list[int], reduction: str, backend: str, chunk: int, need_grad_h: bool,
                   need_grad_w: bool, need_grad_b: bool, group: str = "",
                   layout: Optional[list[int]] = None, gstats: Optional[Tensor] = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss, d, ce, grad_h, grad_w, grad_b, grad_scale, kept)`` (gradients empty when not
    asked for). ``h`` (N, H), ``w`` (V, H), ``b`` (V,) or None; ``labels`` (N,) int64 or None;
    ``kd_w``, ``ce_w`` (N,) contiguous in the accumulation dtype; ``chunk``: rows per chunk.
    ``kept``: the gathered statistics of a column-parallel forward with ``reduction="none"`` (what its
    backward replays as ``gstats``), else empty."""
    n = h.shape[0]
    gs = grad_scale(labels, iparams[IParam.IGNORE_INDEX], n, reduction, kd_w.dtype, h.device)
    shard = (_ColumnShard(group, layout, n, min(chunk, n), fparams, iparams, backend, reduction, gstats,
                          h.device) if group else None)
    d, ce, gh, gw, gb = _linear_sweep(h, w, b, (t, t_w, t_b), None if p is None else (p, p_w, p_b),
                                      labels, kd_w, ce_w, fparams, iparams, backend, chunk,
                                      (need_grad_h, need_grad_w, need_grad_b), gs, shard)
    empty = w.new_empty(0)
    kept = shard.saved if shard is not None and shard.saved is not None else h.new_empty(0, dtype=torch.float64)
    return (_reduce(kd_w, d, ce_w, ce, reduction, gs), d, ce, h.new_empty(0) if gh is None else gh,
            empty if gw is None else gw, empty.clone() if gb is None else gb, gs, kept)


@linear_distill.register_fake
def _(h, w, b, t, t_w, t_b, p, p_w, p_b, labels, kd_w, ce_w, fparams, iparams, reduction, backend, chunk,
      need_grad_h, need_grad_w, need_grad_b, group="", layout=None, gstats=None):
    n, acc = h.shape[0], kd_w.dtype
    kept = (layout[1] * n * _ColumnShard.width(fparams, iparams)
            if group and reduction == "none" and gstats is None else 0)
    return (h.new_empty(n if reduction == "none" else (), dtype=acc), h.new_empty(n, dtype=acc),
            h.new_empty(n, dtype=acc),
            torch.empty_like(h, memory_format=torch.contiguous_format) if need_grad_h else h.new_empty(0),
            w.new_empty(w.shape) if need_grad_w else w.new_empty(0),
            b.new_empty(b.shape) if need_grad_b and b is not None else w.new_empty(0),
            h.new_empty(1, dtype=acc), h.new_empty(kept, dtype=torch.float64))


# the positions of linear_distill's arguments that autograd reads
_L_H, _L_B, _L_KD_W, _L_CE_W, _L_FPARAMS, _L_IPARAMS, _L_REDUCTION, _L_BACKEND, _L_CHUNK = (
    0, 2, 10, 11, 12, 13, 14, 15, 16)
_L_GROUP, _L_LAYOUT = 20, 21


def _linear_setup_context(ctx, inputs, output):
    loss, d, ce, gh, gw, gb, gs, kept = output
    ctx.reduction = inputs[_L_REDUCTION]
    if ctx.reduction == "none":
        # the per-row gradient needs the upstream g_i: backward runs the chunk loop again (column-
        # parallel: with the statistics this forward gathered, ``kept``)
        group = inputs[_L_GROUP] if len(inputs) > _L_GROUP else ""
        layout = inputs[_L_LAYOUT] if len(inputs) > _L_LAYOUT else None
        ctx.consts = tuple(inputs[i] for i in (_L_FPARAMS, _L_IPARAMS, _L_BACKEND, _L_CHUNK)) + (group, layout)
        ctx.save_for_backward(*inputs[:_L_CE_W + 1], d, ce, kept)
    else:
        ctx.save_for_backward(gh, gw, gb, d, ce, gs)
    ctx.mark_non_differentiable(d, ce, gh, gw, gb, gs, kept)
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, g_loss, _gd, _gce, _ggh, _ggw, _ggb, _gs, _gkept):
    need = ctx.needs_input_grad
    grads = [None] * len(need)
    if g_loss is None:
        return tuple(grads)
    want = need[_L_H:_L_B + 1]
    if ctx.reduction == "none":
        *inputs, d, ce, kept = ctx.saved_tensors
        g_rows = g_loss.to(d.dtype)
        if any(want):   # the gradient is linear in the row weights: fold g_i into them
            fparams, iparams, backend, chunk, group, layout = ctx.consts
            kd_w, ce_w = inputs[_L_KD_W], inputs[_L_CE_W]
            out = torch.ops.kdfast.linear_distill(
                *inputs[:_L_KD_W], (kd_w * g_rows).contiguous(), (ce_w * g_rows).contiguous(),
                fparams, iparams, "none", backend, chunk, *want, group, layout, kept if group else None)
            for i, x in zip(range(_L_H, _L_B + 1), out[3:6]):
                grads[i] = x if need[i] else None
    else:
        gh, gw, gb, d, ce, gs = ctx.saved_tensors
        g_rows, g_mat = _upstream(g_loss, ctx.reduction, gs)
        for i, x in zip(range(_L_H, _L_B + 1), (gh, gw, gb)):
            grads[i] = _scaled(x, g_mat, False) if need[i] else None
    if need[_L_KD_W]:
        grads[_L_KD_W] = g_rows * d    # d loss / d kd_w_i = D_i (times the reduction's scale)
    if need[_L_CE_W]:
        grads[_L_CE_W] = g_rows * ce
    return tuple(grads)


linear_distill.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def source_rows(src: tuple, s: int, e: int, buf: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """Rows ``s:e`` of constant logits ``src = (x, weight, bias)``: ``x[s:e]`` (``x`` the logits,
    ``weight`` None) or ``x[s:e] @ weight.T (+ bias)`` into ``buf``; unit column stride, in
    ``dtype`` (a copy only when converting)."""
    x, weight, bias = src
    if weight is None:
        out = x[s:e]
        if out.stride(-1) != 1 and out.shape[-1] > 1:
            out = out.contiguous()
    else:
        out = buf[:e - s]
        if bias is None:
            torch.mm(x[s:e], weight.t(), out=out)
        else:
            torch.addmm(bias, x[s:e], weight.t(), out=out)
    return out if out.dtype == dtype else out.to(dtype)


def source_buffer(src: tuple, rows: int, v: int) -> Optional[Tensor]:
    """The reused (rows, V) buffer :func:`source_rows` computes into (None for given logits)."""
    x, weight, _ = src
    return None if weight is None else buffer((rows, v), x.dtype, x.device)


def _linear_sweep(h: Tensor, w: Tensor, b: Optional[Tensor], teacher: tuple, past: Optional[tuple],
                  labels: Optional[Tensor], kd_w: Tensor, ce_w: Tensor, fparams, iparams, backend: str,
                  chunk: int, want: tuple, gs: Tensor, shard: Optional["_ColumnShard"] = None):
    """One pass over the chunks. Returns ``(d, ce, grad_h, grad_w, grad_b)``: the per-row terms and
    the gradients asked for by ``want`` (``None`` otherwise), already weighted and scaled by ``gs``.
    ``shard``: a column-parallel head (each chunk's loss through the two-phase kernels and the
    group's collectives; ``grad_h`` summed over the group once, after the chunks)."""
    n, v = h.shape[0], w.shape[0]
    acc = kd_w.dtype
    want_h, want_w, want_b = want
    need_g = want_h or want_w or want_b
    d = torch.empty(n, dtype=acc, device=h.device)
    ce = torch.empty(n, dtype=acc, device=h.device)
    gh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if want_h else None
    gw_acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    gw = None   # the first chunk's product initialises it (zeros when there is no chunk)
    if want_w:
        gw = (buffer(w.shape, gw_acc, w.device) if n
              else torch.zeros(w.shape, dtype=gw_acc, device=w.device))
    gb = torch.zeros(v, dtype=gw_acc, device=h.device) if want_b else None
    rows = min(chunk, n)
    zbuf = buffer((rows, v), h.dtype, h.device)
    tbuf = source_buffer(teacher, rows, v)
    pbuf = source_buffer(past, rows, v) if past is not None else None
    # float64 students run float64 kernels; the kernels never mix float64 with another dtype
    t_dtype = torch.float64 if h.dtype == torch.float64 else (
        torch.float32 if teacher[0].dtype == torch.float64 else teacher[0].dtype)
    fn = _backend_fn(backend) if shard is None else shard
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        hc, z = h[s:e], zbuf[:e - s]
        if b is None:
            torch.mm(hc, w.t(), out=z)
        else:
            torch.addmm(b, hc, w.t(), out=z)
        vc = source_rows(teacher, s, e, tbuf, t_dtype)
        zp = source_rows(past, s, e, pbuf, h.dtype) if past is not None else None
        y = labels[s:e] if labels is not None else None
        # grad_z aliases z: the chunk's logits become d loss / d logits
        fn(z, vc, zp, y, kd_w[s:e], ce_w[s:e], gs, d[s:e], ce[s:e], z if need_g else None, None,
           fparams, iparams)
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
    if shard is not None:
        d, ce = shard.close(d, ce, gh)
    if gw is not None and gw.dtype != w.dtype:
        gw = gw.to(w.dtype)
    if gb is not None and gb.dtype != b.dtype:
        gb = gb.to(b.dtype)
    return d, ce, gh, gw, gb


class _ColumnShard:
    """The chunk kernel of a column-parallel head (the kinds of ``PHASED_KINDS``; called as
    ``distill_forward``): this
    rank's logits chunk holds the columns ``[start, start + V_local)`` of rows of ``vocab`` columns
    (kdfast/_spec.py, "Two phases"). Per chunk: phase 1 (the chunk's statistics, ``(rows, K)``
    float64), **one all-gather** of them (per round of statistics: JSD has two), phase 2 (the local gradient, in place over the chunk, and
    each row's terms as ``b + a log1p(X)`` with this rank's part of ``X``). The parts of every row
    wait in an ``(2, N)`` buffer: :meth:`close` sums them with **one all_reduce** after the last
    chunk (the gradients never need them: only the loss does), and sums ``grad_h`` with **one
    all_reduce**. So a call runs ``chunks`` all-gathers and at most 2 all_reduces; the logits chunk
    never leaves the rank.

    Why grad_h is summed and grad_W is not: ``z_ij = h_i . W_j`` with ``W_j`` on the rank owning
    column ``j``, so ``dL/dW_j = sum_i g_ij h_i`` needs only local columns, while ``dL/dh_i =
    sum_j g_ij W_j`` runs over the whole vocabulary: each rank's ``g_local @ W_local`` is one
    shard's part of that sum.

    ``replay``: the gathered statistics of an earlier forward (reduction="none"'s backward reruns
    the chunks with the row weights times the upstream gradient; the statistics do not depend on
    the weights): no phase 1, no all-gather, no parts. Otherwise, with ``reduction="none"``, the
    gathered statistics are kept in ``saved`` (chunk-major: chunk ``[s, e)`` is the contiguous
    ``(world, e - s, K)`` block at ``world * K * s``; ``world * N * K`` float64 in all)."""

    def __init__(self, group: str, layout, n: int, rows: int, fparams, iparams, backend: str,
                 reduction: str, replay: Optional[Tensor], device):
        import torch.distributed as dist
        from . import vocab_parallel
        self.vp = vocab_parallel   # _all_gather / _sum: the collectives (looked up at call time)
        self.pg = dist.distributed_c10d._resolve_process_group(group)
        _, self.world, self.start, self.vocab = (int(x) for x in layout)
        params = KernelParams.from_lists(fparams, iparams)
        self.stats_fn, self.finish_fn = phase_fns(backend, params.kind)
        self.widths = [stats_width(params, 1, r) for r in range(stats_rounds(params))]   # per round
        self.k = sum(self.widths)
        self.n = n
        self.replay = replay
        f64 = dict(dtype=torch.float64, device=device)
        self.stats = [torch.empty((rows, k), **f64) for k in self.widths] if replay is None else None
        self.saved = (torch.empty(self.world * n * self.k, **f64)
                      if replay is None and reduction == "none" else None)
        self.coef = torch.zeros((2, n), **f64) if replay is None else None
        self.part = torch.zeros((2, n), **f64) if replay is None else None
        self.s = 0   # the next chunk's first row

    @staticmethod
    def width(fparams, iparams) -> int:
        """The gathered statistics per row (every round's)."""
        params = KernelParams.from_lists(fparams, iparams)
        return sum(stats_width(params, 1, r) for r in range(stats_rounds(params)))

    def __call__(self, z, v, zp, y, kd_w, ce_w, gs, d, ce, grad_z, grad_v, fparams, iparams):
        rows = z.shape[0]
        s, e = self.s, self.s + rows
        self.s = e
        block = slice(self.world * self.k * s, self.world * self.k * e)
        if self.replay is not None:
            gstats = self.replay[block].view(self.world, rows, self.k)
        else:
            gathered = []   # one all-gather per round (JSD: two)
            for r, stats in enumerate(self.stats):
                gprev = None if r == 0 else gathered[0] if r == 1 else torch.cat(gathered, dim=2)
                self.stats_fn(z, [v], zp, y, stats[:rows], fparams, iparams, self.start, self.vocab, r, gprev)
                gathered.append(self.vp._all_gather(stats[:rows], self.pg))
            gstats = gathered[0] if len(gathered) == 1 else torch.cat(gathered, dim=2)
            if self.saved is not None:
                self.saved[block].view(self.world, rows, self.k).copy_(gstats)
        coef = torch.empty((2, rows), dtype=torch.float64, device=z.device)
        part = torch.empty((2, rows), dtype=torch.float64, device=z.device)
        self.finish_fn(z, [v], zp, y, kd_w, ce_w, gs, gstats, d, ce, coef, part, grad_z, grad_v,
                       fparams, iparams, self.start, self.vocab)
        if self.replay is None:
            self.coef[:, s:e], self.part[:, s:e] = coef, part

    def close(self, d: Tensor, ce: Tensor, gh: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """After the chunks: the row terms ``d``, ``ce`` of the whole rows (all_reduce of the parts;
        not in a replay, whose loss is not used) and ``gh`` summed over the group, in place."""
        if self.n and self.replay is None:
            self.vp._sum(self.part, self.pg)
            d = finish_terms(d, self.coef[0], self.part[0]).to(d.dtype)
            ce = finish_terms(ce, self.coef[1], self.part[1]).to(ce.dtype)
        if self.n and gh is not None:
            self.vp._sum(gh, self.pg)
        return d, ce


# ---------------------------------------------------------------------------------------------------
# The vocabulary-parallel op: the logits are this rank's columns of every row; eager torch ops and
# all_reduce collectives over the process group named ``group`` (its ``group_name``; in the place of
# ``distill``'s ``backend``) compute the loss of the whole rows (kdfast/vocab_parallel.py).
# ``layout = [rank, world, vocab_start, vocab_size]``. The rest as in ``distill``; backward runs no
# collective.
@torch.library.custom_op("kdfast::vocab_parallel_distill", mutates_args=())
def vocab_parallel_distill(z: Tensor, v: Tensor, zp: Optional[Tensor], labels: Optional[Tensor],
                           kd_w: Tensor, ce_w: Tensor, fparams: list[float], iparams: list[int],
                           reduction: str, group: str, need_grad_z: bool, need_grad_v: bool,
                           inplace_backward: bool, layout: list[int], backend: str
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss, d, ce, grad_z, grad_v, grad_scale)`` as ``distill``."""
    from . import vocab_parallel
    return vocab_parallel._forward(z, v, zp, labels, kd_w, ce_w, KernelParams.from_lists(fparams, iparams),
                                   reduction, group, layout, need_grad_z, need_grad_v, backend)


@vocab_parallel_distill.register_fake
def _(z, v, zp, labels, kd_w, ce_w, fparams, iparams, reduction, group, need_grad_z, need_grad_v,
      inplace_backward, layout, backend):
    grad_v = torch.empty_like(v, memory_format=torch.contiguous_format) if need_grad_v else v.new_empty(0)
    return _fake_outputs(z, kd_w, reduction, need_grad_z, grad_v)


vocab_parallel_distill.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# The eager fast path. A call through a custom op crosses the dispatcher twice (its autograd kernel,
# then its CPU / CUDA implementation) and torch's Python autograd glue (which rebuilds the op's
# argument list from its schema on every call): ~100 us a call on the 2-core dev machine, where the
# whole fused fwd+bwd at (8, 10) takes ~10 us of kernel. Outside torch.compile, functorch transforms
# and tensor subclasses / modes (which need the op: its fake kernel, its schema), `distill` and
# `topk_distill` run their implementation under a plain autograd.Function with the op's own
# setup_context and backward: the same code, the same saved tensors, the same gradients.
def _function(impl, setup_context, backward) -> type:
    class Fn(torch.autograd.Function):
        # (forward takes ctx: a separate setup_context makes apply() bind the arguments to
        # forward's signature with inspect on every call)
        @staticmethod
        def forward(ctx, *args):
            out = impl(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)
    Fn.__name__ = Fn.__qualname__ = impl.__name__.strip("_").replace("_impl", "") + "_eager"
    return Fn


_DistillFn = _function(_distill_impl, _setup_context, _backward)
_TopkFn = _function(_topk_impl, _setup_context, _backward)


def _plain(*xs) -> bool:
    """Whether the eager fast path may run: plain tensors, nothing tracing or transforming them."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None
            and all(x is None or type(x) is Tensor for x in xs))


# ---------------------------------------------------------------------------------------------------
# The calls: each asks the op for the gradients its inputs need, and returns the loss.
def _needs(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def run(z: Tensor, v: Tensor, zp: Optional[Tensor], labels: Optional[Tensor], kd_w: Tensor,
        ce_w: Tensor, params: KernelParams, reduction: str, backend: str,
        inplace_backward: bool = False) -> Tensor:
    """``kdfast::distill`` (eagerly: its fast path, :func:`_plain`)."""
    fp, ip = params.lists()
    args = (z, v, zp, labels, kd_w, ce_w, fp, ip, reduction, backend, _needs(z), _needs(v), inplace_backward)
    if _plain(z, v, zp, labels, kd_w, ce_w):
        return _DistillFn.apply(*args)[0]
    return torch.ops.kdfast.distill(*args)[0]


def run_topk(z: Tensor, t_lp: Tensor, t_idx: Tensor, labels: Optional[Tensor], kd_w: Tensor,
             ce_w: Tensor, params, reduction: str, backend: str, inplace_backward: bool = False) -> Tensor:
    """``kdfast::topk_distill`` (``params``: a ``TopkParams``; the teacher gets no gradient; eagerly:
    its fast path, :func:`_plain`)."""
    fp, ip = params.lists()
    args = (z, t_lp, t_idx, labels, kd_w, ce_w, fp, ip, reduction, backend, _needs(z), False,
            inplace_backward)
    if _plain(z, t_lp, t_idx, labels, kd_w, ce_w):
        return _TopkFn.apply(*args)[0]
    return torch.ops.kdfast.topk_distill(*args)[0]


def run_multi(z: Tensor, vs: list[Tensor], zp: Optional[Tensor], labels: Optional[Tensor], kd_w: Tensor,
              ce_w: Tensor, params: KernelParams, reduction: str, backend: str,
              inplace_backward: bool = False) -> Tensor:
    """``kdfast::multi_distill``."""
    return torch.ops.kdfast.multi_distill(z, vs, zp, labels, kd_w, ce_w, *params.lists(), reduction, backend,
                                          _needs(z), _needs(*vs), inplace_backward)[0]


def run_linear(h: Tensor, w: Tensor, b: Optional[Tensor], teacher: tuple, past: Optional[tuple],
               labels: Optional[Tensor], kd_w: Tensor, ce_w: Tensor, params: KernelParams,
               reduction: str, backend: str, chunk: int, group: str = "",
               layout: Optional[list[int]] = None) -> Tensor:
    """``kdfast::linear_distill`` (``teacher`` / ``past``: ``(logits, None, None)`` or
    ``(hidden, weight, bias)``, constants). With ``reduction="none"`` the forward computes no
    gradient (backward does). ``group`` (a process group's name) and ``layout`` ``[rank, world,
    vocab_start, vocab_size]``: a column-parallel head (``w``, ``b`` and the teacher's are this
    rank's vocabulary rows)."""
    early = reduction != "none"
    p = past if past is not None else (None, None, None)
    return torch.ops.kdfast.linear_distill(h, w, b, *teacher, *p, labels, kd_w, ce_w, *params.lists(),
                                           reduction, backend, chunk, early and _needs(h),
                                           early and _needs(w), early and _needs(b), group,
                                           None if layout is None else list(layout), None)[0]


def run_vocab_parallel(z: Tensor, v: Tensor, zp: Optional[Tensor], labels: Optional[Tensor],
                       kd_w: Tensor, ce_w: Tensor, params: KernelParams, reduction: str, group: str,
                       layout: list[int], backend: str, inplace_backward: bool = False) -> Tensor:
    """``kdfast::vocab_parallel_distill``."""
    return torch.ops.kdfast.vocab_parallel_distill(z, v, zp, labels, kd_w, ce_w, *params.lists(), reduction,
                                                   group, _needs(z), _needs(v), inplace_backward,
                                                   list(layout), backend)[0]


# ---------------------------------------------------------------------------------------------------
# The vocabulary-parallel multi-teacher op (``kdfast.multi_teacher_loss(..., process_group=)``): M
# teachers on this rank's vocabulary columns through the two-phase kernels, in one call each:
# stats_forward (M teachers), one all-gather of the statistics, finish_forward, one all_reduce of
# the loss parts (kdfast.vocab_parallel._phased). ``multi_distill``'s layout of arguments and
# outputs (``kd_w``, ``d`` (M, N); ``grad_v`` (M, N, C)) with ``vocab_parallel_distill``'s ``group``
# and ``layout`` in ``backend``'s place, so the autograd is ``multi_distill``'s; backward runs no
# collective. ``len(vs)`` is at most the backend's teachers per call (multi_teacher.MAX_TEACHERS).
def phased_kinds(backend: str) -> frozenset:
    """The kinds whose two-phase kernels ``backend`` has: the CPU all of ``_spec.PHASED_KINDS``,
    Triton those of ``kdfast._triton.TRITON_PHASED_KINDS``, ``"torch"`` none."""
    if backend == "cpu":
        return PHASED_KINDS
    if backend == "triton":
        from . import _triton
        return _triton.TRITON_PHASED_KINDS
    return frozenset()


def phase_fns(backend: str, kind=None):
    """The backend's ``(stats_forward, finish_forward)`` (for ``kind``); ``ValueError`` where it has
    none yet."""
    if kind is not None and kind not in phased_kinds(backend) or not phased_kinds(backend):
        what = f" for {kind.name}" if kind is not None else ""
        raise ValueError(f"backend {backend!r} has no two-phase kernel (stats_forward / finish_forward)"
                         f"{what} yet: tensor parallelism through the fused kernels needs another backend "
                         "(backend='cpu' on CPU tensors)")
    return _backend_fn(backend, "stats_forward"), _backend_fn(backend, "finish_forward")


@torch.library.custom_op("kdfast::vocab_parallel_multi", mutates_args=())
def vocab_parallel_multi(z: Tensor, vs: list[Tensor], zp: Optional[Tensor], labels: Optional[Tensor],
                         kd_w: Tensor, ce_w: Tensor, fparams: list[float], iparams: list[int],
                         reduction: str, group: str, need_grad_z: bool, need_grad_v: bool,
                         inplace_backward: bool, layout: list[int], backend: str
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss, d (M, N), ce, grad_z, grad_v (M, N, C), grad_scale)`` as ``multi_distill``."""
    import torch.distributed as dist

    from . import vocab_parallel
    pg = dist.distributed_c10d._resolve_process_group(group)
    loss, d, ce, gz, gv, gs = vocab_parallel._phased(
        z, vs, zp, labels, kd_w, ce_w, KernelParams.from_lists(fparams, iparams), reduction, pg, layout,
        need_grad_z, need_grad_v, backend)
    if gv.dim() == 2:   # _phased hands one teacher's gradient back as (N, C)
        gv = gv.unsqueeze(0)
    return loss, d, ce, gz, gv, gs


@vocab_parallel_multi.register_fake
def _(z, vs, zp, labels, kd_w, ce_w, fparams, iparams, reduction, group, need_grad_z, need_grad_v,
      inplace_backward, layout, backend):
    grad_v = vs[0].new_empty(len(vs), *z.shape) if need_grad_v else vs[0].new_empty(0)
    return _fake_outputs(z, kd_w, reduction, need_grad_z, grad_v)


vocab_parallel_multi.register_autograd(_multi_backward, setup_context=_setup_context)


def run_vocab_parallel_multi(z: Tensor, vs: list[Tensor], zp: Optional[Tensor], labels: Optional[Tensor],
                             kd_w: Tensor, ce_w: Tensor, params: KernelParams, reduction: str, group: str,
                             layout: list[int], backend: str, inplace_backward: bool = False) -> Tensor:
    """``kdfast::vocab_parallel_multi``."""
    return torch.ops.kdfast.vocab_parallel_multi(z, vs, zp, labels, kd_w, ce_w, *params.lists(), reduction,
                                                 group, _needs(z), _needs(*vs), inplace_backward,
                                                 list(layout), backend)[0]
