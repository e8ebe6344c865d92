"""DTensor logits for the dense losses of :mod:`kdfast.functional` (issue 14).

``kdfast.kd_loss(z, v, y)`` and every other loss of a dense teacher take student / teacher logits
given as ``torch.distributed.tensor.DTensor`` on a **1-D device mesh**. The placement of the logits
picks the path; this module only unwraps the local tensors, calls the loss on them and wraps the
result, so it sits on top of the public ``process_group=`` path and knows nothing of its internals.

- ``Shard(-1)`` (the class dim): each rank its vocabulary columns, through the ``process_group=``
  path (group ``mesh.get_group()``; ``vocab_start`` / ``vocab_size`` from the global shape and the
  torch.chunk layout of DTensor's ``Shard``, uneven last shards included). Loss: ``Replicate``.
- ``Replicate()``: each rank the whole loss on its full local tensors (the fused kernels; the same
  result everywhere). Loss: ``Replicate``.
- ``Shard(d)``, ``d`` a leading dim (rows, e.g. ``Shard(0)``): each rank its rows (the fused
  kernels), then one ``all_reduce`` of 2 numbers (the sum and the count of valid rows). Loss:
  ``Replicate``, the global value; with ``reduction="none"``, ``Shard(d)``.

The gradients come back as DTensors of their input's placement (``to_local`` / ``from_local`` are
differentiable), as with PyTorch's ``loss_parallel``, whose cross-entropy on a 1-D mesh returns a
``Replicate`` DTensor for every reduction: so do these (``loss.to_local()`` is then the global
value on every rank). On row-sharded logits ``"mean"`` is the mean over the valid rows of **all**
ranks (``num_items_in_batch``: the global sum divided by it) and ``"sum"`` the global sum; PyTorch's
own ``cross_entropy`` on a ``Shard(0)`` DTensor returns ``Partial(sum)`` for ``"sum"`` and refuses
``"mean"`` on uneven shards: here both are all-reduced in the forward (one ``all_reduce`` of a
float64 pair per call, none in backward).

Mixed placements: a ``Replicate`` logits tensor beside a sharded one is redistributed to the sharded
placement (a local slice, no communication; its gradient is all-gathered back in backward by
DTensor); two different shardings (class dim vs rows) raise. A plain tensor beside DTensor logits
raises (wrap it with ``DTensor.from_local``). Class-sharded logits whose vocabulary is so small that
the torch.chunk layout leaves a rank no column (``C <= (world - 1) * ceil(C / world)``) are gathered
(``Replicate``) and computed locally.

Labels, ``kd_weight`` / ``ce_weight`` tensors and ``num_items_in_batch`` may be plain tensors or
``Replicate`` DTensors (the same on every rank); with row-sharded logits, also ``Shard(d)`` DTensors
of the leading shape, and a plain / replicated tensor holding every row is sliced to this rank's rows
(a plain one of this rank's rows is taken as it is). A replicated weight's gradient is then
``Partial(sum)`` (each rank's rows contribute theirs).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

_LOGITS = ("student_logits", "teacher_logits", "past_student_logits")
_ROWWISE = ("labels", "kd_weight", "ce_weight")
_LAYOUT = ("process_group", "vocab_start", "vocab_size")
_WRAP = ("wrap it as a DTensor on the same mesh: DTensor.from_local(t, mesh, [Replicate()], "
         "run_check=False) for a full tensor present on every rank, [Shard(-1)] for this rank's "
         "vocabulary shard")


class _SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) of a replicated result: backward is the identity (the upstream gradient of a
    Replicate loss is the same on every rank; each rank's part gets it whole)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _chunk(size: int, world: int, rank: int) -> tuple[int, int]:
    """(start, length) of rank's piece of ``size`` under torch.chunk (DTensor's Shard)."""
    step = -(-size // world) if size else 0
    start = min(rank * step, size)
    return start, min(step, size - start)


def _placement(name: str, x: DTensor, ndim: int):
    """None for Replicate, the (non-negative) dim for Shard; raise for anything else."""
    p = x.placements[0]
    if p.is_replicate():
        return None
    if type(p) is Shard:
        return p.dim % ndim
    raise ValueError(f"{name}: unsupported DTensor placement {p} (Shard(-1), Shard(d) of a leading "
                     "dim or Replicate(); a Partial tensor needs .redistribute(mesh, [Replicate()]) "
                     "first)")


def _aux(name: str, x, mesh, rows):
    """A label / weight / count argument -> its local tensor (other values pass through).
    ``rows``: None (each rank holds every row) or ``(d, start, n, size, lead_ndim)`` for row-sharded
    logits (this rank holds rows ``[start, start + n)`` of ``size`` along leading dim ``d``)."""
    if isinstance(x, DTensor):
        if x.device_mesh != mesh:
            raise ValueError(f"{name} is a DTensor on another device mesh than the logits")
        p = x.placements[0]
        if p.is_replicate():   # with row shards: each rank's rows give part of its gradient
            x = x.to_local(grad_placements=None if rows is None else [Partial()])
        elif (rows is not None and type(p) is Shard and x.ndim == rows[4]
              and p.dim % x.ndim == rows[0] and name != "num_items_in_batch"):
            return x.to_local()
        else:
            want = "Replicate()" if rows is None else f"Replicate() or Shard({rows[0]}) like the logits"
            raise ValueError(f"{name}: a DTensor with placement {p}; expected {want}")
    if rows is not None and isinstance(x, Tensor) and name != "num_items_in_batch":
        d, start, n, size, lead_ndim = rows
        ad = d - (lead_ndim - x.dim())          # x's dim aligned with the sharded leading dim
        if ad >= 0 and x.shape[ad] == size != n:   # every row given: keep this rank's
            x = x.narrow(ad, start, n)
    return x


def _logits(args: dict) -> tuple[dict, object, dict]:
    """The DTensor logits by name, their mesh and each one's placement (None: Replicate, else the
    sharded dim), with the checks that need no communication (the same outcome on every rank)."""
    names = [k for k in _LOGITS if args.get(k) is not None]
    plain = [k for k in names if not isinstance(args[k], DTensor)]
    if plain:
        raise ValueError(f"{plain[0]} is a plain tensor beside DTensor logits: {_WRAP}")
    xs = {k: args[k] for k in names}
    z = xs["student_logits"]
    mesh, shape = z.device_mesh, z.shape
    if mesh.ndim != 1:
        raise ValueError(f"DTensor logits need a 1-D device mesh, got {mesh.ndim}-D; on a (dp, tp) "
                         "mesh pass the local tensors with process_group=mesh.get_group('tp')")
    if z.ndim < 1:
        raise ValueError("student_logits must have a class dimension (shape (..., C))")
    place = {}
    for k, x in xs.items():
        if x.device_mesh != mesh:
            raise ValueError(f"{k} and student_logits are DTensors on different device meshes")
        if x.shape != shape:
            raise ValueError(f"{k} global shape {tuple(x.shape)} != student_logits global shape "
                             f"{tuple(shape)}")
        place[k] = _placement(k, x, z.ndim)
    if len({d for d in place.values() if d is not None}) > 1:
        dims = ", ".join(f"{k}: Shard({d})" for k, d in place.items() if d is not None)
        raise ValueError(f"the logits are sharded on different dims ({dims}): redistribute them to "
                         "one placement (Shard(-1) for vocabulary parallelism)")
    return xs, mesh, place


def call(loss, args: dict) -> Tensor:
    """``kdfast.<loss>_loss`` with DTensor logits (``args`` by name, as :func:`functional._call`
    gets them)."""
    from . import functional as F
    if not loss.dense:
        raise ValueError(f"{loss.function_name} does not take DTensors (a top-k teacher's columns do "
                         "not follow a vocabulary sharding); pass local tensors")
    given = [k for k in _LAYOUT if args.get(k) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: not with DTensor logits (the device mesh and the "
                         "placement give the group and the shard layout)")
    xs, mesh, place = _logits(args)
    shape = xs["student_logits"].shape
    ndim, lead, c = len(shape), shape[:-1], shape[-1]
    target = next((d for d in place.values() if d is not None), None)
    world, rank = mesh.size(), mesh.get_local_rank()
    if target == ndim - 1 and world > 1 and (world - 1) * -(-c // world) >= c:
        target = None          # a tiny vocabulary: some rank would hold no column; gather it
    want = [Replicate()] if target is None else [Shard(target)]
    local = dict(args)
    for k, x in xs.items():    # Replicate -> Shard: a local slice; Shard(-1) -> Replicate: a gather
        local[k] = (x if place[k] == target else x.redistribute(mesh, want)).to_local()
    rows = None
    if target is not None:     # this rank's piece: [start, start + n) along the sharded dim
        start, n = _chunk(shape[target], world, rank)
        got = local["student_logits"].shape[target]
        if got != n:
            raise ValueError(f"student_logits holds {got} of {shape[target]} along dim {target} here, "
                             f"not the torch.chunk layout over {world} ranks ({n})")
        if target < ndim - 1:
            rows = (target, start, n, shape[target], len(lead))
    for k in _ROWWISE + ("num_items_in_batch",):
        local[k] = _aux(k, args.get(k), mesh, rows)
    if target is None:                                   # every rank: the whole loss
        return DTensor.from_local(F._call(loss, local), mesh, [Replicate()], run_check=False)
    group = mesh.get_group()
    if target == ndim - 1:                               # vocabulary shards
        local.update(process_group=group, vocab_start=start, vocab_size=c)
        return DTensor.from_local(F._call(loss, local), mesh, [Replicate()], run_check=False)
    # rows: each rank its rows (fused kernels), then the global reduction
    reduction = F._check_reduction(args["ignore_index"], args["reduction"])
    if reduction == "none":
        out = F._call(loss, local)
        stride = torch.empty(lead, device="meta").stride()
        return DTensor.from_local(out, mesh, [Shard(target)], run_check=False, shape=lead, stride=stride)
    per_count = reduction == "mean" and local["num_items_in_batch"] is None
    local["reduction"] = "sum" if per_count else reduction   # (mean with num_items_in_batch: s / it)
    s = F._call(loss, local)
    count = s.new_zeros((), dtype=torch.float64)
    if per_count:                                        # the valid rows (kdfast's "mean")
        y = local["labels"]
        count = (count + local["student_logits"].shape[:-1].numel() if y is None
                 else (y != args["ignore_index"]).sum().double())
    tot = _SumOverGroup.apply(torch.stack([s.double(), count]), group)
    out = tot[0] / tot[1].clamp_min(1) if per_count else tot[0]
    return DTensor.from_local(out.to(s.dtype), mesh, [Replicate()], run_check=False)
