"""The loss-kernel suite (``make bench``): fused kernel vs eager PyTorch vs torch.compile, plus the
memory floor. It declares the cases; timing, memory, the machine and the results file are
``benchmarks/harness.py``.

Run from the repository root::

    python -m benchmarks.bench                 # default sweep, default_plan() (<= ~15 min, 2-core CPU)
    python -m benchmarks.bench --quick         # small sweep, quick_plan() (~2-3 min)
    python -m benchmarks.bench --check         # only assert fused == eager on the selected cases
    python -m benchmarks.bench --losses kd,ttm --shapes 8192x1000 --dtypes fp32 --device cpu
    python -m benchmarks.bench --merge gpu.json   # fold another run's results in (e.g. a GPU run:
                                                  # its own report section), rewrite the report

Cases (loss x shape x dtype x mode) and implementations (fused = ``kdfast.<loss>_loss(backend=
"auto")``, eager = ``kdfast.reference.<loss>_loss``, compile = ``torch.compile`` of the eager function):

* ``fwdbwd``: ``fn(z, v, [labels]).backward()`` with ``z.requires_grad`` (``z.grad`` reset to None
  before every call, as ``zero_grad(set_to_none=True)`` does);
* ``fwd`` (kd): forward only, no input requires grad;
* ``fwdbwd_tgrad`` (kd): both ``z`` and ``v`` require grad;
* a case's ``labels``: ``--labels`` was given (every loss gets labels and its CE term; a loss that
  needs labels, dkd, always gets them);
* ``floor``: ``torch.add(a, b, out=c)`` (impl ``add``) on every fwd+bwd shape and dtype: reads two
  tensors, writes one, the memory floor of a fused fwd+bwd (read z and v, write the gradient);
* peak memory (``peak_bytes`` of the fwd+bwd rows with ``mem``): the extra peak of one fwd+bwd beyond
  the inputs, in a fresh process (:func:`_mem_probe`), the gradient kept as ``z.grad`` included.

The backend ``backend="auto"`` resolves to is recorded (``fused_backend`` per machine, ``backend``
per fused row); "torch" means the eager reference ran in the fused column (a FALLBACK: the C++
extension is not built) and the report says so loudly.

Timing (``harness.time_interleaved``): CPU: ``harness.THREADS`` threads (``--threads``); after a
warm-up call of each implementation (torch.compile: a second one; the first's wall time is
``compile_s``), ``reps`` rounds in which every implementation of the case runs one block of calls
(>= 20 ms; the order rotates each round), medians per implementation. CUDA: ``harness.time_call``
per implementation (CUDA events, L2 flushed before each call) over copies of the inputs used in turn
(:func:`rotation_count`: together >= 2x L2); every fwd+bwd case is also timed ``fwd`` and ``bwd``
(backward alone: ``loss.backward(retain_graph=True)`` on one forward graph); each row carries
``GBs`` = :func:`bytes_moved` / time and ``copy_frac`` = that over the copy bandwidth measured at
the start. Each case's rows also carry the relative error fused vs eager of the loss and gradient on
the benchmarked inputs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # ``python benchmarks/bench.py`` puts benchmarks/ first, not the root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import harness as H  # noqa: E402

SUITE = "losses"

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


def time_cuda_rotated(fn, mode, z, v, extra) -> dict:
    """harness.time_call over ``rotation_count`` copies of the inputs, used in turn (the first set
    is the one the correctness check used)."""
    tensors = [z, v, *extra]
    per_set = sum(t.numel() * t.element_size() for t in tensors)
    props = torch.cuda.get_device_properties(z.device)
    free, _ = torch.cuda.mem_get_info(z.device)
    n = rotation_count(per_set, getattr(props, "L2_cache_size", 50 << 20), free)
    sets = [(z, v, tuple(extra))] + [(z.clone(), v.clone(), tuple(e.clone() for e in extra))
                                     for _ in range(n - 1)]
    step = H.rotating([make_call(fn, mode, *s)[0] for s in sets])
    for _ in range(n):     # every set once (lazy work, autotuning, allocator growth)
        step()
    rec = H.time_call(step, "cuda", budget_s=0.2, warmup=0)
    rec["rotation_sets"] = n
    return rec


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


# ----------------------------------------------------------------------------- plans and sweep


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


def _case(mode, loss, n, c, dt, reps=None, mem=False, impls=("fused", "eager", "compile"), labels=None):
    """One case of a plan; ``labels``: True / False for this case, None: ``--labels``."""
    return dict(mode=mode, loss=loss, N=n, C=c, dtype=dt, reps=reps, mem=mem, impls=tuple(impls),
                labels=labels)


def _labels(cs, args) -> bool:
    return bool(args.labels if cs.get("labels") is None else cs["labels"])


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
    # a training step has labels: kd + CE where training spends it (the LLM shape, ImageNet rows at a
    # per-GPU and a large batch, bf16), every loss + CE at the ImageNet shape (against kd + CE), and
    # the per-call overhead at a tiny shape
    plan += [_case("fwdbwd", "kd", n, c, "fp32", reps=3, labels=True),
             _case("fwdbwd", "kd", 8192, 1000, "fp32", labels=True),
             _case("fwdbwd", "kd", 65536, 1000, "fp32", reps=3, labels=True),
             _case("fwdbwd", "kd", n, c, "bf16", reps=3, impls=("fused", "compile")),
             _case("fwdbwd", "kd", n, c, "bf16", reps=3, impls=("fused", "compile"), labels=True),
             _case("fwdbwd", "kd", 8, 10, "fp32", impls=eager_only)]
    plan += [_case("fwdbwd", loss, 8192, 1000, "fp32", impls=("fused",), labels=True)
             for loss in LOSSES if loss not in ("kd", "dkd")]
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


def run_case(res, cs, fns, device, cfg, labels_flag, fused_be) -> list:
    """Every implementation of one case: a warm-up call each (values and gradients kept for the
    fused-vs-eager error), then timed side by side (``harness.time_interleaved``; CUDA:
    :func:`time_cuda_rotated`). Adds one row per implementation to ``res``."""
    mode, loss, n, c, dt = cs["mode"], cs["loss"], cs["N"], cs["C"], cs["dtype"]
    dtype = DTYPES[dt]
    case = dict(loss=loss, mode=mode, N=n, C=c, dtype=dt, labels=bool(labels_flag))
    z, v, extra = make_inputs(loss, n, c, dtype, device, labels_flag)
    recs, steps, est, vals, grads, callables = {}, {}, {}, {}, {}, {}
    for impl in [i for i in cs["impls"] if i in cfg["impls"]]:
        recs[impl] = rec = {"backend": fused_be} if impl == "fused" else {}
        try:
            fn = _compiled(fns["eager"], fresh=mode == "bwd") if impl == "compile" else fns[impl]
            step, leaves = make_call(fn, mode, z, v, extra)
            val, t = H.first_call(step, device)
            if impl == "compile":      # the first call compiled: time a second one
                rec["compile_s"] = round(t, 2)
                val, t = H.first_call(step, device)
            vals[impl] = val.detach().double()
            if leaves and impl in ("fused", "eager"):
                grads[impl] = [x.grad for x in leaves]
            steps[impl], est[impl], callables[impl] = step, t, fn
        except Exception as e:  # noqa: BLE001
            rec.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
            print(f"\n# error: {mode} {loss} {n}x{c} {dt} {impl}: {rec['reason']}", file=sys.stderr)
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
                recs[impl].update(status="oom" if H.is_oom(e) else "error",
                                  reason=f"{type(e).__name__}: {e}"[:500])
                print(f"\n# error timing {mode} {loss} {n}x{c} {dt} {impl}: {recs[impl]['reason']}",
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
        timed = H.time_interleaved(steps, device, estimates=est, reps=cs["reps"], budget_s=cfg["budget_s"],
                                   min_reps=cfg["min_reps"], max_reps=cfg["max_reps"])
        for impl, t in timed.items():
            recs[impl].update(t)
    del steps, callables, z, v, extra
    H.free_memory(device)
    return [res.add(case, impl, **rec) for impl, rec in recs.items()]


def time_floor(res, n, c, dt, device, cfg) -> dict:
    """The memory floor ``torch.add(a, b, out=c)`` on one shape and dtype (case mode ``floor``)."""
    a = torch.randn(n, c, device=device).to(DTYPES[dt])
    b, o = torch.randn_like(a), torch.empty_like(a)
    step = lambda: torch.add(a, b, out=o)  # noqa: E731
    step()
    _, t1 = H.first_call(step, device)
    t = H.time_interleaved({"add": step}, device, estimates={"add": t1}, budget_s=cfg["budget_s"],
                           min_reps=cfg["min_reps"],
                           max_reps=cfg["min_reps"] if t1 > 0.5 else cfg["max_reps"])["add"]
    return res.add(dict(loss="-", mode="floor", N=n, C=c, dtype=dt, labels=False), "add", **t)


def _mem_probe(spec: dict) -> dict:
    """In a fresh process (``harness.in_fresh_process``): the extra peak memory of one call beyond
    the inputs. Allocate and touch the inputs; warm up (compile: the same shape, so the measured
    call does not recompile; the others: a tiny shape, for lazy initialisation); then
    ``harness.peak_bytes`` of one call (CPU: VmHWM - RSS; CUDA: max_memory_allocated)."""
    torch.set_num_threads(spec["threads"])
    dev, dtype = spec["device"], DTYPES[spec["dtype"]]
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
    return {"peak_bytes": H.peak_bytes(step, dev), "backend": fused_backend(dev)}


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


def sweep(args) -> H.Results:
    """The plan's cases, in order: the floors, the timed cases, then the peak-memory processes."""
    device = args.device
    cfg = dict(budget_s=args.budget, min_reps=args.min_reps, max_reps=args.max_reps, impls=args.impls)
    threads = torch.get_num_threads()
    info = H.machine(device, ROOT)
    info["fused_backend"] = fused_be = fused_backend(device)
    info["loadavg_start"] = info.pop("loadavg")   # other processes on the machine make timings noise
    if info["loadavg_start"] and info["loadavg_start"][0] > 0.5:
        print(f"# WARNING: load average {info['loadavg_start'][0]:.2f} before the sweep: something "
              "else is running; timings will be noisy", file=sys.stderr)
    if fused_be not in ("cpu", "triton"):
        print(f"\n# WARNING: kdfast resolves backend='auto' to {fused_be!r} on {device}: the fused "
              "column is the EAGER REFERENCE (fallback), not kdfast's kernels\n", file=sys.stderr)
    plan = args.plan
    losses = sorted({cs["loss"] for cs in plan})
    avail = {name: loss_fns(name) for name in losses}
    skipped = [name for name in losses if set(avail[name]) != {"fused", "eager"}]
    plan = [cs for cs in plan if cs["loss"] not in skipped]
    if skipped:
        print(f"# skipped (not in kdfast yet): {', '.join(skipped)}", file=sys.stderr)
    if device == "cuda":
        plan = cuda_plan(plan)
        # measured first: every timed row carries its achieved bandwidth as a fraction of it
        info["copy_bandwidth_GBs"] = cfg["copy_GBs"] = H.copy_bandwidth(device)["bytes_per_s"] / 1e9
        info["l2_bytes"] = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", None)
    if args.no_extra:
        plan = [cs for cs in plan if cs["mode"] == "fwdbwd"]
    res = H.Results(SUITE, None, info, {})
    mem_cases = [] if args.no_mem else [
        (cs["loss"], cs["N"], cs["C"], cs["dtype"], impl, _labels(cs, args)) for cs in plan if cs["mem"]
        and cs["mode"] == "fwdbwd" for impl in cs["impls"] if impl in args.impls]
    shapes_dt = sorted({(cs["N"], cs["C"], cs["dtype"]) for cs in plan if cs["mode"] == "fwdbwd"})
    prog = Progress(len(plan) + len(shapes_dt) + len(mem_cases))
    for (n, c, dt) in shapes_dt:
        prog.step(f"add {n}x{c} {dt}")
        time_floor(res, n, c, dt, device, cfg)
    timed = {}
    for cs in plan:
        prog.step(f"{cs['mode']} {cs['loss']} {cs['N']}x{cs['C']} {cs['dtype']}")
        for row in run_case(res, cs, avail[cs["loss"]], device, cfg, _labels(cs, args), fused_be):
            timed[(row["case"]["mode"], row["case"]["loss"], row["case"]["N"], row["case"]["C"],
                   row["case"]["dtype"], row["impl"], row["case"]["labels"])] = row
    for (loss, n, c, dt, impl, lab) in mem_cases:
        prog.step(f"mem {loss} {n}x{c} {dt} {impl}")
        spec = dict(loss=loss, impl=impl, N=n, C=c, dtype=dt, device=device, mode="fwdbwd",
                    labels=lab, threads=threads)
        r = H.in_fresh_process(_mem_probe, spec)
        row = timed.get(("fwdbwd", loss, n, c, dt, impl, lab))
        if row is None:
            continue
        if "error" in r or r.get("peak_bytes") is None:
            row["peak_error"] = r.get("error", "the peak could not be read")
        else:
            grad_bytes = n * c * DTYPES[dt].itemsize
            row.update(peak_bytes=r["peak_bytes"], peak_units=r["peak_bytes"] / grad_bytes,
                       peak_method=H.PEAK_METHOD["cuda" if device == "cuda" else "cpu"])
            if impl == "fused":   # as resolved in the child process
                row["backend"] = r.get("backend", fused_be)
    prog.close()
    info["elapsed_s"] = round(time.perf_counter() - prog.t0, 1)
    info["argv"] = " ".join(sys.argv[1:])
    info["loadavg_end"] = H.loadavg()
    info["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in ("merge", "plan")}
    if device != "cuda" and not args.no_mem:
        info["mem_calibration"] = H.calibrate_memory(threads=threads)
    return res


def load_results(path: Path | None) -> dict:
    """The suite's results file, or an empty one (``path`` None or missing, or another schema)."""
    empty = {"schema": H.SCHEMA, "suite": SUITE, "machines": {}, "config": {}, "calibration": {},
             "rows": [], "extra": {}}
    if path is None or not path.exists():
        return empty
    try:
        return H.load(path)
    except ValueError as e:
        print(f"# {e}: starting a new file", file=sys.stderr)
        return empty


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
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads (default {H.THREADS}, at most the cores)")
    p.add_argument("--labels", action="store_true",
                   help="pass labels (add the CE term) to every loss, not only to dkd")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    p.add_argument("--min-reps", type=int, default=None)
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--no-mem", action="store_true", help="skip the peak-memory processes")
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
    for name in args.losses:
        if name not in LOSSES:
            p.error(f"unknown loss {name!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    results = load_results(None if args.fresh else args.out)
    for other in args.merge:
        results = H.merge(results, H.load(Path(other)))
    if not args.merge_only:
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        H.setup_cpu(args.threads)
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
        res = sweep(args)
        results = H.merge(results, res.doc)
        print(f"# sweep took {res.doc['machines'][res.machine]['elapsed_s']} s", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    if not args.no_report:
        from benchmarks import report
        report.write_report(args.report_dir, {SUITE: results})
    print(f"wrote {args.out}" + ("" if args.no_report else f" and {args.report_dir}/RESULTS.md"))


if __name__ == "__main__":
    main()
