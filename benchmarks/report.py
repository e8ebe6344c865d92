"""RESULTS.md and plots from benchmarks/results.json (one section per device).

    python -m benchmarks.report [results.json] [out_dir]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1024 ** 2


def _index(meas):
    """(device_key, mode, loss, impl, N, C, dtype) -> measurement (labels folded into loss name)."""
    idx = {}
    for m in meas:
        loss = m["loss"] + ("+ce" if m.get("labels") and m["loss"] != "dkd" else "")
        idx[(m["device_key"], m["mode"], loss, m["impl"], m["N"], m["C"], m["dtype"])] = m
    return idx


def _ms(m):
    return None if m is None or "ms" not in m else m["ms"]


def _f(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def rows_for(idx, dev, mode):
    """One row per (loss, N, C, dtype) of ``mode`` on ``dev``."""
    keys = sorted({(k[2], k[6], k[4], k[5]) for k in idx if k[0] == dev and k[1] == mode
                   and k[3] != "add"}, key=lambda k: (k[0], k[1] != "fp32", k[1], k[2] * k[3], k[2]))
    rows = []
    for loss, dt, n, c in keys:
        g = lambda impl, md=mode: idx.get((dev, md, loss, impl, n, c, dt))  # noqa: E731
        add = idx.get((dev, "fwdbwd", "-", "add", n, c, dt))
        fused, eager, comp = _ms(g("fused")), _ms(g("eager")), _ms(g("compile"))
        mem = {i: idx.get((dev, "mem", loss, i, n, c, dt)) for i in ("fused", "eager", "compile")}
        rows.append(dict(loss=loss, dtype=dt, N=n, C=c, fused=fused, eager=eager, compile=comp,
                         add=_ms(add), compile_s=(g("compile") or {}).get("compile_s"),
                         sp_eager=_ratio(eager, fused), sp_compile=_ratio(comp, fused),
                         r_eager=_ratio(fused, eager), r_compile=_ratio(fused, comp),
                         floor=_ratio(fused, _ms(add)), mem=mem,
                         backend=(g("fused") or {}).get("backend", "?"),
                         err=(g("fused") or {}).get("loss_rel_err"),
                         gerr=(g("fused") or {}).get("grad_rel_err"),
                         failed=[i for i in ("fused", "eager", "compile") if g(i) and "error" in g(i)]))
    return rows


def _mem_cell(m):
    if m is None:
        return "–"
    if "error" in m:
        return "err"
    return f"{m['extra_bytes'] / MiB:.0f} ({m['extra_grad_units']:.2f})"


FUSED_BACKENDS = ("cpu", "triton")


def _be_cell(b):
    return b if b in FUSED_BACKENDS else f"**{b} (FALLBACK)**"


def _errs(r):
    if r["err"] is None:
        return "–"
    return f"{r['err']:.0e}" + (f" / {r['gerr']:.0e}" if r.get("gerr") is not None else "")


def machine_lines(dev, info):
    gpu = info.get("gpu")
    L = [f"- machine: {'GPU ' + gpu + ', host ' if gpu else ''}CPU {info.get('cpu')}, "
         f"{info.get('cores')} cores, ISA `{info.get('isa')}` "
         f"(`torch.backends.cpu.get_cpu_capability()`), {info.get('threads')} torch threads",
         f"- software: torch {info.get('torch')}, triton {info.get('triton')}, kdfast "
         f"{info.get('kdfast')}, Python {info.get('python')}"
         + (f", CUDA {info['cuda']}" if info.get("cuda") else ""),
         f"- date {info.get('date')}"
         + (f"; sweep {info['elapsed_s'] / 60:.1f} min" if info.get("elapsed_s") else "")
         + (f"; command `python -m benchmarks.bench {info['argv']}`" if info.get("argv") is not None else ""),
         f"- fused = `backend=\"auto\"`, resolved to: **{info.get('fused_backend', '?')}**"]
    return L


def section(dev, info, idx, out_dir, slug, plots):
    L = [f"## {dev}", ""]
    L += machine_lines(dev, info)
    la = info.get("loadavg_start")
    if la is not None:
        L.append(f"- load average (1 min) before the sweep {la[0]:.2f}, after "
                 f"{(info.get('loadavg_end') or [float('nan')])[0]:.2f}")
        if la[0] > 0.5:
            L.append(f"- **WARNING: the machine was busy before the sweep started (load {la[0]:.2f}): "
                     "other processes shared the cores; treat these timings as noise.**")
    if info.get("copy_bandwidth_GBs"):
        L.append(f"- device-to-device copy bandwidth: {info['copy_bandwidth_GBs']:.0f} GB/s")
    if info.get("mem_calibration"):
        errs = [c["extra"] - c["expected"] for c in info["mem_calibration"] if "extra" in c]
        L.append(f"- peak-memory method check: `torch.empty(N, C).fill_(1)` measured with an error "
                 f"of {min(errs)}…{max(errs)} bytes" if errs else "- peak-memory check failed")
    fused_be = {m.get("backend") for k, m in idx.items() if k[0] == dev and k[3] == "fused"}
    fallback = sorted(b for b in fused_be if b not in FUSED_BACKENDS)
    if fallback or info.get("fused_backend", "cpu") not in FUSED_BACKENDS:
        L += ["", "> **WARNING — FALLBACK RUN: in (some of) these measurements `kdfast` resolved "
              f"`backend=\"auto\"` to {', '.join(map(repr, fallback)) or repr(info.get('fused_backend'))} "
              "(the eager reference; the C++ extension was not built or not importable). The "
              "fused column is then NOT kdfast's kernel: these numbers test the harness only. "
              "Rows so marked in the `backend` column.**"]
    L += ["", "### forward + backward (`fn(z, v).backward()`, z requires grad)", "",
          "ms are medians over rounds in which the implementations alternate (one process). "
          "`fused/eager`, `fused/compile`, `fused/add` = ratios of median times (< 1: fused is "
          "faster; `fused/add` is the distance from the memory floor `torch.add(a, b, out=c)` on "
          "the same shape: read 2, write 1). `err` = relative error fused vs eager of the loss / "
          "of the gradient on the benchmarked inputs. Peak = extra memory beyond the inputs "
          "during one fwd+bwd, MiB (in units of the gradient buffer N·C·itemsize; the gradient "
          "itself, kept as z.grad, is 1.0).", "",
          "| loss | dtype | N × C | backend | fused ms | eager ms | compile ms | add ms | "
          "fused/eager | fused/compile | fused/add | err | peak fused | peak eager | "
          "peak compile | compile s |",
          "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    rows = rows_for(idx, dev, "fwdbwd")
    for r in rows:
        L.append(f"| {r['loss']} | {r['dtype']} | {r['N']} × {r['C']} | {_be_cell(r['backend'])} | "
                 f"{_f(r['fused'])} | {_f(r['eager'])} | {_f(r['compile'])} | {_f(r['add'])} | "
                 f"{_f(r['r_eager'], '{:.3f}')} | {_f(r['r_compile'], '{:.3f}')} | "
                 f"{_f(r['floor'], '{:.2f}')} | {_errs(r)} | {_mem_cell(r['mem']['fused'])} | "
                 f"{_mem_cell(r['mem']['eager'])} | {_mem_cell(r['mem']['compile'])} | "
                 f"{_f(r['compile_s'], '{:.1f}')} |")
    bad = [r for r in rows if r["err"] is not None and r["err"] > 1e-2]
    failed = [r for r in rows if r["failed"]]
    if bad:
        L += ["", "**fused and eager losses disagree (relative error > 1e-2) in: " +
              ", ".join(f"{r['loss']} {r['N']}×{r['C']} {r['dtype']}" for r in bad) + "**"]
    if failed:
        L += ["", "Errors in: " + ", ".join(f"{r['loss']} {r['N']}×{r['C']} {r['dtype']} "
                                             f"({'/'.join(r['failed'])})" for r in failed)]
    if info.get("copy_bandwidth_GBs"):
        L += ["", "Achieved bandwidth of fused fwd+bwd (3·N·C·itemsize bytes moved / time) as a "
              "fraction of the measured copy bandwidth:", "", "| loss | dtype | N × C | GB/s | "
              "fraction of copy |", "|---|---|---|--:|--:|"]
        for r in rows:
            if r["fused"]:
                gbs = 3 * r["N"] * r["C"] * (4 if r["dtype"] == "fp32" else 2) / (r["fused"] / 1e3) / 1e9
                L.append(f"| {r['loss']} | {r['dtype']} | {r['N']} × {r['C']} | {gbs:.0f} | "
                         f"{gbs / info['copy_bandwidth_GBs']:.2f} |")
    for mode, title in (("fwd", "forward only (no input requires grad)"),
                        ("fwdbwd_tgrad", "forward + backward, teacher also requires grad")):
        rs = rows_for(idx, dev, mode)
        if not rs:
            continue
        L += ["", f"### {title}", "", "| loss | dtype | N × C | backend | fused ms | eager ms | "
              "compile ms | fused/eager | fused/compile | err |",
              "|---|---|---|---|--:|--:|--:|--:|--:|--:|"]
        for r in rs:
            L.append(f"| {r['loss']} | {r['dtype']} | {r['N']} × {r['C']} | {_be_cell(r['backend'])} | "
                     f"{_f(r['fused'])} | {_f(r['eager'])} | {_f(r['compile'])} | "
                     f"{_f(r['r_eager'], '{:.3f}')} | {_f(r['r_compile'], '{:.3f}')} | {_errs(r)} |")
    names = _plots(rows, dev, out_dir, slug) if plots else []
    if names:
        L += [""] + [f"![{n}]({n})" for n in names]
    return L + [""]


def _plots(rows, dev, out_dir, slug):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in rows if r["fused"]]
    if not rows:
        return []
    if any(r["backend"] not in FUSED_BACKENDS for r in rows):
        dev = dev + "\nFALLBACK RUN: 'fused' is the eager reference here"
    labels = [f"{r['loss']}\n{r['N']}×{r['C']}\n{r['dtype']}" for r in rows]
    x = range(len(rows))
    w = max(6.0, 0.55 * len(rows))
    names = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        names.append(name)

    fig, ax = plt.subplots(figsize=(w, 4))
    for off, key, lab in ((-0.2, "sp_eager", "vs eager"), (0.2, "sp_compile", "vs torch.compile")):
        ax.bar([i + off for i in x], [r[key] or 0 for r in rows], width=0.4, label=lab)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("speed-up of fused (×)")
    ax.set_title(f"fused fwd+bwd speed-up — {dev}", fontsize=9)
    ax.legend()
    save(fig, f"speedup_{slug}.png")

    fig, ax = plt.subplots(figsize=(w, 4))
    for off, impl in ((-0.27, "fused"), (0, "eager"), (0.27, "compile")):
        ax.bar([i + off for i in x], [(r["mem"][impl] or {}).get("extra_grad_units", 0)
                                      for r in rows], width=0.27, label=impl)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("extra peak memory / gradient size")
    ax.set_title(f"peak memory of one fwd+bwd beyond the inputs — {dev}", fontsize=9)
    ax.legend()
    save(fig, f"memory_{slug}.png")

    fig, ax = plt.subplots(figsize=(w, 4))
    for off, impl in ((-0.27, "fused"), (0, "compile"), (0.27, "eager")):
        ax.bar([i + off for i in x], [(r["add"] / r[impl]) if r[impl] and r["add"] else 0
                                      for r in rows], width=0.27, label=impl)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("add time / impl time")
    ax.set_title(f"fraction of the memory roofline (torch.add read-2-write-1) — {dev}", fontsize=9)
    ax.legend()
    save(fig, f"roofline_{slug}.png")
    return names


def _slug(dev):
    s = "".join(ch if ch.isalnum() else "_" for ch in dev.split("(")[0].lower()).strip("_")
    while "__" in s:
        s = s.replace("__", "_")
    return s[:40]


def write_report(results: dict, out_dir: Path = HERE, plots: bool = True):
    out_dir = Path(out_dir)
    idx = _index(results.get("measurements", []))
    devs = sorted({m["device_key"] for m in results.get("measurements", [])},
                  key=lambda d: (d.startswith("cuda"), d))   # CPU first; each GPU its own section
    L = ["# kdfast benchmark results", "",
         "Generated by `python -m benchmarks.bench` from `benchmarks/results.json` "
         "(regenerate the report alone with `python -m benchmarks.report`). "
         "fused = `kdfast.<loss>_loss(backend=\"auto\")`, eager = `kdfast.reference.<loss>_loss`, "
         "compile = `torch.compile(eager, dynamic=False)`. One section per device.", ""]
    head = []
    for dev in devs:
        for r in rows_for(idx, dev, "fwdbwd"):
            if (r["loss"], r["dtype"], r["N"], r["C"]) == ("kd", "fp32", 4096, 32000):
                head.append(f"| {dev} | {_be_cell(r['backend'])} | {_f(r['fused'])} | "
                            f"{_f(r['eager'])} | {_f(r['compile'])} | {_f(r['add'])} | "
                            f"{_f(r['r_eager'], '{:.3f}')} | {_f(r['r_compile'], '{:.3f}')} | "
                            f"{_f(r['floor'], '{:.2f}')} |")
    if head:
        L += ["## Headline: kd forward + backward, fp32, 4096 × 32000", "",
              "| device | fused backend | fused ms | eager ms | compile ms | add ms | fused/eager | "
              "fused/compile | fused/add |", "|---|---|--:|--:|--:|--:|--:|--:|--:|"] + head + [""]
    for dev in devs:
        L += section(dev, results["machines"].get(dev, {}), idx, out_dir, _slug(dev), plots)
    fl = out_dir / "fused_linear.json"   # written by `python -m benchmarks.bench_fused_linear --json`
    if fl.exists():
        from .bench_fused_linear import _table
        L += ["", "## Fused linear + distillation (`kdfast.fused_linear_distill_loss`)", "",
              "One fwd+bwd of the student head under kd (T = 2), teacher from hidden states + head; "
              "from `benchmarks/fused_linear.json` (`python -m benchmarks.bench_fused_linear`).", "",
              _table(json.loads(fl.read_text())), ""]
    vp = out_dir / "vocab_parallel.json"   # `python -m benchmarks.bench_vocab_parallel --json`
    if vp.exists():
        from .bench_vocab_parallel import _table as _vp_table
        L += ["", "## Vocabulary-parallel kd (`process_group=`)", "",
              "The logits split along the vocabulary over gloo ranks on this machine (each rank one "
              "thread), against the single-process losses; from `benchmarks/vocab_parallel.json` "
              "(`python -m benchmarks.bench_vocab_parallel`). The vocabulary-parallel path is eager "
              "torch per shard, not the fused kernel.", "",
              _vp_table(json.loads(vp.read_text())), ""]
    mt = out_dir / "multi_teacher.json"   # `python -m benchmarks.bench_multi_teacher --json`
    if mt.exists():
        from .bench_multi_teacher import _table as _mt_table
        d = json.loads(mt.read_text())
        L += ["", "## Multi-teacher (`kdfast.multi_teacher_loss`)", "",
              f"One fwd+bwd with M teachers (equal weights, labels with CE), {d['threads']} threads, "
              f"{d['date']}, load {d['load']:.1f}; fused = the multi-teacher kernel (student row read once "
              "per pass), per-teacher = M single-teacher fused calls summed by autograd, eager = M "
              "reference calls; from `benchmarks/multi_teacher.json` "
              "(`python -m benchmarks.bench_multi_teacher`). M = 1 runs the same kernel instantiation as "
              "the single-teacher loss; each row is one run on a shared 2-core VM (single figures move "
              "by up to +-30 % between runs).", "",
              *_mt_table(d["rows"]), ""]
    na = out_dir / "numerics_ab.md"   # a committed old-vs-new kernel record (needs both builds)
    if na.exists():
        L += ["", na.read_text().rstrip(), ""]
    (out_dir / "RESULTS.md").write_text("\n".join(L))


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.json"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE
    write_report(json.loads(src.read_text()), out)
    print(f"wrote {out / 'RESULTS.md'}")
