"""Fused linear + distillation loss vs materialised logits: time and peak memory of one fwd+bwd.

    python -m benchmarks.bench_fused_linear            # N=4096, H=1024, V=32000, fp32 (minutes)
    python -m benchmarks.bench_fused_linear --quick    # N=1024, H=256, V=8000
    python -m benchmarks.bench_fused_linear --json out.json

One training step of the student's output head under a ``kd`` loss (T = 2, no labels), the teacher
given as hidden states ``(N, H)`` and its own head ``(V, H)`` (constant); the student's hidden states
and head require grad. Variants:

- ``eager``: ``z = F.linear(h, W)``; ``v = F.linear(h_t, W_t)`` under ``no_grad``;
  ``kdfast.reference.kd_loss(z, v)`` (log_softmax + KL in eager PyTorch); ``backward()``;
- ``logits+kdfast``: the same full logits, the fused ``kdfast.kd_loss(z, v, backend="cpu")`` kernel;
- ``fused_linear``: ``kdfast.fused_linear.fused_linear_distill_loss(h, W, teacher_hidden=h_t,
  teacher_weight=W_t)`` (default chunk size).

Time: ``torch.get_num_threads()`` threads; after a warm-up call of each variant on a tiny shape,
``reps`` rounds in which every variant runs one step (the order rotates per round, so load from
other processes hits all variants alike); the median and the minimum per variant (``time.perf_counter``
around the step, ``.grad`` reset to None before it).

Peak memory: each variant in a fresh subprocess (``--child``): allocate and touch the inputs, warm up
on a tiny shape, read the resident set ``RSS0`` (``/proc/self/statm``), reset the kernel's high-water
mark (write ``5`` to ``/proc/self/clear_refs``), run one step, read ``VmHWM`` from
``/proc/self/status``: ``extra = VmHWM - RSS0``, the peak of everything the step allocated that was
resident at once, the gradients it leaves in ``.grad`` included (glibc is told to serve every
allocation >= 64 KiB by mmap, so freed memory leaves the resident set). A page-granular OS
measurement, not an allocator count: it includes BLAS workspaces and anything torch allocates.
The child first calibrates with a known ``torch.empty(N, V).fill_(1)``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.bench import _hwm_bytes, _reset_hwm, _rss_bytes  # noqa: E402

FULL = dict(N=4096, H=1024, V=32000)
QUICK = dict(N=1024, H=256, V=8000)
VARIANTS = ("eager", "logits+kdfast", "fused_linear")
TEMPERATURE = 2.0
MIB = 1 << 20


def make_inputs(n, hdim, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g)
    w = torch.randn(v, hdim, generator=g) * hdim ** -0.5 * 2
    ht = torch.randn(n, hdim, generator=g)
    wt = torch.randn(v, hdim, generator=g) * hdim ** -0.5 * 2
    return h.requires_grad_(True), w.requires_grad_(True), ht, wt


def step_fn(variant):
    """A function doing one fwd+bwd of ``variant`` on (h, W, h_t, W_t); returns the loss."""
    import kdfast
    from kdfast.fused_linear import fused_linear_distill_loss

    def materialised(loss_fn):
        def step(h, w, ht, wt):
            z = F.linear(h, w)
            with torch.no_grad():
                v = F.linear(ht, wt)
            loss = loss_fn(z, v)
            loss.backward()
            return loss
        return step

    if variant == "eager":
        return materialised(lambda z, v: kdfast.reference.kd_loss(z, v, temperature=TEMPERATURE))
    if variant == "logits+kdfast":
        return materialised(lambda z, v: kdfast.kd_loss(z, v, temperature=TEMPERATURE, backend="cpu"))
    if variant == "fused_linear":
        def step(h, w, ht, wt):
            loss = fused_linear_distill_loss(h, w, teacher_hidden=ht, teacher_weight=wt,
                                             method="kd", temperature=TEMPERATURE, backend="cpu")
            loss.backward()
            return loss
        return step
    raise ValueError(variant)


def _clear(*xs):
    for x in xs:
        x.grad = None


# ----------------------------------------------------------------------------- peak memory (child)
# RSS / high-water helpers: benchmarks/bench.py
def child(variant, n, hdim, v, threads):
    import gc
    torch.set_num_threads(threads)
    step = step_fn(variant)
    step(*make_inputs(4, 8, 16))          # lazy initialisation: extension, thread pool, BLAS
    r0 = _rss_bytes(); _reset_hwm()
    x = torch.empty(n, v).fill_(1)       # calibration: a known allocation
    calib = (_hwm_bytes() - r0) / (x.numel() * x.element_size())
    del x
    h, w, ht, wt = make_inputs(n, hdim, v)
    gc.collect()
    r0 = _rss_bytes(); _reset_hwm()
    step(h, w, ht, wt)
    extra = _hwm_bytes() - r0
    print(json.dumps({"extra": extra, "calib": calib}))


def measure_mem(variant, shape, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, "-m", "benchmarks.bench_fused_linear", "--child", variant,
           str(shape["N"]), str(shape["H"]), str(shape["V"]), str(threads)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the run
def run(quick: bool = False, reps: int | None = None, memory: bool = True) -> list[dict]:
    """Time (and peak memory) of every variant; one dict per variant."""
    shape = QUICK if quick else FULL
    reps = reps or 3
    threads = torch.get_num_threads()
    n, hdim, v = shape["N"], shape["H"], shape["V"]
    steps = {k: step_fn(k) for k in VARIANTS}
    for k in VARIANTS:                      # warm-up: lazy initialisation on a tiny shape
        steps[k](*make_inputs(4, 8, 16))
    h, w, ht, wt = make_inputs(n, hdim, v)
    load0 = os.getloadavg()[0]
    times = {k: [] for k in VARIANTS}
    grads = {}
    for r in range(reps):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for k in order:
            _clear(h, w)
            t0 = time.perf_counter()
            loss = steps[k](h, w, ht, wt)
            times[k].append(time.perf_counter() - t0)
            if r == 0:
                grads[k] = (loss.detach(), h.grad, w.grad)
    _clear(h, w)
    load1 = os.getloadavg()[0]
    from kdfast.fused_linear import default_chunk_size
    chunk = default_chunk_size(n, v * 8)
    ref = grads["logits+kdfast"]
    rows = []
    for k in VARIANTS:
        errs = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                for a, b in zip(grads[k], ref)]
        row = {"variant": k, **shape, "dtype": "fp32", "threads": threads, "reps": reps,
               "ms_median": 1e3 * statistics.median(times[k]), "ms_min": 1e3 * min(times[k]),
               "times_ms": [round(1e3 * t, 1) for t in times[k]],
               "rel_err_vs_logits+kdfast": {"loss": errs[0], "grad_h": errs[1], "grad_W": errs[2]},
               "chunk_size": chunk if k == "fused_linear" else None,
               "load_avg_before_after": [load0, load1],
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                          f"torch {torch.__version__}, ISA {torch.backends.cpu.get_cpu_capability()}"}
        if memory:
            m = measure_mem(k, shape, threads)
            row["peak_extra_mib"] = m["extra"] / MIB
            row["mem_calibration"] = m["calib"]
        rows.append(row)
    base = {r["variant"]: r for r in rows}
    for r in rows:
        for other in ("eager", "logits+kdfast"):
            r[f"time_vs_{other}"] = r["ms_median"] / base[other]["ms_median"]
            if memory:
                r[f"mem_vs_{other}"] = r["peak_extra_mib"] / base[other]["peak_extra_mib"]
    return rows


def _table(rows):
    shape, nan = rows[0], float("nan")
    out = [f"N={shape['N']} H={shape['H']} V={shape['V']} fp32, {shape['threads']} threads, "
           f"{shape['machine']}; load avg {shape['load_avg_before_after']}", "",
           "| variant | ms median | ms min | vs eager | vs logits+kdfast | peak extra MiB | "
           "mem vs eager | mem vs logits+kdfast | rel err (loss, gh, gW) |",
           "|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        e = r["rel_err_vs_logits+kdfast"]
        out.append(f"| {r['variant']} | {r['ms_median']:.0f} | {r['ms_min']:.0f} | "
                   f"{r['time_vs_eager']:.3f} | {r['time_vs_logits+kdfast']:.3f} | "
                   f"{r.get('peak_extra_mib', nan):.0f} | {r.get('mem_vs_eager', nan):.3f} | "
                   f"{r.get('mem_vs_logits+kdfast', nan):.3f} | "
                   f"{e['loss']:.0e}, {e['grad_h']:.0e}, {e['grad_W']:.0e} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=5, metavar=("VARIANT", "N", "H", "V", "THREADS"))
    a = p.parse_args(argv)
    if a.child:
        variant, *nums = a.child
        child(variant, *map(int, nums))
        return
    rows = run(a.quick, a.reps, not a.no_memory)
    print(_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
