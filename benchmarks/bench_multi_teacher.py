"""Multi-teacher distillation: the fused multi-teacher kernel vs one fused call per teacher vs eager.

    python -m benchmarks.bench_multi_teacher            # N=4096, C=32000, fp32 (minutes)
    python -m benchmarks.bench_multi_teacher --quick    # N=1024, C=8000
    python -m benchmarks.bench_multi_teacher --json out.json

One fwd+bwd of ``kdfast.multi_teacher_loss(method, z, teachers, labels)`` (M teachers as one (M, N, C)
tensor, equal weights, labels with CE), the student requires grad. Cases: ``PLAN`` (method, M, whether
eager runs), ``{"loss": method, "mode": "fwdbwd", "M", "N", "C", "dtype", "labels": True}``;
implementations:

- ``fused``: the multi-teacher kernel (``kdfast::multi_distill``): the student row read once per pass;
- ``per-teacher``: the same loss as M calls of the single-teacher fused kernel summed by autograd
  (what ``multi_teacher_loss`` did before the multi-teacher kernel);
- ``eager``: M calls of the eager reference (``backend="torch"``), kd rows only (a ``skipped`` row
  elsewhere), timed in one round only.

Measured with ``benchmarks/harness.py``: a warm-up (one full-size step of each fused implementation,
a tiny one of eager), ``reps`` interleaved rounds (``harness.time_interleaved``); peak memory of one
step in a fresh process (``VmHWM - RSS``), the gradient left in ``.grad`` included.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import harness as H  # noqa: E402

SUITE = "multi_teacher"
FULL = dict(N=4096, C=32000)
QUICK = dict(N=1024, C=8000)
# (method, M, run eager): eager dkd / jsd with 4 teachers take 1-2 minutes a step here and their
# memory process needed > 20 GB (OOM-killed): their single-teacher eager numbers are in the main table
PLAN = [("kd", 1, True), ("kd", 2, True), ("kd", 4, True), ("dkd", 4, False), ("jsd", 4, False)]
NO_EAGER = "not run: 1-2 min a step and > 20 GB peak here (single-teacher eager: the losses suite)"
IMPLS = ("fused", "per-teacher", "eager")
HYPER = {"kd": {"temperature": 2.0}, "dkd": {"temperature": 2.0}, "jsd": {"beta": 0.5}}


def _inputs(n, c, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n, c, generator=g)
    t = 2 * torch.randn(m, n, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return z, t, y


def _step_fn(impl, method):
    import kdfast
    from kdfast import multi_teacher as MT
    hyper = HYPER[method]
    if impl == "fused":
        return lambda z, t, y: kdfast.multi_teacher_loss(method, z, t, y, backend="cpu", **hyper)
    if impl == "per-teacher":
        fn = MT._LOSSES[method].function
        return lambda z, t, y: MT._unfused(fn, z, list(t.unbind(0)), [1.0 / t.shape[0]] * t.shape[0], y,
                                           1.0, 1.0, "mean", None, {"backend": "cpu", **hyper})
    return lambda z, t, y: kdfast.multi_teacher_loss(method, z, t, y, backend="torch", **hyper)


def _mem_probe(impl, method, n, c, m, threads):
    """In a fresh process: the peak of one step beyond its inputs."""
    torch.set_num_threads(threads)
    z, t, y = _inputs(n, c, m)
    fn = _step_fn(impl, method)
    zz = z.clone().requires_grad_()
    fn(zz[:4], t[:, :4], y[:4]).backward()   # warm-up (extension, thread pool)
    zz.grad = None
    return {"peak_bytes": H.peak_bytes(lambda: fn(zz, t, y).backward())}


def run(n, c, reps, plan=PLAN, mem=True, path=None, progress=True) -> H.Results:
    threads = torch.get_num_threads()
    res = H.Results(SUITE, path, H.machine("cpu", ROOT), {"hyper": HYPER, "reps": reps})
    for method, m, with_eager in plan:
        case = {"loss": method, "mode": "fwdbwd", "M": m, "N": n, "C": c, "dtype": "fp32", "labels": True}
        z, t, y = _inputs(n, c, m)
        impls = IMPLS if with_eager else IMPLS[:2]
        leaf = z.clone().requires_grad_()
        fns = {k: _step_fn(k, method) for k in impls}

        def step(f):
            def s():
                leaf.grad = None
                loss = f(leaf, t, y)
                loss.backward()
                return loss
            return s
        steps = {k: step(fns[k]) for k in impls}
        est = {}
        for k in impls:    # warm-up (the fused ones at full size: page cache, THP, thread pool)
            if k == "eager":
                fns[k](leaf[:4], t[:, :4], y[:4]).backward()
                est[k] = float("inf")     # slow: one call in one round
            else:
                est[k] = H.first_call(steps[k])[1]
        timed = H.time_interleaved(steps, estimates=est, reps=reps, limit={"eager": 1})
        leaf.grad = None
        for k in IMPLS:
            if k not in impls:
                res.add(case, k, "skipped", reason=NO_EAGER)
                continue
            row = dict(timed[k])
            if mem:
                p = H.in_fresh_process(_mem_probe, k, method, n, c, m, threads)
                if "error" in p:
                    row["peak_error"] = p["error"]
                else:
                    row.update(peak_bytes=p["peak_bytes"], peak_method=H.PEAK_METHOD["cpu"])
            res.add(case, k, **row)
        if progress:
            H.log(f"{method} M={m}: " + ", ".join(f"{k} {timed[k]['ms']:.1f} ms" for k in impls))
    res.doc["extra"]["loadavg_end"] = H.loadavg()
    res.save()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help=f"default {H.THREADS}")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    H.setup_cpu(args.threads)
    shape = QUICK if args.quick else FULL
    res = run(shape["N"], shape["C"], args.reps, mem=not args.no_memory, path=args.json)
    from benchmarks import report
    print("\n".join(report.suite_tables(res.doc)))


if __name__ == "__main__":
    main()
