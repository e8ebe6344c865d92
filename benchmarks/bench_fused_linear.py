"""Fused linear + distillation loss vs materialised logits: time and peak memory of one fwd+bwd.

    python -m benchmarks.bench_fused_linear            # N=4096, H=1024, V=32000, fp32 (minutes)
    python -m benchmarks.bench_fused_linear --quick    # N=1024, H=256, V=8000
    python -m benchmarks.bench_fused_linear --json out.json

One training step of the student's output head under a ``kd`` loss (T = 2, no labels), the teacher
given as hidden states ``(N, H)`` and its own head ``(V, H)`` (constant); the student's hidden states
and head require grad. The case is ``{"loss": "kd", "mode": "fwdbwd", "N", "H", "C": V, "dtype"}``;
the implementations:

- ``eager``: ``z = F.linear(h, W)``; ``v = F.linear(h_t, W_t)`` under ``no_grad``;
  ``kdfast.reference.kd_loss(z, v)`` (log_softmax + KL in eager PyTorch); ``backward()``;
- ``logits+kdfast``: the same full logits, the fused ``kdfast.kd_loss(z, v, backend="cpu")`` kernel;
- ``fused_linear``: ``kdfast.fused_linear.fused_linear_distill_loss(h, W, teacher_hidden=h_t,
  teacher_weight=W_t)`` (default chunk size, recorded as ``chunk_size``).

Measured with ``benchmarks/harness.py``: a warm-up of each implementation on a tiny shape and one at
full size (its loss and gradients give ``rel_err`` against ``logits+kdfast``), then ``reps``
interleaved rounds (``harness.time_interleaved``, ``.grad`` reset to None in each step); peak memory
of one step in a fresh process (``harness.in_fresh_process``, ``VmHWM - RSS``, the gradients left in
``.grad`` included; a page-granular OS number that includes BLAS workspaces), each process first
checking the method on a known ``torch.empty(N, V).fill_(1)`` (``mem_calibration``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import harness as H  # noqa: E402

SUITE = "fused_linear"
FULL = dict(N=4096, H=1024, V=32000)
QUICK = dict(N=1024, H=256, V=8000)
IMPLS = ("eager", "logits+kdfast", "fused_linear")
TEMPERATURE = 2.0


def make_inputs(n, hdim, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g)
    w = torch.randn(v, hdim, generator=g) * hdim ** -0.5 * 2
    ht = torch.randn(n, hdim, generator=g)
    wt = torch.randn(v, hdim, generator=g) * hdim ** -0.5 * 2
    return h.requires_grad_(True), w.requires_grad_(True), ht, wt


def step_fn(impl):
    """A function doing one fwd+bwd of ``impl`` on (h, W, h_t, W_t) (grads reset); returns the loss."""
    import kdfast
    from kdfast.fused_linear import fused_linear_distill_loss

    def materialised(loss_fn):
        def logits(h, w, ht, wt):
            z = F.linear(h, w)
            with torch.no_grad():
                v = F.linear(ht, wt)
            return loss_fn(z, v)
        return logits

    loss = {"eager": materialised(lambda z, v: kdfast.reference.kd_loss(z, v, temperature=TEMPERATURE)),
            "logits+kdfast": materialised(lambda z, v: kdfast.kd_loss(z, v, temperature=TEMPERATURE,
                                                                        backend="cpu")),
            "fused_linear": lambda h, w, ht, wt: fused_linear_distill_loss(
                h, w, teacher_hidden=ht, teacher_weight=wt, method="kd", temperature=TEMPERATURE,
                backend="cpu")}[impl]

    def step(h, w, ht, wt):
        h.grad = w.grad = None
        out = loss(h, w, ht, wt)
        out.backward()
        return out
    return step


def _mem_probe(impl, n, hdim, v, threads):
    """In a fresh process: the method's check on a known allocation, then one step's peak."""
    torch.set_num_threads(threads)
    step = step_fn(impl)
    step(*make_inputs(4, 8, 16))          # lazy initialisation: extension, thread pool, BLAS
    keep = []
    calib = H.peak_bytes(lambda: keep.append(torch.empty(n, v).fill_(1))) / (n * v * 4)
    keep.clear()
    ins = make_inputs(n, hdim, v)
    return {"peak_bytes": H.peak_bytes(lambda: step(*ins)), "calib": calib}


def run(quick=False, reps=None, memory=True, path=None) -> H.Results:
    shape = QUICK if quick else FULL
    n, hdim, v = shape["N"], shape["H"], shape["V"]
    threads = torch.get_num_threads()
    res = H.Results(SUITE, path, H.machine("cpu", ROOT), {"T": TEMPERATURE, "quick": quick})
    case = {"loss": "kd", "mode": "fwdbwd", "N": n, "H": hdim, "C": v, "dtype": "fp32"}
    fns = {k: step_fn(k) for k in IMPLS}
    for k in IMPLS:                         # warm-up: lazy initialisation on a tiny shape
        fns[k](*make_inputs(4, 8, 16))
    ins = make_inputs(n, hdim, v)
    h, w = ins[:2]
    steps = {k: (lambda f=fns[k]: f(*ins)) for k in IMPLS}
    est, out = {}, {}
    for k in IMPLS:                         # at full size: the estimate, the values compared
        loss, est[k] = H.first_call(steps[k])
        out[k] = (loss.detach(), h.grad, w.grad)
    timed = H.time_interleaved(steps, estimates=est, reps=reps or 3)
    h.grad = w.grad = None
    from kdfast.fused_linear import default_chunk_size
    ref = out["logits+kdfast"]
    for k in IMPLS:
        errs = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(out[k], ref)]
        row = dict(timed[k], rel_err=dict(zip(("loss", "grad_h", "grad_W"), errs)),
                   chunk_size=default_chunk_size(n, v * 8) if k == "fused_linear" else None)
        if memory:
            m = H.in_fresh_process(_mem_probe, k, n, hdim, v, threads)
            if "error" in m:
                row["peak_error"] = m["error"]
            else:
                row.update(peak_bytes=m["peak_bytes"], peak_method=H.PEAK_METHOD["cpu"],
                           mem_calibration=m["calib"])
        res.add(case, k, **row)
    res.doc["extra"]["loadavg_end"] = H.loadavg()
    res.save()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help=f"default {H.THREADS}")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    H.setup_cpu(a.threads)
    res = run(a.quick, a.reps, not a.no_memory, a.json)
    from benchmarks import report
    print("\n".join(report.suite_tables(res.doc)))


if __name__ == "__main__":
    main()
