"""multi_teacher_loss (the fused kdfast::multi_distill op, both backends) against the explicit sum of
single-teacher reference losses."""
import pytest
import torch

import kdfast
import kdfast.multi_teacher as MT
from conftest import CASES as CASES_OF
from conftest import BACKENDS, FAMILY, LOSSES, low_precision_bound, max_err, rand_labels, rand_logits

R = kdfast.reference
CASES = {**{k: v for k, v in LOSSES.items()}, **FAMILY}   # name -> (fused, reference, hyper)
METHOD = {case: method for case, (method, _) in CASES_OF.items()}   # case -> method


def _reference_sum(ref, z, teachers, y, w_rows, ce_weight, hyper, zp=None, reduction="none"):
    extra = () if zp is None else (zp,)
    return sum(ref(z, teachers[m], *extra, y, kd_weight=w_rows[m], ce_weight=ce_weight if m == 0 else 0.0,
                   reduction=reduction, **hyper) for m in range(len(teachers)))


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


@pytest.mark.parametrize("backend,m", [("cpu", 1), ("cpu", 3), ("triton", 3)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_sum_of_single_teacher_losses(backend, m, case, gen, monkeypatch):
    """float64, every loss of the family, M teachers (CPU: M = 1 is the single-teacher instantiation
    of the kernel, M = 3 the multi-teacher one; Triton's M = 1 is tests/test_triton_multi.py's),
    per-row teacher weights with gradients, labels with ignored rows, a random upstream gradient;
    Triton with BLOCK 16 (C = 37: rows of 3 blocks, the last partial)."""
    if backend == "triton":
        import kdfast._triton as KT
        monkeypatch.setattr(KT, "MAX_BLOCK", 16)
    _, ref, hyper = CASES[case]
    n, c = 6, 37
    z = rand_logits((n, c), gen=gen)
    teachers = rand_logits((m, n, c), gen=gen)
    y = rand_labels((n,), c, gen=gen)
    w_rows = torch.rand(m, n, generator=gen, dtype=torch.float64) + 0.2
    up = torch.randn(n, generator=gen, dtype=torch.float64)
    zp = rand_logits((n, c), gen=gen) if case == "retro_kd" else None
    kw = {} if zp is None else {"past_student_logits": zp}

    a, t, w = _leaves(z, teachers, w_rows)
    got = kdfast.multi_teacher_loss(METHOD.get(case, case), a, t, y, teacher_weights=w, ce_weight=0.7,
                                    reduction="none", backend=backend, **hyper, **kw)
    got.backward(up)
    b, t2, w2 = _leaves(z, teachers, w_rows)
    want = _reference_sum(ref, b, t2, y, w2, 0.7, hyper, zp)
    want.backward(up)
    for x, xr in ((got, want), (a.grad, b.grad), (t.grad, t2.grad), (w.grad, w2.grad)):
        assert max_err(x.detach(), xr.detach()) <= 1e-10 * max(1.0, float(xr.detach().abs().max())), case


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_of_teachers_fp32_mean(backend, gen):
    """fp32, separately allocated teachers (not equally spaced: Triton stacks them), mean reduction,
    float teacher weights, 2 teachers only one of which requires grad."""
    n, c = 9, 53
    z, v1, v2 = (rand_logits((n, c), gen=gen, scale=s).float().double() for s in (3.0, 3.0, 6.0))  # fp32-exact
    y = rand_labels((n,), c, gen=gen)
    got_z, t1 = _leaves(z.float(), v1.float())
    v2f = v2.float().contiguous()
    got = kdfast.multi_teacher_loss("kd", got_z, [t1, v2f], y, teacher_weights=[0.25, 0.75], backend=backend,
                                    temperature=2.0)
    got.backward()
    assert v2f.grad is None
    b, r1 = _leaves(z, v1)
    want = _reference_sum(R.kd_loss, b, [r1, v2], y, [0.25, 0.75], 1.0, {"temperature": 2.0}, reduction="mean")
    want.backward()
    for x, xr in ((got, want), (got_z.grad, b.grad), (t1.grad, r1.grad)):
        # the single-teacher kernel's fp32 bound (inputs exact in fp32: no eager error) per teacher term
        bound = 2 * low_precision_bound(0.0, torch.float32, max(1.0, float(xr.detach().abs().max())))
        assert max_err(x.detach().double(), xr.detach()) <= bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_worse_than_eager(backend, gen):
    """bf16 student and teachers: the fused error vs float64 within the eager bf16 error bound."""
    n, c = 8, 40
    z, teachers = rand_logits((n, c), gen=gen), rand_logits((2, n, c), gen=gen)
    y = rand_labels((n,), c, gen=gen)
    a = z.bfloat16().requires_grad_()
    got = kdfast.multi_teacher_loss("dkd", a, teachers.bfloat16(), y, backend=backend, reduction="sum")
    got.backward()
    e = z.bfloat16().requires_grad_()
    eager = _reference_sum(R.dkd_loss, e, teachers.bfloat16(), y, [0.5, 0.5], 1.0, {}, reduction="sum")
    eager.backward()
    b = z.clone().requires_grad_()
    want = _reference_sum(R.dkd_loss, b, teachers, y, [0.5, 0.5], 1.0, {}, reduction="sum")
    want.backward()
    for x, xe, xr in ((got, eager, want), (a.grad, e.grad, b.grad)):
        eager_err = max_err(xe.detach().double(), xr.detach())
        bound = low_precision_bound(eager_err, torch.bfloat16, max(1.0, float(xr.abs().max())))
        assert max_err(x.detach().double(), xr.detach()) <= bound


def test_one_kernel_call_per_eight_teachers(monkeypatch):
    """The fused path: one op call for M <= 8 teachers (the student row read once per pass), and
    M = 11 in two groups, CE counted once; equal to the sum of single-teacher losses."""
    calls = []
    real = MT.run_multi
    monkeypatch.setattr(MT, "run_multi", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    z, teachers = rand_logits((4, 30), gen=g), rand_logits((11, 4, 30), gen=g)
    y = rand_labels((4,), 30, gen=g)
    got = kdfast.multi_teacher_loss("jsd", z, teachers[:3], y, backend="cpu", beta=0.4)
    assert calls == [3]
    want = _reference_sum(R.jsd_loss, z, teachers[:3], y, [1 / 3] * 3, 1.0, {"beta": 0.4}, reduction="mean")
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    calls.clear()
    got = kdfast.multi_teacher_loss("ttm", z, teachers, y, backend="cpu")
    assert calls == [8, 3]
    want = _reference_sum(R.ttm_loss, z, teachers, y, [1 / 11] * 11, 1.0, {}, reduction="mean")
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())


def test_extremes_ignored_rows_and_empty():
    """Logits at +-1e4, a teacher with -inf entries, all-ignored rows, N = 0."""
    g = torch.Generator().manual_seed(5)
    z = rand_logits((5, 23), gen=g) * 3000
    t = rand_logits((2, 5, 23), gen=g)
    t[1, :, ::4] = float("-inf")
    y = torch.tensor([3, -100, 7, -100, 0])
    for case in ("kd", "dkd", "jsd"):
        _, ref, hyper = CASES[case]
        a, b = _leaves(z, z)
        got = kdfast.multi_teacher_loss(case, a, t, y, reduction="sum", backend="cpu", **hyper)
        got.backward()
        want = _reference_sum(ref, b, t, y, [0.5, 0.5], 1.0, hyper, reduction="sum")
        want.backward()
        assert torch.isfinite(got) and torch.isfinite(a.grad).all(), case
        assert max_err(got.detach(), want.detach()) <= 1e-9 * max(1.0, abs(want.item())), case
        assert max_err(a.grad, b.grad) <= 1e-9, case
        assert (a.grad[[1, 3]] == 0).all()
    e = torch.empty(0, 23, dtype=torch.float64, requires_grad=True)
    out = kdfast.multi_teacher_loss("kd", e, torch.empty(3, 0, 23, dtype=torch.float64), backend="cpu")
    out.backward()
    assert out.item() == 0.0 and e.grad.shape == (0, 23)


def test_gradcheck_cpu():
    g = torch.Generator().manual_seed(7)
    z = rand_logits((3, 7), gen=g).requires_grad_()
    t = rand_logits((2, 3, 7), gen=g).requires_grad_()
    w = (torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    y = torch.tensor([1, -100, 6])
    for case in ("kd", "dkd", "ls_kd", "jsd", "lm"):
        _, _, hyper = CASES[case]
        fn = lambda a, b, c: kdfast.multi_teacher_loss(METHOD.get(case, case), a, b, y, teacher_weights=c,  # noqa: E731
                                                       backend="cpu", reduction="none", **hyper)
        assert torch.autograd.gradcheck(fn, (z, t, w)), case


def test_inplace_backward_and_compile():
    """inplace_backward gives the same gradients; torch.compile(fullgraph=True) traces the op."""
    g = torch.Generator().manual_seed(9)
    z, t = rand_logits((4, 19), gen=g), rand_logits((3, 4, 19), gen=g)
    y = rand_labels((4,), 19, gen=g)
    grads = []
    for inplace in (False, True):
        a, b = _leaves(z, t)
        kdfast.multi_teacher_loss("wttm", a, b, y, backend="cpu", inplace_backward=inplace).backward()
        grads.append((a.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])

    def step(a, b):
        return kdfast.multi_teacher_loss("kd", a, b, y, backend="cpu")
    a, b = _leaves(z, t)
    torch.compile(step, fullgraph=True, backend="aot_eager")(a, b).backward()
    a2, b2 = _leaves(z, t)
    step(a2, b2).backward()
    assert torch.allclose(a.grad, a2.grad, rtol=1e-12, atol=0) and torch.allclose(b.grad, b2.grad, rtol=1e-12, atol=0)


def test_unfused_callable_and_errors():
    g = torch.Generator().manual_seed(1)
    z, v1, v2 = (rand_logits((4, 20), gen=g) for _ in range(3))
    y = rand_labels((4,), 20, gen=g)
    # a loss function that is not one of kdfast's: called once per teacher
    got = kdfast.multi_teacher_loss(R.kd_loss, z, [v1, v2], y, teacher_weights=[0.25, 0.75])
    want = (0.25 * R.kd_loss(z, v1, y, ce_weight=0.0) + 0.75 * R.kd_loss(z, v2, y, ce_weight=0.0)
            + R.kd_loss(z, v1, y, kd_weight=0.0))
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    even = kdfast.multi_teacher_loss(kdfast.ttm_loss, z, torch.stack([v1, v2]), backend="torch")
    assert abs(even.item() - 0.5 * (R.ttm_loss(z, v1) + R.ttm_loss(z, v2)).item()) <= 1e-12
    with pytest.raises(ValueError, match="2 entries"):
        kdfast.multi_teacher_loss("kd", z, [v1, v2], teacher_weights=[1.0])
    with pytest.raises(ValueError, match="unknown method"):
        kdfast.multi_teacher_loss("nope", z, [v1])
    with pytest.raises(ValueError, match="shape"):
        kdfast.multi_teacher_loss("kd", z, [v1, v2[:, :10]])
    with pytest.raises(ValueError, match="needs labels"):
        kdfast.multi_teacher_loss("dkd", z, [v1, v2])
    with pytest.raises(ValueError, match="past_student_logits"):
        kdfast.multi_teacher_loss("retro_kd", z, [v1, v2])
    with pytest.raises(ValueError, match="kd"):
        kdfast.multi_teacher_loss("kd", z, [v1, v2], alpha=2.0)
