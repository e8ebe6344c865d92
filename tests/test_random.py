"""Randomised differential tests of every kdfast loss against the float64 eager reference and against
the same loss written plainly in the low precision (tests/_randcase.py has the case generator, the
three evaluations and the error metric; its docstring states the rule).

The rule per output: finite exactly where the float64 truth is finite, and
``err(kernel) <= max(TOL[dtype], K * err(plain))`` (``err`` the largest per-row relative error,
``err(plain)`` that of the reference evaluated in the case's lower precision); float64:
``err(kernel) <= TOL[float64]`` with an absolute floor of ``FLOOR64`` float64 eps times the row's
natural magnitude. The constants live in tests/_randcase.py (one source for the tests and for
re-running a case from the command line) and are restated here:

- ``K = 4``: the kernel may be at most 4x less accurate than the loss written plainly in the same
  precision. A kernel that accumulates in float32 should be *more* accurate than a bf16 / fp16 /
  fp32 eager loss; 4 leaves room for a different, not worse, order of operations (e.g. a 20-ulp
  vector exp against libm's 1-ulp one). Never raised to make a case pass: a failure is a finding.
- ``TOL``: float32 1e-6 (~8 eps), bfloat16 / float16 4 eps of the output's dtype (0.031 / 0.0039),
  float64 1e-10 relative plus the floor ``FLOOR64 = 256`` eps64 x the row's natural magnitude
  ``|upstream| |weight| S (1 + max|logit / T| + log C)`` (the float64 reference's own cancellation
  error is ~eps64 x that).

Layout:

- ``test_random_*``: one test per (loss, backend) that runs many seeded cases (``N_CASES``) and
  reports every failing case in one assertion message: a summary per (loss, backend, dtypes,
  output) with the worst ratio ``err(kernel) / err(plain)``, then the worst cases, each with its case
  id and drawn parameters. Re-run one case alone with
  ``KDFAST_RANDCASE=family:kd:cpu:123 .venv/bin/python -m pytest -q tests/test_random.py -p no:cacheprovider``
  (the other tests of the file are then skipped) or ``.venv/bin/python tests/_randcase.py family:kd:cpu:123``
  (prints every output's errors).
- ``test_nan_*``: a NaN logit in one row, or (Triton) an out-of-range label, leaves the other rows'
  outputs unchanged and finite.
- ``test_broadcast_tensor_weights``: 0-d / (1,) / (B, 1) tensor weights that require grad.
- ``test_regression_*``: the findings of the precision issue, with the parameters it gives.

Backends: "cpu" (the C++ kernel) for ~4,400 cases, "triton" under ``TRITON_INTERPRET=1`` (set by
conftest.py; shapes C <= 300, N <= 6) for ~480.
"""
import os

import pytest
import torch

import _randcase as RC
import kdfast
from conftest import BACKENDS

K, TOL, FLOOR64 = RC.K, RC.TOL, RC.FLOOR64   # (see the module docstring)

R = kdfast.reference
f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16

#: cases per test function (seeds 0 .. n-1)
N_CASES = {
    ("family", "cpu"): 250, ("family", "triton"): 25,
    ("topk", "cpu"): 300, ("topk", "triton"): 40,
    ("topk_tail", "cpu"): 300, ("topk_tail", "triton"): 40,
    ("topk_rev", "cpu"): 300, ("topk_rev", "triton"): 40,
    ("topk_jsd", "cpu"): 300, ("topk_jsd", "triton"): 40,
    ("multi", "cpu"): 40, ("multi", "triton"): 4,
    ("linear", "cpu"): 25, ("linear", "triton"): 4,
}
NAMES = list(RC.TABLE)   # conftest's LOSSES + FAMILY: kd ttm wttm dkd lm lm_raw ls_kd jsd jsd_fwd jsd_rev retro_kd
ONLY = os.environ.get("KDFAST_RANDCASE")

# the interpreter's numpy warnings (NaN / inf in intermediate lanes) and torch's std() at C = 1
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:std\\(\\):UserWarning")]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for these tiny tensors (conftest sets 2): on a loaded 2-core machine two
    OpenMP threads per op made the suite ~8x slower, and the second core is not ours."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run_group(kind, name, backend):
    if ONLY:
        k, n, b, seed = RC.parse_cid(ONLY)
        if (k, n, b) != (kind, name, backend):
            pytest.skip(f"KDFAST_RANDCASE={ONLY}")
        seeds = [seed]
    else:
        seeds = range(N_CASES[(name, backend) if (name, backend) in N_CASES else (kind, backend)])
    findings, known, fixed = [], [], []
    for seed in seeds:
        case = RC.draw_case(kind, name, backend, seed)
        got = RC.check_safely(case)
        if case.cid in RC.KNOWN_OPEN:
            (known if got else fixed).append(case.cid)
        else:
            findings += got
    if known:
        print(f"{len(known)} known open case(s), see _randcase.KNOWN_OPEN: {', '.join(known)}")
    msg = []
    if findings:
        msg.append(RC.table(findings))
    if fixed:
        msg.append("passing now, remove from _randcase.KNOWN_OPEN: " + ", ".join(fixed))
    if msg:
        pytest.fail("\n" + "\n".join(msg), pytrace=False)


def _skip_if_only():
    if ONLY:
        pytest.skip(f"KDFAST_RANDCASE={ONLY}")


# ----------------------------------------------------------------------------- the random cases
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_random_family(name, backend):
    """The single-teacher losses (conftest's LOSSES and FAMILY tables, hyperparameters drawn)."""
    _run_group("family", name, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_topk(backend):
    """topk_kd_loss: renormalize True (temperature drawn) / False (valid log-probabilities, T = 1),
    k drawn, padded rows, a teacher of raw logits or log-probabilities."""
    _run_group("topk", "topk", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_topk_tail(backend):
    """topk_kd_loss(renormalize=False, tail=True): the teacher's log-probabilities at the drawn
    temperature (valid after rounding), k drawn up to C (k = C: no tail bucket), padded rows, the
    "near" regime's students saturated on the teacher's classes (the masked recomputation of Q_tail)."""
    _run_group("topk", "topk_tail", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_topk_reverse(backend):
    """topk_reverse_kd_loss: over the k renormalised entries (temperature drawn; a teacher of raw logits
    or log-probabilities) or the k + 1 buckets of tail (the stored log-probabilities at the drawn
    temperature), k drawn up to C, padded rows; the "near" regime's small losses."""
    _run_group("topk", "topk_rev", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_topk_jsd(backend):
    """topk_jsd_loss: as test_random_topk_reverse, beta drawn in (0, 1) towards both ends, and exactly
    0 (the forward top-k KL) and 1 (the reverse)."""
    _run_group("topk", "topk_jsd", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_random_multi_teacher(name, backend):
    """multi_teacher_loss with 2-3 teachers (a list, or one stacked tensor), teacher weights None /
    floats / a per-row tensor with gradients, some teachers requiring grad."""
    _run_group("multi", name, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_random_fused_linear(name, backend):
    """fused_linear_distill_loss: H 2-32, V = C <= 3000, bias or not, the teacher as logits or
    hidden states + head, chunk sizes 1-8 or the default; gradients of h, W, b and the weights."""
    _run_group("linear", name, backend)


# ----------------------------------------------------------------------------- NaN containment
def _call_rows(name, backend, z, v, y, zp=None):
    """Per-row loss, student and teacher gradients (float64 copies) of the fused loss."""
    fused, _, hyper = RC.TABLE[name]
    z = z.detach().clone().requires_grad_(True)
    v = v.detach().clone().requires_grad_(True)
    args = (z, v) if zp is None else (z, v, zp)
    loss = fused(*args, y, **hyper, reduction="none", backend=backend)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype))
    return loss.detach().double(), z.grad.double(), v.grad.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_logit_is_contained(where, backend):
    """One row holds a NaN logit (student or teacher): every other row's loss and gradients are those
    of the same call with that row finite, and finite; every loss of the family, float32, labels."""
    _skip_if_only()
    g = torch.Generator().manual_seed(7)
    n, c, bad = 5, 37, 2
    bad_rows = []
    for name in NAMES:
        z = torch.randn(n, c, generator=g) * 3
        v = torch.randn(n, c, generator=g) * 3
        zp = torch.randn(n, c, generator=g) * 3 if name == "retro_kd" else None
        y = torch.randint(0, c, (n,), generator=g)
        ref = _call_rows(name, backend, z, v, y, zp)
        (z if where == "student" else v)[bad, 5] = float("nan")
        got = _call_rows(name, backend, z, v, y, zp)
        keep = torch.arange(n) != bad
        for what, a, b in zip(("loss", "grad_z", "grad_v"), got, ref):
            ok = torch.isfinite(a[keep]).all() and torch.equal(a[keep], b[keep])
            if not ok:
                bad_rows.append(f"{name}: {what} of the other rows changed or non-finite")
    assert not bad_rows, "\n".join(bad_rows)


def test_nan_bad_label_is_contained_triton():
    """Triton (the CPU layer raises on a bad label before calling its kernel): a label outside
    [0, C) in one row makes that row NaN (kdfast/_spec.py) and leaves the other rows unchanged and
    finite. The op is called directly (functional.py checks CPU labels in Python)."""
    _skip_if_only()
    g = torch.Generator().manual_seed(3)
    n, c, bad = 4, 19, 1
    problems = []
    for name in NAMES:
        fused, _, hyper = RC.TABLE[name]
        params = kdfast.functional.METHODS[RC.METHOD.get(name, name)](**hyper)
        z = torch.randn(n, c, generator=g) * 3
        v = torch.randn(n, c, generator=g) * 3
        zp = torch.randn(n, c, generator=g) * 3 if name == "retro_kd" else None
        y = torch.randint(0, c, (n,), generator=g)
        ones = torch.ones(n)
        outs = []
        for label in (int(y[bad]), c + 5):
            yy = y.clone()
            yy[bad] = label
            out = torch.ops.kdfast.distill(z, v, zp, yy, ones, ones, params.fparams(), params.iparams(),
                                           "none", "triton", True, True)
            outs.append([out[i] for i in (0, 1, 2, 3, 4)])   # loss, d, ce, grad_z, grad_v
        keep = torch.arange(n) != bad
        for what, a, b in zip(("loss", "d", "ce", "grad_z", "grad_v"), outs[1], outs[0]):
            if not (torch.isfinite(a[keep]).all() and torch.equal(a[keep], b[keep])):
                problems.append(f"{name}: {what} of the other rows changed or non-finite")
            if torch.isfinite(a[bad]).any():
                problems.append(f"{name}: {what} of the bad-label row is not NaN (kdfast/_spec.py)")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- broadcast weights
@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_tensor_weights(backend):
    """kd_weight / ce_weight as tensors that broadcast to the leading shape (README: "floats or
    tensors broadcastable to the leading shape") and require grad: 0-d, (1,), and (B, 1) for a
    (B, S) leading shape; the loss and every gradient by the suite's rule (float32, vs plain)."""
    _skip_if_only()
    problems = []
    g = torch.Generator().manual_seed(11)
    for lead, wshape in (((4,), ()), ((4,), (1,)), ((2, 3), (2, 1)), ((2, 3), ())):
        c = 9
        z = (torch.randn(*lead, c, generator=g) * 2).float()
        v = (torch.randn(*lead, c, generator=g) * 2).float()
        y = torch.randint(0, c, lead, generator=g)
        w = [(torch.rand(wshape, generator=g) + 0.5).to(bf16).double() for _ in range(2)]
        outs = {}
        for mode, dt in (("kernel", f32), ("truth", f64), ("plain", f32)):
            zz = z.detach().to(dt).clone().requires_grad_(True)
            ww = [x.detach().to(dt).clone().requires_grad_(True) for x in w]
            fn = kdfast.kd_loss if mode == "kernel" else R.kd_loss
            extra = {"backend": backend} if mode == "kernel" else {}
            try:
                loss = fn(zz, v.to(dt), y, temperature=2.0, kd_weight=ww[0], ce_weight=ww[1], **extra)
                loss.backward()
            except Exception as e:  # noqa: BLE001
                problems.append(f"lead {lead} weights {wshape}: {mode} raised {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:100]}")
                break
            outs[mode] = [loss.detach().double().reshape(1, 1), zz.grad.double().reshape(-1, c),
                          ww[0].grad.double().reshape(1, -1), ww[1].grad.double().reshape(1, -1)]
        if len(outs) < 3:
            continue
        for key, x, t, p in zip(("loss", "gz", "gkd", "gce"), outs["kernel"], outs["truth"], outs["plain"]):
            m = torch.full((t.shape[0],), float(t.abs().max()) + 1.0, dtype=f64)
            ek, ep = RC.row_err(x, t, m, f32)[0], RC.row_err(p, t, m, f32)[0]
            if ek > max(TOL[f32], K * ep):
                problems.append(f"lead {lead} weights {wshape}: {key} err(kernel) {ek:.2e} err(plain) {ep:.2e}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- regression tests
# Each reproduces one finding of the precision issue with its parameters (the seed / offset that
# reproduces it named) and applies the suite's rule (K, TOL) to the named outputs. The assertion
# message gives err(kernel), err(plain) and their ratio.
def _assert_rule(case, inp, keys):
    fs = [f for f in RC.check(case, inp) if f.key in keys]
    if fs:
        pytest.fail("\n" + "\n".join(
        f"{f.key}: {f.what} err(kernel)={f.err_k:.3g} err(plain)={f.err_p:.3g} bound={f.bound:.3g} "
        f"ratio={f.ratio:.3g} row={f.row}" for f in fs) + f"\n{case.describe()}", pytrace=False)


def _inputs(z, v, *, up_seed=0, y=None, zp=None):
    g = torch.Generator().manual_seed(up_seed)
    lowest = RC.lower(z.dtype, v.dtype)
    up = torch.randn(z.shape[:-1], generator=g, dtype=f64).to(lowest).double()
    inp = {"z": z, "v": v, "y": y, "w": (1.0, 1.0), "up": up, "lowest": lowest}
    if zp is not None:
        inp["zp"] = zp
    return inp


def _case(name, backend, z, v, hyper, **fields):
    return RC.make_case("family", name, backend, 0, lead=tuple(z.shape[:-1]), C=z.shape[-1],
                        zdt=z.dtype, vdt=v.dtype, hyper=hyper, reduction="none", **fields)


@pytest.mark.parametrize("s", [30.0, 100.0, 1000.0])
def test_regression_1_triton_jsd_nonfinite(s):
    """Finding 1: Triton JSD (0 < beta < 1), float32: ``z, v = torch.randn(41, 401) * s`` (seed 0),
    beta 0.3, T 1, reduction none, both requiring grad: non-finite losses and teacher gradients
    (seed 0: 36 / 7 / 1 of 41 rows at s = 30 / 100 / 1000); the CPU kernel and eager are finite."""
    _skip_if_only()
    torch.manual_seed(0)
    z, v = torch.randn(41, 401) * s, torch.randn(41, 401) * s
    case = _case("jsd", "triton", z, v, {"beta": 0.3, "temperature": 1.0}, teacher_grad=True,
                 std_z=s, std_v=s)
    _assert_rule(case, _inputs(z, v), ("loss", "gv", "gz"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,hyper", [("kd", {"temperature": 1.0}), ("jsd", {"beta": 0.5, "temperature": 1.0})],
                         ids=["kd", "jsd"])
@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
def test_regression_2_student_grad_vs_offset(offset, name, hyper, backend):
    """Finding 2: float32 student gradient loses precision as |z / T| grows: O(1) logits (N(0, 1),
    seed 0, 8 x 1000) plus a constant offset, T = 1. Today, kd (both backends): err(kernel) 3.7e-6 /
    2.5e-5 / 5.3e-4 at offsets 1e2 / 1e3 / 1e4 while err(plain) stays 3-4e-7; jsd: 2.2e-6 / 2.1e-5 /
    2.4e-4 against 3-5e-7 (the 1e2 jsd case is marginal: 4.3-4.6x)."""
    _skip_if_only()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 1000, generator=g) + offset
    v = torch.randn(8, 1000, generator=g) + offset
    case = _case(name, backend, z, v, hyper, off_z=offset, off_v=offset)
    _assert_rule(case, _inputs(z, v), ("gz",))


def _drawn(name, backend, seed, **fields):
    """A case whose inputs are drawn by _randcase from the fields (``make_case``)."""
    c = RC.make_case("family", name, backend, seed, reduction="none", **fields)
    return c, RC.make_inputs(c)


REGRESSION_3 = {   # id -> (name, backend, seed, fields); the past student is drawn with the student's std
    "dkd-f32-cpu": ("dkd", "cpu", 0, dict(lead=(3,), C=1000, zdt=f32, vdt=f32, std_z=600.0, std_v=600.0,
                                          hyper=dict(temperature=3.9, alpha=1.1, beta=7.9), labels="valid")),
    "dkd-bf16-cpu": ("dkd", "cpu", 1, dict(lead=(3,), C=3, zdt=bf16, vdt=bf16, std_z=456.0, std_v=456.0,
                                           hyper=dict(temperature=7.2, alpha=1.0, beta=8.0), labels="valid")),
    "retro_kd-f32-triton": ("retro_kd", "triton", 7, dict(
        lead=(3,), C=3, zdt=f32, vdt=f32, std_z=262.0, std_v=262.0,
        hyper=dict(temperature=0.571, past_weight=0.71))),
}


@pytest.mark.parametrize("which", list(REGRESSION_3))
def test_regression_3_saturated_teacher_grads(which):
    """Finding 3: teacher gradients in saturated rows (teacher requires grad, reduction none):
    dkd float32 N 3 C 1000 std 600 T 3.9 alpha 1.1 beta 7.9 (seed 0: a row whose true teacher
    gradient is 4e-25 comes out as 9e-4); dkd bf16 N 3 C 3 std 456 T 7.2 (seed 1); Triton retro_kd
    float32 N 3 C 3 std 262 T 0.571 past_weight 0.71 (seed 7: err 2.7e-5 vs plain 4.2e-6). The
    bf16 dkd case today: a row's teacher gradient 7.8e8 relative off vs plain 0.72."""
    _skip_if_only()
    name, backend, seed, fields = REGRESSION_3[which]
    case, inp = _drawn(name, backend, seed, teacher_grad=True, **fields)
    _assert_rule(case, inp, ("gv",))


@pytest.mark.parametrize("which", ["retro_kd", "wttm"])
def test_regression_3_float64_guard(which):
    """Finding 3, the float64 items (retro_kd N 8 C 100 std 1600 T 2.08 past_weight 0.7; wttm std 808
    T 0.617): NOT reproduced as failures under the suite's float64 rule. The per-row relative errors
    are there (up to 1.7e-2 for retro_kd, 0.17 for wttm C 1000 over seeds 0-59), but only in rows
    whose truth is 1e-13..1e-9 of its natural magnitude, and the kernel's absolute error (~1e-14)
    is below the float64 reference's own cancellation error eps64 * max|logit / T| (~4e-13), hence
    far below the suite's floor (256 eps64 * M_i). Kept as a guard: passes today."""
    _skip_if_only()
    if which == "retro_kd":
        fields = dict(lead=(8,), C=100, zdt=f64, vdt=f64, std_z=1600.0, std_v=1600.0,
                      hyper=dict(temperature=2.08, past_weight=0.7))
    else:
        fields = dict(lead=(8,), C=1000, zdt=f64, vdt=f64, std_z=808.0, std_v=808.0,
                      hyper=dict(temperature=0.617))
    for seed in range(3):
        case, inp = _drawn(which, "cpu", seed, teacher_grad=True, **fields)
        _assert_rule(case, inp, ("loss", "gz", "gv"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_4_jsd_saturated_student_grad(backend):
    """Finding 4: JSD float32 in saturated rows (std 30, T 1, C 401, beta 0.5, N 8, seed 2): the
    student gradient's per-row error is 25x plain's on the CPU (2.9e11 vs 1.1e10: saturated rows whose
    true gradient is tiny); Triton's is non-finite (finding 1)."""
    _skip_if_only()
    case, inp = _drawn("jsd", backend, 2, lead=(8,), C=401, zdt=f32, vdt=f32, std_z=30.0, std_v=30.0,
                       hyper=dict(beta=0.5, temperature=1.0), teacher_grad=True)
    _assert_rule(case, inp, ("gz",))


REGRESSION_5 = {   # id -> (name, backend, seed, fields): "std" logits with an offset of 50 on both
    "ttm-triton": ("ttm", "triton", 0, dict(C=1000, std_z=0.18, std_v=0.18, hyper=dict(temperature=15.5))),
    "wttm-triton": ("wttm", "triton", 0, dict(C=100, std_z=0.024, std_v=0.024, hyper=dict(temperature=0.94))),
    "wttm-cpu": ("wttm", "cpu", 0, dict(C=1000, std_z=0.016, std_v=0.016, hyper=dict(temperature=18.3))),
    "kl-triton": ("jsd_fwd", "triton", 0, dict(C=1000, std_z=0.022, std_v=0.022,
                                               hyper=dict(beta=0.0, temperature=1.6))),
}


@pytest.mark.parametrize("which", list(REGRESSION_5))
def test_regression_5_small_losses(which):
    """Finding 5: small per-row losses (logits of std 0.016-0.18, the teacher drawn independently,
    both offset by +50, float32, N 4, reduction none): the loss's per-row relative error. Today:
    Triton ttm 4.2e-4 vs plain 1.2e-5; Triton wttm 5.2e-3 vs 4.5e-4; CPU wttm 4.0e-2 vs 1.5e-3;
    Triton KL (jsd beta 0) 1.8e-2 vs 2.0e-3. (Without an offset these parameters pass; the CPU KL
    passes at every offset tried.)"""
    _skip_if_only()
    name, backend, seed, fields = REGRESSION_5[which]
    case, inp = _drawn(name, backend, seed, lead=(4,), zdt=f32, vdt=f32, off_z=50.0, off_v=50.0, **fields)
    _assert_rule(case, inp, ("loss",))
