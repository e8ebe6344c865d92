"""topk_kd_loss (a sparse teacher of k log-probabilities) on every fused backend against the dense
reference that scatters the teacher into a row of -inf logits."""
import pytest
import torch

import kdfast
from conftest import BACKENDS, low_precision_bound, max_err, rand_labels, rand_logits, scale_of

R = kdfast.reference


def sparse_teacher(lead, c, k, gen, dtype=torch.float64, pad=0):
    """(log-probabilities, classes) of a random teacher's top-k; the last ``pad`` entries of each row
    are padding (-inf) on unused classes."""
    v = rand_logits((*lead, c), gen=gen)
    lp, idx = torch.log_softmax(v, -1).topk(k, dim=-1)
    if pad:
        lp[..., k - pad:] = float("-inf")
    # shuffle the k entries so the classes are not sorted by probability
    perm = torch.argsort(torch.rand(lp.shape, generator=gen), dim=-1)
    return lp.gather(-1, perm).to(dtype), idx.gather(-1, perm)


def run(fn, z, lp, idx, labels, *, weights=None, upstream=None, gen=None, **kw):
    z = z.detach().requires_grad_(True)
    kd_w = ce_w = 1.0
    if weights is not None:
        kd_w, ce_w = (w.detach().clone().requires_grad_(True) for w in weights)
    loss = fn(z, lp, idx, labels, kd_weight=kd_w, ce_weight=ce_w, reduction="none", **kw)
    if upstream is None:
        upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
    loss.backward(upstream.to(loss.dtype))
    out = {"loss": loss.detach().double(), "z": z.grad.double()}
    if weights is not None:   # without labels the reference never touches ce_weight: grad None = 0
        out["kd_w"], out["ce_w"] = (torch.zeros_like(w.double()) if w.grad is None else w.grad.double()
                                    for w in (kd_w, ce_w))
    return out, upstream


CASES = [   # (shape, k, pad, hyperparameters)
    ((1, 1), 1, 0, {}),
    ((5, 3), 2, 0, {"temperature": 2.0}),
    ((4, 37), 8, 3, {"temperature": 1.5}),
    ((2, 3, 300), 16, 0, {}),
    ((3, 300), 16, 0, {"renormalize": False}),
    ((6, 1031), 64, 5, {"temperature": 4.0}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("with_labels", [True, False])
def test_float64_matches_dense_reference(backend, case, with_labels, gen):
    shape, k, pad, hyper = CASES[case]
    lead, c = shape[:-1], shape[-1]
    z = rand_logits(shape, gen=gen)
    lp, idx = sparse_teacher(lead, c, k, gen, pad=pad)
    labels = rand_labels(lead, c, gen=gen) if with_labels else None
    if with_labels and c > 2:   # a label among the teacher's classes, and one outside them
        labels.view(-1)[0] = idx.reshape(-1, k)[0, 0]
    w = tuple(torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    got, up = run(kdfast.topk_kd_loss, z, lp, idx, labels, weights=w, gen=gen, backend=backend, **hyper)
    want, _ = run(R.topk_kd_loss, z, lp, idx, labels, weights=w, upstream=up, **hyper)
    for key in want:
        tol = 1e-10 * max(1.0, scale_of(want[key])) * (1 + c ** 0.5)
        assert max_err(got[key], want[key]) <= tol, (shape, key, max_err(got[key], want[key]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_no_worse_than_eager(backend, dtype, gen):
    shape = (8, 1031) if backend == "cpu" else (3, 300)
    lead, c = shape[:-1], shape[-1]
    z = rand_logits(shape, gen=gen).to(dtype)
    lp, idx = sparse_teacher(lead, c, 32, gen)
    labels = rand_labels(lead, c, gen=gen)
    kw = {"temperature": 2.0}
    got, up = run(kdfast.topk_kd_loss, z, lp.to(dtype), idx, labels, gen=gen, backend=backend, **kw)
    want, _ = run(R.topk_kd_loss, z.double(), lp.to(dtype).double(), idx, labels, upstream=up, **kw)
    eager, _ = run(R.topk_kd_loss, z, lp.to(dtype), idx, labels, upstream=up, **kw)
    for key in want:
        bound = low_precision_bound(max_err(eager[key], want[key]), dtype, scale_of(want[key]))
        assert max_err(got[key], want[key]) <= bound, (key, max_err(got[key], want[key]), bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_kd_on_the_scattered_teacher(backend, gen):
    """k = C: the sparse teacher is the whole teacher, and the loss is kd_loss's."""
    z, v = rand_logits((4, 50), gen=gen), rand_logits((4, 50), gen=gen)
    lp, idx = torch.log_softmax(v, -1).topk(50, dim=-1)
    y = rand_labels((4,), 50, gen=gen)
    a = kdfast.topk_kd_loss(z, lp, idx, y, temperature=3.0, backend=backend)
    b = kdfast.kd_loss(z, v, y, temperature=3.0, backend=backend)
    assert abs(a.item() - b.item()) <= 1e-10 * max(1.0, abs(b.item()))


def test_gradcheck_cpu():
    g = torch.Generator().manual_seed(0)
    z = rand_logits((3, 11), gen=g).requires_grad_()
    lp, idx = sparse_teacher((3,), 11, 4, g, pad=1)
    y = torch.tensor([idx[0, 0].item(), 5, -100])
    kd_w = (torch.rand(3, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    for t in (1.0, 2.5):
        assert torch.autograd.gradcheck(
            lambda a, w: kdfast.topk_kd_loss(a, lp, idx, y, temperature=t, kd_weight=w, backend="cpu"),
            (z, kd_w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extremes_empty_and_all_padding(backend, gen):
    # +-1e4 logits, a row whose teacher entries are all -inf (no mass: D = 0), an empty batch
    z = rand_logits((3, 40), gen=gen) * 3e3
    lp, idx = sparse_teacher((3,), 40, 6, gen)
    lp[1] = float("-inf")
    got, up = run(kdfast.topk_kd_loss, z, lp, idx, None, gen=gen, backend=backend, temperature=2.0)
    want, _ = run(R.topk_kd_loss, z, lp, idx, None, upstream=up, temperature=2.0)
    assert torch.isfinite(got["loss"]).all() and torch.isfinite(got["z"]).all()
    for key in want:
        assert max_err(got[key], want[key]) <= 1e-9 * max(1.0, scale_of(want[key]))
    assert got["loss"][1] == 0
    e = kdfast.topk_kd_loss(torch.zeros(0, 7, requires_grad=True), torch.zeros(0, 3),
                            torch.zeros(0, 3, dtype=torch.long), backend=backend)
    e.backward()
    assert e.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward(backend, gen):
    z = rand_logits((4, 70), gen=gen)
    lp, idx = sparse_teacher((4,), 70, 5, gen)
    y = rand_labels((4,), 70, gen=gen)
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    kdfast.topk_kd_loss(a, lp, idx, y, backend=backend).backward(torch.tensor(0.7, dtype=torch.float64))
    kdfast.topk_kd_loss(b, lp, idx, y, backend=backend, inplace_backward=True).backward(
        torch.tensor(0.7, dtype=torch.float64))
    assert torch.equal(a.grad, b.grad)


def test_errors():
    z = torch.randn(2, 5)
    lp, idx = torch.randn(2, 3), torch.tensor([[0, 1, 2], [2, 3, 5]])
    with pytest.raises(ValueError, match=r"in \[0, 5\)"):
        kdfast.topk_kd_loss(z, lp, idx, backend="cpu")
    with pytest.raises(ValueError, match="needs renormalize=False"):
        kdfast.topk_kd_loss(z, lp, idx.clamp_max(4), tail=True)
    with pytest.raises(ValueError, match="integer"):
        kdfast.topk_kd_loss(z, lp, idx.float())
    with pytest.raises(ValueError, match="leading shape"):
        kdfast.topk_kd_loss(z, lp[:1], idx[:1])


def test_triton_bad_class_makes_the_row_nan():
    """On CUDA the indices are not read on the host: a class outside [0, C) makes its row NaN."""
    from kdfast._ops import topk_distill
    z = torch.randn(2, 5)
    lp = torch.log_softmax(torch.randn(2, 3), -1)
    idx = torch.tensor([[0, 1, 2], [2, 3, 9]])
    ones = torch.ones(2)
    p = kdfast._spec.TopkParams(has_ce=False)
    out = topk_distill(z, lp, idx, None, ones, ones, p.fparams(), p.iparams(), "none", "triton", True, False)
    loss, grad = out[0], out[3]
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1]).all()


def test_compile_fullgraph():
    z = torch.randn(4, 33, requires_grad=True)
    lp, idx = torch.log_softmax(torch.randn(4, 33), -1).topk(5, -1)
    f = torch.compile(lambda a: kdfast.topk_kd_loss(a, lp, idx, temperature=2.0, backend="cpu"),
                      fullgraph=True, backend="eager")
    got = f(z)
    got.backward()
    g1 = z.grad.clone()
    z.grad = None
    want = kdfast.topk_kd_loss(z, lp, idx, temperature=2.0, backend="cpu")
    want.backward()
    assert torch.allclose(got, want) and torch.allclose(g1, z.grad)


# ----------------------------------------------------------------------------- tail=True
def valid_lp(lp):
    """Log-probabilities kept valid after rounding (a margin below 0, as _randcase does)."""
    eps = torch.finfo(lp.dtype).eps
    return lp - eps * (2 + lp.abs())


TAIL_CASES = [   # (shape, k, pad, temperature)
    ((1, 1), 1, 0, 1.0),       # k = C = 1: no tail bucket
    ((5, 3), 1, 0, 2.0),       # k = 1
    ((4, 37), 8, 3, 1.5),
    ((2, 3, 300), 16, 0, 1.0),
    ((3, 50), 50, 0, 3.0),     # k = C
    ((6, 1031), 64, 5, 4.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(TAIL_CASES)))
@pytest.mark.parametrize("with_labels", [True, False])
def test_tail_float64_matches_reference(backend, case, with_labels, gen):
    shape, k, pad, t = TAIL_CASES[case]
    lead, c = shape[:-1], shape[-1]
    z = rand_logits(shape, gen=gen)
    v = rand_logits(shape, gen=gen)
    lp, idx = torch.log_softmax(v / t, -1).topk(k, dim=-1)
    lp = valid_lp(lp)
    if pad:
        lp[..., k - pad:] = float("-inf")
    labels = rand_labels(lead, c, gen=gen) if with_labels else None
    if with_labels and c > 2:   # a label among the teacher's classes
        labels.view(-1)[0] = idx.reshape(-1, k)[0, 0]
    w = tuple(torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    kw = dict(renormalize=False, tail=True, temperature=t)
    got, up = run(kdfast.topk_kd_loss, z, lp, idx, labels, weights=w, gen=gen, backend=backend, **kw)
    want, _ = run(R.topk_kd_loss, z, lp, idx, labels, weights=w, upstream=up, **kw)
    for key in want:
        tol = 1e-10 * max(1.0, scale_of(want[key])) * (1 + c ** 0.5)
        assert max_err(got[key], want[key]) <= tol, (shape, key, max_err(got[key], want[key]))


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_tail_gradcheck(t):
    """The kernel's gradient (q_j - p_j on K, q_j (1 - P_tail / Q_tail) elsewhere, times T^2 / T) is
    the derivative of its loss; padding entries, a label in K and one outside."""
    g = torch.Generator().manual_seed(1)
    z = rand_logits((4, 11), gen=g).requires_grad_()
    v = rand_logits((4, 11), gen=g)
    lp, idx = torch.log_softmax(v / t, -1).topk(4, -1)
    lp = lp.clone()
    lp[1, 3] = float("-inf")
    y = torch.tensor([idx[0, 0].item(), 5, -100, idx[3, 1].item()])
    kd_w = (torch.rand(4, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    for backend in ("cpu", "torch"):
        assert torch.autograd.gradcheck(
            lambda a, w: kdfast.topk_kd_loss(a, lp, idx, y, temperature=t, renormalize=False, tail=True,
                                             kd_weight=w, backend=backend, reduction="none"),
            (z, kd_w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tail_student_saturated_on_k(backend, dtype, gen):
    """The student holds nearly all its mass on the teacher's classes: Q_tail = 1 - sum_k q_k cancels
    in a plain evaluation; the kernels take it from the non-K exponentials (recomputed, masked)."""
    c, k = 300, 8
    z = rand_logits((4, c), gen=gen)
    v = rand_logits((4, c), gen=gen) * 2
    lp, idx = torch.log_softmax(v, -1).topk(k, -1)
    lp = valid_lp(lp.to(dtype)).to(dtype)
    for i, boost in enumerate([8.0, 15.0, 40.0, 120.0]):   # Q_tail ~ e^-8 .. e^-120 (fp32 underflow)
        z[i].scatter_(-1, idx[i], z[i].max().item() + boost)
    z = z.to(dtype)
    kw = dict(renormalize=False, tail=True, temperature=1.0)
    got, up = run(kdfast.topk_kd_loss, z, lp, idx, None, gen=gen, backend=backend, **kw)
    want, _ = run(R.topk_kd_loss, z.double(), lp.double(), idx, None, upstream=up, **kw)
    eager, _ = run(R.topk_kd_loss, z, lp, idx, None, upstream=up, **kw)
    assert torch.isfinite(got["loss"]).all() and torch.isfinite(got["z"]).all()
    for key in want:
        bound = low_precision_bound(max_err(eager[key], want[key]), dtype, scale_of(want[key]))
        assert max_err(got[key], want[key]) <= bound, (key, max_err(got[key], want[key]), bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_teacher_mass_exactly_one(backend, gen):
    """P_tail = 0: the tail adds 0 (0 log 0 = 0) and its gradient term vanishes: the loss equals the
    tail-less one; a full teacher over k = C classes equals kd_loss at T = 1."""
    z = rand_logits((3, 20), gen=gen)
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.25]] * 3, dtype=torch.float64))
    assert torch.logsumexp(lp, -1).eq(0).all()
    idx = torch.tensor([[0, 5, 7], [1, 2, 3], [19, 4, 9]])
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    la = kdfast.topk_kd_loss(a, lp, idx, renormalize=False, tail=True, backend=backend, reduction="none")
    lb = kdfast.topk_kd_loss(b, lp, idx, renormalize=False, backend=backend, reduction="none")
    la.sum().backward()
    lb.sum().backward()
    assert torch.allclose(la, lb, rtol=1e-12, atol=0) and torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-15)
    v = rand_logits((3, 20), gen=gen)
    lp, idx = torch.log_softmax(v, -1).topk(20, -1)
    full = kdfast.topk_kd_loss(z, lp, idx, renormalize=False, tail=True, backend=backend)
    assert abs(full.item() - kdfast.kd_loss(z, v, temperature=1.0, backend=backend).item()) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_is_kl_over_k_plus_one_buckets(backend, gen):
    """The definition: KL over the k classes and one bucket holding the rest, from dense softmaxes."""
    t = 2.0
    z, v = rand_logits((5, 40), gen=gen), rand_logits((5, 40), gen=gen)
    lp, idx = torch.log_softmax(v / t, -1).topk(6, -1)
    q = torch.softmax(z / t, -1)
    qk = q.gather(-1, idx)
    pk = lp.exp()
    P = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    Q = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    want = t * t * (P * (P.log() - Q.log())).sum(-1)
    got = kdfast.topk_kd_loss(z, lp, idx, renormalize=False, tail=True, temperature=t, backend=backend,
                              reduction="none")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_tail_all_padding_row_and_empty():
    """A row of padding only: all the teacher's mass is in the tail, which is every class: D = 0."""
    z = rand_logits((2, 9), gen=torch.Generator().manual_seed(3))
    lp = torch.full((2, 3), float("-inf"), dtype=torch.float64)
    lp[0] = torch.log(torch.tensor([0.2, 0.3, 0.1]))
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    for backend in BACKENDS:
        d = kdfast.topk_kd_loss(z, lp, idx, renormalize=False, tail=True, backend=backend, reduction="none")
        assert d[1] == 0 and torch.isfinite(d).all()
        e = kdfast.topk_kd_loss(torch.zeros(0, 7, requires_grad=True), torch.zeros(0, 3),
                                torch.zeros(0, 3, dtype=torch.long), renormalize=False, tail=True,
                                backend=backend)
        e.backward()
        assert e.item() == 0.0


def test_validation_errors():
    z = torch.randn(2, 6)
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.3, 0.3]]))
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    kw = dict(renormalize=False, tail=True)
    kdfast.topk_kd_loss(z, lp, idx, **kw)   # valid
    with pytest.raises(ValueError, match="distinct"):
        kdfast.topk_kd_loss(z, lp, torch.tensor([[0, 1, 0], [3, 4, 5]]), **kw)
    with pytest.raises(ValueError, match=r"in \[0, 6\)"):
        kdfast.topk_kd_loss(z, lp, torch.tensor([[0, 1, 6], [3, 4, 5]]), **kw)
    with pytest.raises(ValueError, match=r"in \[0, 6\)"):
        kdfast.topk_kd_loss(z, lp, torch.tensor([[0, 1, -1], [3, 4, 5]]), **kw)
    bad = lp.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kdfast.topk_kd_loss(z, bad, idx, **kw)
    with pytest.raises(ValueError, match="NaN"):   # NaN and duplicates: with renormalize too
        kdfast.topk_kd_loss(z, bad, idx)
    bad = lp.clone()
    bad[0, 0] = 0.01
    with pytest.raises(ValueError, match="above 0"):
        kdfast.topk_kd_loss(z, bad, idx, **kw)
    kdfast.topk_kd_loss(z, bad, idx)   # logits are fine for renormalize=True
    bad = torch.log(torch.tensor([[0.5, 0.4, 0.2], [0.3, 0.3, 0.3]]))
    with pytest.raises(ValueError, match="exceed 1"):
        kdfast.topk_kd_loss(z, bad, idx, renormalize=False)
    # rounding is not an error: bf16 log-probabilities of a full distribution
    v = torch.randn(2, 6)
    full, fidx = torch.log_softmax(v, -1).topk(6, -1)
    kdfast.topk_kd_loss(z, full.to(torch.bfloat16), fidx, **kw)
    # validate=False skips the checks (the CPU kernel still makes a bad class's row NaN)
    out = kdfast.topk_kd_loss(z, lp, torch.tensor([[0, 1, 6], [3, 4, 5]]), validate=False, reduction="none", **kw)
    assert torch.isnan(out[0]) and torch.isfinite(out[1])
    with pytest.raises(ValueError, match="validate must be a bool"):
        kdfast.topk_kd_loss(z, lp, idx, validate=1)


def test_renormalize_false_at_a_temperature():
    """renormalize=False takes the log-probabilities as stored at the distillation temperature T:
    p_k = exp(lp_k) (not re-scaled by T), the student at z / T, times T^2."""
    g = torch.Generator().manual_seed(4)
    z, v = rand_logits((3, 30), gen=g), rand_logits((3, 30), gen=g)
    lp, idx = torch.log_softmax(v / 3.0, -1).topk(30, -1)
    a = kdfast.topk_kd_loss(z, lp, idx, renormalize=False, temperature=3.0, backend="cpu")
    b = kdfast.kd_loss(z, v, temperature=3.0, backend="cpu")
    assert abs(a.item() - b.item()) <= 1e-10 * abs(b.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_k_equal_c_has_no_bucket(backend, gen):
    """k = C: no class outside the teacher's, so no tail bucket, whatever mass the stored values'
    rounding leaves (here 1 - sum_k p_k ~ 1e-2): loss and gradient are the tail-less ones."""
    z, v = rand_logits((4, 12), gen=gen), rand_logits((4, 12), gen=gen)
    lp, idx = torch.log_softmax(v, -1).topk(12, -1)
    lp = lp - 1e-2 * (1 + lp.abs())
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    y = rand_labels((4,), 12, gen=gen)
    la = kdfast.topk_kd_loss(a, lp, idx, y, renormalize=False, tail=True, temperature=2.0, backend=backend)
    lb = kdfast.topk_kd_loss(b, lp, idx, y, renormalize=False, temperature=2.0, backend=backend)
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) <= 1e-12 and torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- reverse KL and JSD
# topk_reverse_kd (T^2 KL(Q || P)) and topk_jsd (beta KL(P || M) + (1 - beta) KL(Q || M), no T^2) over
# the support buckets: the k entries renormalised on both sides, or the k + 1 buckets of tail.
DIVS = {   # name -> (fused, reference, hyperparameters)
    "reverse": (kdfast.topk_reverse_kd_loss, R.topk_reverse_kd_loss, {}),
    "jsd": (kdfast.topk_jsd_loss, R.topk_jsd_loss, {"beta": 0.3}),
    "jsd_hi": (kdfast.topk_jsd_loss, R.topk_jsd_loss, {"beta": 0.85}),
}
MODES = {"renorm": {}, "tail": {"renormalize": False, "tail": True}}


def support_teacher(mode, lead, c, k, gen, t=1.0, pad=0, raw=False):
    """A teacher's top-k for ``mode``: renorm: log-probabilities (or raw logits, ``raw``); tail: the
    log-probabilities at ``t`` as stored (valid after rounding). Entries shuffled, the last ``pad`` of
    each row padding (-inf)."""
    v = rand_logits((*lead, c), gen=gen)
    if mode == "tail":
        lp, idx = torch.log_softmax(v / t, -1).topk(k, dim=-1)
        lp = valid_lp(lp)
    else:
        lp, idx = (v if raw else torch.log_softmax(v, -1)).topk(k, dim=-1)
    lp = lp.clone()
    if pad:
        lp[..., k - pad:] = float("-inf")
    perm = torch.argsort(torch.rand(lp.shape, generator=gen), dim=-1)
    return lp.gather(-1, perm), idx.gather(-1, perm)


DIV_CASES = [   # (shape, k, pad, temperature)
    ((1, 1), 1, 0, 1.0),       # k = C = 1: one bucket, D = 0
    ((5, 3), 2, 0, 2.0),
    ((4, 37), 8, 3, 1.5),
    ((2, 3, 300), 16, 0, 1.0),
    ((3, 50), 50, 0, 3.0),     # k = C: tail without its bucket
    ((6, 1031), 64, 5, 4.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", list(DIVS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", range(len(DIV_CASES)))
@pytest.mark.parametrize("with_labels", [True, False])
def test_divergences_float64_match_reference(backend, div, mode, case, with_labels, gen):
    shape, k, pad, t = DIV_CASES[case]
    lead, c = shape[:-1], shape[-1]
    fused, ref, hyper = DIVS[div]
    z = rand_logits(shape, gen=gen)
    lp, idx = support_teacher(mode, lead, c, k, gen, t=t, pad=pad, raw=case % 2 == 1)
    labels = rand_labels(lead, c, gen=gen) if with_labels else None
    if with_labels and c > 2:   # a label among the teacher's classes
        labels.view(-1)[0] = idx.reshape(-1, k)[0, 0]
    w = tuple(torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    kw = dict(hyper, temperature=t, **MODES[mode])
    got, up = run(fused, z, lp, idx, labels, weights=w, gen=gen, backend=backend, **kw)
    want, _ = run(ref, z, lp, idx, labels, weights=w, upstream=up, **kw)
    for key in want:
        tol = 1e-10 * max(1.0, scale_of(want[key])) * (1 + c ** 0.5)
        assert max_err(got[key], want[key]) <= tol, (shape, key, max_err(got[key], want[key]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["reverse", "jsd"])
@pytest.mark.parametrize("mode", list(MODES))
def test_divergences_gradcheck(backend, div, mode):
    """The kernels' gradients ((s/T) w_b (q_j / Q_b), csrc/kinds/topk.h) are the derivatives of their
    losses, float64, per row: a padding entry, a label in K, one outside, an ignored row."""
    g = torch.Generator().manual_seed(5)
    fused, _, hyper = DIVS[div]
    t = 2.5 if mode == "tail" else 1.5
    z = rand_logits((4, 11), gen=g).requires_grad_()
    lp, idx = support_teacher(mode, (4,), 11, 4, g, t=t)
    lp[1, 3] = float("-inf")
    y = torch.tensor([idx[0, 0].item(), 5, -100, idx[3, 1].item()])
    kd_w = (torch.rand(4, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    kw = dict(hyper, temperature=t, **MODES[mode])
    assert torch.autograd.gradcheck(
        lambda a, w: fused(a, lp, idx, y, kd_weight=w, backend=backend, reduction="none", **kw), (z, kd_w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_jsd_beta_endpoints_are_the_kls(backend, mode, gen):
    """topk_jsd at beta = 0 is topk_kd / T^2 and at beta = 1 topk_reverse_kd / T^2 (as jsd_loss's
    endpoints: the same kernels), loss and gradient, with labels."""
    t = 2.0
    z = rand_logits((5, 40), gen=gen)
    lp, idx = support_teacher(mode, (5,), 40, 6, gen, t=t, pad=1)
    y = rand_labels((5,), 40, gen=gen)
    kw = dict(temperature=t, **MODES[mode])
    for beta, other in ((0.0, kdfast.topk_kd_loss), (1.0, kdfast.topk_reverse_kd_loss)):
        a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
        la = kdfast.topk_jsd_loss(a, lp, idx, y, beta=beta, ce_weight=0.0, backend=backend, reduction="none", **kw)
        lb = other(b, lp, idx, y, ce_weight=0.0, backend=backend, reduction="none", **kw) / (t * t)
        la.sum().backward()
        lb.sum().backward()
        assert torch.allclose(la, lb, rtol=1e-13, atol=0), (beta, la, lb)
        assert torch.allclose(a.grad, b.grad, rtol=1e-13, atol=1e-16), beta
        # and the references agree with each other the same way
        ra = R.topk_jsd_loss(z, lp, idx, y, beta=beta, ce_weight=0.0, reduction="none", **kw)
        rb = getattr(R, other.__name__)(z, lp, idx, y, ce_weight=0.0, reduction="none", **kw) / (t * t)
        assert torch.allclose(ra, rb, rtol=1e-13, atol=0)
        assert torch.allclose(la, ra, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_equal_c_is_the_dense_divergence(backend, gen):
    """k = C (the whole teacher, no class outside its k): topk_reverse_kd is reverse_kd and topk_jsd is
    jsd, with the teacher softmax(l / T) (renormalize, l the logits) or exp(l) (tail, l = its
    log-probabilities at T)."""
    t = 1.7
    z, v = rand_logits((4, 30), gen=gen), rand_logits((4, 30), gen=gen)
    logits, idx = v.topk(30, -1)
    lpt, idt = torch.log_softmax(v / t, -1).topk(30, -1)
    for lp, ix, mode in ((logits, idx, {}), (lpt, idt, MODES["tail"])):
        a = kdfast.topk_reverse_kd_loss(z, lp, ix, temperature=t, backend=backend, reduction="none", **mode)
        b = kdfast.reverse_kd_loss(z, v, temperature=t, backend=backend, reduction="none")
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-13), (mode, a, b)
        for beta in (0.2, 0.9):
            a = kdfast.topk_jsd_loss(z, lp, ix, beta=beta, temperature=t, backend=backend, reduction="none", **mode)
            b = kdfast.jsd_loss(z, v, beta=beta, temperature=t, backend=backend, reduction="none")
            assert torch.allclose(a, b, rtol=1e-11, atol=1e-13), (mode, beta, a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["reverse", "jsd"])
def test_renormalized_support_only_reads_k(backend, div, gen):
    """renormalize: the divergence of the k renormalised entries: without CE its gradient is 0 outside
    the k classes, and the student's logits there do not change the loss."""
    fused, _, hyper = DIVS[div]
    z = rand_logits((3, 60), gen=gen)
    lp, idx = support_teacher("renorm", (3,), 60, 7, gen, pad=2)
    a = z.clone().requires_grad_()
    loss = fused(a, lp, idx, temperature=2.0, backend=backend, reduction="none", **hyper)
    loss.sum().backward()
    inK = torch.zeros_like(z, dtype=torch.bool).scatter(-1, idx, lp > float("-inf"))
    assert (a.grad[~inK] == 0).all() and (a.grad[inK] != 0).any()
    z2 = torch.where(inK, z, z * 5 + 100)
    loss2 = fused(z2, lp, idx, temperature=2.0, backend=backend, reduction="none", **hyper)
    assert torch.allclose(loss, loss2, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_reverse_without_teacher_tail_is_infinite(backend, gen):
    """tail: a teacher whose k probabilities sum to exactly 1 has P_tail = 0: the reverse KL
    Q_tail log(Q_tail / 0) is +inf (as reverse_kd against a -inf teacher logit, in the reference too);
    the JSD stays finite and matches the reference."""
    z = rand_logits((3, 20), gen=gen)
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.25]] * 3, dtype=torch.float64))
    idx = torch.tensor([[0, 5, 7], [1, 2, 3], [19, 4, 9]])
    kw = dict(renormalize=False, tail=True, reduction="none")
    got = kdfast.topk_reverse_kd_loss(z, lp, idx, backend=backend, **kw)
    want = R.topk_reverse_kd_loss(z, lp, idx, **kw)
    assert torch.isinf(got).all() and (got > 0).all() and torch.equal(got, want)
    got = kdfast.topk_jsd_loss(z, lp, idx, beta=0.6, backend=backend, **kw)
    want = R.topk_jsd_loss(z, lp, idx, beta=0.6, **kw)
    assert torch.isfinite(got).all() and torch.allclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["reverse", "jsd"])
@pytest.mark.parametrize("mode", list(MODES))
def test_divergences_padding_rows_and_empty(backend, div, mode, gen):
    """A row of padding only: no bucket (renormalize: D = 0 and a zero gradient exactly) or the tail
    bucket alone, P_tail = Q_tail = 1 (tail: D = 0 and a zero gradient up to the rounding of Q_tail's
    renormalisation, 1e-33 for the JSD); an empty batch."""
    fused, ref, hyper = DIVS[div]
    z = rand_logits((3, 9), gen=gen)
    lp, idx = support_teacher(mode, (3,), 9, 3, gen)
    lp[1] = float("-inf")
    kw = dict(hyper, **MODES[mode])
    got, up = run(fused, z, lp, idx, None, gen=gen, backend=backend, **kw)
    want, _ = run(ref, z, lp, idx, None, upstream=up, **kw)
    assert torch.isfinite(got["loss"]).all() and torch.isfinite(got["z"]).all()
    if mode == "renorm":
        assert got["loss"][1] == 0 and (got["z"][1] == 0).all()
    else:
        assert abs(got["loss"][1]) <= 1e-15 and (got["z"][1].abs() <= 1e-15).all()
    for key in want:
        assert max_err(got[key], want[key]) <= 1e-12 * max(1.0, scale_of(want[key]))
    e = fused(torch.zeros(0, 7, requires_grad=True), torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long),
              backend=backend, **kw)
    e.backward()
    assert e.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["reverse", "jsd"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_divergences_low_precision_no_worse_than_eager(backend, div, mode, dtype, gen):
    shape = (8, 1031) if backend == "cpu" else (3, 300)
    lead, c = shape[:-1], shape[-1]
    fused, ref, hyper = DIVS[div]
    z = rand_logits(shape, gen=gen).to(dtype)
    lp, idx = support_teacher(mode, lead, c, 32, gen, t=2.0)
    lp = lp.to(dtype)
    if mode == "tail":
        lp = valid_lp(lp).to(dtype)
    labels = rand_labels(lead, c, gen=gen)
    kw = dict(hyper, temperature=2.0, **MODES[mode])
    got, up = run(fused, z, lp, idx, labels, gen=gen, backend=backend, **kw)
    want, _ = run(ref, z.double(), lp.double(), idx, labels, upstream=up, **kw)
    eager, _ = run(ref, z, lp, idx, labels, upstream=up, **kw)
    for key in want:
        bound = low_precision_bound(max_err(eager[key], want[key]), dtype, scale_of(want[key]))
        assert max_err(got[key], want[key]) <= bound, (key, max_err(got[key], want[key]), bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["reverse", "jsd"])
@pytest.mark.parametrize("mode", list(MODES))
def test_divergences_small_loss_float32(backend, div, mode, gen):
    """A student within 1e-4 of the teacher (float32 inputs): D ~ 1e-9 (reverse) / 1e-10 (JSD), far
    below the float32 rounding of the log-probabilities: the loss written plainly in float32 is off by
    30-60x D (measured, 10 seeds). The kernels' sums of nonnegative phi terms in double keep it:
    renormalize (the k values alone, in double) ~1e-6 relative (the float64 rounding of log-ratios of
    size ~5); tail ~5e-3 (CPU) / 7e-3 (Triton), the float32 rounding of a_j = z_j / T in the student's
    float32 sweep (~eps32 |a|) against log-ratios of ~1e-4 (the dense sweep is float32)."""
    fused, ref, hyper = DIVS[div]
    t = 1.5
    v = rand_logits((4, 200), gen=gen)
    k = 20
    if mode == "tail":
        lp, idx = torch.log_softmax(v / t, -1).topk(k, -1)
        lp = valid_lp(lp.float()).float()
    else:
        lp, idx = torch.log_softmax(v, -1).topk(k, -1)
        lp = lp.float()
    z = (v + 1e-4 * torch.randn(v.shape, generator=gen, dtype=torch.float64)).float()
    kw = dict(hyper, temperature=t, **MODES[mode])
    got = fused(z, lp, idx, backend=backend, reduction="none", **kw).double()
    want = ref(z.double(), lp.double(), idx, reduction="none", **kw)
    plain = ref(z, lp, idx, reduction="none", **kw).double()
    rel = ((got - want).abs() / want.abs()).max().item()
    rel_plain = ((plain - want).abs() / want.abs()).max().item()
    assert want.abs().max() < 1e-7 and rel <= (1e-5 if mode == "renorm" else 3e-2), (rel, rel_plain, want)
    assert rel <= 1e-3 * rel_plain, (rel, rel_plain)


def test_divergence_errors():
    z = torch.randn(2, 6)
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.3, 0.3]]))
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    for fn, kw in ((kdfast.topk_reverse_kd_loss, {}), (kdfast.topk_jsd_loss, {"beta": 0.0}),
                   (kdfast.topk_jsd_loss, {"beta": 0.5})):
        with pytest.raises(ValueError, match="needs renormalize=True .* or tail=True"):
            fn(z, lp, idx, renormalize=False, **kw)
        with pytest.raises(ValueError, match="needs renormalize=False"):
            fn(z, lp, idx, tail=True, **kw)
        fn(z, lp, idx, renormalize=False, tail=True, **kw)   # valid
        fn(z, lp, idx, **kw)
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            kdfast.topk_jsd_loss(z, lp, idx, beta=beta)
    with pytest.raises(ValueError, match="distinct"):   # the teacher's validation as topk_kd's
        kdfast.topk_reverse_kd_loss(z, lp, torch.tensor([[0, 1, 0], [3, 4, 5]]))


@pytest.mark.parametrize("name", ["topk_reverse_kd", "topk_jsd"])
def test_divergences_compile_fullgraph_and_module(name):
    z = torch.randn(4, 33, requires_grad=True)
    lp, idx = torch.log_softmax(torch.randn(4, 33), -1).topk(5, -1)
    fn = getattr(kdfast, f"{name}_loss")
    f = torch.compile(lambda a: fn(a, lp, idx, temperature=2.0, backend="cpu"), fullgraph=True, backend="eager")
    got = f(z)
    got.backward()
    g1 = z.grad.clone()
    z.grad = None
    want = fn(z, lp, idx, temperature=2.0, backend="cpu")
    want.backward()
    assert torch.allclose(got, want) and torch.allclose(g1, z.grad)
    module = {"topk_reverse_kd": kdfast.TopKReverseKDLoss, "topk_jsd": kdfast.TopKJSDLoss}[name]
    assert torch.allclose(module(temperature=2.0, backend="cpu")(z, lp, idx), want)
