"""DKD, logit matching, logit standardisation, JSD, RetroKD on every fused backend, and the
identities of docs/spec.md that tie the losses together."""
import pytest
import torch

import kdfast
from conftest import (BACKENDS, FAMILY, NO_NEG_INF, low_precision_bound, max_err, rand_labels, rand_logits,
                      rand_weights, run_case, scale_of)

R = kdfast.reference
CPU_SHAPES = [(1, 2), (5, 3), (9, 130), (2, 3, 37), (6, 1031), (2, 131072)]
TRITON_SHAPES = [(1, 2), (4, 3), (2, 3, 37), (3, 300)]


def bind(name, shape, dtype, gen):
    """(fused, reference, hyper), with retro_kd's past-student logits bound to a fresh tensor."""
    fused, ref, hyper = FAMILY[name]
    if name == "retro_kd":
        zp = rand_logits(shape, dtype, gen=gen)
        return (lambda z, v, y, **kw: kdfast.retro_kd_loss(z, v, zp, y, **kw),
                lambda z, v, y, **kw: R.retro_kd_loss(z, v, zp.to(z.dtype), y, **kw), hyper)
    return fused, ref, hyper


def compare(backend, name, shape, dtype, gen, *, weights=True, z=None, v=None, labels=None):
    """Fused (in ``dtype``) vs the reference in float64 on the same values; returns the errors and
    the eager reference's own error in ``dtype``."""
    fused, ref, hyper = bind(name, shape, dtype, gen)
    z = rand_logits(shape, dtype, gen=gen) if z is None else z
    v = rand_logits(shape, dtype, gen=gen) if v is None else v
    labels = rand_labels(shape[:-1], shape[-1], gen=gen) if labels is None else labels
    w = rand_weights(shape[:-1], gen=gen) if weights else None
    got, up = run_case(fused, z, v, labels, teacher_grad=True, weights=w, gen=gen, backend=backend,
                       **hyper)
    want, _ = run_case(ref, z.double(), v.double(), labels, teacher_grad=True, weights=w,
                       upstream=up, **hyper)
    eager = None
    if dtype != torch.float64:
        eager, _ = run_case(ref, z, v, labels, teacher_grad=True, upstream=up, **hyper)
    return got, want, eager


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FAMILY))
def test_float64_matches_reference(backend, name, gen):
    for shape in CPU_SHAPES if backend == "cpu" else TRITON_SHAPES:
        got, want, _ = compare(backend, name, shape, torch.float64, gen)
        for key in want:
            tol = 1e-10 * max(1.0, scale_of(want[key])) * (1 + shape[-1] ** 0.5)
            assert max_err(got[key], want[key]) <= tol, (shape, key, max_err(got[key], want[key]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FAMILY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_no_worse_than_eager(backend, name, dtype, gen):
    shape = (8, 1031) if backend == "cpu" else (3, 300)
    got, want, eager = compare(backend, name, shape, dtype, gen, weights=False)
    for key in want:
        bound = low_precision_bound(max_err(eager[key], want[key]), dtype, scale_of(want[key]))
        assert max_err(got[key], want[key]) <= bound, (key, max_err(got[key], want[key]), bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FAMILY))
def test_masked_teacher_and_extreme_logits(backend, name, gen):
    shape = (6, 50)
    z, v = rand_logits(shape, gen=gen), rand_logits(shape, gen=gen)
    z[0, 3], v[1, 4], z[2, :5] = 1e4, -1e4, -1e4
    # no -inf for lm / ls_kd (a mean / std of the row is taken) nor for the reverse KL (jsd at
    # beta = 1: KL(q || p) is +inf where p = 0 < q, in the reference too): conftest.NO_NEG_INF
    if name not in NO_NEG_INF:
        v[3:, ::4] = float("-inf")
    labels = torch.tensor([1, 2, 3, 5, 6, 9])   # labels on finite teacher classes
    got, want, _ = compare(backend, name, shape, torch.float64, gen, z=z, v=v, labels=labels)
    for key in want:
        assert torch.isfinite(got[key]).all(), key
        assert max_err(got[key], want[key]) <= 1e-9 * max(1.0, scale_of(want[key])), key


@pytest.mark.parametrize("name", list(FAMILY))
def test_gradcheck_float64(name, gen):
    fused, _, hyper = bind(name, (3, 6), torch.float64, gen)
    z = rand_logits((3, 6), gen=gen).requires_grad_(True)
    v = rand_logits((3, 6), gen=gen).requires_grad_(True)
    kd_w = torch.rand(3, dtype=torch.float64, generator=gen).requires_grad_(True)
    labels = torch.tensor([2, -100, 5])
    f = lambda z, v, w: fused(z, v, labels, kd_weight=w, reduction="sum", backend="cpu", **hyper)
    assert torch.autograd.gradcheck(f, (z, v, kd_w))


# ----------------------------------------------------------------------------- identities
def loss_rows(fn, z, v, *args, **kw):
    return fn(z, v, *args, reduction="none", backend="cpu", **kw)


def test_kd_tends_to_logit_matching(gen):
    z, v = rand_logits((7, 40), gen=gen), rand_logits((7, 40), gen=gen)
    lm = loss_rows(kdfast.logit_matching_loss, z, v)
    kd = loss_rows(kdfast.kd_loss, z, v, temperature=1e4)
    torch.testing.assert_close(kd, lm, rtol=1e-3, atol=0)       # O(1/T) apart
    kd_far = loss_rows(kdfast.kd_loss, z, v, temperature=10.0)
    assert max_err(kd_far, lm) > 10 * max_err(kd, lm)           # and converging


def test_dkd_with_beta_one_minus_pt_is_kd(gen):
    """kd = T^2 (TCKD + (1 - p_y) NCKD) per row (Zhao et al.)."""
    t = 4.0
    z, v = rand_logits((9, 30), gen=gen), rand_logits((9, 30), gen=gen)
    y = rand_labels((9,), 30, ignore_frac=0.0, gen=gen)
    p_y = torch.softmax(v / t, -1).gather(1, y[:, None]).squeeze(1)
    kd = loss_rows(kdfast.kd_loss, z, v, y, temperature=t, ce_weight=0.0)
    for i in range(9):   # beta differs per row: one row at a time
        dkd = loss_rows(kdfast.dkd_loss, z[i:i + 1], v[i:i + 1], y[i:i + 1], temperature=t,
                        alpha=1.0, beta=float(1 - p_y[i]), ce_weight=0.0)
        torch.testing.assert_close(dkd, kd[i:i + 1], rtol=1e-10, atol=1e-12)


def test_jsd_limits_and_symmetry(gen):
    z, v = rand_logits((6, 25), gen=gen), rand_logits((6, 25), gen=gen)
    fwd = loss_rows(kdfast.jsd_loss, z, v, beta=0.0, temperature=2.0)
    rev = loss_rows(kdfast.jsd_loss, z, v, beta=1.0, temperature=2.0)
    torch.testing.assert_close(fwd, loss_rows(kdfast.kd_loss, z, v, temperature=2.0) / 4.0,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(rev, loss_rows(kdfast.kd_loss, v, z, temperature=2.0) / 4.0,
                               rtol=1e-12, atol=0)
    for beta in (0.0, 0.2, 0.5, 0.9, 1.0):
        a = loss_rows(kdfast.jsd_loss, z, v, beta=beta, temperature=1.5)
        b = loss_rows(kdfast.jsd_loss, v, z, beta=1.0 - beta, temperature=1.5)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_retro_at_zero_past_weight_is_kd(gen):
    z, v, zp = (rand_logits((5, 20), gen=gen) for _ in range(3))
    y = rand_labels((5,), 20, gen=gen)
    torch.testing.assert_close(loss_rows(kdfast.retro_kd_loss, z, v, zp, y, past_weight=0.0),
                               loss_rows(kdfast.kd_loss, z, v, y), rtol=1e-13, atol=0)
    torch.testing.assert_close(loss_rows(kdfast.retro_kd_loss, z, v, zp, y, past_weight=1.0),
                               loss_rows(kdfast.kd_loss, z, zp, y), rtol=1e-12, atol=1e-14)


def test_family_errors():
    z, v, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="dkd_loss needs labels"):
        kdfast.dkd_loss(z, v, None)
    with pytest.raises(ValueError, match="at least 2 classes"):
        kdfast.dkd_loss(z[:, :1], v[:, :1], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 classes"):
        kdfast.ls_kd_loss(z[:, :1], v[:, :1])
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            kdfast.jsd_loss(z, v, beta=beta)
    for rho in (-0.5, 1.01):
        with pytest.raises(ValueError, match="past_weight"):
            kdfast.retro_kd_loss(z, v, z, past_weight=rho)
    with pytest.raises(ValueError, match="past_student_logits"):
        kdfast.retro_kd_loss(z, v, torch.randn(4, 6))
    with pytest.raises(ValueError, match="alpha"):
        kdfast.dkd_loss(z, v, y, alpha=float("inf"))


def test_past_logits_cache():
    cache = kdfast.PastLogits(10, 4, refresh_every=2)
    idx = torch.tensor([3, 7])
    z0 = torch.randn(2, 4)
    torch.testing.assert_close(cache.get(idx, z0), z0)          # nothing stored yet
    assert cache.store(idx, z0, epoch=0)
    assert not cache.store(idx, torch.randn(2, 4), epoch=1)     # not a refresh epoch
    torch.testing.assert_close(cache.get(idx, torch.randn(2, 4)), z0)
    z2 = torch.randn(2, 4)
    assert cache.store(idx, z2, epoch=2)
    torch.testing.assert_close(cache.get(idx, torch.randn(2, 4)), z2)
