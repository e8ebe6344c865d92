"""Vocabulary-parallel kd (``process_group=``) vs the single-process losses: time and peak memory.

    python -m benchmarks.bench_vocab_parallel            # N=4096, C=32000, fp32, 2 ranks (minutes)
    python -m benchmarks.bench_vocab_parallel --quick    # N=1024, C=8000
    python -m benchmarks.bench_vocab_parallel --json out.json

One fwd+bwd of ``kd`` (T = 2, no labels), student requires grad; the case ``{"loss": "kd", "mode":
"fwdbwd", "N", "C", "dtype"}``. Implementations, each in fresh processes
(``harness.in_fresh_processes``):

- ``eager``: one process, ``kdfast.reference.kd_loss`` on the full (N, C) logits, ``harness.THREADS``
  threads;
- ``fused``: one process, ``kdfast.kd_loss`` (the fused CPU kernel) on the full logits, same threads;
- ``vocab_parallel x W``: W processes (gloo, file rendezvous, one thread each: the cores are split
  between the ranks), each holding N x C/W columns, ``kdfast.kd_loss(..., process_group=)``.
  Time: the slowest rank's median step (a barrier before each step); memory: the largest rank's.

Each process: a warm-up on a tiny slice, the peak of one step (``harness.peak_bytes``: ``VmHWM -
RSS``, the gradient left in ``.grad`` included), then ``reps`` timed steps (``harness.summarize``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import harness as H  # noqa: E402

SUITE = "vocab_parallel"
T = 2.0


def _inputs(n, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, c, generator=g), 2 * torch.randn(n, c, generator=g)


def _measure(fn, z, v, reps, barrier=None):
    """Warm-up, the peak of one step, then ``reps`` timed steps: {"times_s", "peak_bytes"}."""
    fn(z[:4], v[:4]).backward()     # warm-up (extension, thread pool)
    z.grad = None
    if barrier:
        barrier()
    peak = H.peak_bytes(lambda: fn(z, v).backward())
    ts = []
    for _ in range(reps):
        z.grad = None
        if barrier:
            barrier()
        t0 = time.perf_counter()
        fn(z, v).backward()
        ts.append(time.perf_counter() - t0)
    return {"times_s": ts, "peak_bytes": peak}


def _single(impl, n, c, reps, threads):
    """One process on the full logits."""
    import kdfast
    torch.set_num_threads(threads)
    loss = kdfast.reference.kd_loss if impl == "eager" else kdfast.kd_loss
    z, v = _inputs(n, c)
    return _measure(lambda a, b: loss(a, b, temperature=T), z.clone().requires_grad_(), v, reps)


def _rank(rank, world, n, c, reps, store):
    """One rank of the vocabulary-parallel run: columns [rank C/W, (rank + 1) C/W)."""
    import torch.distributed as dist

    import kdfast
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        z, v = _inputs(n, c)
        cl = c // world
        zs = z[:, rank * cl:(rank + 1) * cl].clone().requires_grad_()
        vs = v[:, rank * cl:(rank + 1) * cl].clone()
        del z, v
        return _measure(lambda a, b: kdfast.kd_loss(a, b, temperature=T, process_group=dist.group.WORLD),
                        zs, vs, reps, barrier=dist.barrier)
    finally:
        dist.destroy_process_group()


def run(quick=False, reps=None, world=2, path=None) -> H.Results:
    n, c = (1024, 8000) if quick else (4096, 32000)
    reps = reps or (3 if quick else 5)
    threads = torch.get_num_threads()
    res = H.Results(SUITE, path, H.machine("cpu", ROOT), {"T": T, "reps": reps, "world": world})
    case = {"loss": "kd", "mode": "fwdbwd", "N": n, "C": c, "dtype": "fp32"}
    runs = {k: [H.in_fresh_process(_single, k, n, c, reps, threads)] for k in ("eager", "fused")}
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        runs[f"vocab_parallel x {world}"] = H.in_fresh_processes(
            _rank, [(r, world, n, c, reps, store) for r in range(world)])
    for impl, ranks in runs.items():
        procs = {"processes": len(ranks), "threads": threads if len(ranks) == 1 else 1}
        errors = [r["error"] for r in ranks if "error" in r]
        if errors:
            res.add(case, impl, "error", reason="; ".join(errors)[:500], **procs)
            continue
        slowest = max(ranks, key=lambda r: sorted(r["times_s"])[len(r["times_s"]) // 2])
        res.add(case, impl, **H.summarize(slowest["times_s"]), **procs,
                peak_bytes=max(r["peak_bytes"] for r in ranks), peak_method=H.PEAK_METHOD["cpu"]
                + (", the largest rank's" if len(ranks) > 1 else ""))
    res.doc["extra"]["loadavg_end"] = H.loadavg()
    res.save()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help=f"single-process threads (default {H.THREADS})")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    H.setup_cpu(a.threads)
    res = run(a.quick, a.reps, a.world, a.json)
    from benchmarks import report
    print("\n".join(report.suite_tables(res.doc)))


if __name__ == "__main__":
    main()
