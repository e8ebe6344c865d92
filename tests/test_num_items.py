"""Token-count normalisation: ``num_items_in_batch=`` on every entry point (docs/spec.md section 5).

``reduction="mean"`` with ``num_items_in_batch=n`` is ``"sum" / n``; over micro-batches that each
get the count of the whole batch, the losses and the accumulated gradients add up to the whole
batch's mean; an int and a 0-d tensor (int or float, as Hugging Face's Trainer passes it) give the
same result; the count is never read on the host (a taint-tracking TorchFunctionMode, and
torch.compile(fullgraph=True))."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import kdfast
from conftest import CASES, rand_labels, rand_logits
from kdfast.losses import REGISTRY

ALL_BACKENDS = ["cpu", "triton", "torch"]


def _fn(case):
    name, hyper = CASES[case]
    loss = REGISTRY[name]
    if loss.past_student:
        def fn(z, v, y, **kw):
            return loss.function(z, v, v.flip(0).detach(), y, **hyper, **kw)
        return fn
    return lambda z, v, y, **kw: loss.function(z, v, y, **hyper, **kw)


def _grads(fn, z, v, y, w, **kw):
    z = z.clone().requires_grad_(True)
    v = v.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss = fn(z, v, y, kd_weight=w, ce_weight=0.5, **kw)
    loss.backward()
    return loss.detach(), z.grad, v.grad, w.grad


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_mean_with_count_is_sum_over_count(case, backend, gen):
    """Every loss of a dense teacher, every backend: value and gradients (student, teacher, a
    tensor kd_weight) of "mean" with the count equal "sum" / count; int, int64 and float tensors."""
    fn = _fn(case)
    z, v = rand_logits((3, 5, 11), gen=gen), rand_logits((3, 5, 11), gen=gen)
    y = rand_labels((3, 5), 11, gen=gen)
    w = torch.rand((3, 5), generator=gen, dtype=torch.float64)
    n = 37   # not the number of valid rows (as across micro-batches / ranks)
    ref = _grads(fn, z, v, y, w, reduction="sum", backend=backend)
    for count in (n, torch.tensor(n), torch.tensor(float(n))):
        got = _grads(fn, z, v, y, w, reduction="mean", backend=backend, num_items_in_batch=count)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b / n, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradient_accumulation_equals_the_whole_batch(backend, gen):
    """Two micro-batches with the whole batch's count: their summed losses and accumulated
    gradients equal the whole batch's "mean" (float32 kernels, float64 comparison tolerance)."""
    z, v = rand_logits((12, 40), torch.float32, gen=gen), rand_logits((12, 40), torch.float32, gen=gen)
    y = rand_labels((12,), 40, ignore_frac=0.4, gen=gen)
    count = (y != -100).sum()                      # a device tensor, as Trainer passes it
    zw = z.clone().requires_grad_(True)
    whole = kdfast.jsd_loss(zw, v, y, beta=0.3, backend=backend)
    whole.backward()
    za = z.clone().requires_grad_(True)
    total = 0.0
    for part in (slice(0, 6), slice(6, 12)):       # accumulate: backward per micro-batch
        loss = kdfast.jsd_loss(za[part], v[part], y[part], beta=0.3, backend=backend,
                               num_items_in_batch=count)
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, whole.detach(), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(za.grad, zw.grad, rtol=2e-5, atol=1e-8)


def test_other_reductions_ignore_the_count_and_bad_counts_fail(gen):
    z, v = rand_logits((4, 9), gen=gen), rand_logits((4, 9), gen=gen)
    for red in ("sum", "none"):
        torch.testing.assert_close(kdfast.kd_loss(z, v, reduction=red, num_items_in_batch=7),
                                   kdfast.kd_loss(z, v, reduction=red), rtol=0, atol=0)
    # a count of 0 (no valid row anywhere) is taken as 1: finite, never NaN
    assert kdfast.kd_loss(z, v, num_items_in_batch=0) == kdfast.kd_loss(z, v, reduction="sum")
    for bad in (-1, "3", 2.5j, torch.ones(2), True, float("nan")):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            kdfast.kd_loss(z, v, num_items_in_batch=bad)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_topk_multi_teacher_fused_linear_and_modules(backend, gen):
    n = 29
    z, v, v2 = (rand_logits((6, 13), gen=gen) for _ in range(3))
    y = rand_labels((6,), 13, gen=gen)
    lp, idx = torch.log_softmax(v, -1).topk(4, -1)

    def check(fn):
        a = fn(reduction="mean", num_items_in_batch=torch.tensor(n))
        b = fn(reduction="sum")
        torch.testing.assert_close(a, b / n, rtol=1e-12, atol=1e-14)

    check(lambda **kw: kdfast.topk_kd_loss(z, lp, idx, y, temperature=2.0, backend=backend, **kw))
    check(lambda **kw: kdfast.multi_teacher_loss("kd", z, [v, v2], y, backend=backend, **kw))
    check(lambda **kw: kdfast.KDLoss(backend=backend, reduction=kw.pop("reduction"))(z, v, y, **kw))
    h, w = rand_logits((6, 5), gen=gen), rand_logits((13, 5), gen=gen).requires_grad_(True)
    ht, wt = rand_logits((6, 7), gen=gen), rand_logits((13, 7), gen=gen)
    grads = []
    for kw in (dict(reduction="mean", num_items_in_batch=n), dict(reduction="sum")):
        w.grad = None
        loss = kdfast.fused_linear_distill_loss(h, w, y, teacher_hidden=ht, teacher_weight=wt,
                                                method="jsd", backend=backend, **kw)
        loss.backward()
        grads.append((loss.detach(), w.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0] / n, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[0][1], grads[1][1] / n, rtol=1e-12, atol=1e-14)
    crit = kdfast.FusedLinearDistillLoss("kd", backend=backend)
    torch.testing.assert_close(crit(h, w, y, teacher_hidden=ht, teacher_weight=wt, num_items_in_batch=n),
                               crit(h, w, y, teacher_hidden=ht, teacher_weight=wt) * (y != -100).sum() / n)


class _NoHostRead(TorchFunctionMode):
    """Fails on any host read (item, bool, float, int, tolist, numpy) of the count or of a tensor
    computed from it."""

    READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy}

    def __init__(self, count):
        super().__init__()
        self.tainted = {id(count)}
        self.keep = [count]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        flat = tree_flatten((args, kwargs or {}))[0]
        hit = any(isinstance(x, torch.Tensor) and id(x) in self.tainted for x in flat)
        if hit and func in self.READS:
            raise AssertionError(f"host read of the count: {func}")
        out = func(*args, **(kwargs or {}))
        if hit:
            for x in tree_flatten(out)[0]:
                if isinstance(x, torch.Tensor):
                    self.tainted.add(id(x))
                    self.keep.append(x)
        return out


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_the_count_is_never_read_on_the_host(backend, gen):
    z = rand_logits((5, 9), torch.float32, gen=gen).requires_grad_(True)
    v = rand_logits((5, 9), torch.float32, gen=gen)
    y = rand_labels((5,), 9, gen=gen)
    count = torch.tensor(11.0)
    with _NoHostRead(count) as mode:
        loss = kdfast.kd_loss(z, v, y, backend=backend, num_items_in_batch=count)
        h, w = rand_logits((5, 4), torch.float32, gen=gen), rand_logits((9, 4), torch.float32, gen=gen)
        kdfast.fused_linear_distill_loss(h, w, y, teacher_logits=v, backend=backend,
                                         num_items_in_batch=count)
    assert id(loss) in mode.tainted   # the mode did see the count flow into the loss
    with _NoHostRead(count):
        with pytest.raises(AssertionError, match="host read"):
            count.to(torch.float64).item()   # (the mode itself works)


def test_compiled_with_a_tensor_count_has_no_graph_break(gen):
    z = rand_logits((8, 33), torch.float32, gen=gen)
    v = rand_logits((8, 33), torch.float32, gen=gen)
    y = rand_labels((8,), 33, gen=gen)

    def step(z, v, y, n):
        return kdfast.jsd_loss(z, v, y, beta=0.4, backend="cpu", ce_weight=0.0, num_items_in_batch=n)

    n = torch.tensor(20.0)
    explanation = torch._dynamo.explain(step)(z, v, y, n)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    zc, ze = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    lc, le = compiled(zc, v, y, n), step(ze, v, y, n)
    lc.backward()
    le.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(zc.grad, ze.grad, rtol=1e-6, atol=1e-8)
