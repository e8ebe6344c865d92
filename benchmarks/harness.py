"""The benchmark harness every suite builds on: timing, peak memory, the machine, one results schema.

A suite (``bench.py``, ``bench_fused_linear.py``, ``bench_multi_teacher.py``,
``bench_vocab_parallel.py``, ``bench_gpu.py``) only declares its cases (inputs, implementations, the
floor) and hands the calls to this module; nothing here knows about losses.

Timing
  - :func:`setup_cpu`: the fixed torch thread count of the CPU protocol (``THREADS`` = 2).
  - :func:`first_call`: one call, synchronised and timed (warm-up; the per-call estimate).
  - :func:`time_interleaved`: CPU protocol. Every implementation of a case runs one block of calls
    (>= ``BLOCK_S`` of calls, from its estimate) per round, the order rotating each round, all in
    one process: drift of a shared machine hits them alike; median, quartiles and minimum per
    implementation. On CUDA each implementation goes to :func:`time_call` instead.
  - :func:`time_call`: one implementation alone. CUDA: CUDA events around each call, the L2 flushed
    before each (a 256 MiB write, as ``triton.testing.do_bench`` does); CPU: blocks of >= 20 ms.
  - :func:`make_step`, :func:`rotating`, :func:`sync`. No ``.item()`` or other host sync inside a
    timed call: a step returns its loss tensor and nobody reads it there.

Memory
  - :func:`peak_bytes`: the peak of one call beyond what was allocated before it (the ``.grad`` it
    leaves included). CUDA: ``max_memory_allocated``; CPU: ``VmHWM - RSS`` (the high-water mark
    reset through ``/proc/self/clear_refs``), a page-granular OS number, with glibc told to serve
    allocations >= 64 KiB by mmap (:func:`malloc_returns_memory`) so freed memory leaves the RSS.
  - :func:`in_fresh_process` / :func:`in_fresh_processes`: run a module-level function in new
    processes (a forkserver that preloaded torch, kdfast and the suite): the CPU peak is taken there,
    on a process that only allocated the case's inputs; also the multi-process (gloo) runs.
  - :func:`calibrate_memory`: the CPU method on known allocations (``torch.empty(N, C).fill_(1)``).

Machine: :func:`machine` (CPU model, ISA from ``torch.backends.cpu.get_cpu_capability()``, cores,
threads, torch / triton / kdfast / Python versions, load average, date, commit; GPU fields on CUDA),
:func:`machine_id` (a row's ``machine``), :func:`describe` (one line for a title),
:func:`copy_bandwidth`.

Results (``SCHEMA``; one JSON file per suite, all the same shape): :class:`Results` ::

    {"schema": "kdfast-bench/2", "suite": str,
     "machines": {machine_id: machine()}, "config": {...}, "calibration": {...}, "extra": {...},
     "rows": [ {"suite": str, "machine": machine_id,
                "case": {"loss", "mode", "dtype", shape: "N", "C", ["H"], ["M"], ...suite keys},
                "impl": str, "status": "ok" | "skipped" | "oom" | "error", ["reason"],
                "ms", "ms_q25", "ms_q75", "ms_min", "reps", "number", ["times_ms"], ["warmup_s"],
                ["peak_bytes", "peak_method"], ...suite's derived fields} ]}

``mode`` is ``fwdbwd`` (the student requires grad, loss + backward), ``fwd``, ``fwdbwd_tgrad``,
``bwd``, or ``floor`` (a memory-floor reference such as ``torch.add(a, b, out=c)``). Rows are keyed
by (suite, machine, case, impl): :func:`merge` lets a new run replace the rows it measured again.
:func:`load` reads a file; :func:`log`, :class:`Budget`, :func:`md_table` are small utilities.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SCHEMA = "kdfast-bench/2"
THREADS = 2          # the CPU protocol's torch thread count
BLOCK_S = 0.02       # a CPU timing block: calls repeated until it lasts this long
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


class Budget:
    """Seconds of wall time from now; ``left()`` may go negative."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = float(seconds), time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


# ----------------------------------------------------------------------------- calls and timing
def setup_cpu(threads: int | None = None) -> int:
    """Fix torch's thread count (default ``THREADS``, at most the cores); returns it."""
    n = max(1, min(threads or THREADS, os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n


def make_step(fn, inputs: dict, leaves=(), mode: str = "fwdbwd"):
    """A zero-argument callable doing one measured call of ``fn(**inputs)``.

    ``fwd``: under ``torch.no_grad()``. ``fwdbwd``: the inputs named in ``leaves`` are detached
    copies that require grad; each call resets their ``.grad`` to None (as
    ``zero_grad(set_to_none=True)`` does), computes the loss and calls ``backward()``."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(**inputs)
        return step
    if mode != "fwdbwd":
        raise ValueError(f"mode must be fwd or fwdbwd, got {mode!r}")
    ins = dict(inputs)
    for k in leaves:
        ins[k] = inputs[k].detach().requires_grad_(True)

    def step():
        for k in leaves:
            ins[k].grad = None
        loss = fn(**ins)
        loss.backward()
        return loss
    return step


def rotating(steps):
    """One step calling ``steps`` in turn (call i runs steps[i mod len]): with one input set per
    step, no call finds its inputs in the cache the previous call left."""
    state = {"i": 0}

    def step():
        i = state["i"]
        state["i"] = (i + 1) % len(steps)
        return steps[i]()
    return step


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def first_call(step, device="cpu"):
    """(``step()``'s result, its wall seconds), synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = step()
    sync(device)
    return out, time.perf_counter() - t0


def summarize(times_s: list, number: int = 1, warmup_s: float | None = None) -> dict:
    """``ms`` (median), ``ms_q25``, ``ms_q75``, ``ms_min``, ``reps``, ``number`` (calls per timed
    block), ``times_ms`` (the first 50) of per-call times in seconds."""
    ts = sorted(times_s)
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    out = {"ms": 1e3 * statistics.median(ts), "ms_q25": 1e3 * q[0], "ms_q75": 1e3 * q[2],
           "ms_min": 1e3 * ts[0], "reps": len(ts), "number": number,
           "times_ms": [round(1e3 * t, 4) for t in times_s][:50]}
    if warmup_s is not None:
        out["warmup_s"] = round(warmup_s, 3)
    return out


def time_interleaved(steps: dict, device="cpu", *, estimates: dict | None = None, reps: int | None = None,
                     budget_s: float = 1.0, min_reps: int = 3, max_reps: int = 15,
                     limit: dict | None = None, block_s: float = BLOCK_S) -> dict:
    """Time the implementations of one case side by side: {name: :func:`summarize`}.

    ``steps``: name -> zero-argument step, already warmed up. ``estimates``: name -> seconds of one
    call (measured by one call each where missing; ``inf``: unknown and slow, blocks of one call). A block is ``ceil(block_s / estimate)`` calls.
    ``reps`` rounds (default: as many as ``budget_s`` allows, clamped to [min_reps, max_reps]); in
    round r the order is rotated by r. ``limit``: name -> at most that many rounds (a slow baseline
    timed once). CUDA: each step through :func:`time_call` (``budget_s`` each) instead."""
    if torch.device(device).type == "cuda":
        return {k: time_call(s, device, budget_s=budget_s, min_reps=min_reps, max_reps=max(max_reps, 100),
                             warmup=0) for k, s in steps.items()}
    est = dict(estimates or {})
    for k, s in steps.items():
        if k not in est:
            est[k] = first_call(s, device)[1]
    number = {k: max(1, math.ceil(block_s / max(est[k], 1e-7))) for k in steps}
    if reps is None:
        per_round = sum(est[k] * number[k] for k in steps)
        reps = int(min(max_reps, max(min_reps, budget_s // max(per_round, 1e-9))))
    limit = limit or {}
    times = {k: [] for k in steps}
    order = list(steps)
    for r in range(reps):
        for k in order[r % len(order):] + order[:r % len(order)]:
            if r >= limit.get(k, reps):
                continue
            t0 = time.perf_counter()
            for _ in range(number[k]):
                steps[k]()
            times[k].append((time.perf_counter() - t0) / number[k])
    return {k: summarize(times[k], number[k]) for k in steps}


_FLUSH = {}


def _l2_flush(device):
    """A 256 MiB buffer whose ``zero_()`` evicts the L2 (every current GPU's L2 is smaller)."""
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(256 << 20, dtype=torch.int8, device=device)
    return _FLUSH[key]


def time_call(step, device, *, budget_s: float = 0.2, min_reps: int = 3, max_reps: int = 100,
              warmup: int = 1) -> dict:
    """Per-call time of ``step()`` alone: ``warmup`` calls first (their wall time is ``warmup_s``:
    it holds ``torch.compile``'s compilation), then as many timed calls as ``budget_s`` allows after
    a one-call estimate, clamped to [min_reps, max_reps] (budget 0: ``min_reps`` calls, no
    estimate). CUDA: event times of single calls, the L2 flushed before each (outside the timed
    region); CPU: blocks of >= ``BLOCK_S``. Returns :func:`summarize` with ``warmup_s``."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(dev)
    warmup_s = time.perf_counter() - t0
    if dev.type == "cuda":
        flush = _l2_flush(dev)
        ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        a, b = ev(), ev()
        flush.zero_()
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        est = a.elapsed_time(b) / 1e3
        reps = int(min(max_reps, max(min_reps, budget_s // max(est, 1e-6))))
        marks = [(ev(), ev()) for _ in range(reps)]
        for s, e in marks:
            flush.zero_()
            s.record()
            step()
            e.record()
        torch.cuda.synchronize()
        return summarize([s.elapsed_time(e) / 1e3 for s, e in marks], 1, warmup_s)
    number, reps = 1, min_reps
    if budget_s > 0:
        est = max(first_call(step, dev)[1], 1e-7)
        number = max(1, math.ceil(BLOCK_S / est))
        reps = int(min(max_reps, max(min_reps, budget_s // (est * number))))
    times = []
    for _ in range(reps):
        t1 = time.perf_counter()
        for _ in range(number):
            step()
        times.append((time.perf_counter() - t1) / number)
    return summarize(times, number, warmup_s)


# ----------------------------------------------------------------------------- memory
def _status_bytes(field: str):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_returns_memory() -> None:
    """glibc: every allocation >= 64 KiB its own mmap (returned to the OS on free), no trimming
    threshold, so freed warm-up buffers do not sit resident and hide the measured call's peak.
    (New processes of :func:`in_fresh_process` get it from ``MALLOC_MMAP_THRESHOLD_`` too.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)       # M_TRIM_THRESHOLD
    except OSError:
        pass


def peak_bytes(step, device="cpu"):
    """Peak memory of one ``step()`` beyond what was allocated before it (what it leaves alive, a
    ``.grad`` say, counts). None where it cannot be read (no /proc, or no permission to reset the
    high-water mark). On the CPU run it in a fresh process (:func:`in_fresh_process`)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(dev) - base)
    gc.collect()
    try:
        rss = rss_bytes()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current RSS
        step()
        hwm = _status_bytes("VmHWM")
    except OSError:
        return None
    return None if hwm is None else int(hwm - rss)


PEAK_METHOD = {"cpu": "VmHWM - RSS around one call, fresh process", "cuda": "max_memory_allocated"}

_CTX = None


def _context(module: str):
    """The forkserver context (one per run), its server preloading torch, kdfast and ``module``."""
    global _CTX
    if _CTX is None:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
        # a suite run with -m is re-imported under its name in the server: runpy's harmless warning
        os.environ.setdefault("PYTHONWARNINGS", "ignore::RuntimeWarning:runpy")
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "kdfast", module])
    return _CTX


def _importable(fn):
    """``fn`` as its module's importable name sees it (a suite run as ``__main__`` is imported
    again under its own name in the new process)."""
    mod = fn.__module__
    if mod == "__main__":
        import importlib
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        if spec is not None:
            mod = spec.name
        else:   # python benchmarks/<suite>.py: the dotted name from the package folders above it
            path = Path(main.__file__).resolve()
            parts = [path.stem]
            while (path.parent / "__init__.py").exists():
                path = path.parent
                parts.insert(0, path.name)
            mod = ".".join(parts)
        fn = getattr(importlib.import_module(mod), fn.__name__)
    return fn, mod


def _child(fn, args, conn):
    try:
        malloc_returns_memory()
        conn.send(fn(*args))
    except BaseException as e:   # noqa: BLE001 (reported to the parent)
        conn.send({"error": f"{type(e).__name__}: {e}"[:500]})
    finally:
        conn.close()


def in_fresh_processes(fn, args_list: list, timeout: float = 900) -> list:
    """``fn(*args)`` for every ``args`` of ``args_list``, each in a new process, all running at once
    (the ranks of a multi-process run); their return values (picklable), or ``{"error": ...}`` for
    a process that raised, died (out of memory, say) or ran past ``timeout`` seconds."""
    fn, mod = _importable(fn)
    ctx = _context(mod)
    procs = []
    for args in args_list:
        rd, wr = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(fn, tuple(args), wr))
        p.start()
        wr.close()
        procs.append((p, rd))
    out, t_end = [], time.monotonic() + timeout
    for p, rd in procs:
        try:
            ok = rd.poll(max(0.0, t_end - time.monotonic()))
            out.append(rd.recv() if ok else {"error": f"timeout ({timeout:.0f} s)"})
        except EOFError:
            out.append({"error": "the process died (killed for memory?)"})
    for p, _ in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return out


def in_fresh_process(fn, *args, timeout: float = 900):
    """``fn(*args)`` in a new process: its return value or ``{"error": ...}``."""
    return in_fresh_processes(fn, [args], timeout)[0]


def _calib_child(n: int, c: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.empty(16, 16).fill_(1)
    x = []
    extra = peak_bytes(lambda: x.append(torch.empty(n, c).fill_(1)))
    return {"N": n, "C": c, "expected": n * c * 4, "extra": extra}


def calibrate_memory(shapes=((256, 1000), (8192, 1000), (4096, 32000)), threads: int = THREADS) -> list:
    """The CPU peak method on ``torch.empty(N, C).fill_(1)`` (float32), each in a fresh process:
    [{"N", "C", "expected", "extra"}]; ``extra - expected`` is the method's error."""
    return [in_fresh_process(_calib_child, n, c, threads) for n, c in shapes]


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device, collect: bool = False) -> None:
    """Return cached blocks to the device; ``collect``: first a full garbage collection (after an
    exception, whose traceback frames hold tensors in cycles)."""
    if collect:
        gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure(results: "Results", case: dict, impls: dict, inputs: dict, leaves, device, *,
            budget_s: float = 0.2, min_reps: int = 3, warmup: int = 1, derived=None, on_row=None) -> dict:
    """Time and in-process peak memory of every implementation of one case, one after the other
    (:func:`time_call`, :func:`peak_bytes`: the GPU protocol). ``impls``: name -> a function of
    ``**inputs`` returning the loss, or a string: the reason it is not run (a ``skipped`` row).
    ``case["mode"]``: ``fwd`` or ``fwdbwd``. Each row also gets the loss value (``value``, from the
    memory call) and ``derived(timing)``'s fields. Out-of-memory and other exceptions become
    ``oom`` / ``error`` rows; the next implementation still runs. Returns {impl: row}."""
    rows = {}
    for name, fn in impls.items():
        if isinstance(fn, str):
            rows[name] = row = results.add(case, name, "skipped", reason=fn)
        else:
            step, failed = None, False
            try:
                step = make_step(fn, inputs, leaves, case["mode"])
                t = time_call(step, device, budget_s=budget_s, min_reps=min_reps, warmup=warmup)
                out = []
                peak = peak_bytes(lambda: out.append(step()), device)
                t.update(peak_bytes=peak, peak_method=PEAK_METHOD[torch.device(device).type].split(",")[0],
                         value=float(out[0].detach().float().sum()))
                if derived is not None:
                    t.update(derived(t))
                rows[name] = row = results.add(case, name, **t)
                del out
            except Exception as e:   # noqa: BLE001 (recorded; the other implementations still run)
                status, failed = ("oom" if is_oom(e) else "error"), True
                rows[name] = row = results.add(case, name, status, reason=f"{type(e).__name__}: {e}"[:400])
            finally:
                del step
                free_memory(device, collect=failed)
        if on_row is not None:
            on_row(row)
    return rows


# ----------------------------------------------------------------------------- the machine
def _run(cmd) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _driver_version():
    try:
        import pynvml
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:   # noqa: BLE001 (no NVML, or an old binding: try the command line)
        out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        return out.splitlines()[0].strip() if out else None


def package_version(name: str):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _kdfast_version():
    try:
        import kdfast
        return getattr(kdfast, "__version__", None) or package_version("kdfast")
    except ImportError:
        return None


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine(device="cpu", root: Path | None = None) -> dict:
    """The machine and software a run measured on (the load average at the time of the call)."""
    dev = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"device": dev.type, "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "isa": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "torch": torch.__version__, "triton": package_version("triton"),
            "kdfast": _kdfast_version(), "cuda_runtime": torch.version.cuda,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", ""), "loadavg": loadavg(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if root is not None:
        info["commit"] = _run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
        info["dirty"] = bool(_run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"]))
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_bytes=p.total_memory, l2_bytes=getattr(p, "L2_cache_size", None),
                    driver=_driver_version())
    return info


def machine_id(info: dict) -> str:
    """A row's ``machine``: ``cpu: <model> (<threads> threads, <ISA>)`` or ``cuda: <GPU>``."""
    if info["device"] == "cuda":
        return f"cuda: {info['gpu']}"
    return f"cpu: {info['cpu']} ({info['threads']} threads, {info.get('isa')})"


def describe(info: dict) -> str:
    """One line for a report header or a figure title."""
    if info["device"] == "cuda":
        return (f"{info['gpu']} (sm_{info['capability'].replace('.', '')}, {info['sms']} SMs, "
                f"{info['memory_bytes'] / 2**30:.0f} GiB), driver {info['driver']}, CUDA {info['cuda_runtime']}, "
                f"torch {info['torch']}, triton {info['triton']}, Python {info['python']}")
    soft = [f"{k} {info[k.lower()]}" for k in ("torch", "triton", "Python") if info.get(k.lower())]
    return (f"CPU: {info['cpu']} ({info.get('isa')}, {info['threads']} threads), " + ", ".join(soft)
            + (", TRITON_INTERPRET=1" if info.get("triton_interpret") == "1" else ""))


def copy_bandwidth(device, nbytes: int = 1 << 30) -> dict:
    """``b.copy_(a)`` of ``nbytes``: bytes read + written per second (``bytes_per_s``)."""
    a = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = time_call(lambda: b.copy_(a), device, budget_s=0.3, min_reps=5)
    del a, b
    free_memory(device)
    moved = 2 * (nbytes // 4) * 4
    return {"bytes": moved, "ms": t["ms"], "bytes_per_s": moved / (t["ms"] / 1e3)}


# ----------------------------------------------------------------------------- results
class Results:
    """One suite's results file (the module docstring's schema); :meth:`add` appends a row and
    rewrites the file (``path`` None: in memory only), so a killed run keeps what it measured."""

    def __init__(self, suite: str, path: Path | None, machine_info: dict, config: dict | None = None):
        self.path, self.suite, self.machine = path, suite, machine_id(machine_info)
        self.doc = {"schema": SCHEMA, "suite": suite, "machines": {self.machine: machine_info},
                    "config": dict(config or {}), "calibration": {}, "rows": [], "extra": {}}

    @property
    def rows(self) -> list:
        return self.doc["rows"]

    def add(self, case: dict, impl: str, status: str = "ok", **fields) -> dict:
        row = {"suite": self.suite, "machine": self.machine, "case": dict(case), "impl": impl,
               "status": status, **fields}
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        if self.path is not None:
            self.path = Path(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.doc, indent=1, default=str))
            tmp.replace(self.path)


def row_key(row: dict) -> tuple:
    return (row["suite"], row["machine"], tuple(sorted(row["case"].items())), row["impl"])


def merge(base: dict, new: dict) -> dict:
    """``base`` with ``new``'s rows replacing those of the same key (suite, machine, case, impl) and
    its machines, config, calibration and extra folded in (``new`` wins)."""
    out = dict(base)
    for k in ("machines", "config", "calibration", "extra"):
        out[k] = {**base.get(k, {}), **new.get(k, {})}
    rows = {row_key(r): r for r in base.get("rows", [])}
    rows.update({row_key(r): r for r in new.get("rows", [])})
    out["rows"] = list(rows.values())
    return out


def load(path: Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {doc.get('schema')!r}, expected {SCHEMA!r}")
    return doc


def md_table(header: list, rows: list) -> list:
    """Markdown table lines (None cells: ``-``)."""
    def cell(x):
        return "-" if x is None else str(x)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return out


if __name__ == "__main__":   # python -m benchmarks.harness: this machine, as a report names it
    setup_cpu()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info = machine(dev, Path(__file__).resolve().parent.parent)
    print(machine_id(info))
    print(describe(info))
    json.dump(info, sys.stdout, indent=1)
    print()
