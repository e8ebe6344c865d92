"""kdfast benchmark harness: fused kernel vs eager PyTorch vs torch.compile, plus the memory floor.

Run from the repository root::

    python -m benchmarks.bench                 # default sweep, default_plan() (<= ~15 min, 2-core CPU)
    python -m benchmarks.bench --quick         # small sweep, quick_plan() (~2-3 min)
    python -m benchmarks.bench --check         # only assert fused == eager on the selected cases
    python -m benchmarks.bench --losses kd,ttm --shapes 8192x1000 --dtypes fp32 --device cpu
    python -m benchmarks.bench --merge gpu.json   # fold another run's results in (e.g. a GPU run:
                                                  # its own report section), rewrite the report

What is measured, per case (loss x shape x dtype x mode) and implementation (fused =
``kdfast.<loss>_loss(backend="auto")``, eager = ``kdfast.reference.<loss>_loss``, compile =
``torch.compile`` of the eager function):

* ``fwdbwd``: ``fn(z, v, [labels]).backward()`` with ``z.requires_grad`` (``z.grad`` reset to None
  before every call, as ``zero_grad(set_to_none=True)`` does);
* ``fwd`` (kd): forward only, no input requires grad;
* ``fwdbwd_tgrad`` (kd): both ``z`` and ``v`` require grad;
* ``add``: ``torch.add(a, b, out=c)`` on the same shape and dtype: reads two tensors, writes one,
  the memory floor of a fused fwd+bwd (read z and v, write the gradient);
* ``mem``: extra peak memory of one fwd+bwd beyond the inputs (see :func:`_mem_child`).

The backend ``backend="auto"`` resolves to is recorded (``fused_backend`` per machine, ``backend``
per fused measurement); "torch" means the eager reference ran in the fused column (a FALLBACK: the
C++ extension is not built) and the report says so loudly.

Timing: CPU: after warm-up, ``reps`` rounds in which every implementation of the case runs one
block of calls (>= 20 ms; the order rotates each round), medians per implementation: the ratios are
measured side by side in one process. CUDA: ``triton.testing.do_bench`` (warm-up, then the median
of per-call CUDA-event times; it flushes L2 before every timed call) over copies of the inputs used
in turn (:func:`rotation_count`: together >= 2x L2); every fwd+bwd case is also timed ``fwd`` and
``bwd`` (backward alone: ``loss.backward(retain_graph=True)`` on one forward graph); each record
carries ``GBs`` = :func:`bytes_moved` / time and ``copy_frac`` = that over the device-to-device copy
bandwidth measured at the start (1 GiB ``copy_``, do_bench median); peak memory is
``torch.cuda.max_memory_allocated`` in a fresh process. torch.compile's compile time is excluded
from the timing and recorded as ``compile_s``. Each fused measurement also records the relative
error fused vs eager of the loss and of the gradient on the benchmarked inputs.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # ``python benchmarks/bench.py`` puts benchmarks/ first, not the root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _losses() -> dict:
    """loss name -> (needs labels, takes past student logits as third positional argument): every
    loss of ``kdfast.losses.REGISTRY``; ``topk_kd`` (its teacher the top-TOPK_K log-probabilities
    and classes) is the one of a top-k teacher."""
    from kdfast.losses import REGISTRY
    return {name: (bool(loss.needs_labels), loss.past_student) for name, loss in REGISTRY.items()}


LOSSES = _losses()
TOPK_K = 64

# used by --check and by custom sweeps (--losses/--shapes/--dtypes); the default and --quick sweeps
# are the explicit plans default_plan() / quick_plan() below
DEFAULT_SHAPES = [(8192, 1000), (4096, 32000)]
DEFAULT_LOSSES = ["kd", "ttm", "wttm", "dkd"]
EXTRA_SHAPES = [(8192, 1000)]     # forward-only and teacher-grad sets (kd, fp32) of custom sweeps


# ----------------------------------------------------------------------------- loss functions


def _kdfast():
    import kdfast
    return kdfast


def loss_fns(name: str) -> dict:
    """The implementations of one loss that exist now: {"fused": fn, "eager": fn} (compile is built
    per case from eager). A loss the package does not have yet is skipped by the caller."""
    kdfast = _kdfast()
    import kdfast.reference as ref
    fused = getattr(kdfast, f"{name}_loss", None)
    eager = getattr(ref, f"{name}_loss", None)
    out = {}
    if fused is not None:
        out["fused"] = lambda *a, **k: fused(*a, backend="auto", **k)
    if eager is not None:
        out["eager"] = eager
    return out


def _topk(loss: str) -> bool:
    """The loss's teacher is its top-k log-probabilities and classes."""
    from kdfast.losses import REGISTRY
    return REGISTRY[loss].teacher == "topk"


def make_inputs(loss: str, n: int, c: int, dtype, device, labels: bool, seed: int = 0):
    """(z, v, extra positional args, kwargs). Logits ~ 2·N(0, 1), labels uniform in [0, C)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = (2 * torch.randn(n, c, generator=g)).to(dtype=dtype, device=device)
    v = (2 * torch.randn(n, c, generator=g)).to(dtype=dtype, device=device)
    need_labels, past = LOSSES[loss]
    extra = []
    if _topk(loss):   # (z, teacher top-k log-probabilities, their classes[, labels])
        lp, idx = torch.log_softmax(v.float(), -1).topk(min(TOPK_K, c), dim=-1)
        v = lp.to(dtype)
        extra.append(idx)
    if past:
        extra.append((2 * torch.randn(n, c, generator=g)).to(dtype=dtype, device=device))
    if need_labels or labels:
        extra.append(torch.randint(0, c, (n,), generator=g).to(device))
    return z, v, tuple(extra)


def _compiled(fn, fresh: bool = False):
    """torch.compile of ``fn``. ``fresh``: drop everything compiled so far first (the ``bwd`` mode
    needs a graph compiled without donated buffers, see :func:`make_call`)."""
    import torch._dynamo
    if fresh:
        torch._dynamo.reset()
    cfg = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, knob):
            setattr(cfg, knob, max(getattr(cfg, knob), 256))
    return torch.compile(fn, dynamic=False)


def make_call(fn, mode: str, z, v, extra):
    """A zero-argument callable doing one measured step. mode: fwdbwd | fwd | fwdbwd_tgrad | bwd
    (bwd: the CUDA sweep only; the forward runs once here, each step is
    ``loss.backward(retain_graph=True)`` on that graph, ``z.grad`` reset to None first)."""
    if mode == "bwd":
        zr = z.detach().requires_grad_(True)
        # torch.compile's backward frees ("donates") saved buffers and then refuses
        # retain_graph=True; a graph compiled here without that is timed instead (run_case passes
        # a freshly reset torch.compile for this mode: a cached graph would keep its donations)
        import contextlib
        try:
            import torch._functorch.config as fc
            no_donate = fc.patch(donated_buffer=False)
        except (ImportError, AttributeError):   # older torch: no donated buffers
            no_donate = contextlib.nullcontext()
        with no_donate:
            loss = fn(zr, v.detach(), *extra)

        def step():
            zr.grad = None
            loss.backward(retain_graph=True)
            return loss
        return step, [zr]
    if mode == "fwd":
        z0, v0 = z.detach(), v.detach()

        def step():
            with torch.no_grad():
                return fn(z0, v0, *extra)
        return step, []
    zr = z.detach().requires_grad_(True)
    vr = v.detach().requires_grad_(mode == "fwdbwd_tgrad")
    leaves = [zr, vr] if mode == "fwdbwd_tgrad" else [zr]

    def step():
        for t in leaves:
            t.grad = None
        loss = fn(zr, vr, *extra)
        loss.backward()
        return loss
    return step, leaves


# ----------------------------------------------------------------------------- timing


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_cpu(step, nthreads: int, budget_s: float, min_reps: int, max_reps: int, t1: float) -> dict:
    """Median over ``reps`` blocks of ``number`` calls each (blocks of >= 20 ms), Timer.timeit."""
    from torch.utils.benchmark import Timer
    number = max(1, math.ceil(0.02 / max(t1, 1e-6)))
    reps = int(min(max_reps, max(min_reps, budget_s // max(t1 * number, 1e-9))))
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=nthreads)
    times = [timer.timeit(number).median for _ in range(reps)]
    return _summary(times, number)


def time_cuda(step, leaves) -> dict:
    """``triton.testing.do_bench``: warm-up (25 ms of calls), then timed calls for ~200 ms, each
    preceded by an L2 flush and ``grad = None`` on ``leaves`` (outside the timed region); the
    median and quartiles of the per-call CUDA-event times."""
    from triton.testing import do_bench
    ts = do_bench(step, warmup=25, rep=200, grad_to_none=leaves or None, return_mode="all")
    return _summary([t / 1e3 for t in ts], 1)


def rotation_count(bytes_per_set: int, l2_bytes: int, free_bytes: int, lo: int = 2,
                   hi: int = 32) -> int:
    """How many input sets the CUDA timing rotates through: enough that consecutive calls never
    find their inputs in L2 (together >= 2x the L2 size), at least ``lo``, at most ``hi``, and no
    more than fit a quarter of the free memory with room for gradients and saved activations
    (4x a set each)."""
    b = max(int(bytes_per_set), 1)
    want = max(lo, math.ceil(2 * l2_bytes / b))
    fit = int(free_bytes // (4 * 4 * b))
    return int(max(1, min(hi, want, fit)))


def rotating(steps):
    """One step that calls ``steps`` in turn (input set i on call i mod len(steps))."""
    state = {"i": 0}

    def step():
        i = state["i"]
        state["i"] = (i + 1) % len(steps)
        return steps[i]()
    return step


def time_cuda_rotated(fn, mode, z, v, extra) -> dict:
    """time_cuda over ``rotation_count`` copies of the inputs, used in turn (the first set is the
    one the correctness check used): no call finds its inputs in L2 or in the previous call's
    freshly written cache lines, on top of do_bench's L2 flush."""
    tensors = [z, v, *extra]
    per_set = sum(t.numel() * t.element_size() for t in tensors)
    props = torch.cuda.get_device_properties(z.device)
    free, _ = torch.cuda.mem_get_info(z.device)
    n = rotation_count(per_set, getattr(props, "L2_cache_size", 50 << 20), free)
    sets = [(z, v, tuple(extra))] + [(z.clone(), v.clone(), tuple(e.clone() for e in extra))
                                     for _ in range(n - 1)]
    calls = [make_call(fn, mode, *s) for s in sets]
    leaves = [t for _, ls in calls for t in ls]
    step = rotating([c for c, _ in calls])
    for _ in range(n):     # every set once (lazy work, autotuning, allocator growth)
        step()
    torch.cuda.synchronize()
    rec = time_cuda(step, leaves)
    rec["rotation_sets"] = n
    del calls, leaves, step, sets
    return rec


def bytes_moved(mode: str, loss: str, n: int, c: int, dtype) -> int:
    """The DRAM traffic a single fused pass needs for ``mode`` (the achieved-bandwidth numerator):
    read the logits (z, v, and zp for retro_kd), write one gradient per input that requires grad;
    ``bwd`` alone: read the saved gradient, write ``z.grad`` (what a backward separate from the
    forward must move at least). Labels and per-row outputs are negligible and not counted."""
    el = n * c * torch.empty((), dtype=dtype).element_size()
    inputs = 3 if LOSSES[loss][1] else 1 if _topk(loss) else 2   # topk: the teacher is (N, k)
    per_mode = {"fwd": inputs, "fwdbwd": inputs + 1, "fwdbwd_tgrad": inputs + 2, "bwd": 2}
    return per_mode[mode] * el


def cuda_plan(plan: list) -> list:
    """The CUDA sweep: every fwd+bwd case is also timed forward-only and backward-only (GPU calls
    take milliseconds), with the same implementations and no extra peak-memory run."""
    have = {(cs["mode"], cs["loss"], cs["N"], cs["C"], cs["dtype"]) for cs in plan}
    out = []
    for cs in plan:
        out.append(cs)
        if cs["mode"] != "fwdbwd":
            continue
        for mode in ("fwd", "bwd"):
            key = (mode, cs["loss"], cs["N"], cs["C"], cs["dtype"])
            if key not in have:
                have.add(key)
                out.append(dict(cs, mode=mode, mem=False))
    return out


def _summary(times_s, number) -> dict:
    ts = sorted(times_s)
    q = lambda f: ts[min(len(ts) - 1, int(f * (len(ts) - 1) + 0.5))]  # noqa: E731
    return {"ms": 1e3 * _median(ts), "ms_q25": 1e3 * q(0.25), "ms_q75": 1e3 * q(0.75),
            "reps": len(ts), "number": number,
            "times_ms": [round(1e3 * t, 4) for t in times_s][:50]}


def _median(xs):
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def measure(step, leaves, device, nthreads, cfg, warmups: int = 1) -> dict:
    """Warm up (timing the last warm-up call as the per-call estimate), then time."""
    t1 = None
    for _ in range(warmups):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        t1 = time.perf_counter() - t0
    if device == "cuda":
        return time_cuda(step, leaves)
    slow = t1 > 0.5
    return time_cpu(step, nthreads, cfg["budget_s"], cfg["min_reps"],
                    cfg["max_reps_slow"] if slow else cfg["max_reps"], t1)


# ----------------------------------------------------------------------------- peak memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _malloc_returns_memory():
    """Make every allocation >= 64 KiB its own mmap (returned to the OS on free) and disable glibc's
    dynamic mmap threshold, so freed warm-up buffers do not sit resident in the heap and hide the
    measured run's allocations. (Also set through MALLOC_MMAP_THRESHOLD_ for the fork server.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)       # M_TRIM_THRESHOLD
    except OSError:
        pass


def _mem_child(spec: dict, conn):
    """Runs in a fresh process (forked from a server that only imported torch): the extra peak
    memory of one call beyond the inputs.

    CPU: allocate and touch the inputs; warm up (compile: the same shape, so the measured call does
    not recompile; others: a tiny shape, for lazy initialisation); drop all references; read the
    resident set (statm); reset the high-water mark (write 5 to /proc/self/clear_refs); one call;
    read VmHWM. extra = VmHWM - RSS before. The result includes the gradient buffer that stays
    alive as ``z.grad``. CUDA: the allocator's max_memory_allocated() around the same call."""
    try:
        _malloc_returns_memory()
        torch.set_num_threads(spec["threads"])
        dev = spec["device"]
        dtype = DTYPES[spec["dtype"]]
        if spec["kind"] == "calib":
            n, c = spec["N"], spec["C"]
            torch.empty(16, 16).fill_(1)
            r0 = _rss_bytes(); _reset_hwm()
            x = torch.empty(n, c, dtype=dtype).fill_(1)
            conn.send({"extra": _hwm_bytes() - r0, "expected": x.numel() * x.element_size()})
            return
        fns = loss_fns(spec["loss"])
        fn = fns["eager" if spec["impl"] == "compile" else spec["impl"]]
        if spec["impl"] == "compile":
            fn = _compiled(fn)
        else:  # lazy initialisation (extension load, thread pool) on a tiny input
            zs, vs, es = make_inputs(spec["loss"], 4, 16, dtype, dev, spec["labels"])
            make_call(fn, spec["mode"], zs, vs, es)[0]()
            del zs, vs, es
        z, v, extra = make_inputs(spec["loss"], spec["N"], spec["C"], dtype, dev, spec["labels"])
        step, leaves = make_call(fn, spec["mode"], z, v, extra)
        if spec["impl"] == "compile":
            step()  # compiles (the inductor cache is warm from the timing sweep)
            for t in leaves:
                t.grad = None
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            conn.send({"extra": torch.cuda.max_memory_allocated() - base,
                       "backend": fused_backend(dev)})
            return
        import gc
        gc.collect()
        r0 = _rss_bytes()
        _reset_hwm()
        step()
        conn.send({"extra": _hwm_bytes() - r0, "backend": fused_backend(dev)})
    except Exception as e:  # noqa: BLE001
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


_CTX = None


def _mp_context():
    global _CTX
    if _CTX is None:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
        # children re-import ``-m benchmarks.bench`` as their __main__: runpy's harmless warning
        os.environ.setdefault("PYTHONWARNINGS",
                              "ignore:'benchmarks.bench' found in sys.modules:RuntimeWarning")
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "kdfast", "benchmarks.bench"])
    return _CTX


def measure_mem(spec: dict, timeout: float = 900) -> dict:
    ctx = _mp_context()
    rd, wr = ctx.Pipe(duplex=False)
    from benchmarks import bench as mod  # the importable copy (this file may run as __main__)
    p = ctx.Process(target=mod._mem_child, args=(spec, wr))
    p.start()
    wr.close()
    out = rd.recv() if rd.poll(timeout) else {"error": "timeout"}
    p.join(30)
    if p.is_alive():
        p.kill()
    return out


def calibrate_mem(threads: int) -> list:
    """Known allocations: torch.empty(N, C).fill_(1) must show N·C·itemsize bytes."""
    out = []
    for n, c in [(256, 1000), (8192, 1000), (4096, 32000)]:
        r = measure_mem({"kind": "calib", "N": n, "C": c, "dtype": "fp32", "device": "cpu",
                         "threads": threads})
        r.update(N=n, C=c)
        out.append(r)
    return out


# ----------------------------------------------------------------------------- machine


def machine_info(device: str) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"device": device, "cpu": cpu, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "isa": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "hostname_hash": hex(hash(platform.node()) & 0xffff)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        kdfast = _kdfast()
        info["kdfast"] = getattr(kdfast, "__version__", "unknown")
        info["kdfast_file"] = str(Path(kdfast.__file__).resolve()) if kdfast.__file__ else None
    except ImportError:
        info["kdfast"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def device_key(info: dict) -> str:
    if info["device"] == "cuda":
        return f"cuda: {info['gpu']}"
    return f"cpu: {info['cpu']} ({info['threads']} threads, {info['isa']})"


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB buffers."""
    n = (1 << 30) // 4
    a = torch.empty(n, device=device).fill_(1)
    b = torch.empty_like(a)
    if device == "cuda":
        from triton.testing import do_bench
        ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    else:
        step = lambda: b.copy_(a)  # noqa: E731
        step()
        ms = time_cpu(step, torch.get_num_threads(), 1.0, 3, 10, 0.1)["ms"]
    return 2 * a.numel() * 4 / (ms / 1e3)


# ----------------------------------------------------------------------------- checks


TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def check_case(loss, n, c, dtype, device, labels) -> dict:
    """Fused vs eager on the same inputs: loss (relative) and gradient (max abs diff / max abs)."""
    fns = loss_fns(loss)
    z, v, extra = make_inputs(loss, n, c, dtype, device, labels)
    res = {}
    for impl in ("fused", "eager"):
        zr = z.detach().requires_grad_(True)
        val = fns[impl](zr, v, *extra)
        val.backward()
        res[impl] = (val.detach().double(), zr.grad.double())
        del zr, val
    (lf, gf), (le, ge) = res["fused"], res["eager"]
    loss_err = float((lf - le).abs() / le.abs().clamp(min=1e-12))
    grad_err = float((gf - ge).abs().max() / ge.abs().max().clamp(min=1e-30))
    tol = TOL[dtype]
    ok = bool(loss_err <= tol and grad_err <= (tol if dtype == torch.float32 else 4 * tol))
    return {"loss_rel_err": loss_err, "grad_rel_err": grad_err, "ok": ok,
            "loss_fused": float(lf), "loss_eager": float(le)}


# ----------------------------------------------------------------------------- sweep


class Progress:
    def __init__(self, total):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def step(self, what):
        self.done += 1
        el = time.perf_counter() - self.t0
        w = 24
        fill = int(w * self.done / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (w - fill)}] {self.done}/{self.total} "
                         f"{int(el // 60)}m{int(el % 60):02d}s {what[:60]:<60}")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


def fused_backend(device: str) -> str:
    """The backend ``kdfast.<loss>_loss(backend="auto")`` resolves to for ``device`` tensors:
    "cpu" (the C++ kernel), "triton", or "torch" (the eager reference: a FALLBACK, so the fused
    column then measures the eager code and says nothing about kdfast's kernels)."""
    import warnings
    from kdfast import functional as F
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return F._resolve_backend("auto", torch.device(device))
        except Exception as e:  # noqa: BLE001
            return f"error: {type(e).__name__}: {e}"


def _case(mode, loss, n, c, dt, reps=None, mem=False, impls=("fused", "eager", "compile")):
    return dict(mode=mode, loss=loss, N=n, C=c, dtype=dt, reps=reps, mem=mem, impls=tuple(impls))


HEADLINE = (4096, 32000)


def default_plan() -> list:
    """The `make bench` sweep, sized for <= ~15 min on 2 CPU cores (AVX2). There, eager kd fwd+bwd
    at 4096 x 32000 fp32 costs ~10 s per call and every torch.compile case ~15-25 s of compilation
    (counted in wall time, excluded from the timings), so compile runs only where it matters."""
    n, c = HEADLINE
    eager_only = ("fused", "eager")
    plan = [_case("fwdbwd", "kd", n, c, "fp32", reps=5, mem=True)]            # the headline
    plan += [_case("fwdbwd", "kd", 256, 1000, "fp32")]                       # small batch: overhead
    for loss in LOSSES:                                                      # ImageNet: every loss
        plan.append(_case("fwdbwd", loss, 8192, 1000, "fp32", mem=loss == "kd",
                          impls=eager_only if loss in ("logit_matching", "ls_kd", "retro_kd")
                          else ("fused", "eager", "compile")))
    plan += [_case("fwdbwd", "kd", 8192, 1000, "bf16")]
    plan += [_case("fwdbwd", "kd", 512, 131072, "bf16", reps=3, mem=True),   # LLM-ish, bf16
             _case("fwdbwd", "jsd", 512, 131072, "bf16", reps=3, impls=eager_only)]
    plan += [_case("fwd", "kd", 8192, 1000, "fp32"), _case("fwdbwd_tgrad", "kd", 8192, 1000, "fp32"),
             _case("fwd", "kd", n, c, "fp32", reps=3, impls=eager_only)]
    # every loss against torch.compile of its reference at the LLM-vocabulary shape (eager: the kd
    # headline above; ~10 s a call), and the top-k teacher against its dense eager reference
    plan += [_case("fwdbwd", loss, n, c, "fp32", reps=3, impls=("fused", "compile"))
             for loss in LOSSES if loss not in ("kd", "topk_kd")]
    plan += [_case("fwdbwd", "topk_kd", n, c, "fp32", reps=3, mem=True, impls=eager_only)]
    return plan


def quick_plan() -> list:
    """`--quick`: the plumbing at small shapes (~2 min)."""
    return [_case("fwdbwd", "kd", 256, 1000, "fp32", mem=True),
            _case("fwdbwd", "kd", 4096, 1000, "fp32", mem=True),
            _case("fwdbwd", "ttm", 4096, 1000, "fp32"),
            _case("fwdbwd", "dkd", 4096, 1000, "fp32", impls=("fused", "eager")),
            _case("fwdbwd", "kd", 512, 8192, "bf16"),
            _case("fwd", "kd", 4096, 1000, "fp32"),
            _case("fwdbwd_tgrad", "kd", 4096, 1000, "fp32")]


def custom_plan(args) -> list:
    """--losses/--shapes/--dtypes given: their product (fwd+bwd), plus kd fwd / teacher-grad at
    --extra-shapes."""
    plan = [_case("fwdbwd", loss, n, c, dt, mem=True)
            for dt in args.dtypes for (n, c) in args.shapes for loss in args.losses]
    if "kd" in args.losses:
        plan += [_case(mode, "kd", n, c, "fp32") for (n, c) in args.extra_shapes
                 for mode in ("fwd", "fwdbwd_tgrad")]
    return plan


def _rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def run_case(cs, fns, device, threads, cfg, labels_flag, fused_be) -> list:
    """Time every implementation of one case side by side: warm up each, then ``reps`` rounds in
    which each implementation runs one block of calls (the order rotates every round), so slow drift
    of the machine (turbo, other load) hits them alike. Returns one record per implementation."""
    mode, loss, n, c, dt = cs["mode"], cs["loss"], cs["N"], cs["C"], cs["dtype"]
    dtype = DTYPES[dt]
    labels = labels_flag or LOSSES[loss][0]
    z, v, extra = make_inputs(loss, n, c, dtype, device, labels_flag)
    impls = [i for i in cs["impls"] if i in cfg["impls"]]
    recs, steps, t1, vals, grads, callables = {}, {}, {}, {}, {}, {}
    for impl in impls:
        rec = dict(mode=mode, loss=loss, impl=impl, N=n, C=c, dtype=dt, labels=labels)
        if impl == "fused":
            rec["backend"] = fused_be
        recs[impl] = rec
        try:
            fn = _compiled(fns["eager"], fresh=mode == "bwd") if impl == "compile" else fns[impl]
            step, leaves = make_call(fn, mode, z, v, extra)
            _sync(device)
            t0 = time.perf_counter()
            val = step()
            _sync(device)
            t = time.perf_counter() - t0
            if impl == "compile":      # the first call compiled: time a second one
                rec["compile_s"] = round(t, 2)
                _sync(device)
                t0 = time.perf_counter()
                val = step()
                _sync(device)
                t = time.perf_counter() - t0
            vals[impl] = val.detach().double()
            if leaves and impl in ("fused", "eager"):
                grads[impl] = [x.grad for x in leaves]
            steps[impl], t1[impl] = (step, leaves), t
            callables[impl] = fn
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"\n# error: {mode} {loss} {n}x{c} {dt} {impl}: {rec['error']}", file=sys.stderr)
    if "fused" in vals and "eager" in vals:
        err = float((vals["fused"] - vals["eager"]).abs() / vals["eager"].abs().clamp(min=1e-12))
        gerr = (max(_rel_err(a, b) for a, b in zip(grads["fused"], grads["eager"]))
                if grads.get("fused") and grads.get("eager") else None)
        for r in recs.values():
            r["loss_rel_err"] = err
            if gerr is not None:
                r["grad_rel_err"] = gerr
        tol = TOL[dtype]
        if err > tol or (gerr is not None and gerr > (tol if dtype == torch.float32 else 4 * tol)):
            print(f"\n# WARNING: fused and eager disagree for {mode} {loss} {n}x{c} {dt}: loss rel "
                  f"err {err:.2e}, grad rel err {gerr}", file=sys.stderr)
    del grads, vals
    if device == "cuda":
        moved = bytes_moved(mode, loss, n, c, dtype)
        for impl in steps:
            try:
                recs[impl].update(time_cuda_rotated(callables[impl], mode, z, v, extra))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for the rotated sets
                recs[impl]["error"] = f"{type(e).__name__}: {e}"[:500]
                print(f"\n# error timing {mode} {loss} {n}x{c} {dt} {impl}: {recs[impl]['error']}",
                      file=sys.stderr)
                torch.cuda.empty_cache()
                continue
            if mode == "bwd":   # the graph (and any compile) was built outside the timed step
                recs[impl].pop("compile_s", None)
            gbs = moved / (recs[impl]["ms"] / 1e3) / 1e9
            recs[impl].update(bytes_moved=moved, GBs=gbs)
            if cfg.get("copy_GBs"):
                recs[impl]["copy_frac"] = gbs / cfg["copy_GBs"]
    elif steps:
        number = {i: max(1, math.ceil(0.02 / max(t1[i], 1e-6))) for i in steps}
        per_round = sum(t1[i] * number[i] for i in steps)
        reps = cs["reps"] or int(min(cfg["max_reps"], max(cfg["min_reps"],
                                                          cfg["budget_s"] // max(per_round, 1e-9))))
        times = {i: [] for i in steps}
        order = list(steps)
        for r in range(reps):      # torch.set_num_threads(threads) was called by main()
            for impl in order[r % len(order):] + order[:r % len(order)]:
                step = steps[impl][0]
                t0 = time.perf_counter()
                for _ in range(number[impl]):
                    step()
                times[impl].append((time.perf_counter() - t0) / number[impl])
        for impl in steps:
            recs[impl].update(_summary(times[impl], number[impl]))
    del steps, callables, z, v, extra
    if device == "cuda":
        torch.cuda.empty_cache()
    return list(recs.values())


def sweep(args) -> tuple[list, dict]:
    device = args.device
    cfg = dict(budget_s=args.budget, min_reps=args.min_reps, max_reps=args.max_reps,
               impls=args.impls)
    threads = torch.get_num_threads()
    info = machine_info(device)
    info["fused_backend"] = fused_be = fused_backend(device)
    info["loadavg_start"] = os.getloadavg()   # other processes on the machine make timings noise
    if info["loadavg_start"][0] > 0.5:
        print(f"# WARNING: load average {info['loadavg_start'][0]:.2f} before the sweep: something "
              "else is running; timings will be noisy", file=sys.stderr)
    if fused_be not in ("cpu", "triton"):
        print(f"\n# WARNING: kdfast resolves backend='auto' to {fused_be!r} on {device}: the fused "
              "column is the EAGER REFERENCE (fallback), not kdfast's kernels\n", file=sys.stderr)
    key = device_key(info)
    plan = args.plan
    losses = sorted({cs["loss"] for cs in plan})
    avail = {l: loss_fns(l) for l in losses}
    skipped = [l for l in losses if set(avail[l]) != {"fused", "eager"}]
    plan = [cs for cs in plan if cs["loss"] not in skipped]
    if skipped:
        print(f"# skipped (not in kdfast yet): {', '.join(skipped)}", file=sys.stderr)
    if device == "cuda":
        plan = cuda_plan(plan)
        # measured first: every timed record carries its achieved bandwidth as a fraction of it
        info["copy_bandwidth_GBs"] = cfg["copy_GBs"] = copy_bandwidth(device) / 1e9
        info["l2_bytes"] = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", None)
    if args.no_extra:
        plan = [cs for cs in plan if cs["mode"] == "fwdbwd"]
    mem_cases = [] if args.no_mem else [
        (cs["loss"], cs["N"], cs["C"], cs["dtype"], impl) for cs in plan if cs["mem"]
        and cs["mode"] == "fwdbwd" for impl in cs["impls"] if impl in args.impls]
    shapes_dt = sorted({(cs["N"], cs["C"], cs["dtype"]) for cs in plan if cs["mode"] == "fwdbwd"})
    prog = Progress(len(plan) + len(shapes_dt) + len(mem_cases))
    out = []
    common = dict(device_key=key, device=device, threads=threads, date=info["date"])

    for (n, c, dt) in shapes_dt:
        prog.step(f"add {n}x{c} {dt}")
        dtype = DTYPES[dt]
        a = torch.randn(n, c, device=device).to(dtype)
        b, o = torch.randn_like(a), torch.empty_like(a)
        step = lambda: torch.add(a, b, out=o)  # noqa: E731
        r = measure(step, [], device, threads, dict(cfg, max_reps_slow=cfg["min_reps"]), warmups=2)
        out.append(dict(common, mode="fwdbwd", loss="-", impl="add", N=n, C=c, dtype=dt, **r))
        del a, b, o

    for cs in plan:
        prog.step(f"{cs['mode']} {cs['loss']} {cs['N']}x{cs['C']} {cs['dtype']}")
        for rec in run_case(cs, avail[cs["loss"]], device, threads, cfg, args.labels, fused_be):
            out.append(dict(common, **rec))

    for (loss, n, c, dt, impl) in mem_cases:
        prog.step(f"mem {loss} {n}x{c} {dt} {impl}")
        spec = dict(kind="loss", loss=loss, impl=impl, N=n, C=c, dtype=dt, device=device,
                    mode="fwdbwd", labels=args.labels, threads=threads)
        r = measure_mem(spec)
        grad_bytes = n * c * DTYPES[dt].itemsize
        rec = dict(common, mode="mem", loss=loss, impl=impl, N=n, C=c, dtype=dt,
                   grad_bytes=grad_bytes, labels=args.labels or LOSSES[loss][0])
        if impl == "fused":   # as resolved in the child process
            rec["backend"] = r.get("backend", fused_be)
        if "error" in r:
            rec["error"] = r["error"]
        else:
            rec["extra_bytes"] = r["extra"]
            rec["extra_grad_units"] = r["extra"] / grad_bytes
        out.append(rec)
    prog.close()

    info["elapsed_s"] = round(time.perf_counter() - prog.t0, 1)
    info["argv"] = " ".join(sys.argv[1:])
    info["loadavg_end"] = os.getloadavg()
    info["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in ("merge", "plan")}
    if device != "cuda" and not args.no_mem:
        info["mem_calibration"] = calibrate_mem(threads)
    return out, {key: info}


# ----------------------------------------------------------------------------- results file


def _mkey(m):
    return (m["device_key"], m["mode"], m["loss"], m["impl"], m["N"], m["C"], m["dtype"],
            m.get("labels", False))


def merge_results(base: dict, new: dict) -> dict:
    """Measurements of ``new`` replace those of ``base`` with the same key (device, mode, loss,
    impl, shape, dtype, labels); everything else is kept. Machines likewise, by device key."""
    machines = dict(base.get("machines", {}))
    machines.update(new.get("machines", {}))
    meas = {_mkey(m): m for m in base.get("measurements", [])}
    for m in new.get("measurements", []):
        meas[_mkey(m)] = m
    return {"schema": 1, "machines": machines, "measurements": list(meas.values())}


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"schema": 1, "machines": {}, "measurements": []}


# ----------------------------------------------------------------------------- CLI


def _shape(s):
    n, c = s.lower().split("x")
    return int(n), int(c)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sweep (~2 min on 2 CPU cores)")
    p.add_argument("--losses", type=lambda s: s.split(","), default=None,
                   help=f"comma list from {','.join(LOSSES)} (default {','.join(DEFAULT_LOSSES)})")
    p.add_argument("--shapes", type=lambda s: [_shape(x) for x in s.split(",")], default=None,
                   help="comma list of NxC (default " +
                   ",".join(f"{n}x{c}" for n, c in DEFAULT_SHAPES) + ")")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=None, help="fp32,bf16,fp16")
    p.add_argument("--impls", type=lambda s: s.split(","), default=["fused", "eager", "compile"])
    p.add_argument("--extra-shapes", type=lambda s: [_shape(x) for x in s.split(",")],
                   default=None, help="shapes of the kd forward-only / teacher-grad set")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--labels", action="store_true",
                   help="pass labels (add the CE term) to every loss, not only to dkd")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    p.add_argument("--min-reps", type=int, default=None)
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--no-mem", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-extra", action="store_true", help="skip the kd fwd / teacher-grad set")
    p.add_argument("--check", action="store_true",
                   help="only check fused == eager (loss and gradient) on the selected cases")
    p.add_argument("--merge", action="append", default=[], metavar="JSON",
                   help="merge another results file in (repeatable); with no sweep options given "
                        "only merges and regenerates the report")
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    p.add_argument("--report-dir", type=Path, default=HERE)
    p.add_argument("--fresh", action="store_true", help="ignore the existing results file")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    args.merge_only = bool(args.merge) and not any(
        x in (argv if argv is not None else sys.argv[1:])
        for x in ("--quick", "--losses", "--shapes", "--dtypes", "--device", "--check"))
    q = args.quick
    custom = any(x is not None for x in (args.losses, args.shapes, args.dtypes))
    args.losses = args.losses or DEFAULT_LOSSES
    args.shapes = args.shapes or ([(256, 1000), (4096, 1000)] if q else DEFAULT_SHAPES)
    args.dtypes = args.dtypes or ["fp32"]
    args.extra_shapes = args.extra_shapes or EXTRA_SHAPES
    args.budget = args.budget if args.budget is not None else (0.3 if q else 1.5)
    args.min_reps = args.min_reps or (3 if q else 5)
    args.max_reps = args.max_reps or (7 if q else 15)
    args.plan = custom_plan(args) if custom else (quick_plan() if q else default_plan())
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}")
    for l in args.losses:
        if l not in LOSSES:
            p.error(f"unknown loss {l!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    results = {"schema": 1, "machines": {}, "measurements": []} if args.fresh else \
        load_results(args.out)
    for other in args.merge:
        results = merge_results(results, json.loads(Path(other).read_text()))
    if not args.merge_only:
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        threads = args.threads or (os.cpu_count() or 1)
        torch.set_num_threads(threads)
        try:
            _kdfast()
        except ImportError as e:
            sys.exit(f"kdfast is not importable: {e}")
        if args.check:
            bad = 0
            for dt in args.dtypes:
                for (n, c) in args.shapes:
                    for loss in args.losses:
                        if set(loss_fns(loss)) != {"fused", "eager"}:
                            print(f"skip {loss}: not in kdfast yet")
                            continue
                        r = check_case(loss, n, c, DTYPES[dt], args.device,
                                       args.labels or LOSSES[loss][0])
                        bad += not r["ok"]
                        print(f"{'ok ' if r['ok'] else 'BAD'} {loss:>14} {n:>6}x{c:<7} {dt}  "
                              f"loss rel err {r['loss_rel_err']:.2e}  "
                              f"grad rel err {r['grad_rel_err']:.2e}", flush=True)
            sys.exit(1 if bad else 0)
        meas, machines = sweep(args)
        results = merge_results(results, {"machines": machines, "measurements": meas})
        print(f"# sweep took {machines[next(iter(machines))]['elapsed_s']} s", file=sys.stderr)
    args.out.write_text(json.dumps(results, indent=1))
    if not args.no_report:
        from benchmarks import report
        report.write_report(results, args.report_dir)
    print(f"wrote {args.out}" + ("" if args.no_report else f" and {args.report_dir}/RESULTS.md"))


if __name__ == "__main__":
    main()
