"""Multi-teacher distillation: the fused multi-teacher kernel vs one fused call per teacher vs eager.

    python -m benchmarks.bench_multi_teacher            # N=4096, C=32000, fp32 (minutes)
    python -m benchmarks.bench_multi_teacher --quick    # N=1024, C=8000
    python -m benchmarks.bench_multi_teacher --json out.json

One fwd+bwd of ``kdfast.multi_teacher_loss(method, z, teachers, labels)`` (M teachers as one (M, N, C)
tensor, equal weights, labels with CE), student requires grad. Variants:

- ``fused``: the multi-teacher kernel (``kdfast::multi_distill``): the student row read once per pass;
- ``per-teacher``: the same loss as M calls of the single-teacher fused kernel summed by autograd
  (what ``multi_teacher_loss`` did before the multi-teacher kernel);
- ``eager``: M calls of the eager reference (``backend="torch"``), kd rows only, one step.

Time: all threads; after a warm-up (one full-size step of each fused variant), ``reps`` rounds in which every variant runs one step (the order
rotates per round); the median per variant. Peak memory: each variant in a fresh process,
``VmHWM - RSS`` around one step (the method of ``benchmarks/bench_fused_linear.py``), the gradient
left in ``.grad`` included.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench import _hwm_bytes, _malloc_returns_memory, _reset_hwm, _rss_bytes  # noqa: E402

FULL = dict(N=4096, C=32000)
QUICK = dict(N=1024, C=8000)
# (method, M, run eager): eager dkd / jsd with 4 teachers take 1-2 minutes a step here and their
# memory child needed > 20 GB (OOM-killed): their single-teacher eager numbers are in the main table
PLAN = [("kd", 1, True), ("kd", 2, True), ("kd", 4, True), ("dkd", 4, False), ("jsd", 4, False)]
VARIANTS = ("fused", "per-teacher", "eager")
HYPER = {"kd": {"temperature": 2.0}, "dkd": {"temperature": 2.0}, "jsd": {"beta": 0.5}}
MIB = 1 << 20


def _inputs(n, c, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(n, c, generator=g)
    t = 2 * torch.randn(m, n, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return z, t, y


def _step_fn(variant, method):
    import kdfast
    from kdfast import multi_teacher as MT
    hyper = HYPER[method]
    if variant == "fused":
        return lambda z, t, y: kdfast.multi_teacher_loss(method, z, t, y, backend="cpu", **hyper)
    if variant == "per-teacher":
        fn = MT._LOSSES[method].function
        m_of = lambda t: t.shape[0]  # noqa: E731
        return lambda z, t, y: MT._unfused(fn, z, list(t.unbind(0)), [1.0 / m_of(t)] * m_of(t), y, 1.0, 1.0,
                                           "mean", None, {"backend": "cpu", **hyper})
    return lambda z, t, y: kdfast.multi_teacher_loss(method, z, t, y, backend="torch", **hyper)


def _mem_child(variant, method, n, c, m, conn):
    _malloc_returns_memory()
    z, t, y = _inputs(n, c, m)
    step = _step_fn(variant, method)
    zz = z.clone().requires_grad_()
    step(zz[:4], t[:, :4], y[:4]).backward()   # warm-up (extension, thread pool)
    zz.grad = None
    r0 = _rss_bytes()
    _reset_hwm()
    step(zz, t, y).backward()
    conn.send(_hwm_bytes() - r0)


def peak_mib(variant, method, n, c, m) -> float:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_mem_child, args=(variant, method, n, c, m, b))
    p.start()
    out = a.recv() if a.poll(900) else None
    p.join(10)
    if p.is_alive():
        p.kill()
    return None if out is None else out / MIB   # None: the child died (e.g. out of memory)


def run(n, c, reps, plan=PLAN, mem=True, progress=True) -> list:
    rows = []
    for method, m, with_eager in plan:
        z, t, y = _inputs(n, c, m)
        variants = VARIANTS if with_eager else VARIANTS[:2]
        steps = {v: _step_fn(v, method) for v in variants}
        leaf = z.clone().requires_grad_()
        for v in variants:     # warm-up (the fused variants at full size: page cache, THP, thread pool)
            k = n if v != "eager" else 4
            steps[v](leaf[:k], t[:, :k], y[:k]).backward()
        times = {v: [] for v in variants}
        for r in range(reps):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                if v == "eager" and r >= 1:   # eager is slow: one step
                    continue
                leaf.grad = None
                t0 = time.perf_counter()
                steps[v](leaf, t, y).backward()
                times[v].append(time.perf_counter() - t0)
        row = {"method": method, "M": m, "N": n, "C": c, "dtype": "float32",
               **{f"{v}_ms": statistics.median(times[v]) * 1e3 for v in variants}}
        if mem:
            row.update({f"{v}_mib": peak_mib(v, method, n, c, m) for v in variants})
        rows.append(row)
        if progress:
            print(_table([row])[-1], flush=True)
    return rows


def _table(rows) -> list:
    L = ["| method | M | N x C | fused ms | per-teacher ms | eager ms | fused / per-teacher | "
         "fused MiB | per-teacher MiB | eager MiB |",
         "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    def f(r, key, fmt):
        return fmt.format(r[key]) if r.get(key) is not None else "-"
    for r in rows:
        L.append(f"| {r['method']} | {r['M']} | {r['N']} x {r['C']} | {f(r, 'fused_ms', '{:.1f}')} | "
                 f"{f(r, 'per-teacher_ms', '{:.1f}')} | {f(r, 'eager_ms', '{:.1f}')} | "
                 f"{r['fused_ms'] / r['per-teacher_ms']:.2f} | {f(r, 'fused_mib', '{:.0f}')} | "
                 f"{f(r, 'per-teacher_mib', '{:.0f}')} | {f(r, 'eager_mib', '{:.0f}')} |")
    return L


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    shape = QUICK if args.quick else FULL
    import platform
    rows = run(shape["N"], shape["C"], args.reps)
    out = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "load": os.getloadavg()[0],
           "rows": rows}
    print("\n".join(_table(rows)))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
