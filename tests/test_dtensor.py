"""DTensor logits (kdfast/_dtensor.py) against the single-process float64 reference.

One batch of CPU processes per world size (2 and 4, gloo over a FileStore rendezvous, loopback, as
tests/test_vocab_parallel.py): every rank builds the same fixed-seed float64 inputs, wraps its part
as a DTensor on a 1-D mesh (``DTensor.from_local``: no communication), runs every case (loss +
backward with a fixed upstream gradient) and saves the full loss and gradients (``full_tensor``) and
the placements it saw. The parent compares them with kdfast.reference on the full tensors.

Cases, for every loss case of a dense teacher (conftest.CASES: every loss of the registry):
class-sharded (``Shard(-1)``; 37 classes: 19/18 and 10/10/10/7) with each reduction, equal shards
(40 classes) without labels, ``Replicate()``, and row-sharded (``Shard(0)`` of 5 rows: 3/2 and
2/2/1/0, a rank without rows) with each reduction; the labels and weights in the forms a user may
pass (plain, Replicate DTensor, Shard(0) DTensor, plain local rows). Then the special layouts (3
classes: 2/1, and over 4 ranks 1/1/1/0, which is gathered; rows sharded on dim 1, num_items_in_batch,
mixed Shard(-1) / Replicate logits, a ColwiseParallel head) and the errors. Run as a script, this
file is the worker.
"""
import datetime
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import CASES as LOSS_CASES  # noqa: E402  (case -> (method, hyperparameters))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-10
REDS = ("mean", "sum", "none")


def cases():
    """name -> case; the same list in every process. lead: leading shape; c: classes; place: "cls",
    "rep", "row" (Shard(0)), "row1" (Shard(1)); lab: labels' form (None: no labels); w: weights'
    form (None: floats)."""
    out = {}
    for i, (case, (method, hyper)) in enumerate(LOSS_CASES.items()):
        base = dict(method=method, hyper=hyper, lead=(5,), c=37)
        for j, red in enumerate(REDS):
            k = i + j
            out[f"{case}/cls/{red}"] = dict(base, place="cls", red=red, lab=("plain", "rep")[k % 2],
                                            w=(None, "plain", "rep")[k % 3])
            out[f"{case}/row/{red}"] = dict(base, place="row", red=red,
                                            lab=("plain", "rep", "shard", "local")[k % 4],
                                            w=(None, "plain", "rep", "shard")[k % 4])
        out[f"{case}/cls_even"] = dict(base, place="cls", c=40, red=REDS[i % 3],
                                       lab="plain" if method == "dkd" else None, w=None)
        out[f"{case}/rep"] = dict(base, place="rep", red=REDS[i % 3], lab=("plain", "rep")[i % 2],
                                  w=("rep", "plain")[i % 2])
    kd = dict(method="kd", hyper=dict(temperature=2.0), lead=(5,), c=37)
    out["kd/cls_tiny_vocab"] = dict(kd, place="cls", c=3, red="mean", lab="plain", w="plain")
    out["kd/cls_3d"] = dict(kd, place="cls", lead=(2, 3), red="none", lab="rep", w="plain")
    out["dkd/row1_3d"] = dict(kd, method="dkd", hyper=LOSS_CASES["dkd"][1], place="row1", lead=(2, 5),
                              red="mean", lab="shard", w="rep")
    out["kd/row1_3d_none"] = dict(kd, place="row1", lead=(2, 5), red="none", lab="plain", w="shard")
    out["kd/row_num_items"] = dict(kd, place="row", red="mean", lab="plain", w="plain", items=7)
    out["kd/row_all_ignored"] = dict(kd, place="row", red="mean", lab="ignored", w="rep")
    out["kd/mixed_cls_rep"] = dict(kd, place="cls", teacher="rep", red="sum", lab="plain", w=None)
    out["ls_kd/mixed_rep_cls"] = dict(kd, method="ls_kd", place="rep", teacher="cls", red="mean",
                                      lab="plain", w=None)
    return out


CASES = cases()


def make_inputs(name):
    """The full float64 inputs of a case, the same in every process."""
    case = CASES[name]
    g = torch.Generator().manual_seed(2000 + sorted(CASES).index(name))
    lead, c = case["lead"], case["c"]
    z, v, zp = (torch.randn(*lead, c, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    labels = None
    if case["lab"] is not None:
        labels = torch.randint(0, c, lead, generator=g)
        drop = torch.rand(lead, generator=g) < 0.3
        drop.view(-1)[0] = True                        # an ignored row in every case
        labels = labels.masked_fill(drop if case["lab"] != "ignored" else torch.ones_like(drop), -100)
    elif case["method"] == "dkd":
        raise AssertionError("dkd needs labels")
    kd_w = ce_w = 1.0
    if case["w"] is not None:
        kd_w, ce_w = (torch.rand(lead, generator=g, dtype=torch.float64) + 0.5 for _ in range(2))
    up = (torch.randn(lead, generator=g, dtype=torch.float64) if case["red"] == "none"
          else float(torch.rand((), generator=g)) + 0.5)
    return dict(z=z, v=v, zp=zp, labels=labels, kd_w=kd_w, ce_w=ce_w, up=up)


def chunk(size, world, rank):
    step = -(-size // world)
    start = min(rank * step, size)
    return start, min(step, size - start)


# ----------------------------------------------------------------------------- the worker
def _worker(rank, world, store, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    import kdfast
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    mesh = init_device_mesh("cpu", (world,))
    PL = {"cls": lambda nd: Shard(nd - 1), "rep": lambda nd: Replicate(), "row": lambda nd: Shard(0),
          "row1": lambda nd: Shard(1)}

    def dt(x, placement):
        """This rank's part of the full tensor x as a DTensor (no communication)."""
        if isinstance(placement, Shard):
            start, n = chunk(x.shape[placement.dim], world, rank)
            loc = x.narrow(placement.dim, start, n)
        else:
            loc = x
        return DTensor.from_local(loc.clone(), mesh, [placement], run_check=False, shape=x.shape,
                                  stride=x.stride())

    def aux(x, form, case, leaf):
        """Labels / weights in the case's form; ``leaf``: a weight (gets a gradient)."""
        if not isinstance(x, torch.Tensor):
            return x
        place = case["place"]
        row_dim = {"row": 0, "row1": 1}.get(place)
        if form == "rep":
            y = dt(x, Replicate())
        elif form == "shard":
            y = dt(x, Shard(row_dim))
        elif form == "local":
            start, n = chunk(x.shape[row_dim], world, rank)
            y = x.narrow(row_dim, start, n).clone()
        else:                     # plain, full
            y = x.clone()
        return y.requires_grad_(True) if leaf else y

    def full(x):
        if isinstance(x, DTensor):
            return x.full_tensor().detach(), repr(x.placements[0])
        return (x.detach() if isinstance(x, torch.Tensor) else x), "plain"

    results = {}
    for name, case in CASES.items():
        inp = make_inputs(name)
        if os.environ.get("DT_DEBUG"):       # which case a hung rank is in
            print(name, flush=True)
        nd = len(case["lead"]) + 1
        sp = PL[case["place"]](nd)
        tp = PL[case.get("teacher", case["place"])](nd)
        z = dt(inp["z"], sp).requires_grad_(True)
        v = dt(inp["v"], tp).requires_grad_(True)
        labels = aux(inp["labels"], case["lab"] if case["lab"] != "ignored" else "plain", case, False)
        kd_w, ce_w = (aux(inp[k], case["w"], case, True) for k in ("kd_w", "ce_w"))
        fn = getattr(kdfast, case["method"] + "_loss")
        past = (dt(inp["zp"], sp),) if case["method"] == "retro_kd" else ()
        extra = dict(num_items_in_batch=case["items"]) if "items" in case else {}
        loss = fn(z, v, *past, labels, kd_weight=kd_w, ce_weight=ce_w, reduction=case["red"],
                  **case["hyper"], **extra)
        if case["red"] == "none":
            (loss * dt(inp["up"], loss.placements[0])).sum().backward()
        else:
            (loss * inp["up"]).backward()
        res = dict(local_loss=loss.to_local().detach() if isinstance(loss, DTensor) else None)
        for key, x in (("loss", loss), ("gz", z.grad), ("gv", v.grad),
                       ("gkd", getattr(kd_w, "grad", None)), ("gce", getattr(ce_w, "grad", None))):
            res[key], res[key + "_place"] = full(x) if x is not None else (None, None)
        res["z_place"], res["v_place"] = repr(z.placements[0]), repr(v.placements[0])
        results[name] = res

    checks = dict(errors(rank, world, mesh))
    if world == 2:
        checks["colwise_head"] = _colwise_head_check(mesh)
    torch.save(dict(results=results, checks=checks), os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def errors(rank, world, mesh):
    """(name, ok) for each unsupported input: a ValueError (raised on every rank before any
    collective, so nothing hangs) whose message names the problem."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    import kdfast
    full = torch.randn(4, 12, dtype=torch.float64)

    def dt(placement, x=full):
        if isinstance(placement, Shard):
            start, n = chunk(x.shape[placement.dim], world, rank)
            x = x.narrow(placement.dim, start, n)
        return DTensor.from_local(x.clone(), mesh, [placement], run_check=False, shape=full.shape,
                                  stride=full.stride())

    def raises(match, fn):
        try:
            fn()
        except ValueError as e:
            return match in str(e) or f"{match!r} not in {e}"
        return "no error"

    y = torch.zeros(4, dtype=torch.long)
    cls, rep, row = dt(Shard(1)), dt(Replicate()), dt(Shard(0))
    yield "cls_vs_row", raises("sharded on different dims", lambda: kdfast.kd_loss(cls, row, y))
    yield "plain_teacher", raises("plain tensor beside DTensor", lambda: kdfast.kd_loss(cls, full, y))
    yield "plain_student", raises("student_logits is a plain tensor",
                                  lambda: kdfast.kd_loss(full, cls, y))
    yield "partial", raises("Partial", lambda: kdfast.kd_loss(
        DTensor.from_local(full.clone(), mesh, [Partial()], run_check=False), rep))
    yield "process_group_given", raises("process_group", lambda: kdfast.kd_loss(
        cls, cls, y, process_group=mesh.get_group()))
    yield "sharded_labels_for_cls", raises("expected Replicate()", lambda: kdfast.kd_loss(
        cls, cls, DTensor.from_local(y[:2].clone(), mesh, [Shard(0)], run_check=False, shape=(4,),
                                     stride=(1,))))
    yield "shape_mismatch", raises("global shape", lambda: kdfast.kd_loss(
        cls, DTensor.from_local(full[:3].clone(), mesh, [Replicate()], run_check=False)))
    yield "topk", raises("does not take DTensors", lambda: kdfast.topk_kd_loss(
        rep, torch.zeros(4, 2, dtype=torch.float64) - 1.0, torch.tensor([[0, 1]] * 4)))
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2))
        x2 = DTensor.from_local(full.clone(), mesh2, [Replicate(), Replicate()], run_check=False)
        yield "mesh_2d", raises("1-D device mesh", lambda: kdfast.kd_loss(x2, x2, y))


def _colwise_head_check(mesh):
    """docs/vocab-parallel.md's DTensor example: a ColwiseParallel lm_head with use_local_output=False
    gives Shard(-1) logits; the hidden states' and the head's gradients equal the single process's."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import kdfast
    g = torch.Generator().manual_seed(11)
    h = torch.randn(6, 4, generator=g, dtype=torch.float64)
    w = torch.randn(37, 4, generator=g, dtype=torch.float64)
    v = torch.randn(6, 37, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 5, 36, -100, 20, 36])
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    kdfast.reference.kd_loss(h1 @ w1.T, v, y, temperature=2.0).backward()
    head = torch.nn.Linear(4, 37, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(w)
    head = parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
    h2 = h.clone().requires_grad_()
    z = head(h2)                                    # DTensor, Shard(-1)
    teacher = DTensor.from_local(v, mesh, [Replicate()], run_check=False)
    loss = kdfast.kd_loss(z, teacher, y, temperature=2.0)
    loss.backward()
    return (repr(z.placements[0]) == "Shard(dim=1)"
            and float((h2.grad - h1.grad).abs().max()) < 1e-12
            and float((head.weight.grad.full_tensor() - w1.grad).abs().max()) < 1e-12)


# ----------------------------------------------------------------------------- the parent
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the 2- and 4-process worlds together; returns {world: [per-rank results]}."""
    from _worlds import run_worlds
    return run_worlds(__file__, str(tmp_path_factory.mktemp("dtensor")))


def reference(name):
    import kdfast
    case = CASES[name]
    inp = make_inputs(name)
    ref = getattr(kdfast.reference, case["method"] + "_loss")
    z, v = (inp[k].clone().requires_grad_(True) for k in ("z", "v"))
    w = {k: (inp[k].clone().requires_grad_(True) if isinstance(inp[k], torch.Tensor) else inp[k])
         for k in ("kd_w", "ce_w")}
    args = (z, v, inp["zp"]) if case["method"] == "retro_kd" else (z, v)
    loss = ref(*args, inp["labels"], kd_weight=w["kd_w"], ce_weight=w["ce_w"], reduction=case["red"],
               **case["hyper"])
    if "items" in case:     # num_items_in_batch: the sum over every row / it
        loss = ref(*args, inp["labels"], kd_weight=w["kd_w"], ce_weight=w["ce_w"], reduction="sum",
                   **case["hyper"]) / case["items"]
    loss.backward(torch.as_tensor(inp["up"], dtype=torch.float64))
    return dict(loss=loss.detach(), gz=z.grad, gv=v.grad,
                gkd=w["kd_w"].grad if case["w"] else None, gce=w["ce_w"].grad if case["w"] else None)


def close(got, want, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = float(want.abs().max()) if want.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= TOL * scale, f"{what}: max error {err:.3g} > {TOL:.1g} * {scale:.3g}"


def expected_placements(case, nd):
    sp = {"cls": f"Shard(dim={nd - 1})", "rep": "Replicate()", "row": "Shard(dim=0)",
          "row1": "Shard(dim=1)"}
    rows_none = case["red"] == "none" and case["place"].startswith("row")
    loss = sp[case["place"]] if rows_none else "Replicate()"
    return sp[case["place"]], sp[case.get("teacher", case["place"])], loss


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(runs, world, name):
    case = CASES[name]
    ranks = [runs[world][r]["results"][name] for r in range(world)]
    want = reference(name)
    zp, vp, lp = expected_placements(case, len(case["lead"]) + 1)
    for res in ranks:
        # the gradients are DTensors of their input's placement, the loss a Replicate DTensor
        # (per row on row shards: Shard(d)), the same value on every rank
        assert (res["z_place"], res["gz_place"]) == (zp, zp)
        assert (res["v_place"], res["gv_place"]) == (vp, vp)
        assert res["loss_place"] == lp
        if lp == "Replicate()":
            assert torch.equal(res["local_loss"], ranks[0]["local_loss"]), "the ranks' losses differ"
    res = ranks[0]
    close(res["loss"], want["loss"], "loss")
    close(res["gz"], want["gz"], "student gradient")
    close(res["gv"], want["gv"], "teacher gradient")
    if case["w"] is not None:
        rows = case["place"].startswith("row")
        wp = {"plain": "plain", "rep": "Partial(sum)" if rows else "Replicate()",
              "shard": {"row": "Shard(dim=0)", "row1": "Shard(dim=1)"}.get(case["place"])}[case["w"]]
        for k in ("gkd", "gce"):
            got = res[k]
            assert all(r[k + "_place"] == wp for r in ranks), (k, wp, [r[k + "_place"] for r in ranks])
            if case["place"].startswith("row") and res[k + "_place"] == "plain":
                got = sum(r[k] for r in ranks)      # a plain tensor: each rank's rows' part
            elif res[k + "_place"] == "plain":
                assert all(torch.equal(r[k], got) for r in ranks)
            close(got, want[k], k)
    if case["lab"] == "ignored":
        assert float(res["loss"]) == 0.0 and not res["gz"].any()


@pytest.mark.parametrize("world", [2, 4])
def test_errors_and_colwise_head(runs, world):
    for r in range(world):
        checks = runs[world][r]["checks"]
        assert {k: ok for k, ok in checks.items() if ok is not True} == {}


def test_plain_tensors_skip_the_dtensor_layer():
    """Without DTensor logits the hook is a dict look-up and two isinstance."""
    import kdfast
    from kdfast import functional as F
    assert not F._has_dtensor(dict(student_logits=torch.zeros(2, 3), teacher_logits=torch.zeros(2, 3)))
    assert not F._has_dtensor(dict(student_logits=torch.zeros(2, 3),
                                   teacher_topk_logprobs=torch.zeros(2, 1)))
    z = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(kdfast.kd_loss(z, z * 2), kdfast.kd_loss(z, z * 2))


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
