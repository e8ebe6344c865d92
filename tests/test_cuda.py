"""The CUDA test cases: the compiled Triton kernels on CUDA tensors (``make gpu`` runs them).

Skipped unless a CUDA device is there and Triton compiles (TRITON_INTERPRET unset or 0:
tests/conftest.py sets it to 1 when it is unset, so run them as ``make gpu`` does, with
``TRITON_INTERPRET=0 python3 -m pytest tests/test_cuda.py``). On a machine without a GPU they are
collected and skipped (tests/test_cuda_collect.py checks that).

1. Every backend test that runs under the Triton interpreter is collected here again, unchanged:
   all of tests/test_triton.py and tests/test_triton_multi.py, and the Triton cases of
   tests/test_topk.py, tests/test_multi_teacher.py and tests/test_fused_linear.py (their ``backend``
   parametrisation cut to "triton"), named ``test_<module>__<test>``. They run with CUDA as the
   default device and a CUDA generator (the fixtures below): the same inputs, assertions and
   tolerances, on the compiled kernels. The interpreter cases stay where they are.
2. What the interpreter cannot afford: C = 32000 and 131072 with thousands of rows (rows of 4 and 16
   blocks), every loss of the family (and top-k, multi-teacher, fused linear) against the float64
   reference; 64-bit offsets (N * C > 2^31 elements), for each kernel kind.
3. What only a GPU shows: no host synchronisation in forward or backward
   (``torch.cuda.set_sync_debug_mode("error")``), CUDA-graph capture and replay of a training step,
   ``torch.compile(fullgraph=True)`` with inductor, a non-default stream, autocast.

The tests that need tens of GB run in two pytest-xdist groups (one worker each) under
``--dist loadgroup`` (``make gpu``), so that no more than two of them share the GPU at a time.
"""
import copy
import importlib.util
import os
import types

import pytest
import torch

import kdfast
import test_fused_linear as FL
import test_multi_teacher
import test_topk
import test_triton
import test_triton_multi
from conftest import FAMILY, LOSSES, low_precision_bound, max_err, rand_labels, rand_logits, rand_weights, run_case, scale_of
from test_triton import small_block  # noqa: F401  (a fixture; test_triton_multi's sets the same MAX_BLOCK = 16)

R = kdfast.reference
INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y")
CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not CUDA or INTERPRET,
    reason="no CUDA device (make gpu runs these on a GPU)" if not CUDA else
    "TRITON_INTERPRET=1: these cases are for the compiled kernels (make gpu sets TRITON_INTERPRET=0)")


def _group(name) -> list:
    """pytest-xdist's group mark, as a list: empty where xdist is not installed (no unknown mark)."""
    return [pytest.mark.xdist_group(name)] if importlib.util.find_spec("xdist") else []


MEM_A, MEM_B = _group("gpu-memory-a"), _group("gpu-memory-b")   # <= ~35 GB each


def marked(marks):
    """Decorator applying a list of marks."""
    def apply(fn):
        for m in marks:
            fn = m(fn)
        return fn
    return apply


@pytest.fixture(autouse=True)
def _cuda_default_device():
    """Factory calls without a device (torch.randn, torch.tensor, ...) make CUDA tensors: the ported
    tests run unchanged on the GPU."""
    with torch.device("cuda"):
        yield


@pytest.fixture
def gen():
    """tests/conftest.py's ``gen`` on the GPU (a CPU generator cannot draw CUDA tensors)."""
    g = torch.Generator(device="cuda")
    g.manual_seed(torch.seed() % (2**31))
    print("generator seed:", g.initial_seed())
    return g


# ----------------------------------------------------------------------------- 1. the interpreter's cases
#: tests of those modules with no CUDA twin: no tensor reaches a kernel (launch configurations), or
#: ahead-of-time compiles that need no GPU (they run under make test)
NO_DEVICE = {"test_launch_config", "test_launch_config_multi", "test_aot_multi_teacher_no_spills_128bit"}
ALL_TRITON = {test_triton.__name__, test_triton_multi.__name__}   # every test there is a Triton test
SOURCES = (test_triton, test_triton_multi, test_topk, test_multi_teacher, FL)


def _triton_marks(fn):
    """``fn``'s marks with its ``backend`` parametrisation cut to "triton"; None if ``fn`` is not a
    Triton test (no "triton" backend case, not in ALL_TRITON, "triton" not in its name)."""
    marks, is_triton = [], fn.__module__ in ALL_TRITON or "triton" in fn.__name__
    for m in getattr(fn, "pytestmark", []):
        if m.name == "parametrize" and "backend" in m.args[0].replace(" ", "").split(","):
            names = m.args[0].replace(" ", "").split(",")
            i = names.index("backend")
            keep = [p for p in m.args[1] if (p[i] if len(names) > 1 else p) == "triton"]
            if not keep:
                return None
            m, is_triton = pytest.mark.parametrize(m.args[0], keep, **m.kwargs).mark, True
        marks.append(m)
    return marks if is_triton else None


def _port(module) -> list:
    """Collect ``module``'s Triton tests in this module too (as ``test_<module>__<test>``)."""
    prefix, names = module.__name__.removeprefix("test_"), []
    for name, fn in list(vars(module).items()):
        if not name.startswith("test_") or not isinstance(fn, types.FunctionType) or name in NO_DEVICE \
                or fn.__module__ != module.__name__:
            continue
        marks = _triton_marks(fn)
        if marks is None:
            continue
        twin = types.FunctionType(fn.__code__, fn.__globals__, f"test_{prefix}__{name[5:]}", fn.__defaults__,
                                  fn.__closure__)
        twin.__dict__.update(fn.__dict__)
        twin.pytestmark, twin.__doc__ = marks, fn.__doc__
        globals()[twin.__name__] = twin
        names.append(twin.__name__)
    return names


PORTED = [name for module in SOURCES for name in _port(module)]

# ----------------------------------------------------------------------------- 2. shapes of real use
FAMILY_ALL = {**LOSSES, **FAMILY}   # name -> (fused, reference, hyperparameters)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
LARGE = [pytest.param((4096, 32000), marks=MEM_B, id="4096x32000"),
         pytest.param((2048, 131072), marks=MEM_A, id="2048x131072")]


def _no_worse_than_eager(runner, fused, ref, tensors, dtype, gen, **kw):
    """``runner`` (a test module's forward + backward helper) on the fused loss (backend triton),
    the eager reference in ``dtype`` and in float64: the fused error within tests/conftest.py's
    bound from eager's."""
    got, up = runner(fused, *tensors, gen=gen, backend="triton", **kw)
    eager, _ = runner(ref, *tensors, upstream=up, **kw)
    wide = [t.double() if t is not None and t.is_floating_point() else t for t in tensors]
    want, _ = runner(ref, *wide, upstream=up, **kw)
    for key in want:
        assert torch.isfinite(got[key]).all(), key
        bound = low_precision_bound(max_err(eager[key], want[key]), dtype, scale_of(want[key]))
        assert max_err(got[key], want[key]) <= bound, (key, max_err(got[key], want[key]), bound)


@pytest.mark.parametrize("shape", LARGE)
@DTYPES
@pytest.mark.parametrize("name", list(FAMILY_ALL))
def test_large_rows_against_float64(name, dtype, shape, gen):
    """Rows of 4 and 16 blocks of 8192 columns, thousands of them; labels with ignored rows, per-row
    weights with gradients, the teacher's gradient: every loss of the family."""
    fused, ref, hyper = test_triton.bind(name, shape, dtype, gen)
    z, v = rand_logits(shape, dtype, gen=gen), rand_logits(shape, dtype, gen=gen)
    labels = rand_labels(shape[:-1], shape[-1], gen=gen)
    _no_worse_than_eager(run_case, fused, ref, (z, v, labels), dtype, gen, teacher_grad=True,
                         weights=rand_weights(shape[:-1], gen=gen), **hyper)


@marked(MEM_B)
@DTYPES
def test_topk_large_rows_against_float64(dtype, gen):
    z = rand_logits((4096, 32000), dtype, gen=gen)
    lp, idx = test_topk.sparse_teacher((4096,), 32000, 64, gen, pad=3)
    labels = rand_labels((4096,), 32000, gen=gen)
    _no_worse_than_eager(test_topk.run, kdfast.topk_kd_loss, R.topk_kd_loss, (z, lp.to(dtype), idx, labels),
                         dtype, gen, temperature=2.0)


@marked(MEM_B)
@DTYPES
@pytest.mark.parametrize("method", ["kd", "dkd", "jsd"])
def test_multi_teacher_large_rows_against_float64(method, dtype, gen):
    """3 teachers (a padded fourth slot) at 2048 x 32000, per-row weights and the teachers' gradients,
    against the sum of the single-teacher references."""
    shape, hyper = (2048, 32000), FAMILY_ALL[method][2]
    z, teachers = rand_logits(shape, dtype, gen=gen), rand_logits((3, *shape), dtype, gen=gen)
    labels = rand_labels(shape[:-1], shape[-1], gen=gen)
    fused = lambda z, t, y, **kw: kdfast.multi_teacher_loss(method, z, t, y, **kw)  # noqa: E731
    ref = lambda z, t, y, **kw: kdfast.multi_teacher_loss(method, z, t, y, backend="torch", **kw)  # noqa: E731
    _no_worse_than_eager(run_case, fused, ref, (z, teachers, labels), dtype, gen, teacher_grad=True,
                         weights=rand_weights(shape[:-1], gen=gen), **hyper)


@marked(MEM_B)
@DTYPES
@pytest.mark.parametrize("method", ["kd", "dkd", "jsd"])
def test_fused_linear_large_against_float64(method, dtype, gen):
    """4096 tokens, hidden 256, vocabulary 32000, teacher as hidden states + head, default chunks;
    bf16 gets twice eager's error (tests/test_fused_linear.py: per-chunk grad_W products)."""
    name, hyper = FL.CASES[method]
    c = FL.make((4096,), 256, 32000, torch.float64, gen, teacher="hidden")
    want, up = FL.run(c, name, hyper, impl="eager", dtype=torch.float64, reduction="mean", gen=gen)
    eager, _ = FL.run(c, name, hyper, impl="eager", dtype=dtype, reduction="mean", upstream=up)
    got, _ = FL.run(c, name, hyper, impl="fused", dtype=dtype, reduction="mean", upstream=up, backend="triton")
    k_eager = 1 if dtype == torch.float32 else 2
    for k in want:
        bound = low_precision_bound(k_eager * max_err(eager[k], want[k]), dtype, scale_of(want[k]))
        assert max_err(got[k], want[k]) <= bound, (k, max_err(got[k], want[k]), bound)


@pytest.fixture(scope="module", params=[131072, 131071], ids=["C131072-vec8", "C131071-vec1"])
def huge(request):
    """bf16 student and teacher rows with N * C > 2^31 elements (4.3 GB each): the last rows start
    past 2^31 elements. C = 131071 makes every access scalar (the kernels then take strides in
    elements, not in 16-byte vectors)."""
    c = request.param
    n = 2**31 // c + 3
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n, c, generator=g, device="cuda", dtype=torch.bfloat16).mul_(3)
    v = torch.randn(n, c, generator=g, device="cuda", dtype=torch.bfloat16).mul_(3)
    y = torch.randint(0, c, (n,), generator=g, device="cuda")
    yield z, v, y
    del z, v, y
    torch.cuda.empty_cache()


def _last_rows_match(fn, full, rows, k=3):
    """``fn`` on whole tensors vs on copies of their last ``k`` rows (small offsets): the per-row
    losses and the gradients of the tensors in ``rows`` (indices into ``full``) agree."""
    leaves = [t.detach().requires_grad_(i in rows) if t is not None and t.is_floating_point() else t
              for i, t in enumerate(full)]
    loss = fn(*leaves)
    loss.backward(torch.ones_like(loss))
    tail = [t[..., -k:, :].detach().clone().requires_grad_(i in rows) if t is not None and t.is_floating_point()
            else (t[..., -k:, :] if t is not None and t.dim() > 1 else t[-k:]) if t is not None else None
            for i, t in enumerate(full)]
    small = fn(*tail)
    small.backward(torch.ones_like(small))
    assert torch.isfinite(loss[-k:]).all()
    torch.testing.assert_close(loss[-k:], small, rtol=1e-6, atol=1e-6)
    for i in rows:
        torch.testing.assert_close(leaves[i].grad[..., -k:, :], tail[i].grad, rtol=1e-6, atol=1e-6)


@marked(MEM_B)
@pytest.mark.parametrize("name", ["kd", "dkd", "lm", "ls_kd", "jsd"])   # each kind stores its own gradients
def test_64bit_offsets(name, huge):
    fused, _, hyper = FAMILY_ALL[name]
    fn = lambda z, v, y: fused(z, v, y, reduction="none", backend="triton", **hyper)  # noqa: E731
    _last_rows_match(fn, huge, rows=(0, 1))


@marked(MEM_B)
def test_64bit_offsets_topk(huge):
    z, v, y = huge
    lp, idx = torch.log_softmax(v[:, :4096].float(), -1).topk(32, dim=-1)   # any 32 classes < 4096
    fn = lambda z, lp, idx, y: kdfast.topk_kd_loss(z, lp, idx, y, reduction="none")  # noqa: E731
    _last_rows_match(fn, (z, lp, idx, y), rows=(0,))


@marked(MEM_B)
def test_64bit_offsets_multi_teacher(huge):
    """3 stacked teachers of 2^31 / (2 C) rows: the third starts past 2^31 elements (its gradient
    too)."""
    z, v, y = huge
    c = z.shape[1]
    n = 2**31 // (2 * c) + 2
    teachers = torch.empty(3, n, c, dtype=torch.bfloat16)
    teachers[0], teachers[1], teachers[2] = v[:n], v[-n:], z[-n:]
    fn = lambda z, t, y: kdfast.multi_teacher_loss("kd", z, t, y, reduction="none", temperature=2.0)  # noqa: E731
    _last_rows_match(fn, (z[:n], teachers, y[:n]), rows=(0, 1))


# ----------------------------------------------------------------------------- 3. what only a GPU shows
N_STEP, H_STEP, C_STEP, M_STEP, K_STEP = 64, 32, 32000, 2, 16   # rows of 4 blocks


def _batch(gen):
    """Inputs of a distillation step: hidden states, teacher logits (dense, top-k, M of them),
    labels with ignored rows, per-row weights."""
    v = rand_logits((N_STEP, C_STEP), torch.float32, gen=gen)
    lp, idx = torch.log_softmax(v, -1).topk(K_STEP, dim=-1)
    return {"x": torch.randn(N_STEP, H_STEP, generator=gen), "v": v, "lp": lp, "idx": idx,
            "vs": rand_logits((M_STEP, N_STEP, C_STEP), torch.float32, gen=gen),
            "y": rand_labels((N_STEP,), C_STEP, gen=gen),
            "w": torch.rand(N_STEP, generator=gen) + 0.5}


STEPS = {   # name -> loss of (student head, batch); backend "auto": Triton on CUDA tensors
    "kd": lambda m, b: kdfast.kd_loss(m(b["x"]), b["v"], b["y"], temperature=2.0),
    "kd_no_labels": lambda m, b: kdfast.kd_loss(m(b["x"]), b["v"]),   # mean over all rows
    "dkd_sum": lambda m, b: kdfast.dkd_loss(m(b["x"]), b["v"], b["y"], reduction="sum"),
    "jsd_none_weights": lambda m, b: kdfast.jsd_loss(m(b["x"]), b["v"], b["y"], beta=0.3, kd_weight=b["w"],
                                                     reduction="none").sum(),
    "topk": lambda m, b: kdfast.topk_kd_loss(m(b["x"]), b["lp"], b["idx"], b["y"], temperature=2.0),
    "multi_teacher": lambda m, b: kdfast.multi_teacher_loss("ls_kd", m(b["x"]), b["vs"], b["y"],
                                                            teacher_weights=[0.3, 0.7]),
    "fused_linear": lambda m, b: kdfast.fused_linear_distill_loss(
        b["x"], m.weight, b["y"], student_bias=m.bias, teacher_logits=b["v"], method="kd", chunk_size=24),
}


def _head(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(H_STEP, C_STEP, device="cuda")


def _grads(m):
    return [p.grad.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("name", list(STEPS))
def test_no_host_sync(name, gen):
    """Forward and backward never wait for the GPU (no .item(), no host copy, no nonzero)."""
    m, b, step = _head(), _batch(gen), STEPS[name]
    step(m, b).backward()   # warm-up: kernel compilation, cuBLAS handles
    m.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(m, b).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", list(STEPS))
def test_cuda_graph_training_step(name, gen):
    """A training step (loss, backward, SGD) captured once in a CUDA graph and replayed on new
    batches copied into its inputs: the same losses and parameters as the eager steps."""
    m, step = _head(), STEPS[name]
    batches = [_batch(gen) for _ in range(4)]
    static = {k: t.clone() for k, t in batches[0].items()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):   # warm-up on a side stream, as torch.cuda.graph requires
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            step(m, static).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    ref = copy.deepcopy(m)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = step(m, static)
        loss.backward()
        opt.step()
    for b in batches[1:]:
        for k, t in b.items():
            static[k].copy_(t)
        graph.replay()
        ref_opt.zero_grad(set_to_none=True)
        want = step(ref, b)
        want.backward()
        ref_opt.step()
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        for p, q in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in STEPS if n != "fused_linear"])   # (an autograd.Function with
def test_compile_fullgraph_inductor(name, gen):                              # a chunk loop, not a custom op)
    """torch.compile(fullgraph=True) of a training step's loss (inductor, CUDA): no graph break
    through the custom ops, the eager values and gradients."""
    torch._dynamo.reset()
    m, b, step = _head(), _batch(gen), STEPS[name]
    compiled = torch.compile(lambda b: step(m, b), fullgraph=True)
    got = compiled(b)
    got.backward()
    got_g = _grads(m)
    m.zero_grad(set_to_none=True)
    want = step(m, b)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, e in zip(got_g, _grads(m)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(STEPS))
def test_non_default_stream(name, gen):
    """The kernels run on the current stream: inputs produced on a side stream behind 50 ms of
    spinning give the default stream's results (a launch on another stream would read them early)."""
    m, b, step = _head(), _batch(gen), STEPS[name]
    want = step(m, b)
    want.backward()
    want_g = _grads(m)
    m.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(100_000_000)   # ~50 ms at 2 GHz
        late = {k: t.clone() for k, t in b.items()}
        got = step(m, late)
        got.backward()
        got = got.detach().clone()
        got_g = _grads(m)
    s.synchronize()
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    for a, e in zip(got_g, want_g):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_autocast_bf16(gen):
    """Logits from a head under bf16 autocast: the loss is float32, close to float64 on those logits."""
    m, b = _head(), _batch(gen)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z = m(b["x"])
        assert z.dtype == torch.bfloat16
        loss = kdfast.kd_loss(z, b["v"], b["y"])
    assert loss.dtype == torch.float32
    loss.backward()
    want = R.kd_loss(z.detach().double(), b["v"].double(), b["y"])
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
