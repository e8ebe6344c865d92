"""Vocabulary-parallel kd (``process_group=``) vs the single-process losses: time and peak memory.

    python -m benchmarks.bench_vocab_parallel            # N=4096, C=32000, fp32, 2 ranks (minutes)
    python -m benchmarks.bench_vocab_parallel --quick    # N=1024, C=8000
    python -m benchmarks.bench_vocab_parallel --json out.json

One fwd+bwd of ``kd`` (T = 2, no labels), student requires grad. Variants:

- ``eager``: one process, ``kdfast.reference.kd_loss`` on the full (N, C) logits, all cores;
- ``fused``: one process, ``kdfast.kd_loss`` (the fused CPU kernel) on the full logits, all cores;
- ``vocab_parallel x W``: W processes (gloo on loopback, one thread each: this machine's cores are
  split between the ranks), each holding N x C/W columns, ``kdfast.kd_loss(..., process_group=)``.
  Time: the slowest rank's step (a barrier before each step); memory: the largest rank's.

Time: median of ``reps`` steps after a warm-up; memory: ``VmHWM - RSS`` around one step in a fresh
process (the method of ``benchmarks/bench_fused_linear.py``: glibc serves allocations >= 64 KiB by
mmap, so freed memory leaves the resident set), the gradient left in ``.grad`` included.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .bench import _hwm_bytes, _reset_hwm, _rss_bytes

ROOT = Path(__file__).resolve().parent.parent
T = 2.0


def _inputs(n, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, c, generator=g), 2 * torch.randn(n, c, generator=g)


def _single(variant, n, c, reps, threads):
    """One process: (median seconds, peak extra bytes of one step)."""
    import kdfast
    torch.set_num_threads(threads)
    fn = kdfast.reference.kd_loss if variant == "eager" else kdfast.kd_loss
    z, v = _inputs(n, c)
    zz = z.clone().requires_grad_()
    fn(zz[:4], v[:4], temperature=T).backward()     # warm-up (extension, thread pool)
    zz.grad = None
    r0 = _rss_bytes(); _reset_hwm()
    fn(zz, v, temperature=T).backward()
    peak = _hwm_bytes() - r0
    ts = []
    for _ in range(reps):
        zz.grad = None
        t0 = time.perf_counter()
        fn(zz, v, temperature=T).backward()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), peak


def _rank(rank, world, n, c, reps, store):
    import torch.distributed as dist

    import kdfast
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    z, v = _inputs(n, c)
    cl = c // world
    zs = z[:, rank * cl:(rank + 1) * cl].clone().requires_grad_()
    vs = v[:, rank * cl:(rank + 1) * cl].clone()
    del z, v
    kdfast.kd_loss(zs[:4], vs[:4], temperature=T, process_group=dist.group.WORLD).backward()
    zs.grad = None
    dist.barrier()
    r0 = _rss_bytes(); _reset_hwm()
    kdfast.kd_loss(zs, vs, temperature=T, process_group=dist.group.WORLD).backward()
    peak = _hwm_bytes() - r0
    ts = []
    for _ in range(reps):
        zs.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        kdfast.kd_loss(zs, vs, temperature=T, process_group=dist.group.WORLD).backward()
        ts.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(ts), float(peak)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"seconds": t[0].item(), "peak": t[1].item()}))
    dist.destroy_process_group()


def _child(argv):
    kind = argv[0]
    if kind == "single":
        variant, n, c, reps, threads = argv[1], *map(int, argv[2:])
        s, peak = _single(variant, n, c, reps, threads)
        print(json.dumps({"seconds": s, "peak": peak}))
    else:
        rank, world, n, c, reps = map(int, argv[1:6])
        _rank(rank, world, n, c, reps, argv[6])


def _spawn(args, world=1, store=None):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS="1" if world > 1 else os.environ.get("OMP_NUM_THREADS", ""))
    base = [sys.executable, "-m", "benchmarks.bench_vocab_parallel", "--child"]
    if world == 1:
        out = subprocess.run(base + args, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    procs = [subprocess.Popen(base + ["rank", str(r), str(world)] + args + [store], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = [p.communicate() for p in procs]
    for p, (o, e) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(e[-2000:])
    return json.loads(outs[0][0].strip().splitlines()[-1])


def run(quick: bool = False, reps: int | None = None, world: int = 2) -> list[dict]:
    n, c = (1024, 8000) if quick else (4096, 32000)
    reps = reps or (3 if quick else 5)
    threads = os.cpu_count() or 1
    load = os.getloadavg()[0]
    rows = []
    for variant in ("eager", "fused"):
        r = _spawn(["single", variant, str(n), str(c), str(reps), str(threads)])
        rows.append(dict(variant=variant, processes=1, threads=threads, **r))
    with tempfile.TemporaryDirectory() as d:
        r = _spawn([str(n), str(c), str(reps)], world=world, store=os.path.join(d, "store"))
    rows.append(dict(variant=f"vocab_parallel x {world}", processes=world, threads=1, **r))
    eager = rows[0]
    for r in rows:
        r.update(N=n, C=c, time_vs_eager=r["seconds"] / eager["seconds"],
                 mem_vs_eager=r["peak"] / eager["peak"], machine=platform.processor() or platform.machine(),
                 torch=torch.__version__, load_avg_before_after=[round(load, 2), round(os.getloadavg()[0], 2)])
    return rows


def _table(rows):
    r0 = rows[0]
    out = [f"kd fwd+bwd, N={r0['N']} C={r0['C']} fp32, torch {r0['torch']}; load avg "
           f"{r0['load_avg_before_after']}", "",
           "| variant | processes x threads | ms (median) | vs eager | peak extra MiB (per rank) | mem vs eager |",
           "|---|---|--:|--:|--:|--:|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['processes']} x {r['threads']} | {r['seconds'] * 1e3:.0f} | "
                   f"{r['time_vs_eager']:.3f} | {r['peak'] / 2**20:.0f} | {r['mem_vs_eager']:.3f} |")
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = run(a.quick, a.reps, a.world)
    print(_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
