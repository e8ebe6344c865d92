"""Vocabulary-parallel losses (kdfast.vocab_parallel) against the single-process reference.

One batch of CPU processes per world size (2 and 4, gloo over a FileStore rendezvous, loopback):
every rank builds the same fixed-seed float64 logits, keeps its column shard (37 classes split
unevenly: 19/18 and 10/9/9/9; one case with equal shards and the default layout), runs every case
(loss + backward with a fixed upstream gradient) and saves its loss, its gradient shards and the
number of collectives it called. The parent concatenates the shards and compares them with
kdfast.reference on the full logits. Run as a script, this file is the worker.
"""
import os
import sys
import time

import pytest
import torch

C = 37
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> case. lead: leading shape; lab: fraction of ignored labels (None: no labels, 1.0: all
# ignored); w: tensor weights with gradients; tg: teacher gradient; red: reduction; n: the expected
# collectives per forward (backward: none).
# the two-phase kernels: one all-gather of the statistics per round, one all_reduce of the loss parts
PHASED = dict(all_gather=1, all_reduce=1)
PHASED2 = dict(all_gather=2, all_reduce=1)   # JSD: two rounds of statistics
PHASED3 = dict(all_gather=3, all_reduce=1)   # LS: three (means, standard deviations, the rest)
CASES = {
    "kd": dict(method="kd", hyper=dict(temperature=3.0), lab=0.25, w=True, tg=True, red="mean", n=PHASED),
    "kd_none_3d": dict(method="kd", hyper=dict(temperature=2.0), lead=(2, 3), lab=None, red="none", n=PHASED),
    "kd_T1_neg_inf": dict(method="kd", hyper=dict(temperature=1.0), lab=0.0, tg=True, red="sum",
                          neg_inf=True, n=PHASED),
    "kd_fp32": dict(method="kd", hyper=dict(temperature=2.0), lab=0.25, tg=True, red="mean",
                    dtype=(torch.float32, torch.float32), n=PHASED),
    "kd_fp32_student_fp64_teacher": dict(method="kd", hyper=dict(temperature=2.0), lab=0.25, red="sum",
                                         dtype=(torch.float32, torch.float64), n=PHASED),
    "kd_all_ignored": dict(method="kd", hyper=dict(temperature=2.0), lab=1.0, w=True, red="mean", n=PHASED),
    "kd_even_default_layout": dict(method="kd", hyper=dict(temperature=2.0), lab=0.25, red="mean",
                                   even=True, n=PHASED),
    "kd_inplace": dict(method="kd", hyper=dict(temperature=4.0, inplace_backward=True),
                       lab=0.0, tg=True, red="mean", up=1.0, n=PHASED),
    "ttm": dict(method="ttm", hyper=dict(temperature=2.5), lab=0.25, tg=True, red="sum", n=PHASED),
    "wttm": dict(method="wttm", hyper=dict(temperature=2.5), lab=0.25, w=True, tg=True, red="mean", n=PHASED),
    "wttm_T1": dict(method="wttm", hyper=dict(temperature=1.0), lab=None, red="none", n=PHASED),
    "retro_kd": dict(method="retro_kd", hyper=dict(temperature=4.0, past_weight=0.3), lab=0.25, w=True,
                     tg=True, red="mean", n=PHASED),
    "jsd_half": dict(method="jsd", hyper=dict(beta=0.5, temperature=1.5), lab=0.25, w=True, tg=True,
                     red="mean", n=PHASED2),
    "jsd_0.2_none": dict(method="jsd", hyper=dict(beta=0.2), lab=None, tg=True, red="none", n=PHASED2),
    "jsd_beta0": dict(method="jsd", hyper=dict(beta=0.0, temperature=2.0), lab=0.25, tg=True, red="sum", n=PHASED),
    "jsd_beta1": dict(method="jsd", hyper=dict(beta=1.0, temperature=2.0), lab=0.25, tg=True, red="sum", n=PHASED),
    "jsd_beta1_T1": dict(method="jsd", hyper=dict(beta=1.0), lab=0.25, w=True, tg=True, red="mean", n=PHASED),
    "jsd_T1_labels": dict(method="jsd", hyper=dict(beta=0.7), lab=0.25, red="sum", n=PHASED2),
    "dkd": dict(method="dkd", hyper=dict(temperature=4.0, alpha=1.0, beta=8.0), lab=0.25, w=True, tg=True,
                red="mean", n=PHASED),
    "dkd_T1_sum": dict(method="dkd", hyper=dict(temperature=1.0, alpha=0.5, beta=2.0), lab=0.0, tg=True,
                       red="sum", n=PHASED),
    "lm_center": dict(method="logit_matching", hyper=dict(center=True), lab=0.25, w=True, tg=True,
                      red="mean", n=PHASED),
    "lm_center_none": dict(method="logit_matching", hyper=dict(center=True), lab=None, tg=True, red="none",
                           n=PHASED),
    "lm_plain": dict(method="logit_matching", hyper=dict(center=False), lab=None, tg=True, red="sum", n=PHASED),
    "lm_plain_ce": dict(method="logit_matching", hyper=dict(center=False), lab=0.25, red="mean", n=PHASED),
    "ls_kd": dict(method="ls_kd", hyper=dict(temperature=2.0), lab=0.25, w=True, tg=True, red="mean", n=PHASED3),
    "ls_kd_none": dict(method="ls_kd", hyper=dict(temperature=3.0), lab=None, red="none", n=PHASED3),
    # 4 processes only: 2 data-parallel replicas x tensor-parallel groups of 2 (process_group = the
    # TP subgroup); each replica has its own rows
    "tp2_dp2_kd": dict(method="kd", hyper=dict(temperature=2.0), lead=(8,), lab=0.25, w=True, tg=True,
                       red="mean", n=PHASED, tp=2),
    "tp2_dp2_dkd": dict(method="dkd", hyper=dict(temperature=2.0), lead=(8,), lab=0.25, tg=True,
                        red="mean", n=PHASED, tp=2),
}
TOL64 = 1e-10


def sizes_for(world, case):
    c = 40 if case.get("even") else C
    base, extra = divmod(c, world)
    return c, [base + (r < extra) for r in range(world)]


def make_inputs(name):
    """The full (unsharded) float64 inputs of a case, the same in every process."""
    case = CASES[name]
    g = torch.Generator().manual_seed(1000 + sorted(CASES).index(name))
    c = 40 if case.get("even") else C
    lead = case.get("lead", (6,))
    z = torch.randn(*lead, c, generator=g, dtype=torch.float64) * 3
    v = torch.randn(*lead, c, generator=g, dtype=torch.float64) * 3
    zp = torch.randn(*lead, c, generator=g, dtype=torch.float64) * 3
    if case.get("neg_inf"):
        v.masked_fill_(torch.rand(v.shape, generator=g) < 0.2, float("-inf"))
        v.view(-1, c)[0, :12] = float("-inf")       # a row whose first shard is all -inf
    labels = None
    if case["lab"] is not None:
        labels = torch.randint(0, c, lead, generator=g)
        labels = labels.masked_fill(torch.rand(lead, generator=g) < case["lab"], -100)
        if case["lab"] == 0.0 and labels.numel() >= 2:
            labels.view(-1)[:2] = torch.tensor([c - 1, 0])     # the first and last class
    kd_w = ce_w = 1.0
    if case.get("w"):
        kd_w = torch.rand(lead, generator=g, dtype=torch.float64) + 0.5
        ce_w = torch.rand(lead, generator=g, dtype=torch.float64) + 0.5
    up = (torch.randn(lead, generator=g, dtype=torch.float64) if case["red"] == "none"
          else torch.rand((), generator=g, dtype=torch.float64) + 0.5)
    if "up" in case:
        up = torch.tensor(case["up"], dtype=torch.float64)
    dz, dv = case.get("dtype", (torch.float64, torch.float64))
    return dict(z=z.to(dz), v=v.to(dv), zp=zp.to(dz), labels=labels, kd_w=kd_w, ce_w=ce_w, up=up)


def rows_of(x, rows):
    return x if rows is None or not isinstance(x, torch.Tensor) or x.dim() == 0 else x[rows]


# ----------------------------------------------------------------------------- the worker
def _worker(rank, world, store, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    import kdfast
    from kdfast import vocab_parallel as VP

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    calls = {"all_reduce": 0, "all_gather": 0, "other": 0}

    def counting(fn, key):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    dist.all_reduce = counting(dist.all_reduce, "all_reduce")
    for gather in ("all_gather_single", "all_gather_into_tensor"):   # (the two-phase kernels' gather)
        if hasattr(dist, gather):
            setattr(dist, gather, counting(getattr(dist, gather), "all_gather"))
    for other in ("broadcast", "all_gather", "reduce_scatter", "reduce",
                  "gather", "scatter", "all_to_all", "barrier"):
        setattr(dist, other, counting(getattr(dist, other), "other"))
    subgroups = [dist.new_group([0, 1]), dist.new_group([2, 3])] if world == 4 else None
    results, timings = {}, {}
    for name, case in CASES.items():
        if case.get("tp") and world != 4:
            continue
        inp = make_inputs(name)
        group, tp_rank, tp_world, rows = dist.group.WORLD, rank, world, None
        if case.get("tp"):
            dp, tp_rank, tp_world = rank // 2, rank % 2, 2
            group = subgroups[dp]
            n = inp["z"].shape[0]
            rows = slice(dp * n // 2, (dp + 1) * n // 2)
        c, sizes = sizes_for(tp_world, case)
        start, cl = sum(sizes[:tp_rank]), sizes[tp_rank]
        shard = lambda x: rows_of(x, rows)[..., start:start + cl].clone()   # noqa: E731
        z = shard(inp["z"]).requires_grad_(True)
        v = shard(inp["v"]).requires_grad_(bool(case.get("tg")))
        w = {k: (rows_of(inp[k], rows).clone().requires_grad_(True) if isinstance(inp[k], torch.Tensor)
                 else inp[k]) for k in ("kd_w", "ce_w")}
        labels = rows_of(inp["labels"], rows)
        layout = {} if case.get("even") else dict(vocab_start=start, vocab_size=c)
        extra = dict(past_student_logits=shard(inp["zp"])) if case["method"] == "retro_kd" else {}
        calls.update(all_reduce=0, all_gather=0, other=0)
        t0 = time.perf_counter()
        common = dict(process_group=group, kd_weight=w["kd_w"], ce_weight=w["ce_w"],
                      reduction=case["red"], **layout, **case["hyper"])
        if name.endswith("_none"):   # the dispatcher by name
            loss = VP.vocab_parallel_loss(case["method"], z, v, labels, **extra, **common)
        else:                        # the public losses' process_group= path
            fn = getattr(kdfast, case["method"] + "_loss")
            past = (extra["past_student_logits"],) if extra else ()
            loss = fn(z, v, *past, labels, **common)
        n_fwd = dict(calls)
        loss.backward(rows_of(inp["up"], rows).to(loss.dtype))
        timings[name] = time.perf_counter() - t0
        n_bwd = {k: calls[k] - n_fwd[k] for k in calls}
        results[name] = dict(
            loss=loss.detach(), gz=z.grad, gv=v.grad if case.get("tg") else None,
            gkd=w["kd_w"].grad if case.get("w") else None, gce=w["ce_w"].grad if case.get("w") else None,
            n_fwd=n_fwd, n_bwd=n_bwd, rows=rows, tp_rank=tp_rank)

    # setup helper and argument errors (no collective runs before the checks)
    sizes = sizes_for(world, {})[1]
    checks = {"shard_bounds": VP.shard_bounds(sizes[rank], dist.group.WORLD) == (sum(sizes[:rank]), C)}
    z = torch.randn(3, sizes[rank], dtype=torch.float64)
    layout = dict(vocab_start=sum(sizes[:rank]), vocab_size=C)

    def raises(**kw):
        args = dict(process_group=dist.group.WORLD, **layout)
        args.update(kw)
        try:
            VP.kd_loss(z, z, args.pop("labels", None), **args)
        except ValueError:
            return True
        return False

    checks["label_out_of_vocab"] = raises(labels=torch.tensor([0, C, 1]))
    checks["start_without_size"] = raises(vocab_size=None)
    checks["uneven_without_start"] = raises(vocab_start=None)
    checks["shard_outside_vocab"] = raises(vocab_start=C - 1)
    checks["no_group"] = raises(process_group=None)
    checks["bad_temperature"] = raises(temperature=0.0)
    checks["backend_torch"] = raises(backend="torch")   # the eager reference has no two-phase form
    calls.update(all_reduce=0, all_gather=0, other=0)
    VP.kd_loss(z, z, torch.tensor([C - 1, 0, -100]), **layout, process_group=dist.group.WORLD)
    checks["global_labels_ok"] = calls == dict(all_reduce=1, all_gather=1, other=0)
    if world == 2:
        checks["ddp_equals_full_batch"] = _ddp_check(rank, world)
        checks["tp_head_grads"] = _tp_head_check(rank, world, sizes)
    torch.save(dict(results=results, checks=checks, timings=timings), os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _ddp_check(rank, world):
    """Data parallel needs nothing special: DDP over whole rows with the ordinary kdfast loss gives
    the full-batch gradient (equal rows per rank, reduction="mean": DDP averages the rank means)."""
    import kdfast
    from torch.nn.parallel import DistributedDataParallel as DDP
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    t = torch.randn(8, C, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (8,), generator=g)
    torch.manual_seed(0)                # the same initial model on every rank (DDP checks it)
    student = torch.nn.Linear(5, C).double()
    ref = torch.nn.Linear(5, C).double()
    ref.load_state_dict(student.state_dict())
    kdfast.kd_loss(ref(x), t, y, temperature=2.0).backward()          # one process, whole batch
    ddp = DDP(student)
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)           # this rank's rows
    kdfast.kd_loss(ddp(x[rows]), t[rows], y[rows], temperature=2.0).backward()
    return all(float((a.grad - b.grad).abs().max()) < 1e-12 for a, b in zip(student.parameters(), ref.parameters()))


class _ToTensorParallel(torch.autograd.Function):
    """docs/vocab-parallel.md's head input: identity forward, backward sums dL/dh over the group."""

    @staticmethod
    def forward(ctx, h, group):
        ctx.group = group
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _tp_head_check(rank, world, sizes):
    """A column-parallel head (W split by vocabulary rows) + the vocab-parallel loss: h.grad and this
    rank's rows of W.grad equal the single-process gradients."""
    import torch.distributed as dist

    import kdfast
    from kdfast import vocab_parallel as VP
    g = torch.Generator().manual_seed(11)
    h = torch.randn(6, 4, generator=g, dtype=torch.float64)
    w = torch.randn(C, 4, generator=g, dtype=torch.float64)
    v = torch.randn(6, C, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 5, C - 1, -100, 20, 36])
    start, cl = sum(sizes[:rank]), sizes[rank]
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    kdfast.reference.kd_loss(h1 @ w1.T, v, y, temperature=2.0).backward()
    h2, w2 = h.clone().requires_grad_(), w[start:start + cl].clone().requires_grad_()
    z = _ToTensorParallel.apply(h2, dist.group.WORLD) @ w2.T
    VP.kd_loss(z, v[:, start:start + cl], y, process_group=dist.group.WORLD, vocab_start=start,
               vocab_size=C, temperature=2.0).backward()
    return (float((h2.grad - h1.grad).abs().max()) < 1e-12
            and float((w2.grad - w1.grad[start:start + cl]).abs().max()) < 1e-12)


# ----------------------------------------------------------------------------- the parent
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the 2- and 4-process worlds together; returns {world: [per-rank results]}."""
    from _worlds import run_worlds
    return run_worlds(__file__, str(tmp_path_factory.mktemp("vocab_parallel")))


def reference(name, rows):
    """Loss and gradients of kdfast.reference on the full float64 logits (the rows of a replica)."""
    import kdfast
    case = CASES[name]
    inp = make_inputs(name)
    ref = getattr(kdfast.reference, case["method"] + "_loss")
    z = rows_of(inp["z"], rows).double().requires_grad_(True)
    v = rows_of(inp["v"], rows).double().requires_grad_(True)
    w = {k: (rows_of(inp[k], rows).clone().requires_grad_(True) if isinstance(inp[k], torch.Tensor) else inp[k])
         for k in ("kd_w", "ce_w")}
    hyper = {k: x for k, x in case["hyper"].items() if k != "inplace_backward"}
    args = (z, v, rows_of(inp["zp"], rows).double()) if case["method"] == "retro_kd" else (z, v)
    loss = ref(*args, rows_of(inp["labels"], rows), kd_weight=w["kd_w"], ce_weight=w["ce_w"],
               reduction=case["red"], **hyper)
    loss.backward(rows_of(inp["up"], rows))
    return dict(loss=loss.detach(), gz=z.grad, gv=v.grad, gkd=w["kd_w"].grad if case.get("w") else None,
                gce=w["ce_w"].grad if case.get("w") else None)


def close(got, want, tol, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    got, want = got.double(), want.double()
    scale = float(want.abs().max()) if want.numel() else 0.0      # relative to the tensor's size
    scale = scale if scale > 0 else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


@pytest.mark.parametrize("name,world", [(n, w) for n in CASES for w in (2, 4) if w == 4 or not CASES[n].get("tp")])
def test_matches_reference_on_gathered_logits(runs, world, name):
    case = CASES[name]
    ranks = [runs[world][r]["results"][name] for r in range(world)]
    dz, dv = case.get("dtype", (torch.float64, torch.float64))
    tol = TOL64 if torch.float32 not in (dz, dv) else 2e-6
    replicas = [ranks[i:i + 2] for i in (0, 2)] if case.get("tp") else [ranks]
    for group in replicas:
        want = reference(name, group[0]["rows"])
        for res in group:
            n = case["n"] if isinstance(case["n"], dict) else dict(all_reduce=case["n"])
            assert res["n_fwd"] == dict(dict(all_reduce=0, all_gather=0, other=0), **n), res["n_fwd"]
            assert res["n_bwd"] == {"all_reduce": 0, "all_gather": 0, "other": 0}, res["n_bwd"]
            assert torch.equal(res["loss"], group[0]["loss"]), "the loss differs between ranks"
        close(group[0]["loss"], want["loss"], tol, "loss")
        gz = torch.cat([res["gz"] for res in group], dim=-1)
        assert gz.dtype == dz
        close(gz, want["gz"], tol, "student gradient")
        if case.get("tg"):
            close(torch.cat([res["gv"] for res in group], dim=-1), want["gv"], tol, "teacher gradient")
        if case.get("w"):
            for k in ("gkd", "gce"):
                assert all(torch.equal(res[k], group[0][k]) for res in group)
                close(group[0][k], want[k], tol, k)
        if case["lab"] == 1.0:
            assert float(group[0]["loss"]) == 0.0 and not gz.any()


@pytest.mark.parametrize("world", [2, 4])
def test_setup_helper_and_argument_errors(runs, world):
    for r in range(world):
        checks = runs[world][r]["checks"]
        assert all(checks.values()), checks


def test_timings_reported(runs):
    for world in (2, 4):
        t = runs[world][0]["timings"]
        print(f"world {world}: {len(t)} cases, fwd+bwd {sum(t.values()) * 1e3:.0f} ms in all, "
              f"slowest {max(t, key=t.get)} {max(t.values()) * 1e3:.1f} ms")


def test_needs_a_process_group_and_an_initialised_backend():
    from kdfast import vocab_parallel as VP
    z = torch.randn(2, 5)
    with pytest.raises(ValueError, match="process_group"):
        VP.kd_loss(z, z, process_group=None)
    with pytest.raises(ValueError, match="method"):
        VP.vocab_parallel_loss("nope", z, z, process_group=object())
    import torch.distributed as dist
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="initialised"):
            VP.kd_loss(z, z, process_group=object())


def test_every_dense_loss_takes_the_layout():
    """Each named loss of kdfast.functional takes the shard layout, and the vocab-parallel names are
    those losses with ``process_group`` required (one declaration per loss, in functional)."""
    import inspect

    import kdfast.functional as F
    from kdfast import vocab_parallel as VP
    from kdfast.losses import REGISTRY
    assert set(VP.METHODS) == {name for name, loss in REGISTRY.items() if loss.dense}   # all but topk_kd
    for name, fn in VP.METHODS.items():
        params = inspect.signature(getattr(F, name + "_loss")).parameters
        assert {"process_group", "vocab_start", "vocab_size"} <= set(params), name
        assert params["process_group"].default is None, name
        assert fn.__name__ == name + "_loss"
        with pytest.raises(TypeError, match="process_group"):
            fn(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
