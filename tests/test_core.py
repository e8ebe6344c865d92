"""KD / TTM / WTTM (+ fused CE) on every fused backend against the eager reference in float64."""
import pytest
import torch

import kdfast
from conftest import (BACKENDS, LOSSES, low_precision_bound, max_err, rand_labels, rand_logits,
                      rand_weights, run_case, scale_of)

# Shapes: (leading..., C). C = 1 and 3, C not a multiple of any vector width or block, several
# leading dims, the odd 3-D shape and a long row on the CPU.
CPU_SHAPES = [(1, 1), (7, 1), (5, 3), (13, 17), (9, 130), (2, 3, 37), (6, 1031), (3, 131072),
              (41, 401, 1271)]
TRITON_SHAPES = [(1, 1), (4, 3), (3, 37), (2, 3, 37), (3, 300)]


def shapes_for(backend):
    return CPU_SHAPES if backend == "cpu" else TRITON_SHAPES


def truth(name, z, v, labels, upstream, **kw):
    """The reference in float64 on the same values, same upstream gradient."""
    _, ref, hyper = LOSSES[name]
    out, _ = run_case(ref, z.double(), v.double(), labels, upstream=upstream, **{**hyper, **kw})
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_float64_matches_reference(backend, name, gen):
    fused, _, hyper = LOSSES[name]
    for shape in shapes_for(backend):
        if shape == (41, 401, 1271) and name != "kd":
            continue   # one big odd shape is enough; the others share the kernel path
        z, v = rand_logits(shape, gen=gen), rand_logits(shape, gen=gen)
        labels = rand_labels(shape[:-1], shape[-1], gen=gen)
        w = rand_weights(shape[:-1], gen=gen)
        got, up = run_case(fused, z, v, labels, teacher_grad=True, weights=w, gen=gen,
                           backend=backend, **hyper)
        want = truth(name, z, v, labels, up, teacher_grad=True, weights=w)
        for key in want:
            tol = 1e-10 * max(1.0, scale_of(want[key])) * (1 + shape[-1] ** 0.5)
            assert max_err(got[key], want[key]) <= tol, (shape, key, max_err(got[key], want[key]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
def test_reductions_without_labels(backend, name, reduction, gen):
    fused, _, hyper = LOSSES[name]
    z, v = rand_logits((6, 37), gen=gen), rand_logits((6, 37), gen=gen)
    got, up = run_case(fused, z, v, None, teacher_grad=True, reduction=reduction, backend=backend,
                       gen=gen, **hyper)
    want = truth(name, z, v, None, up, teacher_grad=True, reduction=reduction)
    for key in want:
        assert max_err(got[key], want[key]) <= 1e-11 * max(1, scale_of(want[key])), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_eager(backend, name, dtype, gen):
    """Inputs in ``dtype``: the fused loss (fp32 accumulation) must be at least about as close to
    the float64 truth on the same values as the eager reference run in that dtype."""
    fused, ref, hyper = LOSSES[name]
    shape = (16, 1031) if backend == "cpu" else (4, 300)
    z, v = rand_logits(shape, dtype, gen=gen), rand_logits(shape, dtype, gen=gen)
    labels = rand_labels(shape[:-1], shape[-1], gen=gen)
    got, up = run_case(fused, z, v, labels, teacher_grad=True, backend=backend, gen=gen, **hyper)
    eager, _ = run_case(ref, z, v, labels, teacher_grad=True, upstream=up, **hyper)
    want = truth(name, z, v, labels, up, teacher_grad=True)
    for key in want:
        bound = low_precision_bound(max_err(eager[key], want[key]), dtype, scale_of(want[key]))
        assert max_err(got[key], want[key]) <= bound, (key, max_err(got[key], want[key]), bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtypes(backend):
    for dz, dv, dl in [(torch.bfloat16, torch.float32, torch.float32),
                       (torch.float16, torch.float16, torch.float32),
                       (torch.float64, torch.float64, torch.float64)]:
        z = torch.randn(4, 9, dtype=dz, requires_grad=True)
        v = torch.randn(4, 9, dtype=dv, requires_grad=True)
        loss = kdfast.kd_loss(z, v, backend=backend)
        assert loss.dtype == dl and loss.shape == ()
        loss.backward()
        assert z.grad.dtype == dz and v.grad.dtype == dv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_extreme_logits_and_masked_teacher(backend, name, gen):
    """Logits of +-1e4 and -inf teacher entries (top-k / vocabulary-masked teachers)."""
    fused, _, hyper = LOSSES[name]
    shape = (8, 300)
    for dtype in (torch.float64, torch.float32):
        z = rand_logits(shape, dtype, scale=1.0, gen=gen)
        v = rand_logits(shape, dtype, scale=1.0, gen=gen)
        z[0, 5], z[1, :10], v[2, 7], v[3, :] = 1e4, -1e4, 1e4, -1e4 * torch.rand(300, generator=gen).to(dtype)
        v[4:, ::3] = float("-inf")                 # probability-0 teacher classes
        v[5, 4] = 1e4                              # and a dominant one beside them
        labels = rand_labels(shape[:-1], shape[-1], gen=gen)
        got, up = run_case(fused, z, v, labels, teacher_grad=True, backend=backend, gen=gen, **hyper)
        want = truth(name, z, v, labels, up, teacher_grad=True)
        for key in want:
            assert torch.isfinite(got[key]).all(), (dtype, key)
            rel = 1e-10 if dtype == torch.float64 else 2e-3   # fp32 lse of 1e4-sized logits
            assert max_err(got[key], want[key]) <= rel * max(1.0, scale_of(want[key])), (dtype, key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_and_empty(backend, reduction):
    z = torch.randn(5, 11, requires_grad=True)
    v = torch.randn(5, 11, requires_grad=True)
    y = torch.full((5,), -100)
    loss = kdfast.kd_loss(z, v, y, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z)) and torch.equal(v.grad, torch.zeros_like(v))
    for shape in [(0, 11), (2, 0, 11)]:
        z = torch.randn(shape, requires_grad=True)
        loss = kdfast.kd_loss(z, torch.randn(shape), torch.zeros(shape[:-1], dtype=torch.long),
                              reduction=reduction, backend=backend)
        assert loss.shape == (() if reduction != "none" else shape[:-1])
        assert torch.equal(loss, torch.zeros_like(loss))
        loss.sum().backward()
        assert z.grad.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, gen):
    """Rows with a stride larger than C (no copy needed) and permuted leading dims (a copy)."""
    base_z = rand_logits((6, 50), gen=gen)
    base_v = rand_logits((50, 6), gen=gen)
    z = base_z[:, 3:40]                     # row stride 50, C = 37
    v = base_v.t()[:, 3:40]                 # column stride 6: needs a copy
    labels = rand_labels((6,), 37, gen=gen)
    got, up = run_case(kdfast.kd_loss, z, v, labels, teacher_grad=True, backend=backend, gen=gen,
                       temperature=2.0)
    want = truth("kd", z, v, labels, up, teacher_grad=True, temperature=2.0)
    for key in want:
        assert max_err(got[key], want[key]) <= 1e-11 * max(1.0, scale_of(want[key])), key
    z3 = rand_logits((4, 5, 13), gen=gen).permute(1, 0, 2)   # leading dims permuted
    v3 = rand_logits((5, 4, 13), gen=gen)
    got, up = run_case(kdfast.ttm_loss, z3, v3, None, backend=backend, gen=gen)
    want = truth("ttm", z3, v3, None, up, temperature=2.0)
    assert max_err(got["z"], want["z"]) <= 1e-11 * max(1.0, scale_of(want["z"]))


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck_float64(name, gen):
    fused, _, hyper = LOSSES[name]
    z = rand_logits((3, 7), gen=gen).requires_grad_(True)
    # wttm's factor U(v) is a constant by definition (docs/spec.md: no gradient through U), so its
    # teacher gradient is not the derivative gradcheck measures: test_float64_matches_reference checks it
    v = rand_logits((3, 7), gen=gen).requires_grad_(name != "wttm")
    kd_w = torch.rand(3, 1, dtype=torch.float64, generator=gen).requires_grad_(True)   # broadcasts
    ce_w = torch.rand(3, dtype=torch.float64, generator=gen).requires_grad_(True)
    labels = torch.tensor([2, -100, 6])
    for reduction in ("mean", "sum"):
        f = lambda z, v, kw, cw: fused(z, v, labels, kd_weight=kw.squeeze(-1), ce_weight=cw,
                                       reduction=reduction, backend="cpu", **hyper)
        assert torch.autograd.gradcheck(f, (z, v, kd_w, ce_w))
    f = lambda z, v, cw: fused(z, v, labels, ce_weight=cw, reduction="none", backend="cpu", **hyper)
    assert torch.autograd.gradcheck(f, (z, v, ce_w))


def test_identities(gen):
    z, v = rand_logits((5, 23), gen=gen), rand_logits((5, 23), gen=gen)
    kd1 = kdfast.kd_loss(z, v, temperature=1.0, reduction="none", backend="cpu")
    ttm1 = kdfast.ttm_loss(z, v, temperature=1.0, reduction="none", backend="cpu")
    torch.testing.assert_close(kd1, ttm1, rtol=1e-12, atol=0)
    # WTTM's weight: 1 <= U <= C^(1 - 1/T); WTTM = U * TTM
    t = 3.0
    u = kdfast.wttm_loss(z, v, temperature=t, reduction="none", backend="cpu") / \
        kdfast.ttm_loss(z, v, temperature=t, reduction="none", backend="cpu")
    assert bool((u >= 1 - 1e-12).all() and (u <= 23 ** (1 - 1 / t) + 1e-12).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_match_functional(backend, gen):
    z, v = rand_logits((4, 9), gen=gen), rand_logits((4, 9), gen=gen)
    y = rand_labels((4,), 9, gen=gen)
    for mod, fn in [(kdfast.KDLoss(temperature=2.0, ce_weight=0.3, backend=backend), kdfast.kd_loss),
                    (kdfast.TTMLoss(temperature=3.0, backend=backend), kdfast.ttm_loss),
                    (kdfast.WTTMLoss(reduction="sum", backend=backend), kdfast.wttm_loss)]:
        kw = mod.hparams
        torch.testing.assert_close(mod(z, v, y), fn(z, v, y, **kw), rtol=0, atol=0)
        assert "temperature" in repr(mod)


def test_inplace_backward_and_retain_graph():
    z = torch.randn(4, 9, requires_grad=True)
    v = torch.randn(4, 9)
    # default: a retained graph can be back-propagated twice, with the same result
    loss = kdfast.kd_loss(z, v, backend="cpu") * 0.5
    loss.backward(retain_graph=True)
    g1 = z.grad.clone()
    z.grad = None
    loss.backward()
    torch.testing.assert_close(z.grad, g1, rtol=0, atol=0)
    # opt-in in-place backward: same gradient once, and a second backward is refused
    z.grad = None
    loss = kdfast.kd_loss(z, v, backend="cpu", inplace_backward=True) * 0.5
    loss.backward(retain_graph=True)
    torch.testing.assert_close(z.grad, g1, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_teacher_weights_are_per_row_gradients(gen):
    """ALM-KD style mixing: d loss / d kd_weight_i = D_i / n_valid, d loss / d ce_weight_i = CE_i / n_valid."""
    z, v = rand_logits((6, 10), gen=gen), rand_logits((6, 10), gen=gen)
    y = torch.tensor([1, 2, -100, 3, 4, 5])
    lam = torch.rand(6, dtype=torch.float64, generator=gen).requires_grad_(True)
    loss = kdfast.kd_loss(z, v, y, kd_weight=lam, ce_weight=1 - lam, backend="cpu")
    loss.backward()
    d = kdfast.kd_loss(z, v, y, ce_weight=0.0, reduction="none", backend="torch")
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(lam.grad, (d - ce).masked_fill(y == -100, 0) / 5, rtol=1e-10, atol=1e-12)
