"""RESULTS.md and its figures from the suites' results files (all ``harness.SCHEMA``).

    python -m benchmarks.report                       # benchmarks/*.json -> benchmarks/RESULTS.md
    python -m benchmarks.report --out build/report   # the same, written elsewhere
    python -m benchmarks.report --src DIR --out DIR   # results files read from DIR

Reads ``results.json`` (suite ``losses``, one section per machine), ``fused_linear.json``,
``vocab_parallel.json`` and ``multi_teacher.json`` where present, and appends ``numerics_ab.md`` and ``trl.md``
(a hand-kept record). :func:`suite_tables` renders one suite's tables (the suites print them too).

Figures (per machine of the losses suite; each answers one question; titles name the machine, its
ISA and threads; one panel per shape and dtype; a baseline that was not run is marked "not run"):

- ``speedup_<machine>.png``: how much faster is the fused kernel than eager and torch.compile?
- ``memory_<machine>.png``: how much memory beyond the inputs does one fwd+bwd take?
- ``roofline_<machine>.png``: how far is each implementation from the memory floor ``torch.add``?
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness as H  # noqa: E402

MiB = 1024 ** 2
FILES = {"losses": "results.json", "fused_linear": "fused_linear.json",
         "vocab_parallel": "vocab_parallel.json", "multi_teacher": "multi_teacher.json",
         "steady": "steady.json"}
FUSED_BACKENDS = ("cpu", "triton")
IMPLS = ("fused", "eager", "compile")
COLORS = {"fused": "tab:blue", "eager": "tab:orange", "compile": "tab:green",
          "vs eager": "tab:orange", "vs torch.compile": "tab:green"}


def _f(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _ms(row):
    return row["ms"] if row and row.get("status", "ok") == "ok" and "ms" in row else None


# ----------------------------------------------------------------------------- the losses suite
def _loss_label(case):
    return case["loss"] + ("+ce" if case.get("labels") else "")


def _index(rows):
    """(machine, mode, loss label, impl, N, C, dtype) -> row."""
    return {(r["machine"], r["case"]["mode"], _loss_label(r["case"]), r["impl"], r["case"]["N"],
             r["case"]["C"], r["case"]["dtype"]): r for r in rows}


def rows_for(idx, dev, mode):
    """One summary per (loss, N, C, dtype) of ``mode`` on machine ``dev``."""
    keys = sorted({(k[2], k[6], k[4], k[5]) for k in idx if k[0] == dev and k[1] == mode},
                  key=lambda k: (k[0], k[1] != "fp32", k[1], k[2] * k[3], k[2]))
    out = []
    for loss, dt, n, c in keys:
        g = {i: idx.get((dev, mode, loss, i, n, c, dt)) for i in IMPLS}
        floor = _ms(idx.get((dev, "floor", "-", "add", n, c, dt)))
        ms = {i: _ms(g[i]) for i in IMPLS}
        fused = g["fused"] or {}
        out.append(dict(loss=loss, dtype=dt, N=n, C=c, ms=ms, add=floor, rows=g,
                        compile_s=(g["compile"] or {}).get("compile_s"),
                        sp_eager=_ratio(ms["eager"], ms["fused"]), sp_compile=_ratio(ms["compile"], ms["fused"]),
                        r_eager=_ratio(ms["fused"], ms["eager"]), r_compile=_ratio(ms["fused"], ms["compile"]),
                        floor=_ratio(ms["fused"], floor), backend=fused.get("backend", "?"),
                        err=fused.get("loss_rel_err"), gerr=fused.get("grad_rel_err"),
                        failed=[i for i in IMPLS if g[i] and g[i].get("status", "ok") != "ok"]))
    return out


def _mem_cell(row):
    if row is None:
        return "–"
    if "peak_error" in row:
        return "err"
    if row.get("peak_bytes") is None or "peak_units" not in row:
        return "–"
    return f"{row['peak_bytes'] / MiB:.0f} ({row['peak_units']:.2f})"


def _be_cell(b):
    return b if b in FUSED_BACKENDS else f"**{b} (FALLBACK)**"


def _errs(r):
    if r["err"] is None:
        return "–"
    return f"{r['err']:.0e}" + (f" / {r['gerr']:.0e}" if r.get("gerr") is not None else "")


def machine_lines(info):
    gpu = info.get("gpu")
    cuda = info.get("cuda") or (info.get("cuda_runtime") if gpu else None)
    return [f"- machine: {'GPU ' + gpu + ', host ' if gpu else ''}CPU {info.get('cpu')}, "
            f"{info.get('cores')} cores, ISA `{info.get('isa')}` "
            f"(`torch.backends.cpu.get_cpu_capability()`), {info.get('threads')} torch threads",
            f"- software: torch {info.get('torch')}, triton {info.get('triton')}, kdfast "
            f"{info.get('kdfast')}, Python {info.get('python')}" + (f", CUDA {cuda}" if cuda else ""),
            f"- date {info.get('date')}"
            + (f"; sweep {info['elapsed_s'] / 60:.1f} min" if info.get("elapsed_s") else "")
            + (f"; command `python -m benchmarks.bench {info['argv']}`" if info.get("argv") is not None else ""),
            f"- fused = `backend=\"auto\"`, resolved to: **{info.get('fused_backend', '?')}**"]


def losses_section(dev, info, idx, out_dir, plots):
    L = [f"## {dev}", ""] + machine_lines(info)
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
        errs = [c["extra"] - c["expected"] for c in info["mem_calibration"] if c.get("extra") is not None]
        L.append(f"- peak-memory method check: `torch.empty(N, C).fill_(1)` measured with an error "
                 f"of {min(errs)}…{max(errs)} bytes" if errs else "- peak-memory check failed")
    fused_be = {r.get("backend") for k, r in idx.items() if k[0] == dev and k[3] == "fused"}
    fallback = sorted(str(b) for b in fused_be if b not in FUSED_BACKENDS)
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
          "itself, kept as z.grad, is 1.0). – = not run.", "",
          "| loss | dtype | N × C | backend | fused ms | eager ms | compile ms | add ms | "
          "fused/eager | fused/compile | fused/add | err | peak fused | peak eager | "
          "peak compile | compile s |",
          "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    rows = rows_for(idx, dev, "fwdbwd")
    for r in rows:
        L.append(f"| {r['loss']} | {r['dtype']} | {r['N']} × {r['C']} | {_be_cell(r['backend'])} | "
                 f"{_f(r['ms']['fused'])} | {_f(r['ms']['eager'])} | {_f(r['ms']['compile'])} | "
                 f"{_f(r['add'])} | {_f(r['r_eager'], '{:.3f}')} | {_f(r['r_compile'], '{:.3f}')} | "
                 f"{_f(r['floor'], '{:.2f}')} | {_errs(r)} | {_mem_cell(r['rows']['fused'])} | "
                 f"{_mem_cell(r['rows']['eager'])} | {_mem_cell(r['rows']['compile'])} | "
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
            if r["ms"]["fused"]:
                gbs = 3 * r["N"] * r["C"] * (4 if r["dtype"] == "fp32" else 2) / (r["ms"]["fused"] / 1e3) / 1e9
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
                     f"{_f(r['ms']['fused'])} | {_f(r['ms']['eager'])} | {_f(r['ms']['compile'])} | "
                     f"{_f(r['r_eager'], '{:.3f}')} | {_f(r['r_compile'], '{:.3f}')} | {_errs(r)} |")
    names = plot_losses(rows, dev, out_dir) if plots else []
    if names:
        L += [""] + [f"![{n}]({n})" for n in names]
    return L + [""]


# ----------------------------------------------------------------------------- figures
def _hbars(ax, labels, series, fmt, log=False, ref=None):
    """Horizontal grouped bars: one group per label (top to bottom), one bar per (name, values)
    of ``series``; a None value is written as "not run" instead of a bar."""
    k = len(series)
    h = 0.8 / k
    finite = [v for _, vals in series for v in vals if v]
    lo = min(finite) if finite else 1.0
    for j, (name, vals) in enumerate(series):
        ys = [i + (j - (k - 1) / 2) * h for i in range(len(labels))]
        for y, v in zip(ys, vals):
            if v:
                ax.barh(y, v, height=h * 0.9, color=COLORS.get(name), label=name)
                ax.text(v, y, " " + fmt.format(v), va="center", fontsize=7)
            else:
                ax.text(lo if log else 0, y, f" {name}: not run", va="center", fontsize=7, color="0.45")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    if log:
        from matplotlib.ticker import FuncFormatter, NullFormatter
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if ref is not None:
        ax.axvline(ref, color="k", lw=0.8, ls="--")
    if finite:
        ax.set_xlim(right=max(finite) * (3 if log else 1.25))
    handles, names = ax.get_legend_handles_labels()
    uniq = dict(zip(names, handles))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")


def _groups(rows):
    """Shape-and-dtype groups: [((N, C, dtype), [rows])]."""
    g = {}
    for r in rows:
        g.setdefault((r["N"], r["C"], r["dtype"]), []).append(r)
    return sorted(g.items(), key=lambda kv: (kv[0][2] != "fp32", kv[0][0] * kv[0][1]))


def _slug(dev):
    s = "".join(ch if ch.isalnum() else "_" for ch in dev.split("(")[0].lower()).strip("_")
    while "__" in s:
        s = s.replace("__", "_")
    return s[:40]


def plot_losses(rows, dev, out_dir):
    """The three figures of one machine (module docstring); [file names]."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in rows if r["ms"]["fused"]]
    if not rows:
        return []
    title_dev = dev
    if any(r["backend"] not in FUSED_BACKENDS for r in rows):
        title_dev += "\nFALLBACK RUN: 'fused' is the eager reference here"
    names, slug = [], _slug(dev)

    def figure(panels, question, xlabel, name, fmt, log, ref):
        heights = [0.3 * len(labels) * len(series) + 0.9 for _, labels, series in panels]
        total = sum(heights) + 1.0
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, total),
                                 gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, (sub, labels, series) in zip(axes[:, 0], panels):
            _hbars(ax, labels, series, fmt, log, ref)
            ax.set_title(sub, fontsize=9, loc="left")
        axes[-1, 0].set_xlabel(xlabel, fontsize=8)
        fig.suptitle(f"{question}\n{title_dev}", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / total))
        fig.savefig(Path(out_dir) / name, dpi=90)
        plt.close(fig)
        names.append(name)

    groups = _groups(rows)
    figure([(f"{n} × {c} {dt}", [r["loss"] for r in rs],
             [("vs eager", [r["sp_eager"] for r in rs]), ("vs torch.compile", [r["sp_compile"] for r in rs])])
            for (n, c, dt), rs in groups],
           "How much faster is the fused fwd+bwd than eager and torch.compile?",
           "speed-up of fused (baseline time / fused time; > 1: fused is faster)",
           f"speedup_{slug}.png", "{:.1f}×", True, 1.0)
    mem = [r for r in rows if any((r["rows"][i] or {}).get("peak_units") is not None for i in IMPLS)]
    if mem:
        figure([("each case's peak in units of its gradient buffer (N·C·itemsize); 1 = the gradient alone",
                 [f"{r['loss']} {r['N']}×{r['C']} {r['dtype']}" for r in mem],
                 [(i, [(r["rows"][i] or {}).get("peak_units") for r in mem]) for i in IMPLS])],
               "How much memory beyond the inputs does one fwd+bwd take?",
               "extra peak memory / gradient size", f"memory_{slug}.png", "{:.2f}", False, 1.0)
    floor = [(k, [r for r in rs if r["add"]]) for k, rs in groups]
    floor = [(k, rs) for k, rs in floor if rs]
    if floor:
        figure([(f"{n} × {c} {dt}: torch.add = {rs[0]['add']:.2f} ms", [r["loss"] for r in rs],
                 [(i, [_ratio(r["ms"][i], r["add"]) for r in rs]) for i in IMPLS])
                for (n, c, dt), rs in floor],
               "How far is each implementation from the memory floor?",
               "time / time of torch.add(a, b, out=c) on the same shape (read 2, write 1; 1 = the floor)",
               f"roofline_{slug}.png", "{:.1f}×", True, 1.0)
    return names


# ----------------------------------------------------------------------------- the other suites
def _one_machine(doc):
    info = next(iter(doc["machines"].values()), {})
    return info, H.describe(info) if info.get("device") else "?"


def _mib(row):
    return None if row is None or row.get("peak_bytes") is None else row["peak_bytes"] / MiB


def suite_tables(doc) -> list:
    """Markdown lines of one suite's results (the losses suite: every machine's section, no figures)."""
    suite, rows = doc["suite"], doc["rows"]
    if suite == "losses":
        idx = _index(rows)
        return [ln for dev in doc["machines"] for ln in losses_section(dev, doc["machines"][dev], idx, None, False)]
    info, desc = _one_machine(doc)
    load = [(info.get("loadavg") or [None])[0], (doc["extra"].get("loadavg_end") or [None])[0]]
    head = (f"{desc}; {(info.get('date') or '?')[:10]}; load average (1 min) before / after "
            + " / ".join(_f(x) for x in load))
    by = {}
    for r in rows:
        by.setdefault(tuple(sorted(r["case"].items())), {})[r["impl"]] = r
    if suite == "fused_linear":
        L = []
        for key, impls in by.items():
            c = dict(key)
            L += [f"kd fwd+bwd, N={c['N']} H={c['H']} V={c['C']} {c['dtype']}; {head}", "",
                  "| implementation | ms median | ms min | vs eager | vs logits+kdfast | peak extra MiB | "
                  "mem vs eager | mem vs logits+kdfast | rel err (loss, gh, gW) |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|---|"]
            base = {k: impls.get(k) for k in ("eager", "logits+kdfast")}
            for name, r in impls.items():
                e = r.get("rel_err") or {}
                L.append(f"| {name} | {_f(_ms(r), '{:.0f}')} | {_f(r.get('ms_min'), '{:.0f}')} | "
                         f"{_f(_ratio(_ms(r), _ms(base['eager'])), '{:.3f}')} | "
                         f"{_f(_ratio(_ms(r), _ms(base['logits+kdfast'])), '{:.3f}')} | "
                         f"{_f(_mib(r), '{:.0f}')} | {_f(_ratio(_mib(r), _mib(base['eager'])), '{:.3f}')} | "
                         f"{_f(_ratio(_mib(r), _mib(base['logits+kdfast'])), '{:.3f}')} | "
                         + ", ".join(_f(e.get(k), "{:.0e}") for k in ("loss", "grad_h", "grad_W")) + " |")
            L.append("")
        return L
    if suite == "vocab_parallel":
        L = []
        for key, impls in by.items():
            c = dict(key)
            linear = "H" in c   # the fused linear head's case
            title = (f"fused linear + kd fwd+bwd, N={c['N']} H={c['H']} V={c['C']}" if linear
                     else f"kd fwd+bwd, N={c['N']} C={c['C']}")
            # the single-process fused baseline (2 threads) and, for kd, eager
            single = next((r for n, r in impls.items() if r.get("processes") == 1 and n != "eager"), None)
            eager = impls.get("eager")
            L += [f"{title} {c['dtype']}; {head}", "",
                  "| implementation | processes x threads | ms (median) | vs single process | vs eager | "
                  "peak extra MiB (largest rank) | mem vs single process | loss rel diff |",
                  "|---|---|--:|--:|--:|--:|--:|--:|"]
            for name, r in impls.items():
                L.append(f"| {name} | {r.get('processes')} x {r.get('threads')} | {_f(_ms(r), '{:.0f}')} | "
                         f"{_f(_ratio(_ms(r), _ms(single)), '{:.3f}')} | {_f(_ratio(_ms(r), _ms(eager)), '{:.3f}')} | "
                         f"{_f(_mib(r), '{:.0f}')} | {_f(_ratio(_mib(r), _mib(single)), '{:.3f}')} | "
                         f"{_f(r.get('loss_rel_diff'), '{:.1e}')} |"
                         + ("" if r.get("status", "ok") == "ok" else f" {r['status']}: {r.get('reason')}"))
            L.append("")
        return L
    if suite == "multi_teacher":
        L = [head, "", "| method | M | N x C | fused ms | per-teacher ms | eager ms | fused / per-teacher | "
             "fused MiB | per-teacher MiB | eager MiB |", "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
        for key, impls in by.items():
            c = dict(key)
            g = {k: impls.get(k) for k in ("fused", "per-teacher", "eager")}
            cell = {k: _f(_ms(r), "{:.1f}") if r is None or r.get("status", "ok") == "ok" else "not run"
                    for k, r in g.items()}
            L.append(f"| {c['loss']} | {c['M']} | {c['N']} x {c['C']} | {cell['fused']} | {cell['per-teacher']} | "
                     f"{cell['eager']} | {_f(_ratio(_ms(g['fused']), _ms(g['per-teacher'])))} | "
                     + " | ".join(_f(_mib(g[k]), "{:.0f}") for k in ("fused", "per-teacher", "eager")) + " |")
        return L + [""]
    if suite == "steady":
        L = [head, "", "| condition | implementation | N x C | first step ms | best ms | median ms | max ms | "
             "median / best | max / best |", "|---|---|---|--:|--:|--:|--:|--:|--:|"]
        for key, impls in by.items():
            c = dict(key)
            for name, r in impls.items():
                if r.get("status", "ok") != "ok":
                    L.append(f"| {c['condition']} | {name} | {c['N']} x {c['C']} | {r['status']}: {r.get('reason')} |")
                    continue
                L.append(f"| {c['condition']} | {name} | {c['N']} x {c['C']} | {_f(r['first_ms'], '{:.0f}')} | "
                         f"{_f(r['best_ms'], '{:.0f}')} | {_f(r['ms'], '{:.0f}')} | {_f(r['max_ms'], '{:.0f}')} | "
                         f"{_f(r['median_over_best'])} | {_f(r['max_over_best'])} |")
        return L + [""]
    return [f"(no table for suite {suite!r})"]


# ----------------------------------------------------------------------------- RESULTS.md
SUITE_TEXT = {
    "fused_linear": ("Fused linear + distillation (`kdfast.fused_linear_distill_loss`)",
                     "One fwd+bwd of the student head under kd (T = 2), teacher from hidden states + head; "
                     "from `benchmarks/fused_linear.json` (`python -m benchmarks.bench_fused_linear`)."),
    "vocab_parallel": ("Vocabulary-parallel kd (`process_group=`)",
                       "The logits split along the vocabulary over gloo ranks on this machine (each rank one "
                       "thread), against the single-process losses; from `benchmarks/vocab_parallel.json` "
                       "(`python -m benchmarks.bench_vocab_parallel`). The ranks run the fused kernels in "
                       "two phases (kdfast/_spec.py, \"Two phases\"); the fused linear case is a "
                       "column-parallel head (each rank its rows of the student's and the teacher's head)."),
    "multi_teacher": ("Multi-teacher (`kdfast.multi_teacher_loss`)",
                      "One fwd+bwd with M teachers (equal weights, labels with CE); fused = the multi-teacher "
                      "kernel (student row read once per pass), per-teacher = M single-teacher fused calls "
                      "summed by autograd, eager = M reference calls; from `benchmarks/multi_teacher.json` "
                      "(`python -m benchmarks.bench_multi_teacher`). M = 1 runs the same kernel instantiation "
                      "as the single-teacher loss; each row is one run on a shared 2-core VM (single figures "
                      "move by up to +-30 % between runs)."),
    "steady": ("Steady state: a training loop of kd + CE steps (`kdfast` gradient pool)",
               "kd + CE (T = 3) fwd+bwd, step after step, `z.grad = None` between steps, each condition in a "
               "fresh process; `after eager`: one eager kd + CE step of the same shape ran first (its (N, C) "
               "temporaries allocated and freed). `fused, no pool`: the pool off (`KDFAST_GRAD_POOL_MB=0`), "
               "every step faults in a fresh gradient. Best / median / max over the steps after the first; "
               "from `benchmarks/steady.json` (`python -m benchmarks.bench_steady`)."),
}


def load_docs(src: Path) -> dict:
    """{suite: document} of the results files present in ``src``."""
    return {s: H.load(Path(src) / f) for s, f in FILES.items() if (Path(src) / f).exists()}


def write_report(out_dir: Path = HERE, docs: dict | None = None, src: Path | None = None,
                 plots: bool = True) -> Path:
    """RESULTS.md (and the figures) in ``out_dir`` from ``docs`` ({suite: document}), the suites
    missing there read from ``src`` (default: ``out_dir``); ``numerics_ab.md`` from ``src`` or
    benchmarks/."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(src) if src is not None else out_dir
    docs = {**load_docs(src), **(docs or {})}
    L = ["# kdfast benchmark results", "",
         "Generated by `python -m benchmarks.bench` from `benchmarks/results.json` and the other suites' "
         "files (schema `" + H.SCHEMA + "`, `benchmarks/harness.py`; regenerate the report alone with "
         "`python -m benchmarks.report`). "
         "fused = `kdfast.<loss>_loss(backend=\"auto\")`, eager = `kdfast.reference.<loss>_loss`, "
         "compile = `torch.compile(eager, dynamic=False)`. One section per machine.", ""]
    losses = docs.get("losses")
    if losses:
        idx = _index(losses["rows"])
        devs = sorted(losses["machines"], key=lambda d: (d.startswith("cuda"), d))  # CPU first
        head = []
        for dev in devs:
            for r in rows_for(idx, dev, "fwdbwd"):
                if (r["loss"], r["dtype"], r["N"], r["C"]) == ("kd", "fp32", 4096, 32000):
                    head.append(f"| {dev} | {_be_cell(r['backend'])} | {_f(r['ms']['fused'])} | "
                                f"{_f(r['ms']['eager'])} | {_f(r['ms']['compile'])} | {_f(r['add'])} | "
                                f"{_f(r['r_eager'], '{:.3f}')} | {_f(r['r_compile'], '{:.3f}')} | "
                                f"{_f(r['floor'], '{:.2f}')} |")
        if head:
            L += ["## Headline: kd forward + backward, fp32, 4096 × 32000", "",
                  "| machine | fused backend | fused ms | eager ms | compile ms | add ms | fused/eager | "
                  "fused/compile | fused/add |", "|---|---|--:|--:|--:|--:|--:|--:|--:|"] + head + [""]
        for dev in devs:
            L += losses_section(dev, losses["machines"][dev], idx, out_dir, plots)
    for suite, (title, text) in SUITE_TEXT.items():
        if suite in docs:
            L += ["", f"## {title}", "", text, ""] + suite_tables(docs[suite])
    # committed records of one-off runs: the numerics old-vs-new A/B, the GKDTrainer trial (bench_trl.py)
    for name in ("numerics_ab.md", "trl.md"):
        for na in (src / name, HERE / name):
            if na.exists():
                L += ["", na.read_text().rstrip(), ""]
                break
    path = out_dir / "RESULTS.md"
    path.write_text("\n".join(L))
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=HERE, help="where the results files are (default benchmarks/)")
    ap.add_argument("--out", type=Path, default=None, help="where RESULTS.md and figures go (default --src)")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args()
    print(f"wrote {write_report(a.out or a.src, src=a.src, plots=not a.no_plots)}")
