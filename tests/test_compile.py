"""torch.compile (no graph break through the custom op) and autocast."""
import pytest
import torch

import kdfast
from conftest import rand_labels, rand_logits


def step(z, v, y):
    return kdfast.kd_loss(z, v, y, temperature=2.0, backend="cpu") + \
        kdfast.dkd_loss(z, v, y, backend="cpu", ce_weight=0.0)


def test_no_graph_break_and_same_values(gen):
    z = rand_logits((8, 33), torch.float32, gen=gen)
    v = rand_logits((8, 33), torch.float32, gen=gen)
    y = rand_labels((8,), 33, gen=gen)
    explanation = torch._dynamo.explain(step)(z, v, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    zc = z.clone().requires_grad_(True)
    ze = z.clone().requires_grad_(True)
    loss_c, loss_e = compiled(zc, v, y), step(ze, v, y)
    (loss_c * 0.7).backward()
    (loss_e * 0.7).backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zc.grad, ze.grad, rtol=1e-6, atol=1e-7)


def test_compiled_training_step_with_module():
    torch.manual_seed(0)
    student = torch.nn.Linear(16, 10)
    crit = kdfast.KDLoss(temperature=3.0, backend="cpu")
    x, v, y = torch.randn(32, 16), torch.randn(32, 10), torch.randint(0, 10, (32,))

    @torch.compile(fullgraph=True)
    def train_step(x, v, y):
        return crit(student(x), v, y)

    loss = train_step(x, v, y)
    loss.backward()
    g = student.weight.grad.clone()
    student.weight.grad = None
    crit(student(x), v, y).backward()
    torch.testing.assert_close(student.weight.grad, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_takes_low_precision_logits(dtype):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 10)
    x, v = torch.randn(4, 16), torch.randn(4, 10)
    with torch.autocast("cpu", dtype=dtype):
        z = head(x)
        assert z.dtype == dtype
        loss = kdfast.kd_loss(z, v, backend="cpu")
    assert loss.dtype == torch.float32           # computed and returned in fp32
    loss.backward()
    ref = kdfast.reference.kd_loss(z.detach().double(), v.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_no_graph_break_and_same_values(reduction, gen):
    """fused_linear_distill_loss is one custom op (kdfast::linear_distill): no graph break; "none"
    also compiles its backward, which runs the chunk loop again through the op."""
    n, hdim, c = 10, 6, 33
    h = torch.randn(n, hdim, generator=gen)
    w = torch.randn(c, hdim, generator=gen) * 0.5
    b = torch.randn(c, generator=gen)
    th, tw = torch.randn(n, 5, generator=gen), torch.randn(c, 5, generator=gen)
    y = rand_labels((n,), c, gen=gen)
    up = torch.rand(n, generator=gen) + 0.5

    def step(h, w, b, th, tw, y):
        loss = kdfast.fused_linear_distill_loss(h, w, y, student_bias=b, teacher_hidden=th, teacher_weight=tw,
                                                method="dkd", temperature=2.0, chunk_size=4,
                                                reduction=reduction, backend="cpu")
        return loss if reduction == "mean" else (loss * up).sum()

    explanation = torch._dynamo.explain(step)(h, w, b, th, tw, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    leaves_c = [x.clone().requires_grad_(True) for x in (h, w, b)]
    leaves_e = [x.clone().requires_grad_(True) for x in (h, w, b)]
    loss_c, loss_e = compiled(*leaves_c, th, tw, y), step(*leaves_e, th, tw, y)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for a, e in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-6)
