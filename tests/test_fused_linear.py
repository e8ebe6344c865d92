"""kdfast.fused_linear_distill_loss against the eager reference on materialised logits
(``F.linear`` + ``kdfast.reference.<method>_loss``): every method, teacher as logits or as hidden
states + head, bias or not, ignored rows, chunk sizes that do not divide N, N = 0 / 1, every
reduction with a random upstream gradient, float64 (tight), float32 / bfloat16 (vs eager's own
error), gradcheck, and the Triton kernel under the interpreter on one tiny case.

Every case runs the kernel with ``grad_z`` aliasing the chunk's logits (the in-place use the backend
contract allows), so the float64 tests are also the in-place safety tests of every kind."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import kdfast
from conftest import CASES as CONFTEST_CASES
from conftest import low_precision_bound, max_err, rand_labels, scale_of
from kdfast.fused_linear import (METHODS, FusedLinearDistillLoss, default_chunk_size,
                                 fused_linear_distill_loss)

R = kdfast.reference
# id -> (method, hyperparameters): every case of every loss (kdfast.losses.REGISTRY, via conftest), and
# kd at its defaults
CASES = {**CONFTEST_CASES, "kd_defaults": ("kd", {})}


def make(lead, hdim, v, dtype, gen, *, bias=True, teacher="hidden", labels=True, weights=True):
    """Leaves and constants of one case (float64 values rounded to ``dtype``)."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    c = {"h": rnd(*lead, hdim), "w": rnd(v, hdim, scale=hdim ** -0.5 * 3)}
    c["b"] = rnd(v) if bias else None
    if teacher == "hidden":
        c["teacher_hidden"], c["teacher_weight"] = rnd(*lead, 5), rnd(v, 5, scale=1.2)
        c["teacher_bias"] = rnd(v) if bias else None
    else:
        c["teacher_logits"] = rnd(*lead, v, scale=3.0)
    c["past_student_logits"] = rnd(*lead, v, scale=3.0)
    c["y"] = rand_labels(lead, v, gen=gen) if labels else None
    if weights:
        c["kd_w"], c["ce_w"] = ((torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5)
                                for _ in range(2))
    return c


def teacher_logits_of(c, dtype):
    if "teacher_logits" in c:
        return c["teacher_logits"].to(dtype)
    return F.linear(c["teacher_hidden"].to(dtype), c["teacher_weight"].to(dtype),
                    None if c["teacher_bias"] is None else c["teacher_bias"].to(dtype))


def run(c, method, hyper, *, impl, dtype, reduction, upstream=None, gen=None, **kw):
    """Forward + backward; ``impl`` "fused" (kwargs go to fused_linear_distill_loss) or "eager"
    (materialised logits, eager reference, computed in ``dtype``). Returns float64 copies of the
    loss and the gradients, and the upstream gradient used."""
    leaf = lambda x: x.detach().to(dtype).clone().requires_grad_(True)  # noqa: E731
    h, w = leaf(c["h"]), leaf(c["w"])
    b = None if c["b"] is None else leaf(c["b"])
    weights = "kd_w" in c
    kd_w = c["kd_w"].clone().requires_grad_(True) if weights else 1.0
    ce_w = c["ce_w"].clone().requires_grad_(True) if weights else 1.0
    common = dict(kd_weight=kd_w, ce_weight=ce_w, reduction=reduction, **hyper)
    if impl == "fused":
        src = {k: c[k] for k in ("teacher_logits", "teacher_hidden", "teacher_weight",
                                 "teacher_bias") if k in c}
        if method == "retro_kd":
            src["past_student_logits"] = c["past_student_logits"]
        loss = fused_linear_distill_loss(h, w, c["y"], method=method, student_bias=b, **src,
                                         **common, **kw)
    else:
        z = F.linear(h, w, b)
        extra = (c["past_student_logits"].to(dtype),) if method == "retro_kd" else ()
        loss = getattr(R, f"{method}_loss")(z, teacher_logits_of(c, dtype), *extra, c["y"], **common)
    if upstream is None:
        upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
    loss.backward(upstream.to(loss.dtype))
    out = {"loss": loss.detach().double(), "h": h.grad.double(), "w": w.grad.double()}
    if b is not None:
        out["b"] = b.grad.double()
    if weights:
        out["kd_w"], out["ce_w"] = kd_w.grad.double(), ce_w.grad.double()
    return out, upstream


def check_close(got, want, rtol):
    assert got.keys() == want.keys()
    for k in want:
        err, tol = max_err(got[k], want[k]), rtol * max(1.0, scale_of(want[k]))
        assert err <= tol, (k, err, tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(CASES))
def test_float64_matches_reference(name, reduction, gen):
    method, hyper = CASES[name]
    for lead, teacher, bias, chunk in [((3, 7), "hidden", True, 8), ((13,), "logits", False, 5),
                                       ((2, 9), "logits", True, None)]:
        c = make(lead, 6, 37, torch.float64, gen, bias=bias, teacher=teacher)
        want, up = run(c, method, hyper, impl="eager", dtype=torch.float64, reduction=reduction,
                       gen=gen)
        got, _ = run(c, method, hyper, impl="fused", dtype=torch.float64, reduction=reduction,
                     upstream=up, chunk_size=chunk, backend="cpu")
        check_close(got, want, 1e-11)


@pytest.mark.parametrize("name", ["kd", "ttm", "wttm", "dkd", "lm", "ls_kd", "jsd", "retro_kd"])
def test_float32_no_worse_than_eager(name, gen):
    method, hyper = CASES[name]
    c = make((96,), 64, 1000, torch.float64, gen, teacher="hidden")
    want, up = run(c, method, hyper, impl="eager", dtype=torch.float64, reduction="mean", gen=gen)
    eager, _ = run(c, method, hyper, impl="eager", dtype=torch.float32, reduction="mean", upstream=up)
    got, _ = run(c, method, hyper, impl="fused", dtype=torch.float32, reduction="mean", upstream=up,
                 chunk_size=40, backend="cpu")
    for k in want:
        bound = low_precision_bound(max_err(eager[k], want[k]), torch.float32, scale_of(want[k]))
        assert max_err(got[k], want[k]) <= bound, (k, max_err(got[k], want[k]), bound)


def test_bfloat16_no_worse_than_eager(gen):
    """bf16 student and head: logits rounded to bf16 as eager's; grad_W sums per-chunk bf16
    products in fp32 (each chunk's product rounded once: about twice eager's single rounding)."""
    c = make((64,), 32, 500, torch.float64, gen, teacher="logits")
    hyper = {"temperature": 2.0}
    want, up = run(c, "kd", hyper, impl="eager", dtype=torch.float64, reduction="sum", gen=gen)
    eager, _ = run(c, "kd", hyper, impl="eager", dtype=torch.bfloat16, reduction="sum", upstream=up)
    got, _ = run(c, "kd", hyper, impl="fused", dtype=torch.bfloat16, reduction="sum", upstream=up,
                 chunk_size=24, backend="cpu")
    for k in want:
        bound = low_precision_bound(2 * max_err(eager[k], want[k]), torch.bfloat16, scale_of(want[k]))
        assert max_err(got[k], want[k]) <= bound, (k, max_err(got[k], want[k]), bound)


def test_mixed_teacher_dtypes(gen):
    """float64 student + float32 teacher (teacher upcast per chunk), float32 student + float64
    teacher (teacher cast to float32), float32 student + bfloat16 teacher head."""
    c = make((10,), 5, 13, torch.float64, gen, teacher="hidden")
    # (the teacher matmul runs per chunk in fp32: its rounding differs from one full matmul)
    for sd, td, rtol in [(torch.float64, torch.float32, 1e-6), (torch.float32, torch.float64, 1e-5),
                         (torch.float32, torch.bfloat16, 2e-2)]:
        t = dict(teacher_hidden=c["teacher_hidden"].to(td), teacher_weight=c["teacher_weight"].to(td))
        got = fused_linear_distill_loss(c["h"].to(sd), c["w"].to(sd), c["y"], **t, chunk_size=3,
                                        reduction="none", backend="cpu")
        v = F.linear(t["teacher_hidden"], t["teacher_weight"]).double()
        want = R.kd_loss(F.linear(c["h"].to(sd), c["w"].to(sd)).double(), v, c["y"],
                         reduction="none")
        assert got.dtype == (torch.float64 if sd == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol)


def test_chunk_sizes_agree(gen):
    """Every chunk size (1, not dividing N, N, > N, default) gives the same loss and gradients, and
    "mean" divides by the valid rows of the whole batch, not per chunk."""
    c = make((23,), 8, 30, torch.float64, gen)
    c["y"][:9] = -100   # whole chunks of ignored rows
    base, up = run(c, "kd", {}, impl="eager", dtype=torch.float64, reduction="mean", gen=gen)
    for chunk in (1, 4, 7, 23, 64, None):
        got, _ = run(c, "kd", {}, impl="fused", dtype=torch.float64, reduction="mean", upstream=up,
                     chunk_size=chunk, backend="cpu")
        check_close(got, base, 1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_single_and_all_ignored(reduction, gen):
    for lead in [(0,), (1,), (2, 0)]:
        c = make(lead, 4, 9, torch.float64, gen)
        want, up = run(c, "dkd", {}, impl="eager", dtype=torch.float64, reduction=reduction, gen=gen)
        got, _ = run(c, "dkd", {}, impl="fused", dtype=torch.float64, reduction=reduction,
                     upstream=up, backend="cpu")
        check_close(got, want, 1e-12)
        assert got["loss"].shape == want["loss"].shape
    c = make((6,), 4, 9, torch.float64, gen)
    c["y"].fill_(-100)   # no valid row: "mean" is 0.0 with zero gradients, never NaN
    got, _ = run(c, "kd", {}, impl="fused", dtype=torch.float64, reduction=reduction, gen=gen,
                 backend="cpu")
    for k, x in got.items():
        assert torch.all(x == 0), k


def test_no_labels_noncontiguous_inputs_and_frozen_head(gen):
    """(S, B, H) hidden transposed from (B, S, H), teacher logits with a class stride != 1, no labels,
    a frozen head (no grad_W work) or frozen hidden states."""
    c = make((4, 5), 6, 11, torch.float64, gen, teacher="logits", labels=False, weights=False)
    c["h"] = c["h"].transpose(0, 1).contiguous().transpose(0, 1)
    c["teacher_logits"] = c["teacher_logits"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert c["h"].stride(-1) == 1 and not c["h"].is_contiguous()
    assert c["teacher_logits"].stride(-1) != 1
    want, up = run(c, "ttm", {}, impl="eager", dtype=torch.float64, reduction="mean", gen=gen)
    got, _ = run(c, "ttm", {}, impl="fused", dtype=torch.float64, reduction="mean", upstream=up,
                 chunk_size=3, backend="cpu")
    check_close(got, want, 1e-12)
    kw = dict(student_bias=c["b"], teacher_logits=c["teacher_logits"], method="ttm", chunk_size=3,
              backend="cpu")
    h = c["h"].clone().requires_grad_(True)
    fused_linear_distill_loss(h, c["w"], **kw).backward(up)
    torch.testing.assert_close(h.grad, want["h"], rtol=1e-12, atol=1e-14)
    w = c["w"].clone().requires_grad_(True)
    fused_linear_distill_loss(c["h"], w, **kw).backward(up)
    torch.testing.assert_close(w.grad, want["w"], rtol=1e-12, atol=1e-14)


def test_teacher_gets_no_gradient_and_no_grad_mode(gen):
    c = make((10,), 4, 7, torch.float64, gen)
    th = c["teacher_hidden"].requires_grad_(True)
    h = c["h"].requires_grad_(True)
    kw = dict(teacher_hidden=th, teacher_weight=c["teacher_weight"], backend="cpu", chunk_size=4)
    loss = fused_linear_distill_loss(h, c["w"], c["y"], **kw)
    loss.backward()
    assert th.grad is None and h.grad is not None
    with torch.no_grad():
        again = fused_linear_distill_loss(h, c["w"], c["y"], **kw)
    assert not again.requires_grad and again.item() == loss.item()


def test_retro_kd_past_student_from_hidden(gen):
    """The past student's head and hidden states give the same loss as its materialised logits."""
    c = make((11,), 4, 9, torch.float64, gen, teacher="logits")
    ph, pw, pb = torch.randn(11, 3, generator=gen).double(), torch.randn(9, 3, generator=gen).double(), \
        torch.randn(9, generator=gen).double()
    kw = dict(teacher_logits=c["teacher_logits"], method="retro_kd", past_weight=0.3, chunk_size=4,
              backend="cpu", reduction="none")
    a = fused_linear_distill_loss(c["h"], c["w"], c["y"], past_student_hidden=ph,
                                  past_student_weight=pw, past_student_bias=pb, **kw)
    b = fused_linear_distill_loss(c["h"], c["w"], c["y"], past_student_logits=F.linear(ph, pw, pb),
                                  **kw)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_retained_graph_backward_twice(gen):
    """The g == 1 shortcut hands the saved buffer to autograd; with a retained graph it must be
    copied, so two backwards accumulate exactly twice the gradient."""
    c = make((9,), 4, 7, torch.float64, gen, teacher="logits")
    h = c["h"].requires_grad_(True)
    loss = fused_linear_distill_loss(h, c["w"], c["y"], teacher_logits=c["teacher_logits"],
                                     backend="cpu", chunk_size=4)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first, rtol=1e-15, atol=0)


@pytest.mark.parametrize("method,reduction", [("kd", "mean"), ("dkd", "sum"), ("jsd", "none"),
                                              ("ls_kd", "none")])
def test_gradcheck_float64(method, reduction, gen):
    c = make((5,), 3, 6, torch.float64, gen)
    y = c["y"]
    y[1] = -100
    leaves = [c["h"], c["w"], c["b"], c["kd_w"], c["ce_w"]]
    leaves = [x.clone().requires_grad_(True) for x in leaves]
    f = lambda h, w, b, kw, cw: fused_linear_distill_loss(  # noqa: E731
        h, w, y, student_bias=b, teacher_hidden=c["teacher_hidden"],
        teacher_weight=c["teacher_weight"], method=method, kd_weight=kw, ce_weight=cw,
        reduction=reduction, chunk_size=2, backend="cpu")
    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernel_in_place_equals_out_of_place(backend, gen, monkeypatch):
    """The contract the chunk loop relies on, per kind: ``grad_z`` aliasing ``z`` gives bit for bit
    the gradient (and row terms) of a separate buffer, on rows of several blocks and a tail."""
    from kdfast._ops import _backend_fn
    if backend == "triton":
        import kdfast._triton
        monkeypatch.setattr(kdfast._triton, "MAX_BLOCK", 16)   # 40 columns: 3 blocks
        assert kdfast._triton.launch_config(40)[0] == 16
    fn = _backend_fn(backend)
    n, v = (3, 300) if backend == "cpu" else (2, 40)   # the interpreter is slow: 2 rows, one
    names = list(CASES) if backend == "cpu" else [     # case per kernel specialisation
        "kd", "wttm", "dkd", "lm", "lm_raw", "ls_kd", "jsd", "jsd_rev", "retro_kd"]
    for name in names:
        method, hyper = CASES[name]
        params = METHODS[method](**hyper)
        z = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 3).float()
        t = (torch.randn(n, v, generator=gen, dtype=torch.float64) * 3).float()
        zp = torch.randn(n, v, generator=gen).float() if method == "retro_kd" else None
        y = torch.tensor([1, -100, v - 1])[-n:]   # a valid last row on both
        w, scale = torch.rand(n) + 0.5, torch.tensor([0.5])
        outs = []
        for alias in (False, True):
            d, ce = torch.empty(n), torch.empty(n)
            zz = z.clone()
            g = zz if alias else torch.empty_like(z)
            fn(zz, t, zp, y, w, w, scale, d, ce, g, None, params.fparams(), params.iparams())
            outs.append((g, d, ce))
        for a, b in zip(*outs):
            assert torch.equal(a, b), name


def test_triton_interpreter_tiny(gen):
    """The Triton kernel (TRITON_INTERPRET=1, set by conftest) with the in-place logits chunk."""
    c = make((5,), 4, 19, torch.float64, gen)
    for method, hyper in [("kd", {"temperature": 2.0}), ("dkd", {})]:
        want, up = run(c, method, hyper, impl="eager", dtype=torch.float64, reduction="mean", gen=gen)
        got, _ = run(c, method, hyper, impl="fused", dtype=torch.float64, reduction="mean",
                     upstream=up, chunk_size=2, backend="triton")
        check_close(got, want, 1e-11)


def test_module_and_backend_torch(gen):
    c = make((7,), 4, 9, torch.float64, gen, teacher="logits", weights=False)
    crit = FusedLinearDistillLoss("jsd", beta=0.2, chunk_size=3, backend="cpu")
    assert "jsd" in repr(crit) and "beta=0.2" in repr(crit)
    got = crit(c["h"], c["w"], c["y"], student_bias=c["b"], teacher_logits=c["teacher_logits"])
    fn = fused_linear_distill_loss(c["h"], c["w"], c["y"], student_bias=c["b"], method="jsd",
                                   beta=0.2, teacher_logits=c["teacher_logits"], backend="torch")
    torch.testing.assert_close(got, fn, rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="teacher_logit"):
        crit(c["h"], c["w"], teacher_logit=c["teacher_logits"])
    with pytest.raises(ValueError, match="hyperparameters"):
        FusedLinearDistillLoss("kd", alpha=1.0)


def test_method_defaults_match_named_losses():
    """The method table mirrors functional.py: same defaults, same kernel parameters."""
    for method, build in METHODS.items():
        named = inspect.signature(getattr(kdfast, f"{method}_loss")).parameters
        for k, p in inspect.signature(build).parameters.items():
            assert named[k].default == p.default, (method, k)


def test_default_chunk_size():
    mib = 1 << 20
    assert default_chunk_size(4096, 32000 * 8) == 1024     # student + teacher chunks, fp32
    assert default_chunk_size(4096, 32000 * 4) == 2080     # teacher given as logits
    assert default_chunk_size(100, 32000 * 8) == 100
    assert default_chunk_size(4096, 10 ** 9) == 32          # floor
    assert default_chunk_size(4096, 1000 * 4, 2 * mib) == 512
    assert default_chunk_size(0, 4) == 1


H, W, Y = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, -100])
T = torch.randn(4, 5)
ERRORS = [  # (kwargs, words in the ValueError)
    (dict(method="kl"), "method must be one of"),
    (dict(alpha=1.0), "takes the hyperparameters"),
    (dict(temperature=0.0), "temperature"),
    (dict(method="jsd", beta=2.0), "beta"),
    (dict(student_weight=torch.randn(5, 4)), "student_weight must be (V, 3)"),
    (dict(student_weight=torch.randn(5, 3, dtype=torch.float64)), "dtype"),
    (dict(student_bias=torch.randn(4)), "student_bias"),
    (dict(teacher_logits=None), "teacher"),
    (dict(teacher_logits=torch.randn(4, 6)), "teacher_logits must have shape"),
    (dict(teacher_hidden=torch.randn(4, 2), teacher_weight=torch.randn(5, 2)), "not both"),
    (dict(teacher_logits=None, teacher_hidden=torch.randn(4, 2), teacher_weight=torch.randn(5, 3)),
     "teacher_weight must have shape"),
    (dict(method="dkd", labels=None), "needs labels"),
    (dict(past_student_logits=torch.randn(4, 5)), "retro_kd"),
    (dict(method="retro_kd"), "past_student"),
    (dict(labels=torch.tensor([0, 1, 5, 0])), "labels must be in [0, 5)"),
    (dict(labels=torch.tensor([0, 1, 2])), "labels must have the leading shape"),
    (dict(reduction="avg"), "reduction"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(backend="cuda"), "backend"),
    (dict(kd_weight=torch.ones(3)), "kd_weight"),
]


@pytest.mark.parametrize("kwargs,words", ERRORS)
def test_value_errors(kwargs, words):
    args = dict(student_hidden=H, student_weight=W, labels=Y, teacher_logits=T) | kwargs
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        fused_linear_distill_loss(**args)
