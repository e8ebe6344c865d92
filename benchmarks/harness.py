"""The benchmark harness a suite builds on: timing, peak memory, the machine, one results schema.

A suite only declares its cases (what to call, on which inputs) and hands each call to this module;
nothing here knows about losses. ``benchmarks/bench_gpu.py`` is the first suite on it; the CPU suites
(``bench.py``, ``bench_fused_linear.py``, ``bench_multi_teacher.py``) can move onto it as they are:
the CPU paths below are the methods they use today (perf_counter medians over blocks of calls;
``VmHWM`` peaks).

- :func:`make_step`: one measured call (``fwd``: under ``no_grad``; ``fwdbwd``: the leaves' grads
  reset to None, the loss, its backward).
- :func:`time_call`: warm-up (its wall time is returned: it holds ``torch.compile``'s compile), then
  the median and quartiles of per-call times. CUDA: CUDA events around each call, the L2 cache
  flushed before each (a 256 MiB write, as ``triton.testing.do_bench`` does); CPU:
  ``time.perf_counter`` around blocks of calls of >= 20 ms.
- :func:`peak_bytes`: the peak memory of one call beyond what was allocated before it (CUDA:
  ``torch.cuda.max_memory_allocated``; CPU: ``VmHWM`` - ``VmRSS`` of this process, Linux only).
- :func:`machine`: device, driver, CUDA runtime, torch / triton / python versions, CPU, commit.
- :func:`copy_bandwidth`: a device-to-device ``copy_``, bytes read + written per second: the
  ceiling achieved bandwidths are quoted against.
- :class:`Results`: the results file (``SCHEMA``), rewritten after every row, so a run that is
  killed keeps what it measured. A row is ``{"case": {...suite's keys}, "impl": ..., "status":
  "ok" | "skipped" | "oom" | "error", "reason": ..., "ms", "ms_q25", "ms_q75", "reps",
  "warmup_s", "peak_bytes", ...suite's derived numbers}``.
- :class:`Budget` and :func:`log`: a wall-clock budget, progress lines stamped with the elapsed time.
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SCHEMA = "kdfast-bench/1"
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


class Budget:
    """Seconds of wall time from now; ``left()`` may go negative."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


# ----------------------------------------------------------------------------- calls and timing
def make_step(fn, inputs: dict, leaves=(), mode: str = "fwdbwd"):
    """A zero-argument callable doing one measured call of ``fn(**inputs)``.

    ``fwd``: under ``torch.no_grad()`` (no input requires grad). ``fwdbwd``: the inputs named in
    ``leaves`` are detached copies that require grad; each call resets their ``.grad`` to None (as
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


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _summary(times_s: list, warmup_s: float) -> dict:
    q = statistics.quantiles(times_s, n=4) if len(times_s) > 1 else [times_s[0]] * 3
    return {"ms": 1e3 * statistics.median(times_s), "ms_q25": 1e3 * q[0], "ms_q75": 1e3 * q[2],
            "reps": len(times_s), "warmup_s": round(warmup_s, 3)}


_FLUSH = {}


def _l2_flush(device):
    """A 256 MiB buffer whose ``zero_()`` evicts the L2 (every current GPU's L2 is smaller)."""
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(256 << 20, dtype=torch.int8, device=device)
    return _FLUSH[key]


def time_call(step, device, *, budget_s: float = 0.2, min_reps: int = 3, max_reps: int = 100,
              warmup: int = 1) -> dict:
    """Per-call time of ``step()``: ``warmup`` calls first (their wall time is ``warmup_s``), then
    ``reps`` timed calls, as many as ``budget_s`` allows after a one-call estimate, clamped to
    [min_reps, max_reps]. Returns ``ms`` (median), ``ms_q25``, ``ms_q75``, ``reps``, ``warmup_s``."""
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
            flush.zero_()   # outside the timed region; evicts the previous call's cache lines
            s.record()
            step()
            e.record()
        torch.cuda.synchronize()
        return _summary([s.elapsed_time(e) / 1e3 for s, e in marks], warmup_s)
    number, reps = 1, min_reps
    if budget_s > 0:   # (budget 0: min_reps single calls, no estimate: a smoke run)
        t1 = time.perf_counter()
        step()
        est = max(time.perf_counter() - t1, 1e-7)
        number = max(1, math.ceil(0.02 / est))      # blocks of >= 20 ms
        reps = int(min(max_reps, max(min_reps, budget_s // (est * number))))
    times = []
    for _ in range(reps):
        t1 = time.perf_counter()
        for _ in range(number):
            step()
        times.append((time.perf_counter() - t1) / number)
    return _summary(times, warmup_s)


# ----------------------------------------------------------------------------- memory
def _proc_status_bytes(field: str):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def peak_bytes(step, device):
    """Peak memory of one ``step()`` beyond what was allocated before it (what it leaves alive, a
    ``.grad`` say, counts). None where it cannot be read (CPU without /proc, or no permission to
    reset the high-water mark)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(dev) - base)
    try:
        rss = _proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current RSS
        step()
        hwm = _proc_status_bytes("VmHWM")
    except OSError:
        return None
    return None if rss is None or hwm is None else int(hwm - rss)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device, collect: bool = False) -> None:
    """Return cached blocks to the device; ``collect``: first a full garbage collection (after an
    exception, whose traceback frames hold tensors in cycles; ~0.3 s with torch and triton loaded)."""
    if collect:
        gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure(results: "Results", case: dict, impls: dict, inputs: dict, leaves, device, *,
            budget_s: float = 0.2, min_reps: int = 3, warmup: int = 1, derived=None, on_row=None) -> dict:
    """Time and peak memory of every implementation of one case, on the same inputs, one after the
    other. ``impls``: name -> a function of ``**inputs`` returning the loss, or a string: the reason
    it is not run (a ``skipped`` row). ``case["mode"]``: ``fwd`` or ``fwdbwd`` (:func:`make_step`).
    Each row also gets the loss value (``value``, from the memory call) and ``derived(timing)``'s
    fields. Out-of-memory and other exceptions become ``oom`` / ``error`` rows; the next
    implementation still runs. Returns {impl: row}."""
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
                t.update(peak_bytes=peak, value=float(out[0].detach().float().sum()))
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


def machine(device, root: Path | None = None) -> dict:
    """The machine and software a run measured on."""
    dev = torch.device(device)
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"device": dev.type, "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "triton": package_version("triton"), "cuda_runtime": torch.version.cuda,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
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


def describe(info: dict) -> str:
    """One line for a report header."""
    if info["device"] == "cuda":
        return (f"{info['gpu']} (sm_{info['capability'].replace('.', '')}, {info['sms']} SMs, "
                f"{info['memory_bytes'] / 2**30:.0f} GiB), driver {info['driver']}, CUDA {info['cuda_runtime']}, "
                f"torch {info['torch']}, triton {info['triton']}, Python {info['python']}")
    return (f"CPU: {info['cpu']} ({info['threads']} threads), torch {info['torch']}, triton "
            f"{info['triton']}, Python {info['python']}"
            + (", TRITON_INTERPRET=1" if info.get("triton_interpret") == "1" else ""))


def copy_bandwidth(device, nbytes: int = 1 << 30) -> dict:
    """``b.copy_(a)`` of ``nbytes``: bytes read + written per second (``bytes_per_s``)."""
    a = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = time_call(lambda: b.copy_(a), device, budget_s=0.3, min_reps=5)
    del a, b
    free_memory(device)
    return {"bytes": 2 * (nbytes // 4) * 4, "ms": t["ms"], "bytes_per_s": 2 * (nbytes // 4) * 4 / (t["ms"] / 1e3)}


# ----------------------------------------------------------------------------- results
class Results:
    """One results file: ``{"schema", "suite", "machine", "config", "calibration", "rows",
    "extra"}``; :meth:`add` appends a row and rewrites the file (``path`` None: in memory only)."""

    def __init__(self, suite: str, path: Path | None, machine_info: dict, config: dict):
        self.path = path
        self.doc = {"schema": SCHEMA, "suite": suite, "machine": machine_info, "config": config,
                    "calibration": {}, "rows": [], "extra": {}}

    @property
    def rows(self) -> list:
        return self.doc["rows"]

    def add(self, case: dict, impl: str, status: str = "ok", **fields) -> dict:
        row = {"case": dict(case), "impl": impl, "status": status, **fields}
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.doc, indent=1, default=str))
            tmp.replace(self.path)


def load(path: Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {doc.get('schema')!r}, expected {SCHEMA!r}")
    return doc


def md_table(header: list, rows: list) -> list:
    """Markdown table lines; numbers right-aligned."""
    def cell(x):
        return "-" if x is None else str(x)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return out


if __name__ == "__main__":   # python -m benchmarks.harness: this machine, as a report would name it
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info = machine(dev, Path(__file__).resolve().parent.parent)
    print(describe(info))
    json.dump(info, sys.stdout, indent=1)
    print()
