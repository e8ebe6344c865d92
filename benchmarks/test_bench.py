"""Quick benchmark check (``make bench-quick`` = ``pytest -q benchmarks``), pytest-benchmark based.

Small shapes, fused (``kdfast.<loss>_loss(backend="auto")``) vs eager (``kdfast.reference``) fwd+bwd,
grouped so pytest-benchmark prints them side by side. The only assertions are about correctness
(fused == eager on the very inputs that are benchmarked) and about which backend was measured;
wall-clock ratios are never asserted (2 shared cores are too noisy). The full sweep is
``python -m benchmarks.bench``. ``pytest -q tests`` does not collect this directory.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks.bench import DTYPES, LOSSES, TOL, fused_backend, loss_fns, make_call, make_inputs

torch.set_num_threads(min(2, os.cpu_count() or 1))

CASES = [  # (loss, N, C, dtype)
    ("kd", 256, 1000, "fp32"),
    ("kd", 512, 8192, "fp32"),
    ("ttm", 256, 1000, "fp32"),
    ("wttm", 256, 1000, "fp32"),
    ("dkd", 256, 1000, "fp32"),
    ("jsd", 256, 1000, "fp32"),
    ("kd", 256, 8192, "bf16"),
]


def _id(case):
    loss, n, c, dt = case
    return f"{loss}-{n}x{c}-{dt}"


def test_fused_backend_is_a_kernel():
    """The fused timings below mean something only if backend="auto" picks a kernel, not the eager
    reference. KDFAST_BENCH_ALLOW_FALLBACK=1 turns this into a skip (harness development)."""
    be = fused_backend("cpu")
    if be not in ("cpu", "triton"):
        msg = (f"kdfast resolves backend='auto' to {be!r} on CPU tensors: the C++ extension "
               "kdfast._C is not built (make build); fused numbers would be the eager reference")
        if os.environ.get("KDFAST_BENCH_ALLOW_FALLBACK") == "1":
            pytest.skip(msg)
        pytest.fail(msg)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fused_matches_eager(case):
    """Loss and gradient of fused vs eager on the benchmarked inputs (same seed as the timings)."""
    loss, n, c, dt = case
    dtype = DTYPES[dt]
    fns = loss_fns(loss)
    z, v, extra = make_inputs(loss, n, c, dtype, "cpu", LOSSES[loss][0])
    out = {}
    for impl in ("fused", "eager"):
        step, leaves = make_call(fns[impl], "fwdbwd", z, v, extra)
        val = step()
        out[impl] = (val.detach().double(), leaves[0].grad.detach().double())
    (lf, gf), (le, ge) = out["fused"], out["eager"]
    tol = TOL[dtype]
    assert torch.isfinite(lf) and torch.isfinite(gf).all()
    loss_err = float((lf - le).abs() / le.abs().clamp(min=1e-12))
    grad_err = float((gf - ge).abs().max() / ge.abs().max().clamp(min=1e-30))
    assert loss_err <= tol, f"loss: fused {float(lf)} vs eager {float(le)} (rel err {loss_err:.2e})"
    assert grad_err <= (tol if dtype == torch.float32 else 4 * tol), f"grad rel err {grad_err:.2e}"


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_bench(benchmark, case, impl):
    """fwd+bwd of one implementation (z requires grad, z.grad reset before every call)."""
    loss, n, c, dt = case
    fns = loss_fns(loss)
    z, v, extra = make_inputs(loss, n, c, DTYPES[dt], "cpu", LOSSES[loss][0])
    step, _ = make_call(fns[impl], "fwdbwd", z, v, extra)
    step()  # warm-up (extension load, thread pool)
    benchmark.group = f"fwd+bwd {_id(case)}"
    benchmark.extra_info.update(loss=loss, N=n, C=c, dtype=dt, impl=impl,
                                backend=fused_backend("cpu") if impl == "fused" else "eager")
    val = benchmark.pedantic(step, rounds=7, iterations=1, warmup_rounds=1)
    assert torch.isfinite(val)
