"""multi_teacher_loss against the explicit sum of single-teacher reference losses."""
import pytest
import torch

import kdfast
from conftest import BACKENDS, max_err, rand_labels, rand_logits

R = kdfast.reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,ref,hyper", [
    ("kd", R.kd_loss, {"temperature": 3.0}),
    ("dkd", R.dkd_loss, {"temperature": 2.0, "beta": 4.0}),
    ("jsd", R.jsd_loss, {"beta": 0.3}),
])
def test_matches_sum_of_single_teacher_losses(backend, method, ref, hyper, gen):
    shape = (5, 37)
    z = rand_logits(shape, gen=gen)
    teachers = rand_logits((3, *shape), gen=gen)
    y = rand_labels(shape[:-1], shape[-1], gen=gen)
    w_rows = (torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.2)
    up = torch.randn(5, generator=gen, dtype=torch.float64)

    a, t, w = z.clone().requires_grad_(), teachers.clone().requires_grad_(), w_rows.clone().requires_grad_()
    got = kdfast.multi_teacher_loss(method, a, t, y, teacher_weights=w, ce_weight=0.7, reduction="none",
                                    backend=backend, **hyper)
    got.backward(up)

    b, t2, w2 = z.clone().requires_grad_(), teachers.clone().requires_grad_(), w_rows.clone().requires_grad_()
    want = sum(ref(b, t2[m], y, kd_weight=w2[m], ce_weight=0.7 if m == 0 else 0.0, reduction="none", **hyper)
               for m in range(3))
    want.backward(up)
    for x, xr in ((got, want), (a.grad, b.grad), (t.grad, t2.grad), (w.grad, w2.grad)):
        assert max_err(x.detach(), xr.detach()) <= 1e-9 * max(1.0, float(xr.abs().max()))


def test_list_float_weights_and_default():
    g = torch.Generator().manual_seed(1)
    z, v1, v2 = (rand_logits((4, 20), gen=g) for _ in range(3))
    y = rand_labels((4,), 20, gen=g)
    got = kdfast.multi_teacher_loss("kd", z, [v1, v2], y, teacher_weights=[0.25, 0.75], backend="cpu")
    want = (0.25 * kdfast.kd_loss(z, v1, y, ce_weight=0.0) + 0.75 * kdfast.kd_loss(z, v2, y, ce_weight=0.0)
            + kdfast.kd_loss(z, v1, y, kd_weight=0.0))
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    even = kdfast.multi_teacher_loss(kdfast.ttm_loss, z, torch.stack([v1, v2]), backend="cpu")
    assert abs(even.item() - 0.5 * (kdfast.ttm_loss(z, v1) + kdfast.ttm_loss(z, v2)).item()) <= 1e-12
    with pytest.raises(ValueError, match="2 entries"):
        kdfast.multi_teacher_loss("kd", z, [v1, v2], teacher_weights=[1.0])
    with pytest.raises(ValueError, match="unknown method"):
        kdfast.multi_teacher_loss("nope", z, [v1])
