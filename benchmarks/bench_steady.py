"""Steady state of a training loop: kd + CE fwd+bwd step after step, the gradient freed each step.

    python -m benchmarks.bench_steady                 # 4096 x 32000 fp32, 20 steps (~2 min)
    python -m benchmarks.bench_steady --quick         # 1024 x 8000, 8 steps
    python -m benchmarks.bench_steady --json out.json

A fused fwd+bwd that takes ~80 ms in a quiet loop took 130-440 ms on the 2-core dev machine when
other large allocations (an eager loss's temporaries) had run before it in the same process: a fresh
(N, C) gradient faults its pages in on first touch, and PyTorch's CPU allocator caches nothing. kdfast
keeps its gradient buffers in a pool of its own (``csrc/grad_pool.cpp``, ``KDFAST_GRAD_POOL_MB``).

Each condition runs in a fresh process (``harness.in_fresh_process``), ``THREADS`` threads:

- ``quiet``: the inputs, then the loop;
- ``after eager``: one eager kd + CE fwd+bwd of the same shape first (its (N, C) temporaries
  allocated and freed), then the loop;

each with the pool on (``fused``) and off (``fused, no pool``: ``pool_set_cap(0)``, every step
allocates its gradient). A step is ``z.grad = None; kd_loss(z, v, y, temperature=3).backward()`` (as
``zero_grad(set_to_none=True)`` does); each row keeps every step's time, the first (the fresh call),
the best, the median and the worst of the steps after the first, and their ratios to the best.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import harness as H  # noqa: E402

SUITE = "steady"
FULL = dict(N=4096, C=32000, steps=20)
QUICK = dict(N=1024, C=8000, steps=8)
T = 3.0     # kd's benchmark temperature (the losses suite's case)
CONDITIONS = ("quiet", "after eager")
IMPLS = ("fused", "fused, no pool")


def _loop(n, c, steps, condition, pool, threads):
    """In a fresh process: the per-step times (s) of the loop."""
    torch.set_num_threads(threads)
    import kdfast
    from kdfast import _cpu, reference
    if not pool:
        _cpu.load().pool_set_cap(0)
    g = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(n, c, generator=g)).requires_grad_()
    v = 2 * torch.randn(n, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    zs = z.detach()[:4].clone().requires_grad_()   # lazy initialisation on a tiny input
    kdfast.kd_loss(zs, v[:4], y[:4], temperature=T).backward()
    if condition == "after eager":
        reference.kd_loss(z, v, y, temperature=T).backward()
    times = []
    for _ in range(steps):
        z.grad = None
        t0 = time.perf_counter()
        kdfast.kd_loss(z, v, y, temperature=T).backward()
        times.append(time.perf_counter() - t0)
    return {"times_s": times, "pool": _cpu.pool_stats()}


def run(n, c, steps, path=None, progress=True) -> H.Results:
    threads = torch.get_num_threads()
    res = H.Results(SUITE, path, H.machine("cpu", ROOT), {"T": T, "steps": steps})
    for condition in CONDITIONS:
        case = {"loss": "kd", "labels": True, "mode": "loop", "condition": condition, "N": n, "C": c,
                "dtype": "fp32", "steps": steps}
        for impl in IMPLS:
            r = H.in_fresh_process(_loop, n, c, steps, condition, impl == "fused", threads)
            if "error" in r:
                res.add(case, impl, "error", reason=r["error"])
                continue
            ms = [t * 1e3 for t in r["times_s"]]
            rest = ms[1:]
            best, med, worst = min(rest), statistics.median(rest), max(rest)
            res.add(case, impl, steps_ms=ms, first_ms=ms[0], best_ms=best, ms=med, max_ms=worst,
                    median_over_best=med / best, max_over_best=worst / best, pool=r["pool"])
            if progress:
                H.log(f"{condition}, {impl}: first {ms[0]:.0f} ms, best {best:.0f}, median {med:.0f}, "
                      f"max {worst:.0f} ({worst / best:.2f}x best)")
    res.doc["extra"]["loadavg_end"] = H.loadavg()
    res.save()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help=f"default {H.THREADS}")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    H.setup_cpu(args.threads)
    shape = QUICK if args.quick else FULL
    res = run(shape["N"], shape["C"], shape["steps"], path=args.json)
    from benchmarks import report
    print("\n".join(report.suite_tables(res.doc)))


if __name__ == "__main__":
    main()
