"""The fused multi-teacher path of the Triton backend (``kdfast._triton.multi_forward``), run under
TRITON_INTERPRET=1 on CPU tensors: one launch reads M teacher rows per student row and must give,
per teacher, what the single-teacher ``distill_forward`` gives for that teacher (D_m, grad_v[m]),
the CE once, and the student gradient summed over the teachers. The reference is M separate
``distill_forward`` calls (the CE weight only in the first), a different kernel specialisation
(one teacher slot, a larger block) - not the multi kernel compared with itself. Shapes are small:
the interpreter is slow."""
import pytest
import torch

from conftest import CASES, NO_NEG_INF, max_err, rand_labels, rand_logits, scale_of
from kdfast.functional import METHODS

tb = pytest.importorskip("kdfast._triton")

# name -> (method, hyperparameters): every case of every loss (kdfast.losses.REGISTRY, via conftest):
# every kind and variant of the kernel family
VARIANTS = CASES


def params(name):
    method, hyper = VARIANTS[name]
    return METHODS[method](**hyper)


@pytest.fixture
def small_block(monkeypatch):
    """MAX_BLOCK = 16: with M teachers BLOCK = 16 / next_power_of_2(M) (8 for M = 2, 4 for M = 3),
    so rows of C = 37 span several blocks and end in a partial one."""
    monkeypatch.setattr(tb, "MAX_BLOCK", 16)
    assert tb.launch_config(37, teachers=3)[0] == 4 and tb.launch_config(37)[0] == 16


def _acc(z):
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def multi(name, z, vs, zp, labels, kd_w, ce_w, gs, *, need_gz=True, need_gv=True, grad_z=None):
    """multi_forward with sentinel-filled outputs; returns (d (M, N), ce, grad_z, grad_v (M, N, C))."""
    p = params(name)
    M, N = kd_w.shape
    acc = _acc(z)
    d = torch.full((M, N), 7.0, dtype=acc)
    ce = torch.full((N,), 7.0, dtype=acc)
    gz = (torch.full_like(z, 7.0) if grad_z is None else grad_z) if need_gz else None
    gv = torch.full((M,) + tuple(z.shape), 7.0, dtype=vs[0].dtype) if need_gv else None
    tb.multi_forward(z, vs, zp if p.rho else None, labels, kd_w, ce_w, gs, d, ce, gz, gv,
                     p.fparams(), p.iparams())
    return d, ce, gz, gv


def per_teacher(name, z, vs, zp, labels, kd_w, ce_w, gs):
    """M single-teacher distill_forward calls: D_m and grad_v[m] from call m, CE from the first
    (the only one with ce_w; ce_out is computed whatever ce_w is), grad_z summed in float64."""
    p = params(name)
    M, N = kd_w.shape
    acc = _acc(z)
    d, gv, gz = [], [], torch.zeros(z.shape, dtype=torch.float64)
    ce = None
    for m in range(M):
        d1, ce1 = torch.empty(N, dtype=acc), torch.empty(N, dtype=acc)
        gz1, gv1 = torch.empty_like(z), torch.empty(z.shape, dtype=vs[m].dtype)
        tb.distill_forward(z, vs[m], zp if p.rho else None, labels, kd_w[m].contiguous(),
                           ce_w if m == 0 else torch.zeros_like(ce_w), gs, d1, ce1, gz1, gv1,
                           p.fparams(), p.iparams())
        d.append(d1)
        gv.append(gv1)
        gz += gz1.double()
        ce = ce1 if ce is None else ce
    return torch.stack(d), ce, gz, torch.stack(gv)


def inputs(M, N, C, dtype, gen, neg_inf=False, vdtype=None):
    z = rand_logits((N, C), dtype, gen=gen)
    stacked = rand_logits((M, N, C), vdtype or dtype, gen=gen)
    if neg_inf:   # probability-0 classes in some teachers (no label column: labels avoid them)
        stacked[0, 0, 16:40:3] = float("-inf")
        stacked[-1, 2, :16] = float("-inf")
    zp = rand_logits((N, C), dtype, gen=gen)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kd_w = (torch.rand((M, N), generator=gen, dtype=torch.float64) + 0.5).to(acc)
    ce_w = (torch.rand((N,), generator=gen, dtype=torch.float64) + 0.5).to(acc)
    gs = torch.full((1,), 0.37, dtype=acc)
    return z, stacked, zp, kd_w, ce_w, gs


def check(got, want, tol_rel, what=""):
    for key, g, w in zip(("d", "ce", "grad_z", "grad_v"), got, want):
        g, w = g.double(), w.double()
        assert torch.isfinite(g).all(), (what, key)
        tol = tol_rel * max(1.0, scale_of(w))
        assert max_err(g, w) <= tol, (what, key, max_err(g, w), tol)


# ----------------------------------------------------------------------------- every kind, float64
@pytest.mark.parametrize("blocks", ["one", "multi"])
@pytest.mark.parametrize("M", [1, 3])   # 3: a padded teacher slot (MB = 4); M = 2 in the layout / AOT tests
@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_per_teacher_float64(name, M, blocks, gen, monkeypatch):
    """Stacked (M, N, C) teachers (read in place), per-row teacher weights, an ignored row,
    grad_scale != 1; rows in one block (BLOCK = 64 > C) or over several (MAX_BLOCK = 16). M = 3
    has a padding teacher slot. M = 1 is the single-teacher kernel itself: bit-identical."""
    if blocks == "multi":
        monkeypatch.setattr(tb, "MAX_BLOCK", 16)
    N, C = 4, 37
    z, stacked, zp, kd_w, ce_w, gs = inputs(M, N, C, torch.float64, gen,
                                            neg_inf=name not in NO_NEG_INF)
    labels = torch.tensor([3, -100, 36, 0])
    vs = list(stacked.unbind(0))
    assert tb.teacher_stride(vs) == (N * C if M > 1 else 0)
    got = multi(name, z, vs, zp, labels, kd_w, ce_w, gs)
    want = per_teacher(name, z, vs, zp, labels, kd_w, ce_w, gs)
    if M == 1:
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=0)
    check(got, want, 1e-10, name)
    # the ignored row: zeros everywhere
    assert (got[0][:, 1] == 0).all() and got[1][1] == 0
    assert (got[2][1] == 0).all() and (got[3][:, 1] == 0).all()


# ----------------------------------------------------------------------------- teacher layouts
@pytest.mark.parametrize("name", ["dkd"])   # the layouts are the launcher's (kind-independent)
def test_teacher_layouts(name, small_block, gen):
    """The teachers as given: a non-uniformly spaced list (copied by torch.stack), the reversed
    views of a stacked tensor (negative teacher stride, no copy), two separate allocations (any
    distance), equally spaced views with row stride > C. Same results as one teacher at a time."""
    N, C = 3, 37
    z, _, zp, _, ce_w, gs = inputs(1, N, C, torch.float64, gen)
    labels = torch.tensor([5, 36, -100])
    buf = rand_logits((5 * N * C + 11,), gen=gen)
    layouts = {
        # offsets 0, 2NC + 3, 3NC + 11: not equally spaced
        "uneven": ([buf[o:o + N * C].view(N, C) for o in (0, 2 * N * C + 3, 3 * N * C + 11)], None),
        "reversed": (list(rand_logits((3, N, C), gen=gen).unbind(0))[::-1], -N * C),
        "separate": ([rand_logits((N, C), gen=gen), rand_logits((N, C), gen=gen)], "any"),
        "strided": (list(rand_logits((4, N, C + 6), gen=gen)[:, :, 2:C + 2].unbind(0)), N * (C + 6)),
    }
    for key, (vs, stride) in layouts.items():
        d = tb.teacher_stride(vs)
        if stride is None:
            assert d is None, key
        elif stride != "any":
            assert d == stride, (key, d)
        M = len(vs)
        kd_w = torch.rand((M, N), generator=gen, dtype=torch.float64) + 0.5
        got = multi(name, z, vs, zp, labels, kd_w, ce_w, gs)
        want = per_teacher(name, z, vs, zp, labels, kd_w, ce_w, gs)
        check(got, want, 1e-10, key)


# ----------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("name", ["kd", "retro_kd", "dkd", "lm", "ls_kd", "jsd"])
def test_float32_multi_block(name, small_block, gen):
    """float32 (and a bfloat16 student with float32 teachers), M = 3, multi-block rows. The
    reference runs the single-teacher kernel at a 4x larger block (sums and online rescaling in
    another order: measured <= 15 fp32 ulps of the output's scale, bound 64) and rounds each
    teacher's grad_z term to the student dtype before the sum where the kernel rounds the sum once
    (bound (M + 1) / 2 ulps of that dtype: measured ~0.4 bf16 ulp)."""
    N, C, M = 3, 37, 3
    for dz, dv in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]:
        z, stacked, zp, kd_w, ce_w, gs = inputs(M, N, C, dz, gen, vdtype=dv)
        labels = rand_labels((N,), C, ignore_frac=0.0, gen=gen)
        vs = list(stacked.unbind(0))
        got = multi(name, z, vs, zp, labels, kd_w, ce_w, gs)
        want = per_teacher(name, z, vs, zp, labels, kd_w, ce_w, gs)
        assert got[2].dtype == dz and got[3].dtype == dv
        for key, g, w, dt in zip(("d", "ce", "grad_z", "grad_v"), got, want,
                                 (torch.float32, torch.float32, dz, dv)):
            tol = (64 * torch.finfo(torch.float32).eps + (M + 1) / 2 * torch.finfo(dt).eps) \
                * max(1.0, scale_of(w.double()))
            assert max_err(g.double(), w.double()) <= tol, (dz, key, max_err(g.double(), w.double()), tol)


# ----------------------------------------------------------------------------- the contract's edges
@pytest.mark.parametrize("name", ["kd", "dkd", "lm", "ls_kd", "jsd"])   # one variant per kind
def test_bad_labels_nan_rows(name, small_block, gen):
    """A label outside [0, C) that is not ignore_index: NaN in every teacher's D, in CE and in both
    gradients of that row; ignored rows are exact zeros; the good rows are what they are alone."""
    N, C, M = 5, 37, 3
    z, stacked, zp, kd_w, ce_w, gs = inputs(M, N, C, torch.float64, gen)
    labels = torch.tensor([3, 37, -100, -5, 36])
    vs = list(stacked.unbind(0))
    d, ce, gz, gv = multi(name, z, vs, zp, labels, kd_w, ce_w, gs)
    for i in (1, 3):
        assert torch.isnan(d[:, i]).all() and torch.isnan(ce[i]), i
        assert torch.isnan(gz[i]).all() and torch.isnan(gv[:, i]).all(), i
    assert (d[:, 2] == 0).all() and ce[2] == 0 and (gz[2] == 0).all() and (gv[:, 2] == 0).all()
    good = [0, 4]
    d1, ce1, gz1, gv1 = multi(name, z[good], [v[good] for v in vs], zp[good], labels[good],
                              kd_w[:, good].contiguous(), ce_w[good], gs)
    for a, b in [(d[:, good], d1), (ce[good], ce1), (gz[good], gz1), (gv[:, good], gv1)]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_batch():
    """N = 0: nothing to do, nothing written, no launch."""
    for M in (1, 3):
        z = torch.empty(0, 10, dtype=torch.float64)
        vs = [torch.empty(0, 10, dtype=torch.float64) for _ in range(M)]
        kd_w = torch.empty(M, 0, dtype=torch.float64)
        d = torch.empty(M, 0, dtype=torch.float64)
        gv = torch.empty(M, 0, 10, dtype=torch.float64)
        p = params("kd")
        tb.multi_forward(z, vs, None, torch.empty(0, dtype=torch.long), kd_w,
                         torch.empty(0, dtype=torch.float64), torch.ones(1, dtype=torch.float64), d,
                         torch.empty(0, dtype=torch.float64), torch.empty_like(z), gv, p.fparams(),
                         p.iparams())


@pytest.mark.parametrize("name", ["kd", "dkd", "lm", "ls_kd", "jsd", "retro_kd"])
def test_grad_z_aliases_z_and_partial_grads(name, small_block, gen):
    """grad_z may be z itself (each element read before it is written, z_y before the sweep); each
    gradient alone gives the same values as both together; no labels -> ce_out 0."""
    N, C, M = 4, 37, 2
    z, stacked, zp, kd_w, ce_w, gs = inputs(M, N, C, torch.float64, gen)
    labels = torch.tensor([5, -100, 36, 17])
    vs = list(stacked.unbind(0))
    ref = multi(name, z, vs, zp, labels, kd_w, ce_w, gs)
    zz = z.clone()
    alias = multi(name, zz, vs, zp, labels, kd_w, ce_w, gs, grad_z=zz)
    assert alias[2].data_ptr() == zz.data_ptr()
    only_z = multi(name, z, vs, zp, labels, kd_w, ce_w, gs, need_gv=False)
    only_v = multi(name, z, vs, zp, labels, kd_w, ce_w, gs, need_gz=False)
    for a, b in [(alias[0], ref[0]), (alias[1], ref[1]), (alias[2], ref[2]), (alias[3], ref[3]),
                 (only_z[2], ref[2]), (only_v[3], ref[3]), (only_v[0], ref[0]), (only_z[1], ref[1])]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if name != "dkd":   # DKD needs labels
        d0, ce0, _, _ = multi(name, z, vs, zp, None, kd_w, ce_w, gs)
        assert (ce0 == 0).all()
        want = per_teacher(name, z, vs, zp, None, kd_w, ce_w, gs)
        torch.testing.assert_close(d0, want[0], rtol=1e-12, atol=1e-12)


def test_shape_errors():
    z = torch.zeros(2, 5, dtype=torch.float64)
    vs = [torch.zeros(2, 5, dtype=torch.float64)] * 2
    p = params("kd")
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least one teacher"):
        tb.multi_forward(z, [], None, None, torch.zeros(0, 2), one, one, torch.zeros(0, 2),
                         torch.zeros(2), None, None, p.fparams(), p.iparams())
    with pytest.raises(ValueError, match=r"\(M, N\)"):
        tb.multi_forward(z, vs, None, None, torch.zeros(2, dtype=torch.float64), one, one,
                         torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                         None, None, p.fparams(), p.iparams())
    with pytest.raises(ValueError, match="grad_v"):
        tb.multi_forward(z, vs, None, None, torch.zeros(2, 2, dtype=torch.float64), one, one,
                         torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                         None, torch.zeros(2, 5, dtype=torch.float64), p.fparams(), p.iparams())


def test_launch_config_multi():
    """MB * BLOCK within the single-teacher cap; warps follow MB * BLOCK but leave each thread at
    least one 128-bit vector of columns; one teacher unchanged."""
    lc = tb.launch_config
    assert lc(32000, teachers=1) == lc(32000) == (8192, 16)
    assert lc(32000, teachers=2, vec=8) == (4096, 16)
    assert lc(32000, teachers=3, vec=4) == (2048, 16) and lc(32000, teachers=4, vec=8) == (2048, 8)
    assert lc(1000, teachers=4, vec=4) == (1024, 8)
    assert lc(32000, fp64=True, teachers=2, vec=2)[0] == 512


# ----------------------------------------------------------------------------- ahead-of-time compile
def test_aot_multi_teacher_no_spills_128bit(tmp_path):
    """kd and dkd with M = 2, 3, 4 teachers at the largest block the launcher uses for them, fp32
    and bf16, sm_80 and sm_90a: no spills, within the register file, 128-bit row traffic."""
    from test_triton_aot import _assert_128bit, _inspect, _ptxas_present
    if not _ptxas_present():
        pytest.skip("Triton's bundled ptxas / cuobjdump are not installed")
    results, r = _inspect(tmp_path, "--quick", "--arch", "80", "90", "--teachers", "2", "3", "4",
                          "--losses", "kd", "dkd")
    assert len(results) == 2 * 3 * 2 * 2, len(results)
    for res in results:
        assert "error" not in res, res
        where = res["label"] + " " + res["arch"]
        assert res["combo"]["teachers"] in (2, 3, 4)
        assert res["spill_st"] == 0 and res["spill_ld"] == 0 and res["cubin"]["STACK"] == 0, where
        assert res["regs"] <= 255 and res["regs"] * 32 * res["num_warps"] <= 65536, where
    _assert_128bit(results)
    assert r.returncode == 0
