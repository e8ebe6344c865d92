"""``make gpu`` and ``make gpu-dry``: the whole GPU path in one command, printing progress as it goes.

    python3 -m benchmarks.run_gpu           # make gpu: on a CUDA machine, with the python3 that is there
    python3 -m benchmarks.run_gpu --dry     # make gpu-dry (make test runs it): anywhere, < 1 min

Steps, each timed, with a summary at the end (exit status 1 if one failed):

1. the environment: Python, torch, triton, the GPU, which kdfast is imported (this checkout);
2. the C++ CPU extension, ``python setup.py build_ext --inplace`` with ``MAX_JOBS`` = the cores,
   in the background while steps 3-4 run: nothing on the GPU path loads it (the tests and the
   benchmark call the Triton backend), and it is ~3 minutes of a 10-minute run. Log:
   ``build/gpu/build.log``. Skipped with ``KDFAST_SKIP_BUILD=1`` (or ``--skip-build``) and by ``--dry``;
3. the CUDA test cases: ``pytest tests/test_cuda.py`` with ``TRITON_INTERPRET=0`` (compiled
   kernels), on several pytest-xdist workers when xdist is installed (the tests that need tens of
   GB run on one of them, one after the other); ``--dry``: with ``TRITON_INTERPRET=1`` on the CPU,
   where every case is collected and skipped;
4. the GPU benchmark ``benchmarks/bench_gpu.py`` with what is left of ``--deadline-s`` as its
   budget -> ``benchmarks/RESULTS-gpu.md`` and ``benchmarks/results-gpu.json`` (with this run's
   test counts); ``--dry``: its dry run (CPU tensors, TRITON_INTERPRET=1, tiny shapes) into a new
   temporary directory: the committed results are never touched;
5. waits for the build.

Liger-Kernel, the benchmark's third baseline, is optional: when ``liger_kernel`` does not import and
a wheel lies in ``.whl/`` (``make gpu-wheels`` downloads one where there is network; carry ``.whl``
to the GPU machine), it is installed with ``--no-deps --no-index`` into ``build/gpu/site`` (nothing
goes into the system Python) and put on the benchmark's ``PYTHONPATH``.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_T0 = time.monotonic()

ENV_REPORT = r"""
import os, sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", f"{p.total_memory / 2**30:.0f} GiB")
    import subprocess
    subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                    "--format=csv"], check=False)
import kdfast; print("kdfast", kdfast.__file__, "TRITON_INTERPRET =", os.environ.get("TRITON_INTERPRET"))
sys.exit(0 if torch.cuda.is_available() or len(sys.argv) > 1 else 3)
"""


def say(msg: str) -> None:
    print(f"[gpu {time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


def left(deadline: float) -> float:
    return deadline - (time.monotonic() - _T0)


class Steps:
    def __init__(self):
        self.rows = []

    def run(self, name, cmd, env, timeout=None, show=None) -> int:
        say(f"{name}: {show or ' '.join(map(str, cmd))}")
        t = time.monotonic()
        try:
            rc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        self.done(name, rc, time.monotonic() - t)
        return rc

    def done(self, name, rc, seconds) -> None:
        status = "ok" if rc == 0 else f"FAILED ({rc})" if rc not in ("skipped",) else "skipped"
        self.rows.append((name, status, seconds))
        say(f"{name}: {status} in {seconds:.0f} s")

    def failed(self) -> bool:
        return any(s.startswith("FAILED") for _, s, _ in self.rows)


def start_build(env, log: Path):
    """``setup.py build_ext --inplace`` in its own process group (so that it and its compilers can be
    stopped together), output to ``log``."""
    env = dict(env, MAX_JOBS=env.get("MAX_JOBS") or str(os.cpu_count() or 4))
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"build: python setup.py build_ext --inplace (MAX_JOBS={env['MAX_JOBS']}) in the background, log {log}")
    f = open(log, "w")
    p = subprocess.Popen([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                         stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return p, f, time.monotonic()


def finish_build(steps, build, log: Path, timeout: float) -> None:
    p, f, t = build
    try:
        rc = p.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        say(f"build: still running after the deadline: stopping it (pid {p.pid})")
        os.killpg(p.pid, signal.SIGTERM)
        rc = p.wait()
        rc = f"stopped at the deadline, rc {rc}"
    f.close()
    steps.done("build", rc, time.monotonic() - t)
    if rc != 0:
        print("".join(log.read_text(errors="replace").splitlines(True)[-30:]), flush=True)


def liger_path(env, out: Path):
    """A directory to put on PYTHONPATH for Liger-Kernel, or None (already importable, or no wheel)."""
    if importlib.util.find_spec("liger_kernel") is not None:
        say("liger_kernel: importable")
        return None
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "liger_kernel-*.whl")))
    if not wheels:
        say("liger_kernel: not importable and no .whl/liger_kernel-*.whl: the Liger rows are skipped")
        return None
    site = out / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--target", str(site), "--upgrade", wheels[-1]], env=env)
    say(f"liger_kernel: {wheels[-1]} -> {site}" + ("" if r.returncode == 0 else f" FAILED ({r.returncode})"))
    return site if r.returncode == 0 else None


def pytest_cmd(junit: Path, dry: bool, workers: int) -> list:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "tests/test_cuda.py",
           "--junitxml", str(junit)]
    if not dry and workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers), "--dist", "loadgroup"]
    if not dry and importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "300"]   # per test: a hang fails its test, not the whole run
    return cmd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="no GPU: TRITON_INTERPRET=1, CPU tensors, a temp dir")
    ap.add_argument("--deadline-s", type=float, default=480.0, help="the whole run's wall-time target")
    ap.add_argument("--skip-build", action="store_true", default=os.environ.get("KDFAST_SKIP_BUILD") == "1")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--workers", type=int, default=int(os.environ.get("KDFAST_GPU_TEST_WORKERS", 8)))
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="kdfast-gpu-dry-")) if args.dry else ROOT / "build" / "gpu"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TRITON_INTERPRET="1" if args.dry else "0", PYTHONUNBUFFERED="1")
    steps = Steps()
    say(("DRY RUN (CPU, TRITON_INTERPRET=1) -> " if args.dry else "") + f"logs and scratch in {out}")

    rc = steps.run("environment", [sys.executable, "-c", ENV_REPORT] + (["dry"] if args.dry else []), env,
                   show="python, torch, triton, the GPU, kdfast")
    if rc != 0:
        say("no CUDA device here: `make gpu` needs one (`make gpu-dry` runs the same path on the CPU)")
        return 2
    build = None
    if args.dry or args.skip_build:
        steps.done("build", "skipped", 0.0)
    else:
        build = start_build(env, out / "build.log")

    junit = out / "tests.xml"
    if args.skip_tests:
        steps.done("tests", "skipped", 0.0)
    else:
        steps.run("tests", pytest_cmd(junit, args.dry, args.workers), env,
                  timeout=None if args.dry else max(60.0, left(args.deadline_s) - 120))

    bench_env = dict(env)
    site = None if args.dry else liger_path(env, out)
    if site is not None:
        bench_env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "benchmarks.bench_gpu"]
    if junit.exists():
        cmd += ["--tests-junit", str(junit)]
    if args.dry:
        cmd += ["--dry", "--out-dir", str(out)]
    else:
        cmd += ["--budget-s", f"{max(60.0, left(args.deadline_s) - 60):.0f}"]
    steps.run("benchmark", cmd, bench_env)

    if build is not None:
        finish_build(steps, build, out / "build.log", left(args.deadline_s + 30))
    say("summary:")
    for name, status, seconds in steps.rows:
        print(f"    {name:12s} {status:24s} {seconds:6.0f} s", flush=True)
    where = out if args.dry else ROOT / "benchmarks"
    say(f"results: {where / 'RESULTS-gpu.md'}, {where / 'results-gpu.json'}; total {time.monotonic() - _T0:.0f} s")
    return 1 if steps.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
