"""The two phases of every phased kind, KL, DKD, LM, JSD (two rounds) and LS (three) (kdfast/_spec.py,
"Two phases": ``stats_forward`` / ``finish_forward``), tensor parallelism simulated in one process:
the columns of every row are split into uneven shards (world sizes 1, 2, 3; a shard of width 1),
phase 1 runs on each shard (each round from the gathered earlier ones), the stats are stacked into
gstats (world, N, K) (the all-gathers, concatenated), phase 2 runs on each shard, ``part`` is summed
over the shards (the all_reduce) and :func:`finish_terms` gives the terms. The result must be the
same backend's fused ``multi_forward`` on the whole rows: the loss terms, CE, and the gradients (the
shards' columns concatenated).

Backends: "triton" (under TRITON_INTERPRET=1, set by conftest.py) and "cpu" (``kdfast._C``, skipped
until the extension has ``stats_forward``). Shapes are small: the interpreter is slow.
"""
import zlib

import pytest
import torch

from kdfast._spec import (
    PHASED_KINDS, JSDTeacherStat, KernelParams, Kind, KLStat, KLTeacherStat, LMStat, LSStat,
    LSTeacherStat, finish_terms, stats_rounds, stats_width)

f32, f64 = torch.float32, torch.float64

# the warnings of the interpreter's numpy lanes (exp / log of -inf lanes that are selected away)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def backend(name):
    if name == "triton":
        return pytest.importorskip("kdfast._triton")
    from kdfast._cpu import load
    be = load()
    if not hasattr(be, "stats_forward"):
        pytest.skip("kdfast._C has no stats_forward yet")
    return be


BACKENDS = ["triton", "cpu"]


def blocks(monkeypatch, dtype, M):
    """Triton: float32 runs get BLOCK = 16 (one teacher), 16 (two: MAX_BLOCK 32 // 2) or 8 (three:
    32 // 4), so shards wider than BLOCK span several blocks of the statistics and gradient sweeps
    (online rescaling within a shard); float64 runs the one-block rows of the launcher's own choice
    (the interpreter's time grows with the blocks)."""
    tb = pytest.importorskip("kdfast._triton")
    if dtype == f32:
        monkeypatch.setattr(tb, "MAX_BLOCK", 16 if M == 1 else 32)


def kl(t_s=1.0, t_t=None, scale=None, **kw):
    """KernelParams of the KL kind: kd at temperature t_s by default (scale T^2)."""
    t_t = t_s if t_t is None else t_t
    return KernelParams(Kind.KL, t_s, t_t, t_s * t_s if scale is None else scale, **kw)


# ----------------------------------------------------------------------------- the two runs
def fused(be, p, z, vs, zp, y, kd_w, ce_w, gs, need_gz=True, need_gv=True):
    """The single-device call on the whole rows: (terms (M + 1, N) = D_m then CE, grad_z, grad_v)."""
    M, (N, C) = len(vs), z.shape
    acc = kd_w.dtype
    d, ce = torch.full((M, N), 7.0, dtype=acc), torch.full((N,), 7.0, dtype=acc)
    gz = torch.full_like(z, 7.0) if need_gz else None
    gv = torch.full((M, N, C), 7.0, dtype=vs[0].dtype) if need_gv else None
    f, i = p.lists()
    be.multi_forward(z, vs, zp, y, kd_w, ce_w, gs, d, ce, gz, gv, f, i)
    return torch.cat([d, ce[None]]).double(), gz, gv


def split(be, p, z, vs, zp, y, kd_w, ce_w, gs, cuts, need_gz=True, need_gv=True):
    """The two phases over the column shards [cuts[r], cuts[r + 1]) (the tensors are views of the
    whole rows: row stride > C). Returns what ``fused`` returns and ``coef``; checks on the way that
    every stats field of a live row was written and that b and a are the same on every rank."""
    M, (N, C) = len(vs), z.shape
    acc = kd_w.dtype
    f, i = p.lists()
    shards = list(zip(cuts[:-1], cuts[1:]))
    cols = lambda t, a, b: None if t is None else t[:, a:b]
    gstats = None
    for rnd in range(stats_rounds(p)):   # each round's all-gather, concatenated (gprev, gstats)
        K = stats_width(p, M, rnd)
        stats = []
        for a, b in shards:
            st = torch.full((N, K), float("nan"), dtype=f64)
            kw = {} if rnd == 0 else {"round": rnd, "gprev": gstats}
            be.stats_forward(cols(z, a, b), [cols(v, a, b) for v in vs], cols(zp, a, b), y, st, f,
                             i, a, C, **kw)
            stats.append(st)
        g = torch.stack(stats)                       # the all-gather
        gstats = g if gstats is None else torch.cat([gstats, g], -1)
    live = torch.ones(N, dtype=torch.bool) if y is None else (y >= 0) & (y < C)
    assert not gstats[:, live].isnan().any(), "a stats field of a valid row was not written"
    part = torch.zeros((M + 1, N), dtype=f64)        # the all_reduce
    bs, coefs, gzs, gvs = [], [], [], []
    for a, b in shards:
        d, ce = torch.full((M, N), 7.0, dtype=acc), torch.full((N,), 7.0, dtype=acc)
        coef, pt = torch.full((M + 1, N), 7.0, dtype=f64), torch.full((M + 1, N), 7.0, dtype=f64)
        gz = torch.full((N, b - a), 7.0, dtype=z.dtype) if need_gz else None
        gv = torch.full((M, N, b - a), 7.0, dtype=vs[0].dtype) if need_gv else None
        be.finish_forward(cols(z, a, b), [cols(v, a, b) for v in vs], cols(zp, a, b), y, kd_w, ce_w,
                          gs, gstats, d, ce, coef, pt, gz, gv, f, i, a, C)
        part += pt
        bs.append(torch.cat([d, ce[None]]).double())
        coefs.append(coef)
        gzs.append(gz)
        gvs.append(gv)
    for r in range(1, len(shards)):   # b and a: the same on every rank
        torch.testing.assert_close(bs[r], bs[0], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(coefs[r], coefs[0], rtol=0, atol=0, equal_nan=True)
    terms = finish_terms(bs[0], coefs[0], part)
    return (terms, torch.cat(gzs, 1) if need_gz else None,
            torch.cat(gvs, 2) if need_gv else None, coefs[0])


# ----------------------------------------------------------------------------- the tolerance
# The split run does the fused run's arithmetic with the row constants (S, W: sums; l = log S,
# dbar = W / S) from the ranks' partial sums instead of the whole row's, so they differ by the
# rounding of those sums (a few ulps; the maxima and references are exact, rule 1 of
# docs/kernel-math.md). What that moves, per output (the "natural magnitude" below, in float64
# from the inputs):
# - a probability exp((x_j - M) - l): l moves by a few eps, and the argument rounds at the size of
#   |x_j - M|, so by ~eps (1 + |x_j - M|) relative;
# - u_j = d_j - dbar, d_j = (x_j - M) - (x'_j - R): dbar moves by eps times the size of W's summands
#   (dmag = sum w dsize below: pass 1's references move over the row, its corrections shift by
#   both parts of d), and u_j rounds at the size of d_j's parts (dsize_j);
# - a gradient element (a difference of such probabilities, or p u) by those relative to the sizes
#   of its parts, not of itself (a saturated row's q - p << q);
# - a one-pass loss term KL1 = (dbar + doff) - (lc - la) by a few eps of its summands' sizes;
#   log1p(X) (the accurate form) by a few eps of the loss times the same sizes (X's |u| > 1 terms
#   take exp(KL1): at most 4x more, docs/kernel-math.md rule 3); CE = (M_1 - z_y) + l_1 by a few eps
#   of its summands'.
# Float32 allows 16 eps of that magnitude (sums of <= 40 terms: ~log2(40), the exp / log ulps, a
# factor 2; the largest seen over 10 seeds x every case of test_phases_match_fused at world 3 was
# 2.3 eps); float64 1e-10 of it (as the other float64 tests). The Triton fused kernel recomputes pass 1's exponentials in its
# gradient sweep as the split one does; the CPU fused kernel keeps them (ExpCache: a product
# e_j exp((m_b - M) - l), one rounding more, by exp_u20, <= 20 ulp each): 2 x 20 eps more for the CPU
# in float32 (KERNEL_FP32_ULPS in conftest).
TOL = {("triton", f32): 16 * torch.finfo(f32).eps, ("cpu", f32): 56 * torch.finfo(f32).eps,
       ("triton", f64): 1e-10, ("cpu", f64): 1e-10}


def _spread(x):
    """|x - max x| per row (0 where x = -inf): the size an exponent (x - M) - l rounds at."""
    return torch.where(x > float("-inf"), (x - x.max(-1, keepdim=True).values).abs(), 0.0)


def _natural(p, z, vs, zp, y, kd_w, ce_w, gs, xrows, terms):
    """Float64 per-output natural magnitudes (terms (M + 1, N), grad_z (N, C), grad_v (M, N, C)),
    from the float64 probabilities of the inputs (see above). ``xrows`` (M, N): the teacher terms
    that took log1p(X), whose magnitude is the sizes times the term itself, ``terms`` (the fused
    one's: a float64 KL of a row of scale 1e3 from log_softmax has lost it, 1 + 1e-17 = 1)."""
    M, (N, C) = len(vs), z.shape
    rho = p.rho if zp is not None else 0.0
    z = z.double()
    a = z / p.t_student
    lq = torch.log_softmax(a, -1)
    q = lq.exp()
    qs = q * (1 + _spread(a))             # q with its exponent's rounding size
    g = gs.double()[0]
    nat_t = torch.zeros((M + 1, N), dtype=f64)
    nat_gz = torch.zeros((N, C), dtype=f64)
    nat_gv = torch.zeros((M, N, C), dtype=f64)
    for m, v in enumerate(vs):
        r = v.double()
        if zp is not None and rho:
            r = zp.double() if rho == 1 else (1 - rho) * r + rho * zp.double()
        c = r / p.t_teacher
        lp = torch.log_softmax(c, -1)
        pm = lp.exp()
        ps = pm * (1 + _spread(c))
        s = (torch.logsumexp(c, -1) - torch.logsumexp(r, -1) / p.t_teacher).exp() if p.wttm \
            else torch.full((N,), p.scale, dtype=f64)
        # the weighting stream (w, its logits xw) and the other (xo): p, c and a (reverse: q, a, c)
        w, lw, lo, xw, xo = (q, lq, lp, a, c) if p.reverse else (pm, lp, lq, c, a)
        lr = torch.where(w > 0, lw - lo, 0.0)
        u = lr - (w * lr).sum(-1, keepdim=True)
        top = w.argmax(-1, keepdim=True)
        doff = (xo.max(-1).values - xo.gather(-1, top)[:, 0]).abs()
        dsize = torch.where(w > 0, _spread(xw) + (xo - xo.gather(-1, top)).abs(), 0.0)
        dmag = (w * dsize).sum(-1, keepdim=True)
        usize = 1 + u.abs() + dmag + dsize
        size = dmag[:, 0] + doff + torch.logsumexp(-_spread(xw), -1) \
            + torch.logsumexp(-_spread(xo), -1) + 1.0
        nat_t[m] = size * torch.where(xrows[m], terms[m].abs(), s)
        kw = (g * kd_w[m].double()).abs() * s
        cz, cv = (kw / p.t_student)[:, None], (kw * (1 - rho) / p.t_teacher)[:, None]
        if p.reverse:   # dD/dz = (s/Ts) q u, dD/dv = (s/Tt) (p - q)
            nat_gz += cz * (qs * u.abs() + q * usize)
            nat_gv[m] = cv * (ps + qs)
        else:           # dD/dz = (s/Ts) (q - p), dD/dv = (s/Tt) p u
            nat_gz += cz * (qs + ps)
            nat_gv[m] = cv * (ps * u.abs() + pm * usize)
    if y is not None and p.has_ce:
        l1 = torch.log_softmax(z, -1)
        yy = y.clamp(0, C - 1)
        ce = -l1.gather(-1, yy[:, None])[:, 0]
        nat_t[M] = ce + 2 * torch.logsumexp(-_spread(z), -1) + 1.0
        onehot = torch.nn.functional.one_hot(yy, C).double()
        nat_gz += (g * ce_w.double()).abs()[:, None] * (l1.exp() * (1 + _spread(z)) + onehot)
    return nat_t, nat_gz, nat_gv


def _std(x):
    """LS's standardised rows (x - mean) / std (population std), float64; and 1 / std."""
    u = x - x.mean(-1, keepdim=True)
    sd = u.square().mean(-1, keepdim=True).sqrt()
    return u / sd, 1.0 / sd


def _natural_kinds(p, z, vs, zp, y, kd_w, ce_w, gs, xrows, terms):
    """``_natural`` for the kinds other than KL (coarser: no per-term structure of W / u): per row a
    size ``1 + spread(a) + spread(c)`` (the exponents' and one-pass sums' rounding sizes, a / c the
    softmax inputs: z / T, v / T; LS the standardised rows over T), the gradient entries that size
    times the largest coefficient of a gradient (DKD T (alpha + beta), JSD 1 / T, LS T / std, with
    the chain rule's sums over the row) times q_j + p_j (and the label's one-hot: DKD's target
    terms), the terms that size times |term| where the term took log1p(X) (LS, DKD: plus
    s sqrt(|term| / s), s the loss's scale, see below), else the loss's scale.
    LM: |z_j - zbar| + |v_j - vbar| per entry plus its row mean (/ C: the gradient), the term
    their squares' mean."""
    M, (N, C) = len(vs), z.shape
    rho = p.rho if zp is not None else 0.0
    z = z.double()
    g = gs.double()[0]
    T = p.t_student
    nat_t = torch.zeros((M + 1, N), dtype=f64)
    nat_gz = torch.zeros((N, C), dtype=f64)
    nat_gv = torch.zeros((M, N, C), dtype=f64)
    yy = None if y is None else y.clamp(0, C - 1)
    onehot = 0.0 if y is None else torch.nn.functional.one_hot(yy, C).double()
    fin = lambda x: torch.where(x.isfinite(), x, 0.0)
    if p.kind == Kind.LS:
        zs_, izs = _std(z)
        a, gfz = zs_ / T, T * izs * (1 + zs_.abs().amax(-1, keepdim=True))
    else:
        a, gfz = z / T, None
    for m, v in enumerate(vs):
        r = v.double()
        if zp is not None and rho:
            r = zp.double() if rho == 1 else (1 - rho) * r + rho * zp.double()
        kw = (g * kd_w[m].double()).abs()[:, None]
        if p.kind == Kind.LM:
            uz = fin(z - z.mean(-1, keepdim=True) if p.center else z).abs()
            uv = fin(r - r.mean(-1, keepdim=True) if p.center else r).abs()
            # (the entry's parts, and the row's: the means round at the sum of the row's sizes)
            e = uz + uv + (uz + uv).mean(-1, keepdim=True)
            nat_t[m] = (e * e).mean(-1) / 2 + 1e-300
            nat_gz += kw * e / C
            nat_gv[m] = kw * (1 - rho) * e / C
            continue
        if p.kind == Kind.LS:
            rs_, irs = _std(r)
            c = rs_ / T
            gfv = T * irs * (1 + rs_.abs().amax(-1, keepdim=True))
            gfz_m, sfac = gfz, T * T
        else:
            c = r / T
            gf = T * (p.alpha + p.beta) if p.kind == Kind.DKD else 1.0 / T
            gfz_m = gfv = gf
            sfac = T * T * (p.alpha + p.beta) if p.kind == Kind.DKD else 1.0
        size = 1 + _spread(a).amax(-1, keepdim=True) + fin(_spread(c)).amax(-1, keepdim=True)
        qq, pp = torch.softmax(a, -1), torch.softmax(c, -1)
        pr = qq + pp + onehot + (1.0 / C if p.kind == Kind.LS else 0.0)
        tx = terms[m].abs()
        if p.kind in (Kind.LS, Kind.DKD):
            # a small KL of log-ratios that carry an absolute rounding moves by ~sqrt(KL) times it
            # to first order, not by KL: LS's phases standardise with the means and sigmas of the
            # exact sums, the fused kernel with Chan's update (a ~eps relative rescaling of a and
            # c, moving the KL by (q - p) . a); DKD's TCKD, the binary KL of p_y, q_y, takes its
            # log-ratio G from the lse's log-sums (p_y (1 - p_y) G dG)
            tx = tx + sfac * torch.sqrt(tx / sfac)
        nat_t[m] = size[:, 0] * torch.where(xrows[m], tx, sfac)
        nat_gz += kw * gfz_m * size * pr
        nat_gv[m] = kw * (1 - rho) * gfv * size * pr
    if y is not None and p.has_ce:
        l1 = torch.log_softmax(z, -1)
        ce = -l1.gather(-1, yy[:, None])[:, 0]
        nat_t[M] = ce + 2 * torch.logsumexp(-_spread(z), -1) + 1.0
        nat_gz += (g * ce_w.double()).abs()[:, None] * (l1.exp() * (1 + _spread(z)) + onehot)
    return nat_t, nat_gz, nat_gv


def compare(be_name, p, inputs, got, want, what):
    """``got`` (split: terms, grad_z, grad_v, coef) against ``want`` (fused: terms, grad_z, grad_v):
    the same NaN rows (bad labels), elsewhere |got - want| <= TOL * the natural magnitude. Returns per output the largest |got - want| / (eps * natural)
    and the largest |got - want| / max |want|."""
    z, vs, zp, y, kd_w, ce_w, gs = inputs
    M = len(vs)
    xrows = got[3][:M] != 0   # the terms that took log1p(X): a = s > 0
    nat = (_natural if p.kind == Kind.KL else _natural_kinds)(p, z, vs, zp, y, kd_w, ce_w, gs,
                                                              xrows, want[0].double())
    eps = torch.finfo(z.dtype).eps
    worst = {}
    for key, g, w, n in zip(("terms", "grad_z", "grad_v"), got[:3], want, nat):
        if g is None:
            assert w is None, (what, key)
            continue
        g, w = g.double(), w.double()
        assert g.shape == w.shape, (what, key)
        assert torch.equal(g.isnan(), w.isnan()), (what, key, "NaN pattern")
        assert not (g == 7.0).any(), (what, key, "an element not written")
        ok = ~w.isnan() & ~(g.isinf() & w.isinf() & (g.sign() == w.sign()))
        err = torch.where(ok, (g - w).abs(), 0.0)
        ratio = torch.where(ok, err / (eps * n).clamp_min(1e-300), 0.0)
        assert ((err <= TOL[be_name, z.dtype] * n) | ~ok).all(), (what, key, float(err.max()),
                                                                  float(ratio[ok].max()))
        # (for the report: eps of the natural magnitude; |error| relative to the output's scale)
        rel = float(err.max() / w[ok].abs().max().clamp_min(1e-300)) if ok.any() else 0.0
        worst[key] = (float(ratio.max()) if ratio.numel() else 0.0, rel)
    return worst


# ----------------------------------------------------------------------------- inputs
N, C = 5, 37
#: column cuts per world size: uneven shards, a shard of width 1 (world 3)
CUTS = {1: [0, C], 2: [0, 11, C], 3: [0, 1, 20, C]}
#: labels: in every shard of every world above (0: the width-1 shard) and an ignored row (the bad
#: labels: test_bad_labels)
LABELS = [0, 10, 11, 36, -100]
#: per row: logit scale and offset (1e-2 .. 1e3)
SCALES = [1e-2, 1.0, 3.0, 1e3, 30.0]
OFFSETS = [0.0, 100.0, -50.0, 1e3, 7.0]


def make_inputs(p, M, dtype, gen, *, zp=False, labels=True, neg_inf=True, saturated=(1,)):
    """(z, vs, zp, y, kd_w, ce_w, gs): rows of SCALES / OFFSETS; ``saturated`` rows have teachers
    within 1e-4 (relative) of the student at the teachers' temperature (tiny KL: log1p(X));
    ``neg_inf``: teacher 0 is -inf on columns 11: of row 2 (a whole shard of world 2 and 3) and on
    column 0 of row 3 (world 3's width-1 shard) (not for the reverse KL: infinite there)."""
    sc = torch.tensor(SCALES, dtype=f64)[:, None]
    off = torch.tensor(OFFSETS, dtype=f64)[:, None]
    z = torch.randn((N, C), generator=gen, dtype=f64) * sc + off
    stacked = torch.randn((M, N, C), generator=gen, dtype=f64) * sc + off
    for i in saturated:
        tz = z[i] * (p.t_teacher / p.t_student)
        stacked[:, i] = tz + 1e-4 * torch.randn((M, C), generator=gen, dtype=f64) * tz.abs().max()
    if neg_inf and not p.reverse:
        stacked[0, 2, 11:] = float("-inf")
        stacked[0, 3, 0] = float("-inf")
    past = torch.randn((N, C), generator=gen, dtype=f64) * sc + off if zp else None
    acc = f64 if dtype == f64 else f32
    kd_w = (torch.rand((M, N), generator=gen, dtype=f64) + 0.5).to(acc)
    ce_w = (torch.rand((N,), generator=gen, dtype=f64) + 0.5).to(acc)
    gs = torch.full((1,), 0.37, dtype=acc)
    y = torch.tensor(LABELS) if labels else None
    return (z.to(dtype), list(stacked.to(dtype).unbind(0)), None if past is None else past.to(dtype),
            y, kd_w, ce_w, gs)


#: name -> (params, teachers, make_inputs options)
CASES = {
    "kd_t1": (kl(1.0), 1, {}),                                 # CE shares the student's lse
    "kd_t2_no_ce": (kl(2.0, has_ce=False), 1, {}),
    "kd_t3_no_labels": (kl(3.0), 1, {"labels": False}),
    "reverse_t2": (kl(2.0, reverse=True), 1, {}),
    "wttm": (kl(1.0, 2.5, 1.0, wttm=True), 1, {}),
    "retro_kd": (kl(3.0, rho=0.4), 1, {"zp": True}),
    "multi3_kd_t2": (kl(2.0), 3, {}),
    "multi3_reverse": (kl(1.5, reverse=True), 3, {}),
    "multi2_wttm_retro": (kl(1.0, 2.0, 1.0, wttm=True, rho=0.7), 2, {"zp": True}),
    # DKD (labels required: in every shard; the streams over j != y)
    "dkd_t2": (KernelParams(Kind.DKD, 2.0, 2.0, 1.0, alpha=1.0, beta=8.0), 1, {}),
    "dkd_t1_beta0": (KernelParams(Kind.DKD, 1.0, 1.0, 1.0, alpha=1.5, beta=0.0), 1,
                     {"saturated": (1, 3)}),   # CE shares the student's pair (T = 1)
    "multi2_dkd_t3_retro": (KernelParams(Kind.DKD, 3.0, 3.0, 1.0, alpha=0.5, beta=2.0, rho=0.3), 2,
                            {"zp": True}),
    "multi3_dkd_no_ce": (KernelParams(Kind.DKD, 1.5, 1.5, 1.0, alpha=1.0, beta=4.0,
                                      has_ce=False), 3, {}),
    # LM (centred: the means from the ranks' sums; no centring: D = sum (z - v)^2 / 2C)
    "lm_center": (KernelParams(Kind.LM, center=True), 1, {"neg_inf": False}),
    "lm_no_center_retro": (KernelParams(Kind.LM, center=False, rho=0.6), 1, {"zp": True,
                                                                             "neg_inf": False}),
    "multi3_lm_center": (KernelParams(Kind.LM, center=True, has_ce=False), 3, {"neg_inf": False}),
    "multi2_lm_no_labels": (KernelParams(Kind.LM, center=True), 2, {"labels": False,
                                                                    "neg_inf": False}),
    # JSD (two rounds: the lse pairs, then SP / SQ; T != 1 and T = 1 with CE sharing the pair)
    "jsd_b03_t2": (KernelParams(Kind.JSD, 2.0, 2.0, 1.0, beta=0.3), 1, {}),
    "jsd_b05_t1": (KernelParams(Kind.JSD, 1.0, 1.0, 1.0, beta=0.5), 1, {"saturated": (1, 3)}),
    "multi2_jsd_b07_t3_retro": (KernelParams(Kind.JSD, 3.0, 3.0, 1.0, beta=0.7, rho=0.5), 2,
                                {"zp": True}),
    "multi3_jsd_b05_t15": (KernelParams(Kind.JSD, 1.5, 1.5, 1.0, beta=0.5), 3, {}),
    # LS (three rounds: the sums, the centred squares, the standardised streams' statistics)
    "ls_t1": (KernelParams(Kind.LS, 1.0, 1.0, 1.0), 1, {"neg_inf": False}),
    "ls_t2_retro": (KernelParams(Kind.LS, 2.0, 2.0, 4.0, rho=0.4), 1, {"zp": True,
                                                                      "neg_inf": False}),
    "multi2_ls_t2": (KernelParams(Kind.LS, 2.0, 2.0, 4.0), 2, {"neg_inf": False}),
    "multi3_ls_t1_no_ce": (KernelParams(Kind.LS, 1.0, 1.0, 1.0, has_ce=False), 3,
                           {"neg_inf": False}),
}

def exact_world1(p):
    """Whether the Triton phases at world 1 give the fused gradients bit for bit (the same arithmetic
    on the same statistics): KL; DKD unless its CE has a pair of its own (T != 1: stored over
    j != y, the label's column added back in phase 2, one rounding apart from the fused sum)."""
    return p.kind == Kind.KL or (p.kind == Kind.DKD and (not p.has_ce or p.t_student == 1.0))

#: the largest |split - fused| / (eps * natural magnitude) and / max |fused| seen, per dtype and
#: output (printed by test_zz_report_worst at the end, for the record: pytest -s)
WORST = {}


def _record(dtype, worst, kind=Kind.KL):
    for k, v in worst.items():
        key = (kind.name, str(dtype).split(".")[-1], k)
        WORST[key] = tuple(max(x, y) for x, y in zip(WORST.get(key, (0.0, 0.0)), v))


@pytest.mark.parametrize("dtype", [f64, f32])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("be_name", BACKENDS)
def test_phases_match_fused(be_name, case, dtype, monkeypatch):
    """Every case at world 3 (shards of 1, 19 and 17 columns), float32 also at worlds 1 and 2
    (the interpreter's time), against the fused call on the whole rows: the loss terms (D_m, CE),
    grad_z, grad_v. Rows: scales 1e-2 .. 1e3 with offsets, a saturated teacher (log1p(X)), -inf
    teacher columns (a whole shard of one row), labels in every shard, an ignored row."""
    be = backend(be_name)
    p, M, opts = CASES[case]
    if be_name == "triton" and p.kind not in be.TRITON_PHASED_KINDS:
        pytest.skip(f"the Triton backend has no two phases for {p.kind.name} yet")
    blocks(monkeypatch, dtype, M)
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()) % 1000 + (dtype == f32))
    inputs = make_inputs(p, M, dtype, gen, **opts)
    z, vs, zp, y, kd_w, ce_w, gs = inputs
    want = fused(be, p, z, vs, zp, y, kd_w, ce_w, gs)
    for world, cuts in CUTS.items():
        if world < 3 and dtype == f64:
            continue   # (the interpreter's time: worlds 1 and 2 are checked in float32)
        got = split(be, p, z, vs, zp, y, kd_w, ce_w, gs, cuts)
        _record(dtype, compare(be_name, p, inputs, got, want, (case, world)), p.kind)
        if y is not None:   # the ignored row: zeros everywhere
            assert (got[0][:, 4] == 0).all() and (got[1][4] == 0).all() and (got[2][:, 4] == 0).all()
        if be_name == "triton" and world == 1 and exact_world1(p):
            # the Triton kernel recomputes pass 1's exponentials in its gradient sweep, so one rank
            # runs the fused arithmetic exactly (the statistics round-trip through float64 exactly)
            for g, w in zip(got[1:3], want[1:3]):
                torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


#: per kind, the parameters of test_forward_only_and_partial_grads
FORWARD_ONLY = {Kind.KL: kl(2.0), Kind.DKD: KernelParams(Kind.DKD, 2.0, 2.0, 1.0, alpha=1.0, beta=8.0),
                Kind.LM: KernelParams(Kind.LM), Kind.JSD: KernelParams(Kind.JSD, 2.0, 2.0, beta=0.3),
                Kind.LS: KernelParams(Kind.LS, 2.0, 2.0, 4.0)}


@pytest.mark.parametrize("grads", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("be_name", BACKENDS)
@pytest.mark.parametrize("kind", list(FORWARD_ONLY), ids=lambda k: k.name)
def test_forward_only_and_partial_grads(be_name, grads, kind, monkeypatch):
    """Forward-only finish calls (no gradient sweep unless a term needs X: the saturated rows 1 and
    2 do, and every rank must then sweep for its part), and one gradient of two. LM's and JSD's
    terms are sums over the columns (a = 0, X always: every rank sweeps)."""
    be = backend(be_name)
    if be_name == "triton" and kind not in be.TRITON_PHASED_KINDS:
        pytest.skip(f"the Triton backend has no two phases for {kind.name} yet")
    p = FORWARD_ONLY[kind]
    blocks(monkeypatch, f32, 1)
    gen = torch.Generator().manual_seed(7)
    inputs = make_inputs(p, 1, f32, gen, saturated=(1, 2), neg_inf=False)
    z, vs, zp, y, kd_w, ce_w, gs = inputs
    want = fused(be, p, z, vs, zp, y, kd_w, ce_w, gs, *grads)
    got = split(be, p, z, vs, zp, y, kd_w, ce_w, gs, CUTS[3], *grads)
    _record(f32, compare(be_name, p, inputs, got, want, grads), kind)
    coef = got[3]
    if kind in (Kind.LM, Kind.JSD):
        assert (coef == 0).all(), coef
        return
    assert (coef[0, 1:3] > 0).all(), coef   # the saturated rows' D = s log1p(X)
    if grads == (False, False) and kind != Kind.LS:   # (LS: standardised rows, no scale 1e3)
        assert (coef[0, 3] == 0).all(), coef   # a row of scale 1e3: KL1 is accurate, no sweep


@pytest.mark.parametrize("be_name", BACKENDS)
def test_bad_labels(be_name):
    """Global labels outside [0, vocab) (not ignore_index: -3, vocab, vocab + 100) give NaN rows
    (every output, on every rank); the ignored row gives zeros; the other rows are unaffected."""
    be = backend(be_name)
    p = kl(1.0)
    gen = torch.Generator().manual_seed(3)
    inputs = list(make_inputs(p, 2, f64, gen))
    inputs[3] = torch.tensor([-3, C, 5, -100, C + 100])
    z, vs, zp, y, kd_w, ce_w, gs = inputs
    want = fused(be, p, z, vs, zp, y, kd_w, ce_w, gs)
    got = split(be, p, z, vs, zp, y, kd_w, ce_w, gs, CUTS[2])
    compare(be_name, p, inputs, got, want, "bad labels")
    terms, gz, gv, coef = got
    rows = [0, 1, 4]
    assert terms[:, rows].isnan().all() and gz[rows].isnan().all() and gv[:, rows].isnan().all()
    assert (terms[:, 3] == 0).all() and (gz[3] == 0).all() and (gv[:, 3] == 0).all()
    assert terms[:, 2].isfinite().all()


@pytest.mark.parametrize("be_name", BACKENDS)
def test_stats_layout(be_name):
    """Phase 1's statistics are the contract's (KLStat / KLTeacherStat), recomputed here in float64
    for a shard: the pairs (max, sum exp(x - max)), R the student's a at the teacher's argmax and
    W = sum e^(c - M_V) ((c - M_V) - (a - R)), wttm's raw-teacher pair, the label logits on the rank
    holding the label only (0 elsewhere), CE's pair a copy of the student's at Ts = 1, a shard
    without teacher mass (S = 0, M = -inf or the float's lowest)."""
    be = backend(be_name)
    p = kl(1.0, 2.0, 1.0, wttm=True)
    gen = torch.Generator().manual_seed(5)
    z, vs, zp, y, _, _, _ = make_inputs(p, 2, f64, gen)
    M = len(vs)
    K = stats_width(p, M)
    a0, b0 = 11, C      # world 2's second shard: holds row 2's label (11), row 2's teacher 0 is -inf
    st = torch.empty((N, K), dtype=f64)
    f, i = p.lists()
    be.stats_forward(z[:, a0:b0], [v[:, a0:b0] for v in vs], None, y, st, f, i, a0, C)
    live = y != p.ignore_index
    a = z[:, a0:b0] / p.t_student

    def pair(x):
        m = x.max(-1).values
        return m, torch.where(m > float("-inf"), (x - m[:, None]).exp().sum(-1), 0.0)

    m, s = pair(a)
    assert torch.equal(st[live, KLStat.M_Z], m[live])
    torch.testing.assert_close(st[live, KLStat.S_Z], s[live], rtol=1e-13, atol=0)
    assert torch.equal(st[live, KLStat.M_ONE], st[live, KLStat.M_Z])   # Ts = 1: CE shares the pair
    assert torch.equal(st[live, KLStat.S_ONE], st[live, KLStat.S_Z])
    here = live & (y >= a0) & (y < b0)
    zy = torch.where(here, z.gather(-1, y.clamp(0, C - 1)[:, None])[:, 0], 0.0)
    assert torch.equal(st[live, KLStat.Z_Y], zy[live])
    for t, v in enumerate(vs):
        o = KLStat.COUNT + t * KLTeacherStat.COUNT
        c = v[:, a0:b0] / p.t_teacher
        mv, sv = pair(c)
        mass = sv > 0
        assert torch.equal(st[live & mass, o + KLTeacherStat.M_V], mv[live & mass])
        torch.testing.assert_close(st[live, o + KLTeacherStat.S_V], sv[live], rtol=1e-13, atol=0)
        empty = live & ~mass   # row 2, teacher 0: no teacher mass on this shard
        assert empty.any() == (t == 0)
        mv_e = st[empty, o + KLTeacherStat.M_V]
        assert ((mv_e == float("-inf")) | (mv_e == torch.finfo(f64).min)).all()
        ref = a.gather(-1, c.argmax(-1, keepdim=True))[:, 0]
        assert torch.equal(st[live & mass, o + KLTeacherStat.R], ref[live & mass])
        e = torch.where(c > float("-inf"), (c - mv[:, None]).exp(), 0.0)
        d = torch.where(e > 0, (c - mv[:, None]) - (a - ref[:, None]), 0.0)
        w, wabs = (e * d).sum(-1), (e * d.abs()).sum(-1)   # (W may cancel: its terms' size)
        assert ((st[:, o + KLTeacherStat.W] - w).abs() <= 1e-13 * wabs)[live].all()
        mu, su = pair(v[:, a0:b0])
        torch.testing.assert_close(st[live & mass, o + KLTeacherStat.M_U], mu[live & mass], rtol=0, atol=0)
        torch.testing.assert_close(st[live, o + KLTeacherStat.S_U], su[live], rtol=1e-13, atol=0)
        vy = torch.where(here, v.gather(-1, y.clamp(0, C - 1)[:, None])[:, 0], 0.0)
        assert torch.equal(st[live, o + KLTeacherStat.V_Y], vy[live])


@pytest.mark.parametrize("be_name", BACKENDS)
def test_no_rows(be_name):
    """N = 0: both phases write nothing and do not fail."""
    be = backend(be_name)
    p = kl(2.0)
    f, i = p.lists()
    M, c = 2, 7
    z, vs = torch.empty((0, c)), [torch.empty((0, c)) for _ in range(M)]
    y = torch.empty((0,), dtype=torch.long)
    st = torch.empty((0, stats_width(p, M)), dtype=f64)
    be.stats_forward(z, vs, None, y, st, f, i, 3, 20)
    e = torch.empty((M, 0))
    be.finish_forward(z, vs, None, y, e, torch.empty(0), torch.ones(1), st[None], e.clone(),
                      torch.empty(0), torch.empty((M + 1, 0), dtype=f64),
                      torch.empty((M + 1, 0), dtype=f64), torch.empty((0, c)),
                      torch.empty((M, 0, c)), f, i, 3, 20)


@pytest.mark.parametrize("be_name", BACKENDS)
def test_other_kinds_are_refused(be_name):
    """A kind without the two-phase form (in the spec, or in this backend) is an error, not a
    wrong result."""
    be = backend(be_name)
    assert Kind.KL in PHASED_KINDS
    z = torch.zeros((2, 5))
    # the kinds this backend's phases take: the spec's (Triton: its own subset)
    kinds = be.TRITON_PHASED_KINDS if be_name == "triton" else PHASED_KINDS
    for kind in set(Kind) - kinds - {Kind.TOPK}:
        p = KernelParams(kind, 2.0, 2.0, 4.0)
        f, i = p.lists()
        if kind not in PHASED_KINDS:
            with pytest.raises(ValueError):
                stats_width(p)
        with pytest.raises((ValueError, RuntimeError)):
            be.stats_forward(z, [z], None, None, torch.empty((2, 12), dtype=f64), f, i, 0, 5)


@pytest.mark.parametrize("be_name", BACKENDS)
def test_grad_z_aliases_z(be_name):
    """finish_forward with grad_z = z (the shard's logits overwritten by their gradient, as the
    fused call allows): the same gradients and terms as into a separate buffer."""
    be = backend(be_name)
    p = kl(2.0)
    gen = torch.Generator().manual_seed(11)
    inputs = make_inputs(p, 1, f64, gen)
    z, vs, zp, y, kd_w, ce_w, gs = inputs
    want = split(be, p, z, vs, zp, y, kd_w, ce_w, gs, CUTS[2])
    f, i = p.lists()
    stats = []
    for a, b in zip(CUTS[2][:-1], CUTS[2][1:]):
        st = torch.empty((N, stats_width(p, 1)), dtype=f64)
        be.stats_forward(z[:, a:b], [vs[0][:, a:b]], None, y, st, f, i, a, C)
        stats.append(st)
    gstats = torch.stack(stats)
    zz = z.clone()
    for a, b in zip(CUTS[2][:-1], CUTS[2][1:]):
        d, ce = torch.empty((1, N), dtype=f64), torch.empty(N, dtype=f64)
        coef, pt = torch.empty((2, N), dtype=f64), torch.empty((2, N), dtype=f64)
        be.finish_forward(zz[:, a:b], [vs[0][:, a:b]], None, y, kd_w, ce_w, gs, gstats, d, ce, coef,
                          pt, zz[:, a:b], None, f, i, a, C)
    torch.testing.assert_close(zz, want[1], rtol=0, atol=0)


#: per kind, one case whose statistics both backends compute on the same shard
STATS_CASES = {Kind.KL: "multi2_wttm_retro", Kind.DKD: "multi2_dkd_t3_retro",
               Kind.LM: "multi3_lm_center", Kind.JSD: "multi2_jsd_b07_t3_retro",
               Kind.LS: "multi2_ls_t2"}


@pytest.mark.parametrize("kind", list(STATS_CASES), ids=lambda k: k.name)
def test_stats_match_cpu(kind):
    """The gathered statistics are interchangeable between the backends: Triton's and the C++
    kernel's ``stats_forward`` on the same float64 shard (world 3's middle shard: row 1's label)
    agree to float64 rounding in every round (the later rounds from the same gprev). The maxima
    and label logits exactly (fields where a stream has no mass excepted: -inf or the lowest)."""
    tb = pytest.importorskip("kdfast._triton")
    cpu = backend("cpu")
    if kind not in tb.TRITON_PHASED_KINDS:
        pytest.skip(f"the Triton backend has no two phases for {kind.name} yet")
    p, M, opts = CASES[STATS_CASES[kind]]
    gen = torch.Generator().manual_seed(13)
    z, vs, zp, y, _, _, _ = make_inputs(p, M, f64, gen, **opts)
    f, i = p.lists()
    live = y != p.ignore_index
    a0, b0 = CUTS[3][1], CUTS[3][2]
    sh = lambda t: None if t is None else t[:, a0:b0]
    for rnd in range(stats_rounds(p)):
        K = stats_width(p, M, rnd)
        out = {}
        for name, be in (("triton", tb), ("cpu", cpu)):
            st = torch.full((N, K), float("nan"), dtype=f64)
            kw = {} if rnd == 0 else {"round": rnd, "gprev": gprev_all}
            be.stats_forward(sh(z), [sh(v) for v in vs], sh(zp), y, st, f, i, a0, C, **kw)
            out[name] = st[live]
        t, c = out["triton"], out["cpu"]
        low = lambda x: (x == float("-inf")) | (x == torch.finfo(f64).min)
        both = low(t) & low(c)
        scale = torch.maximum(t.abs(), c.abs()).amax(0, keepdim=True).clamp_min(1.0)
        assert (both | ((t - c).abs() <= 1e-12 * scale)).all(), (kind, rnd, t, c)
        # the next round's gprev: the gathered statistics of every rank (here: this rank's on
        # each of three, from the C++'s: the same on both backends)
        st = torch.zeros((N, K), dtype=f64)
        st[live] = c
        g = torch.stack([st] * 3)
        gprev_all = g if rnd == 0 else torch.cat([gprev_all, g], -1)


def test_triton_layout_constants():
    """The Triton kernel's statistics columns (kl.py ST_*, STT_*; logit_matching.py LM_*; jsd.py
    JS_*; ls.py LS_*, LST_*) are the spec's."""
    mods = {m: pytest.importorskip(f"kdfast._triton.{m}") for m in ("kl", "logit_matching", "jsd", "ls")}
    for mod, e, prefix in (("kl", KLStat, "ST_"), ("kl", KLTeacherStat, "STT_"),
                           ("logit_matching", LMStat, "LM_"), ("jsd", JSDTeacherStat, "JS_"),
                           ("ls", LSStat, "LS_"), ("ls", LSTeacherStat, "LST_")):
        for f in e:
            assert getattr(mods[mod], prefix + f.name).value == int(f), (prefix, f.name)


def test_zz_report_worst():
    """(Not a check: prints the largest errors seen above, see WORST.)"""
    for key, (ratio, rel) in sorted(WORST.items()):
        print("worst", key, f"{ratio:.3g} eps of the natural magnitude, {rel:.3g} of max |fused|")
