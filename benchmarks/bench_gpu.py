"""The GPU benchmark (``make gpu``): kdfast's Triton kernels against eager PyTorch
(``kdfast.reference``), ``torch.compile`` of that eager code, and Liger-Kernel where it has the loss.

    python3 -m benchmarks.bench_gpu                       # CUDA -> benchmarks/RESULTS-gpu.md, results-gpu.json
    python3 -m benchmarks.bench_gpu --budget-s 240        # start no new case after 240 s
    python3 -m benchmarks.bench_gpu --dry                 # make gpu-dry: the same code on CPU tensors,
                                                          # TRITON_INTERPRET=1, tiny shapes, a temp dir

What is declared here (timing, memory, the machine and the results file are ``benchmarks/harness.py``):

- LOSSES: kd, kd + CE, jsd, dkd, topk_kd (k = 64 teacher log-probabilities), multi_teacher (kd, 2
  teachers, CE) and fused_linear (the head fused with jsd + CE, ``fused_linear_distill_loss``);
  kdfast is always called with ``backend="triton"``.
- SHAPES: ImageNet rows (N 8192 and 65536, C 1000), LLM rows (16384 x 32000, 16384 x 131072); the
  fused linear rows are (N, H, V) with the teacher's hidden size equal to H.
- PLAN: fp32 and bf16, ``fwdbwd`` (the training step: the student requires grad, its ``.grad`` is
  reset to None before each call, loss + backward) and ``fwd`` (no input requires grad), in priority
  order: the rows the targets are about first (LLM fwd+bwd, fused linear), then ImageNet fwd+bwd,
  then forward only. ``--budget-s`` stops starting new cases (their rows say "time budget"), and
  ``torch.compile``'s warm-ups (compilation) are capped by ``--compile-budget-s`` in total.
- Baselines: ``eager`` = the ``kdfast.reference`` function; ``compile`` = ``torch.compile`` of it
  (static shapes, default mode; its compile time is the row's ``warmup_s``); ``liger`` =
  ``LigerKLDIVLoss`` (kd), ``LigerJSD`` (jsd) and ``LigerFusedLinearJSDLoss`` (fused_linear), when
  ``liger_kernel`` imports. Liger's KL and JSD take log-probabilities: their rows include the two
  ``log_softmax`` calls that turn the logits into them (the same contract as kdfast: logits in).
- Derived: achieved bandwidth (``gbps``) for the bytes the loss must move, ``fwd``: read the student
  and the teacher once; ``fwdbwd``: read them in each pass (forward, backward) and write the
  gradient; ``copy_frac`` = that over the device-to-device copy bandwidth measured at the start of
  the same run. Fused linear: TFLOP/s of its matrix products instead.

The issue's targets (TARGETS) are evaluated on the rows and written, holding or not, to the report.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

if __name__ == "__main__" and "--dry" in sys.argv:   # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kdfast  # noqa: E402
from benchmarks import harness as H  # noqa: E402

R = kdfast.reference
BE = "triton"
T = 2.0            # kd / kd_ce / dkd / topk_kd / multi_teacher temperature (Liger's KL: the same T)
JSD = 0.5          # jsd beta, temperature 1 (Liger's JSD and fused linear JSD: the same)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Loss:
    kind: str                      # inputs: dense (z, v, y) | topk (z, lp, idx, y) | multi (z, vs, y) | linear
    labels: bool
    fused: Callable                # kdfast, backend="triton"
    eager: Callable                # kdfast.reference (torch.compile compiles it too)
    liger: Optional[str] = None    # the Liger-Kernel module it is compared with


def _dense(name: str, labels: bool, liger: Optional[str] = None, **hyper) -> Loss:
    """kdfast.<name> and kdfast.reference.<name> on (z, v, y) (y None without labels)."""
    fused, eager = getattr(kdfast, name), getattr(R, name)
    return Loss("dense", labels, lambda z, v, y: fused(z, v, y, backend=BE, **hyper),
                lambda z, v, y: eager(z, v, y, **hyper), liger)


LOSSES = {
    "kd": _dense("kd_loss", False, "LigerKLDIVLoss", temperature=T),
    "kd_ce": _dense("kd_loss", True, temperature=T),
    "jsd": _dense("jsd_loss", False, "LigerJSD", beta=JSD),
    "dkd": _dense("dkd_loss", True, temperature=T),
    "topk_kd": Loss("topk", False,
                    fused=lambda z, lp, idx, y: kdfast.topk_kd_loss(z, lp, idx, temperature=T, backend=BE),
                    eager=lambda z, lp, idx, y: R.topk_kd_loss(z, lp, idx, temperature=T)),
    "multi_teacher": Loss("multi", True,
                          fused=lambda z, vs, y: kdfast.multi_teacher_loss("kd", z, vs, y, temperature=T, backend=BE),
                          eager=lambda z, vs, y: kdfast.multi_teacher_loss("kd", z, vs, y, temperature=T,
                                                                          backend="torch")),
    "fused_linear": Loss("linear", True, liger="LigerFusedLinearJSDLoss",
                         fused=lambda h, w, th, tw, y: kdfast.fused_linear_distill_loss(
                             h, w, y, method="jsd", beta=JSD, teacher_hidden=th, teacher_weight=tw,
                             kd_weight=0.5, ce_weight=0.5, backend=BE),
                         eager=lambda h, w, th, tw, y: R.jsd_loss(F.linear(h, w), F.linear(th, tw), y, beta=JSD,
                                                                  kd_weight=0.5, ce_weight=0.5)),
}
LOGIT_LOSSES = [k for k, v in LOSSES.items() if v.kind != "linear"]
M_TEACHERS = 2

SHAPES = {   # (N, C); fused linear (N, H, V)
    "full": {"imagenet": [(8192, 1000), (65536, 1000)], "llm": [(16384, 32000), (16384, 131072)],
             "linear": [(16384, 2048, 32000), (16384, 2048, 131072), (8192, 2048, 1000)], "topk": 64},
    "dry": {"imagenet": [(4, 40)], "llm": [(4, 200)], "linear": [(4, 16, 200)], "topk": 8},
}


def plan(shapes: dict, dry: bool = False) -> list:
    """(loss, shape, dtype, mode) in priority order. ``dry``: the cases of that order that bring a
    new (loss, mode) or (loss, dtype) pair: every code path once, at a fraction of the calls."""
    full = _product(shapes)
    if not dry:
        return full
    seen, out = set(), []
    for loss, s, dt, mode in full:
        new = {(loss, mode), (loss, dt)} - seen
        if new:
            seen |= new
            out.append((loss, s, dt, mode))
    return out


def _product(shapes):
    out = [(loss, s, dt, "fwdbwd") for s in shapes["llm"] for dt in DTYPES
           for loss in ("kd", "jsd", "kd_ce", "dkd", "multi_teacher", "topk_kd")]
    out += [("fused_linear", s, dt, "fwdbwd") for s in shapes["linear"] for dt in ("bf16", "fp32")]
    out += [(loss, s, dt, "fwdbwd") for s in shapes["imagenet"] for dt in DTYPES for loss in LOGIT_LOSSES]
    out += [(loss, s, dt, "fwd") for s in shapes["llm"] + shapes["imagenet"] for dt in DTYPES
            for loss in LOGIT_LOSSES]
    out += [("fused_linear", s, dt, "fwd") for s in shapes["linear"] for dt in ("bf16", "fp32")]
    return out


# ----------------------------------------------------------------------------- inputs
def make_inputs(loss: Loss, shape, dtype, device, topk: int, seed: int = 0):
    """(inputs, leaves, bytes the loss must read per pass, FLOPs of one forward)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*s, scale=2.0):
        return torch.randn(*s, generator=g, device=device, dtype=dtype).mul_(scale)

    n = shape[0]
    y = torch.randint(0, shape[-1], (n,), generator=g, device=device) if loss.labels else None
    if loss.kind == "linear":
        _, h, v = shape
        ins = {"h": randn(n, h, scale=1.0), "w": randn(v, h, scale=3 * h ** -0.5),
               "th": randn(n, h, scale=1.0), "tw": randn(v, h, scale=3 * h ** -0.5), "y": y}
        return ins, ("h", "w"), None, 2 * n * v * (2 * h)
    z = randn(*shape)
    if loss.kind == "dense":
        ins = {"z": z, "v": randn(*shape)}
    elif loss.kind == "multi":
        ins = {"z": z, "vs": randn(M_TEACHERS, *shape)}
    else:   # the teacher's top-k log-probabilities and their classes
        lp, idx = torch.log_softmax(randn(*shape).float(), -1).topk(topk, dim=-1)
        ins = {"z": z, "lp": lp.to(dtype), "idx": idx}
    ins["y"] = y
    read = sum(t.numel() * t.element_size() for k, t in ins.items() if k != "y" and t is not None)
    return ins, ("z",), read, None


def derived_fn(case, read, flops, copy_bps):
    """The row's achieved bandwidth (bytes model in the module docstring) or TFLOP/s."""
    def derived(t):
        s = t["ms"] / 1e3
        if read is not None:
            z_bytes = case["N"] * case["C"] * torch.empty((), dtype=DTYPES[case["dtype"]]).element_size()
            moved = read if case["mode"] == "fwd" else 2 * read + z_bytes
            return {"bytes": moved, "gbps": moved / s / 1e9, "copy_frac": moved / s / copy_bps}
        f = flops if case["mode"] == "fwd" else flops * 2   # + grad_h and grad_W: 2 N V H each
        return {"flops": f, "tflops": f / s / 1e12}
    return derived


# ----------------------------------------------------------------------------- baselines
def liger_status():
    """(version, None) when liger_kernel imports, else (None, the reason)."""
    try:
        import liger_kernel  # noqa: F401
    except Exception as e:   # noqa: BLE001
        return None, f"liger_kernel does not import ({type(e).__name__}: {e})"[:200]
    return H.package_version("liger-kernel") or "unknown", None


def liger_fn(name: str):
    """The Liger-Kernel module ``name`` as a function of this suite's inputs (the same loss)."""
    if name == "LigerKLDIVLoss":
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda z, v, y: kl(F.log_softmax(z / T, -1), F.log_softmax(v / T, -1)) * (T * T)
    if name == "LigerJSD":
        from liger_kernel.transformers.jsd import LigerJSD
        jsd = LigerJSD(beta=JSD)
        return lambda z, v, y: jsd(F.log_softmax(z, -1), F.log_softmax(v, -1))
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=JSD, temperature=1.0)
    return lambda h, w, th, tw, y: mod(h, w, th, tw, y)


class Compiled:
    """``torch.compile`` of the eager functions (static shapes), within a total compile budget."""

    def __init__(self, budget_s: float, backend: str):
        import torch._dynamo
        cfg = torch._dynamo.config
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(cfg, knob):   # one graph per shape, dtype and grad mode
                setattr(cfg, knob, max(getattr(cfg, knob), 512))
        self.budget_s, self.backend, self.spent = budget_s, backend, 0.0

    def fn(self, eager):
        if self.spent >= self.budget_s:
            return f"compile budget ({self.budget_s:.0f} s of compilation) spent"
        return torch.compile(eager, dynamic=False, backend=self.backend)

    def charge(self, row):   # the warm-up compiles (without one, --dry: the first timed call)
        self.spent += row.get("warmup_s") or row.get("ms", 0.0) / 1e3


# ----------------------------------------------------------------------------- the run
def run(args) -> H.Results:
    device = "cpu" if args.dry else "cuda"
    if args.dry:   # the interpreter on a shared machine: no thread oversubscription
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    shapes = SHAPES["dry" if args.dry else "full"]
    info = H.machine(device, ROOT)
    liger_version, liger_reason = liger_status()
    config = {"dry": args.dry, "budget_s": args.budget_s, "compile_budget_s": args.compile_budget_s,
              "compile_backend": args.compile_backend, "rep_s": args.rep_s, "T": T, "jsd_beta": JSD,
              "teachers": M_TEACHERS, "topk": shapes["topk"], "liger_kernel": liger_version,
              "liger_missing": liger_reason, "allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    res = H.Results("gpu", args.out_dir / "results-gpu.json", info, config)
    H.log(H.describe(info))
    H.log(f"Liger-Kernel: {liger_version or liger_reason}")
    copy = H.copy_bandwidth(device, (1 << 30) if not args.dry else (16 << 20))
    res.doc["calibration"]["copy"] = copy
    H.log(f"device-to-device copy: {copy['bytes_per_s'] / 1e9:.0f} GB/s (read + write)")
    if args.tests_junit:
        res.doc["extra"]["tests"] = junit_summary(args.tests_junit)
    budget = H.Budget(args.budget_s)
    compiled = Compiled(args.compile_budget_s, args.compile_backend)
    cases = plan(shapes, args.dry)
    for i, (name, shape, dt, mode) in enumerate(cases, 1):
        loss = LOSSES[name]
        case = {"loss": name, "N": shape[0], "C": shape[-1], "dtype": dt, "mode": mode}
        if loss.kind == "linear":
            case["H"] = shape[1]
        impls = {"kdfast": loss.fused}
        if loss.liger:
            impls["liger"] = liger_fn(loss.liger) if liger_version else liger_reason
        impls["compile"] = compiled.fn(loss.eager)
        impls["eager"] = loss.eager
        if budget.left() <= 0:
            for impl in impls:
                res.add(case, impl, "skipped", reason=f"time budget ({args.budget_s:.0f} s) spent")
            continue
        H.log(f"[{i}/{len(cases)}] {name} {'x'.join(map(str, shape))} {dt} {mode}")
        try:
            inputs, leaves, read, flops = make_inputs(loss, shape, DTYPES[dt], device, shapes["topk"])
        except Exception as e:   # noqa: BLE001 (out of memory for the inputs themselves)
            for impl in impls:
                res.add(case, impl, "oom" if H.is_oom(e) else "error", reason=f"inputs: {type(e).__name__}: {e}"[:400])
            H.free_memory(device, collect=True)
            continue

        def on_row(row):
            if row["impl"] == "compile":
                compiled.charge(row)
            H.log("    " + row_line(row))
        rows = H.measure(res, case, impls, inputs, leaves, device, budget_s=args.rep_s,
                         min_reps=1 if args.dry else 3, warmup=0 if args.dry else 1,
                         derived=derived_fn(case, read, flops, copy["bytes_per_s"]), on_row=on_row)
        check_values(rows, dt)
        res.save()
        del inputs
        H.free_memory(device)
    res.doc["extra"]["elapsed_s"] = round(budget.elapsed(), 1)
    res.doc["extra"]["compile_s"] = round(compiled.spent, 1)
    res.save()
    return res


VALUE_RTOL = {"fp32": 1e-3, "bf16": 3e-2}


def check_values(rows: dict, dtype: str) -> None:
    """Every implementation's loss value against kdfast's: a baseline computing another loss (a
    convention differing) is flagged in its row (``value_mismatch``) and in the report."""
    me = rows.get("kdfast")
    if me is None or me["status"] != "ok":
        return
    for r in rows.values():
        if r is not me and r["status"] == "ok":
            rel = abs(r["value"] - me["value"]) / max(abs(me["value"]), 1e-6)
            if rel > VALUE_RTOL[dtype]:
                r["value_mismatch"] = rel
                H.log(f"    WARNING: {r['impl']} loss {r['value']:.6g} vs kdfast {me['value']:.6g} (rel {rel:.1e})")


def row_line(row) -> str:
    if row["status"] != "ok":
        return f"{row['impl']:8s} {row['status']}: {row.get('reason', '')}"
    extra = (f"  {100 * row['copy_frac']:5.1f}% of copy" if "copy_frac" in row
             else f"  {row['tflops']:.1f} TFLOP/s" if "tflops" in row else "")
    mib = "-" if row.get("peak_bytes") is None else f"{row['peak_bytes'] / 2**20:.0f}"
    return f"{row['impl']:8s} {row['ms']:10.3f} ms{extra}  peak {mib} MiB  (warm-up {row['warmup_s']:.1f} s)"


def junit_summary(path) -> dict:
    """Counts of a pytest --junitxml file."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return n


# ----------------------------------------------------------------------------- targets and report
def _ok_rows(rows, impl, mode="fwdbwd"):
    return {_key(r): r for r in rows if r["impl"] == impl and r["status"] == "ok" and r["case"]["mode"] == mode}


def _key(r):
    c = r["case"]
    return (c["loss"], c["N"], c.get("H"), c["C"], c["dtype"], c["mode"])


def _name(key) -> str:
    loss, n, h, c, dt, _ = key
    return f"{loss} {n}x{h}x{c} {dt}" if h else f"{loss} {n}x{c} {dt}"


def _faster(rows, impl, losses=None, min_c=0, memory=False):
    """Does kdfast beat ``impl`` (fwd+bwd) on every row both measured (and, ``memory``, at <= its
    peak)? -> (status, evidence)."""
    mine, theirs = _ok_rows(rows, "kdfast"), _ok_rows(rows, impl)
    keys = [k for k in theirs if k in mine and (losses is None or k[0] in losses) and k[3] >= min_c]
    if not keys:
        return "not measured", f"no fwd+bwd row with both kdfast and {impl} measured"
    bad = []
    for k in keys:
        a, b = mine[k], theirs[k]
        slow = a["ms"] >= b["ms"]
        heavy = memory and (a["peak_bytes"] or 0) > (b["peak_bytes"] or 0)
        if slow or heavy:
            bad.append(f"{_name(k)}: {a['ms']:.2f} vs {b['ms']:.2f} ms"
                       + (f", {a['peak_bytes'] / 2**20:.0f} vs {b['peak_bytes'] / 2**20:.0f} MiB" if memory else ""))
    worst = min(theirs[k]["ms"] / mine[k]["ms"] for k in keys)
    ev = f"{len(keys) - len(bad)} of {len(keys)} rows; smallest speed-up {worst:.2f}x"
    return ("holds" if not bad else "does not hold"), ev + ("; not on: " + "; ".join(bad) if bad else "")


def _bandwidth(rows):
    mine = [r for r in _ok_rows(rows, "kdfast").values() if r["case"]["C"] >= 32000 and "copy_frac" in r]
    if not mine:
        return "not measured", "no kdfast fwd+bwd row at C >= 32000"
    bad = [f"{_name(_key(r))}: {100 * r['copy_frac']:.0f}%" for r in mine if r["copy_frac"] < 0.8]
    lo = min(mine, key=lambda r: r["copy_frac"])
    ev = f"{len(mine) - len(bad)} of {len(mine)} rows; lowest {100 * lo['copy_frac']:.0f}% ({_name(_key(lo))})"
    return ("holds" if not bad else "does not hold"), ev + ("; below: " + "; ".join(bad) if bad else "")


TARGETS = [   # issue 13's GPU targets: (statement, evaluation over the rows)
    (">= 80 % of the device-to-device copy bandwidth, fwd+bwd, C >= 32000 (memory-bound kernels)", _bandwidth),
    ("fwd+bwd faster than Liger-Kernel's LigerKLDIVLoss (kd) at the LLM shapes",
     lambda rows: _faster(rows, "liger", ("kd",), min_c=32000)),
    ("fwd+bwd faster than Liger-Kernel's LigerJSD (jsd) at the LLM shapes",
     lambda rows: _faster(rows, "liger", ("jsd",), min_c=32000)),
    ("fwd+bwd faster than torch.compile of eager, every row", lambda rows: _faster(rows, "compile")),
    ("fused linear + JSD faster than LigerFusedLinearJSDLoss at <= its peak memory",
     lambda rows: _faster(rows, "liger", ("fused_linear",), memory=True)),
]


def _ms(r):
    return None if r is None else f"{r['ms']:.3f}" if r["status"] == "ok" else r["status"]


def _mib(r):
    return None if r is None or r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.0f}"


def _x(mine, other):
    if mine is None or other is None or mine["status"] != "ok" or other["status"] != "ok":
        return None
    return f"{other['ms'] / mine['ms']:.2f}x"


def render(doc: dict) -> str:
    rows, m, cfg = doc["rows"], next(iter(doc["machines"].values())), doc["config"]
    copy = doc["calibration"].get("copy")
    L = ["# kdfast on the GPU (`make gpu`)", "",
         f"Written by `benchmarks/bench_gpu.py` on {m['date']}" + (f", commit {m.get('commit')}" if m.get("commit") else "")
         + ("" if not m.get("dirty") else " (with uncommitted changes)") + ".", "",
         f"- Machine: {H.describe(m)}.",
         f"- Device-to-device copy: {copy['bytes_per_s'] / 1e9:.0f} GB/s (bytes read + written, "
         f"{copy['bytes'] / 2**30:.1f} GiB per copy): the ceiling of the `copy %` columns." if copy else "- Copy: not measured.",
         f"- Liger-Kernel: {cfg['liger_kernel'] or cfg['liger_missing']}."]
    tests = doc["extra"].get("tests")
    if tests:
        L.append(f"- CUDA tests (`tests/test_cuda.py`, this run): " + (
            tests["error"] if "error" in tests else
            f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped."))
    if cfg["dry"]:
        L.append("- DRY RUN: CPU tensors under TRITON_INTERPRET=1, tiny shapes: the numbers mean nothing.")
    skipped = [r for r in rows if r["status"] == "skipped" and "budget" in r.get("reason", "")]
    L.append(f"- {len(rows)} rows in {doc['extra'].get('elapsed_s', '?')} s; {len(skipped)} not run for a "
             f"budget (time {cfg['budget_s']:.0f} s, compilation {cfg['compile_budget_s']:.0f} s).")
    L += ["", "## Targets (issue 13)" + (" - DRY RUN: evaluated only to exercise the code" if cfg["dry"] else ""), ""]
    L += H.md_table(["target", "status", "evidence"], [[t, *ev(rows)] for t, ev in TARGETS])
    by = {}
    for r in rows:
        by.setdefault(_key(r), {})[r["impl"]] = r
    for mode, title in (("fwdbwd", "Forward + backward"), ("fwd", "Forward only")):
        table = []
        for k, impls in by.items():
            if k[5] != mode or k[2] is not None:
                continue
            me = impls.get("kdfast")
            frac = f"{100 * me['copy_frac']:.0f}%" if me and me.get("copy_frac") is not None else None
            gbps = f"{me['gbps']:.0f}" if me and me.get("gbps") is not None else None
            table.append([k[0], f"{k[1]} x {k[3]}", k[4], _ms(me), gbps, frac]
                         + [_ms(impls.get(i)) for i in ("liger", "compile", "eager")]
                         + [_x(me, impls.get(i)) for i in ("liger", "compile", "eager")]
                         + [_mib(impls.get(i)) for i in ("kdfast", "liger", "compile", "eager")])
        L += ["", f"## {title}: logits losses (ms; `x` = that implementation's time / kdfast's; peak MiB)", ""]
        L += H.md_table(["loss", "N x C", "dtype", "kdfast", "GB/s", "copy %", "liger", "compile", "eager",
                         "x liger", "x compile", "x eager", "MiB kdfast", "MiB liger", "MiB compile",
                         "MiB eager"], table)
    table = []
    for k, impls in by.items():
        if k[2] is None:
            continue
        me = impls.get("kdfast")
        tf = f"{me['tflops']:.0f}" if me and me.get("tflops") is not None else None
        table.append([k[5], f"{k[1]} x {k[2]} x {k[3]}", k[4], _ms(me), tf]
                     + [_ms(impls.get(i)) for i in ("liger", "compile", "eager")]
                     + [_x(me, impls.get(i)) for i in ("liger", "compile", "eager")]
                     + [_mib(impls.get(i)) for i in ("kdfast", "liger", "compile", "eager")])
    L += ["", "## Fused linear + JSD + CE (N x H x V; ms, TFLOP/s of kdfast's matrix products, peak MiB)", ""]
    L += H.md_table(["mode", "N x H x V", "dtype", "kdfast", "TFLOP/s", "liger", "compile", "eager", "x liger",
                     "x compile", "x eager", "MiB kdfast", "MiB liger", "MiB compile", "MiB eager"], table)
    notes = [r for r in rows if "value_mismatch" in r or r["status"] in ("error", "oom") or (
        r["status"] == "skipped" and "budget" not in r["reason"] and r["reason"] != cfg["liger_missing"])]
    L += ["", "## Method", "",
          "Timing: one warm-up call (torch.compile compiles there), then the median of per-call CUDA-event "
          "times over >= 3 calls, the L2 cache flushed before each (`benchmarks/harness.py`). Peak memory: "
          "`torch.cuda.max_memory_allocated` during one more call, beyond the inputs (the gradient left in "
          "`.grad` included). `fwdbwd`: the student logits (fused linear: hidden states and head) require "
          "grad, `.grad` is reset to None, loss + backward; `fwd`: no input requires grad. Bandwidth: fwd "
          "reads the student and teacher once; fwd+bwd reads them in each pass and writes the gradient "
          f"(kdfast computes the gradient in the forward: its backward only scales it). kd T = {T}, "
          f"jsd beta = {JSD} (T = 1), {cfg['teachers']} teachers, top-{cfg['topk']} teacher. Liger's KL / "
          "JSD rows include the `log_softmax` of student and teacher their modules take as input; "
          "fused linear: `LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5)` against "
          "kdfast's jsd with kd_weight = ce_weight = 0.5. Every row's loss value is in the JSON (`value`)."]
    if notes:
        L += ["", "## Errors, out-of-memory, skipped rows and loss values that differ", ""]
        L += [f"- {_name(_key(r))} {r['case']['mode']} {r['impl']}: " + (
            f"loss {r['value']:.6g} differs from kdfast's by {r['value_mismatch']:.1e} (relative)"
            if "value_mismatch" in r else f"{r['status']}: {r.get('reason', '')}") for r in notes]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU tensors, TRITON_INTERPRET=1, tiny shapes, a temp dir")
    ap.add_argument("--out-dir", type=Path, help="default: benchmarks/ (--dry: a new temporary directory)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no new case after this many seconds")
    ap.add_argument("--compile-budget-s", type=float, default=None,
                    help="total torch.compile warm-up seconds (default: 40%% of --budget-s)")
    ap.add_argument("--compile-backend", default=None, help="default inductor (--dry: eager)")
    ap.add_argument("--rep-s", type=float, default=None, help="timed seconds per row (default 0.15; --dry 0)")
    ap.add_argument("--tests-junit", type=Path, help="pytest --junitxml of this run's CUDA tests, for the report")
    args = ap.parse_args(argv)
    if args.dry and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--dry needs TRITON_INTERPRET=1 before triton is imported (python -m benchmarks.bench_gpu --dry sets it)")
    if not args.dry and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry (make gpu-dry) on a machine without a GPU")
    if args.out_dir is None:
        args.out_dir = Path(tempfile.mkdtemp(prefix="kdfast-gpu-dry-")) if args.dry else ROOT / "benchmarks"
    if args.compile_budget_s is None:   # (--dry: torch.compile's eager backend, a few cases)
        args.compile_budget_s = 3.0 if args.dry else 0.4 * args.budget_s
    args.compile_backend = args.compile_backend or ("eager" if args.dry else "inductor")
    args.rep_s = args.rep_s if args.rep_s is not None else (0.0 if args.dry else 0.15)
    res = run(args)
    md = args.out_dir / "RESULTS-gpu.md"
    md.write_text(render(res.doc))
    H.log(f"wrote {md} and {res.path}")
    for target, ev in TARGETS:
        status, evidence = ev(res.rows)
        H.log(f"{'(dry run) ' if args.dry else ''}target: {status:13s} {target}: {evidence}")
    broken = [r for r in res.rows if r["status"] == "error" and (args.dry or r["impl"] == "kdfast")]
    for r in broken:
        H.log(f"ERROR {_name(_key(r))} {r['case']['mode']} {r['impl']}: {r['reason']}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
