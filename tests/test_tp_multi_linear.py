"""Tensor parallelism through the fused kernels: ``kdfast.multi_teacher_loss`` and
``kdfast.fused_linear_distill_loss`` with ``process_group=`` against the same single-process kdfast
losses on the full tensors.

One batch of CPU processes per world size (2 and 4, gloo over a FileStore rendezvous, loopback;
tests/_worlds.py): every rank builds the same fixed-seed float64 inputs, keeps its vocabulary shard
(37 classes split unevenly: 19/18 and 10/9/9/9; one case with equal shards of 40 and the default
layout), runs every case (loss + backward with a fixed upstream gradient) and saves its loss, its
gradients and the collectives it called in forward and in backward. The parent concatenates the
shards and compares them with the single-process loss (backend "cpu") to 1e-10 of each tensor's
largest value. Run as a script, this file is the worker.
"""
import os
import sys

import pytest
import torch

C = 37
HID, HID_T = 5, 4        # student / teacher hidden widths of the fused linear cases
TOL = 1e-10

# Multi-teacher cases. m: teachers; lead: leading shape (default (6,)); lab: fraction of ignored
# labels (None: no labels); tw: teacher weights ("rows": an (M, N) tensor with gradients,
# "teacher": an (M,) tensor with gradients, a list of floats, or None); w: kd/ce weight tensors with
# gradients; tg: teachers require grad; red: reduction; n: collectives per forward (backward: none).
# A group of <= 8 teachers is one all-gather and one all_reduce.
ONE = dict(all_gather=1, all_reduce=1)
MULTI = {
    "kd3_rows": dict(method="kd", hyper=dict(temperature=2.0), m=3, lab=0.25, tw="rows", w=True,
                     tg=True, red="mean", n=ONE),
    "ttm2_sum": dict(method="ttm", hyper=dict(temperature=2.5), m=2, lab=0.25, tw=[0.7, 0.3], tg=True,
                     red="sum", n=ONE),
    "wttm2_none_3d": dict(method="wttm", hyper=dict(temperature=2.0), m=2, lead=(2, 3), lab=None,
                          tw="teacher", tg=True, red="none", n=ONE),
    "retro_kd2": dict(method="retro_kd", hyper=dict(temperature=3.0, past_weight=0.3), m=2, lab=0.25,
                      tw="teacher", w=True, tg=True, red="mean", n=ONE),
    "jsd_beta1_none": dict(method="jsd", hyper=dict(beta=1.0, temperature=2.0), m=3, lab=0.25, tw="rows",
                           tg=True, red="none", n=ONE),
    "reverse_kd1_sum": dict(method="reverse_kd", hyper=dict(temperature=1.0), m=1, lab=0.0, tg=True,
                            red="sum", n=ONE),
    "kd9_two_groups": dict(method="kd", hyper=dict(temperature=4.0), m=9, lab=0.25, tw="teacher", w=True,
                           tg=True, red="mean", n=dict(all_gather=2, all_reduce=2)),
    "dkd2": dict(method="dkd", hyper=dict(temperature=2.0, alpha=1.0, beta=4.0), m=2, lab=0.25, tw="rows",
                 w=True, tg=True, red="mean", n=ONE),
    "lm2_sum": dict(method="logit_matching", hyper=dict(), m=2, lab=0.25, tw="teacher", tg=True, red="sum",
                    n=ONE),
    "jsd_half2_none": dict(method="jsd", hyper=dict(beta=0.5, temperature=1.5), m=2, lab=0.25, tw="rows",
                           tg=True, red="none", n=dict(all_gather=2, all_reduce=1)),
    "ls2": dict(method="ls_kd", hyper=dict(temperature=2.0), m=2, lab=0.25, tw="teacher", tg=True, red="mean",
                n=dict(all_gather=3, all_reduce=1)),
    "kd_all_ignored": dict(method="kd", hyper=dict(temperature=2.0), m=2, lab=1.0, tw="rows", w=True,
                           tg=True, red="mean", n=ONE),
}

# Fused linear cases. rows: N; chunk: chunk_size (None: the default, one chunk here); teacher:
# "hidden" (+ bias when bias) or "logits"; past: retro_kd's past student as hidden + head; h: the
# hidden states require grad; n / nb: collectives in forward / backward. Per chunk one all-gather;
# after the chunks one all_reduce of the loss parts and one of grad_h (when h requires grad);
# reduction="none" runs grad_h's in backward instead (its rerun replays the gathered statistics).
LINEAR = {
    "lin_kd_hidden_mean": dict(method="kd", hyper=dict(temperature=2.0), rows=7, chunk=3, bias=True,
                               teacher="hidden", lab=0.25, w=True, red="mean",
                               n=dict(all_gather=3, all_reduce=2)),
    "lin_ttm_logits_sum": dict(method="ttm", hyper=dict(temperature=2.5), rows=7, chunk=4, bias=False,
                               teacher="logits", lab=0.25, red="sum", n=dict(all_gather=2, all_reduce=2)),
    "lin_kd_none": dict(method="kd", hyper=dict(temperature=3.0), rows=7, chunk=2, bias=True,
                        teacher="hidden", lab=0.25, w=True, red="none",
                        n=dict(all_gather=4, all_reduce=1), nb=dict(all_gather=0, all_reduce=1)),
    "lin_retro_kd": dict(method="retro_kd", hyper=dict(temperature=2.0, past_weight=0.4), rows=6,
                         chunk=4, bias=True, teacher="hidden", past=True, lab=0.0, red="mean",
                         n=dict(all_gather=2, all_reduce=2)),
    "lin_wttm_frozen_h": dict(method="wttm", hyper=dict(temperature=2.0), rows=6, chunk=None, bias=True,
                              teacher="logits", lab=0.25, h=False, red="mean",
                              n=dict(all_gather=1, all_reduce=1)),
    "lin_jsd_beta0_none_frozen_h": dict(method="jsd", hyper=dict(beta=0.0, temperature=1.5), rows=5,
                                        chunk=2, bias=False, teacher="hidden", lab=None, h=False,
                                        red="none", n=dict(all_gather=3, all_reduce=1),
                                        nb=dict(all_gather=0, all_reduce=0)),
    "lin_dkd_hidden": dict(method="dkd", hyper=dict(temperature=2.0, alpha=1.0, beta=4.0), rows=7, chunk=3,
                           bias=True, teacher="hidden", lab=0.25, w=True, red="mean",
                           n=dict(all_gather=3, all_reduce=2)),
    "lin_jsd_half_logits": dict(method="jsd", hyper=dict(beta=0.3, temperature=2.0), rows=6, chunk=4,
                                bias=False, teacher="logits", lab=0.25, red="sum",
                                n=dict(all_gather=4, all_reduce=2)),
    "lin_kd_even_default_layout": dict(method="kd", hyper=dict(temperature=2.0), rows=6, chunk=4,
                                       bias=True, teacher="hidden", lab=0.25, red="mean", even=True,
                                       n=dict(all_gather=2, all_reduce=2)),
}
NONE = dict(all_gather=0, all_reduce=0, other=0)


def vocab_of(case):
    return 40 if case.get("even") else C


def sizes_for(world, c):
    base, extra = divmod(c, world)
    return [base + (r < extra) for r in range(world)]


def _gen(name, table):
    return torch.Generator().manual_seed(2000 + sorted(table).index(name) + 100 * (table is LINEAR))


def _labels(lead, c, frac, g):
    if frac is None:
        return None
    y = torch.randint(0, c, lead, generator=g)
    y = y.masked_fill(torch.rand(lead, generator=g) < frac, -100)
    if frac == 0.0:
        y.view(-1)[:2] = torch.tensor([c - 1, 0])    # the first and the last class
    return y


def _upstream(lead, red, g):
    return (torch.randn(lead, generator=g, dtype=torch.float64) if red == "none"
            else torch.rand((), generator=g, dtype=torch.float64) + 0.5)


def multi_inputs(name):
    """The full (unsharded) float64 inputs of a multi-teacher case, the same in every process."""
    case, g = MULTI[name], _gen(name, MULTI)
    lead, m = case.get("lead", (6,)), case["m"]
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 3   # noqa: E731
    inp = dict(z=rnd(*lead, C), v=rnd(m, *lead, C), zp=rnd(*lead, C), y=_labels(lead, C, case["lab"], g))
    tw = case.get("tw")
    inp["tw"] = (torch.rand(m, *lead, generator=g, dtype=torch.float64) + 0.2 if tw == "rows" else
                 torch.rand(m, generator=g, dtype=torch.float64) + 0.2 if tw == "teacher" else tw)
    inp["kd_w"] = inp["ce_w"] = 1.0
    if case.get("w"):
        inp["kd_w"], inp["ce_w"] = (torch.rand(lead, generator=g, dtype=torch.float64) + 0.5 for _ in range(2))
    inp["up"] = _upstream(lead, case["red"], g)
    return inp


def linear_inputs(name):
    """The full float64 inputs of a fused linear case (heads (V, H) by vocabulary row)."""
    case, g = LINEAR[name], _gen(name, LINEAR)
    n, c = case["rows"], vocab_of(case)
    rnd = lambda *s, k=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * k   # noqa: E731
    inp = dict(h=rnd(n, HID), w=rnd(c, HID, k=1.3), b=rnd(c), th=rnd(n, HID_T), tw=rnd(c, HID_T, k=1.5),
               tb=rnd(c), t=rnd(n, c, k=3.0), ph=rnd(n, HID), pw=rnd(c, HID, k=1.3),
               y=_labels((n,), c, case["lab"], g))
    inp["kd_w"] = inp["ce_w"] = 1.0
    if case.get("w"):
        inp["kd_w"], inp["ce_w"] = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5 for _ in range(2))
    inp["up"] = _upstream((n,), case["red"], g)
    return inp


def _leaf(x, grad=True):
    return x.clone().requires_grad_(grad) if isinstance(x, torch.Tensor) else x


def multi_step(name, cols=slice(None), tp=None):
    """Loss + backward of a multi-teacher case on the columns ``cols`` (``tp``: the process_group
    keyword arguments, None: one process); the loss, the gradients and the collectives."""
    import kdfast
    case, inp = MULTI[name], multi_inputs(name)
    z = inp["z"][..., cols].clone().requires_grad_(True)
    v = inp["v"][..., cols].clone().requires_grad_(bool(case.get("tg")))
    tw = _leaf(inp["tw"])
    kd_w, ce_w = _leaf(inp["kd_w"]), _leaf(inp["ce_w"])
    extra = dict(past_student_logits=inp["zp"][..., cols].clone()) if case["method"] == "retro_kd" else {}
    hyper = dict(backend="cpu") | case["hyper"] | (dict(backend="cpu") if tp is None else {})   # (reference: fused)
    counts = _Counts.reset()
    loss = kdfast.multi_teacher_loss(case["method"], z, v, inp["y"], teacher_weights=tw, kd_weight=kd_w,
                                     ce_weight=ce_w, reduction=case["red"], **extra, **hyper, **(tp or {}))
    n_fwd = counts.snapshot()
    loss.backward(inp["up"])
    grad = lambda x: x.grad if isinstance(x, torch.Tensor) else None   # noqa: E731
    return dict(loss=loss.detach(), gz=z.grad, gv=v.grad, gtw=grad(tw), gkd=grad(kd_w), gce=grad(ce_w),
                n_fwd=n_fwd, n_bwd=counts.since(n_fwd))


def linear_step(name, rows=slice(None), tp=None):
    """Loss + backward of a fused linear case with this rank's head rows ``rows`` (``tp``: the
    process_group keyword arguments, None: one process)."""
    from kdfast.fused_linear import fused_linear_distill_loss
    case, inp = LINEAR[name], linear_inputs(name)
    h = inp["h"].clone().requires_grad_(case.get("h", True))
    w = inp["w"][rows].clone().requires_grad_(True)
    b = inp["b"][rows].clone().requires_grad_(True) if case["bias"] else None
    kd_w, ce_w = _leaf(inp["kd_w"]), _leaf(inp["ce_w"])
    if case["teacher"] == "hidden":
        src = dict(teacher_hidden=inp["th"], teacher_weight=inp["tw"][rows],
                   teacher_bias=inp["tb"][rows] if case["bias"] else None)
    else:
        src = dict(teacher_logits=inp["t"][:, rows])
    if case.get("past"):
        src.update(past_student_hidden=inp["ph"], past_student_weight=inp["pw"][rows])
    counts = _Counts.reset()
    loss = fused_linear_distill_loss(h, w, inp["y"], student_bias=b, method=case["method"], kd_weight=kd_w,
                                     ce_weight=ce_w, reduction=case["red"], chunk_size=case["chunk"],
                                     backend="cpu", **src, **case["hyper"], **(tp or {}))
    n_fwd = counts.snapshot()
    loss.backward(inp["up"])
    grad = lambda x: x.grad if isinstance(x, torch.Tensor) else None   # noqa: E731
    return dict(loss=loss.detach(), gh=h.grad, gw=w.grad, gb=grad(b), gkd=grad(kd_w), gce=grad(ce_w),
                n_fwd=n_fwd, n_bwd=counts.since(n_fwd))


class _Counts:
    """The collectives called since :meth:`reset` (the worker wraps torch.distributed's functions)."""
    calls = dict(NONE)

    @classmethod
    def reset(cls):
        cls.calls.update(NONE)
        return cls

    @classmethod
    def snapshot(cls):
        return dict(cls.calls)

    @classmethod
    def since(cls, before):
        return {k: cls.calls[k] - before[k] for k in cls.calls}


# ----------------------------------------------------------------------------- the worker
def _worker(rank, world, store, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    import kdfast
    from kdfast.fused_linear import fused_linear_distill_loss

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)

    def counting(fn, key):
        def wrapped(*a, **k):
            _Counts.calls[key] += 1
            return fn(*a, **k)
        return wrapped

    dist.all_reduce = counting(dist.all_reduce, "all_reduce")
    for gather in ("all_gather_single", "all_gather_into_tensor"):   # (the statistics' all-gather)
        if hasattr(dist, gather):
            setattr(dist, gather, counting(getattr(dist, gather), "all_gather"))
    for other in ("broadcast", "all_gather", "reduce_scatter", "reduce", "gather", "scatter",
                  "all_to_all", "barrier"):
        setattr(dist, other, counting(getattr(dist, other), "other"))
    group = dist.group.WORLD

    def layout(case):
        c = vocab_of(case)
        sizes = sizes_for(world, c)
        start = sum(sizes[:rank])
        tp = dict(process_group=group) if case.get("even") else dict(
            process_group=group, vocab_start=start, vocab_size=c)
        return slice(start, start + sizes[rank]), tp

    results = {}
    for name, case in MULTI.items():
        cols, tp = layout(case)
        results[name] = multi_step(name, cols, tp)
    for name, case in LINEAR.items():
        rows, tp = layout(case)
        results[name] = linear_step(name, rows, tp)

    # argument errors: raised on every rank before any collective
    sizes = sizes_for(world, C)
    start, cl = sum(sizes[:rank]), sizes[rank]
    tp = dict(process_group=group, vocab_start=start, vocab_size=C)
    z, vs = torch.randn(3, cl, dtype=torch.float64), torch.randn(2, 3, cl, dtype=torch.float64)
    h, w = torch.randn(3, HID, dtype=torch.float64), torch.randn(cl, HID, dtype=torch.float64)

    def raises(words, fn, *a, **k):
        try:
            fn(*a, **k)
        except ValueError as e:
            return words in str(e)
        return False

    mt, fl = kdfast.multi_teacher_loss, fused_linear_distill_loss
    _Counts.reset()
    checks = {
        "multi_callable": raises("kdfast method", mt, lambda *a, **k: None, z, vs, **tp),
        "multi_label_out_of_vocab": raises("global class ids", mt, "kd", z, vs, torch.tensor([0, C, 1]), **tp),
        "multi_start_without_group": raises("need process_group", mt, "kd", z, vs, vocab_start=start),
        "linear_backend_torch": raises("backend='torch'", fl, h, w, teacher_logits=z, backend="torch", **tp),
        "multi_backend_torch": raises("no two-phase kernel", mt, "kd", z, vs, backend="torch", **tp),
        "linear_uneven_without_start": raises("vocab_start", fl, h, w, teacher_logits=z,
                                              process_group=group, vocab_size=C),
        "linear_label_out_of_vocab": raises("global class ids", fl, h, w, torch.tensor([0, C, 1]),
                                            teacher_logits=z, **tp),
    }
    checks["no_collective_before_the_checks"] = _Counts.snapshot() == NONE
    # the module form takes the shard layout in its constructor
    from kdfast.fused_linear import FusedLinearDistillLoss
    opts = dict(temperature=2.0, chunk_size=2, backend="cpu", **tp)
    y = torch.tensor([0, C - 1, -100])
    checks["linear_module"] = torch.equal(FusedLinearDistillLoss("kd", **opts)(h, w, y, teacher_logits=z),
                                          fl(h, w, y, teacher_logits=z, method="kd", **opts))
    torch.save(dict(results=results, checks=checks), os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the parent
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2- and 4-process worlds, started together: {world: [per-rank results]}."""
    from _worlds import run_worlds
    return run_worlds(__file__, str(tmp_path_factory.mktemp("tp_multi_linear")))


def close(got, want, what):
    assert got is not None and want is not None, what
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    scale = float(want.abs().max()) if want.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= TOL * scale, f"{what}: max error {err:.3g} > {TOL:.1g} * {scale:.3g}"


def _same_on_every_rank(ranks, key):
    first = ranks[0][key]
    if first is None:
        assert all(r[key] is None for r in ranks), key
    else:
        assert all(torch.equal(r[key], first) for r in ranks), f"{key} differs between ranks"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(MULTI))
def test_multi_teacher_matches_single_process(runs, world, name):
    case = MULTI[name]
    ranks = [runs[world][r]["results"][name] for r in range(world)]
    want = multi_step(name)
    for res in ranks:
        assert res["n_fwd"] == dict(NONE, **case["n"]), res["n_fwd"]
        assert res["n_bwd"] == NONE, res["n_bwd"]
    for key in ("loss", "gtw", "gkd", "gce"):   # replicated values: bitwise equal over the ranks
        _same_on_every_rank(ranks, key)
    close(ranks[0]["loss"], want["loss"], "loss")
    close(torch.cat([r["gz"] for r in ranks], -1), want["gz"], "student gradient")
    if case.get("tg"):
        close(torch.cat([r["gv"] for r in ranks], -1), want["gv"], "teacher gradients")
    for key in ("gtw", "gkd", "gce"):
        if want[key] is not None:
            close(ranks[0][key], want[key], key)
    if case["lab"] == 1.0:
        assert float(ranks[0]["loss"]) == 0.0


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(LINEAR))
def test_fused_linear_matches_single_process(runs, world, name):
    case = LINEAR[name]
    ranks = [runs[world][r]["results"][name] for r in range(world)]
    want = linear_step(name)
    for res in ranks:
        assert res["n_fwd"] == dict(NONE, **case["n"]), res["n_fwd"]
        assert res["n_bwd"] == dict(NONE, **case.get("nb", {})), res["n_bwd"]
    for key in ("loss", "gh", "gkd", "gce"):   # replicated: grad_h is summed over the group
        _same_on_every_rank(ranks, key)
    close(ranks[0]["loss"], want["loss"], "loss")
    if case.get("h", True):
        close(ranks[0]["gh"], want["gh"], "grad_h")
    else:
        assert ranks[0]["gh"] is None
    close(torch.cat([r["gw"] for r in ranks]), want["gw"], "grad_W shards")
    if case["bias"]:
        close(torch.cat([r["gb"] for r in ranks]), want["gb"], "grad_b shards")
    for key in ("gkd", "gce"):
        if want[key] is not None:
            close(ranks[0][key], want[key], key)


@pytest.mark.parametrize("world", [2, 4])
def test_argument_errors(runs, world):
    for r in range(world):
        checks = runs[world][r]["checks"]
        assert all(checks.values()), checks


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
