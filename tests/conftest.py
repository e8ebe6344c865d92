"""Shared test helpers. The Triton kernels run under the interpreter on CPU tensors here, so
TRITON_INTERPRET must be set before anything imports triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import kdfast  # noqa: E402
from kdfast._spec import Kind  # noqa: E402
from kdfast.losses import REGISTRY  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Every fused backend a test runs: the C++ extension must be built (make test builds it) and
# Triton runs on CPU tensors under its interpreter. A missing backend is an error, not a skip.
BACKENDS = ["cpu", "triton"]

# The losses under test, from kdfast.losses.REGISTRY: each loss's cases (named hyperparameter sets
# that together reach every kernel specialisation of the loss). A loss declared there is tested here.
#: case name -> (method, hyperparameters), every case of every loss of a dense teacher
CASES = {case: (name, dict(hyper)) for name, loss in REGISTRY.items() if loss.dense
         for case, hyper in loss.cases.items()}
CORE = ("kd", "ttm", "wttm")   # the single-softmax KL losses test_core.py runs everything on


def _entry(case):
    name, hyper = CASES[case]
    return REGISTRY[name].function, REGISTRY[name].reference, hyper


def _takes_masked_teacher(case) -> bool:
    """The case's loss is finite with -inf teacher logits (classes of probability 0): not for a
    kind that takes the row's mean / std (LM, LS), nor for the reverse KL (KL(q || p) is +inf where
    p = 0 < q, in the reference too)."""
    name, hyper = CASES[case]
    p = REGISTRY[name].params(**hyper)
    return p.kind not in (Kind.LM, Kind.LS) and not (p.kind == Kind.KL and p.reverse)


#: the cases that get no -inf teacher logits (derived from their kernel parameters)
NO_NEG_INF = tuple(case for case in CASES if not _takes_masked_teacher(case))

# name -> (fused, reference, hyperparameters used by the parametrised tests)
LOSSES = {case: _entry(case) for case, (name, _) in CASES.items() if name in CORE}
# the rest of the family, same layout; retro_kd's past logits are bound per test
FAMILY = {case: _entry(case) for case, (name, _) in CASES.items() if name not in CORE}


def rand_logits(shape, dtype=torch.float64, scale=3.0, gen=None):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def rand_labels(lead, c, ignore_frac=0.25, ignore_index=-100, gen=None):
    y = torch.randint(0, c, lead, generator=gen)
    drop = torch.rand(lead, generator=gen) < ignore_frac
    return y.masked_fill(drop, ignore_index)


def rand_weights(lead, dtype=torch.float64, gen=None):
    """Per-row (kd_weight, ce_weight) in [0.5, 1.5)."""
    return tuple((torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5).to(dtype) for _ in range(2))


def run_case(fn, z, v, labels=None, *, teacher_grad=False, weights=None, upstream=None,
             reduction="none", gen=None, **kw):
    """Forward + backward with a random upstream gradient (``upstream``, drawn from ``gen`` if None).
    ``weights``: None (floats 1.0) or a (kd_weight, ce_weight) pair of tensors that get gradients.
    Returns (dict of float64 copies of the loss and gradients, upstream). ``z``/``v`` are used as
    given (dtype, strides)."""
    z = z.detach().requires_grad_(True)
    v = v.detach().requires_grad_(teacher_grad)
    kd_w = ce_w = 1.0
    if weights is not None:
        kd_w, ce_w = (w.detach().clone().requires_grad_(True) for w in weights)
    loss = fn(z, v, labels, kd_weight=kd_w, ce_weight=ce_w, reduction=reduction, **kw)
    if upstream is None:
        upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
    loss.backward(upstream.to(loss.dtype))
    out = {"loss": loss.detach().double(), "z": z.grad.double()}
    if teacher_grad:
        out["v"] = v.grad.double()
    if weights is not None:
        out["kd_w"], out["ce_w"] = kd_w.grad.double(), ce_w.grad.double()
    return out, upstream


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    both_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    return float((a - b).abs().masked_fill(both_inf, 0).max())


def scale_of(t):
    return float(t.abs().max()) if t.numel() else 0.0


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(torch.seed() % (2**31))   # fresh inputs each run; the seed is in the repr below
    print("generator seed:", g.initial_seed())
    return g


# The fused CPU kernel's fp32 arithmetic: exponentials by ATen's exp_u20 (<= 20 ulp, chosen for
# speed: the 1-ulp Sleef exp made kd 4096 x 32000 fwd+bwd ~45% slower). A fused low-precision result
# may differ from float64 by twice eager's own error, plus the rounding to its dtype (4 eps), plus
# this many fp32 ulps of the value's scale.
KERNEL_FP32_ULPS = 20


def low_precision_bound(eager_err, dtype, scale):
    """The bound of the ``*_no_worse_than_eager`` tests (see KERNEL_FP32_ULPS)."""
    return (2 * eager_err + 4 * torch.finfo(dtype).eps * scale
            + KERNEL_FP32_ULPS * torch.finfo(torch.float32).eps * scale)
