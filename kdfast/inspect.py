"""Ahead-of-time resource check of the Triton kernel family: ``python -m kdfast.inspect``.

Compiles ``kdfast._triton.kernel._distill_kernel`` for every loss kind x a representative set of
``tl.constexpr`` combinations (input dtype, NEED_GZ / NEED_GV, HAS_CE, BLOCK with the ``num_warps``
the launcher picks for it, up to the largest block ``MAX_BLOCK``) for sm_80 and sm_90a, with no GPU:
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` emits PTX, then the ptxas that
Triton itself uses for that architecture (bundled under ``triton/backends/nvidia/bin``) assembles
it with ``-v``; its report gives registers per thread and spill stores / loads. Prints a table and
exits non-zero when any configuration spills or cannot launch (registers x threads > 64K).

Options: ``--arch 80 90`` (compute capabilities), ``--blocks 1024 16384``, ``--quick`` (only the largest
block, both gradients and CE on: the highest register pressure of each kind), ``--jobs N`` (parallel compiles), ``--json FILE``.
Triton must not run in interpreter mode here: ``TRITON_INTERPRET`` is ignored (removed) for the
compile (run this module in a fresh process when the tests set it).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

# The AOT compile needs the real (non-interpreted) JIT: drop the interpreter flag before triton is
# imported in this process (and in worker processes, which inherit the environment).
os.environ.pop("TRITON_INTERPRET", None)



@dataclasses.dataclass(frozen=True)
class Combo:
    """One specialisation of ``_distill_kernel`` (mirrors ``kdfast._triton.distill_forward``)."""

    name: str          # the loss it stands for
    kind: int          # kdfast._spec.Kind
    dtype: str         # "fp32" | "bf16" | "fp16" (student and teacher)
    block: int
    need_gz: bool = True
    need_gv: bool = False
    labels: bool = True
    has_ce: bool = True
    ce_shared: bool = False
    wttm: bool = False
    reverse: bool = False
    has_zp: bool = False
    center: bool = False
    num_warps: int | None = None   # None: what the launcher picks for ``block``

    def label(self) -> str:
        flags = "".join([("Z" if self.need_gz else "-"), ("V" if self.need_gv else "-"),
                         ("C" if self.has_ce else "-")])
        return f"{self.name:9s} {self.dtype:4s} {flags} B={self.block:<5d}"


# name -> (kind, flags): the flag sets distill_forward passes for each named loss
_LOSSES = {
    "kd": (0, {}),
    "ttm": (0, {"ce_shared": True}),        # Ts = 1: CE shares the student lse
    "wttm": (0, {"wttm": True, "ce_shared": True}),
    "jsd_rev": (0, {"reverse": True}),
    "retro_kd": (0, {"has_zp": True}),
    "dkd": (1, {}),
    "lm": (2, {"center": True}),
    "ls_kd": (3, {}),
    "jsd": (4, {}),
}


def combos(blocks=(1024, 4096, 16384), dtypes=("fp32", "bf16"), quick=False) -> list[Combo]:
    out = []
    for name, (kind, flags) in _LOSSES.items():
        for dtype in dtypes:
            for block in blocks:
                grads = [(True, True)] if quick else [(True, False), (True, True)]
                ces = [True] if quick else [True, False]
                for need_gz, need_gv in grads:
                    for ce in ces:
                        f = dict(flags)
                        if not ce:
                            f["ce_shared"] = False
                        out.append(Combo(name, kind, dtype, block, need_gz, need_gv, labels=ce,
                                         has_ce=ce, **f))
    return out


def _signature(c: Combo):
    """(signature, constexprs, attrs) for ASTSource, as a real launch with aligned tensors and a
    class count that is a multiple of 16 would specialise them."""
    import triton.language as tl

    from kdfast._triton.kernel import _distill_kernel

    acc = "fp32"
    p = "*" + c.dtype
    sig = {
        "z_ptr": p, "v_ptr": p, "zp_ptr": p, "lab_ptr": "*i64" if c.labels else "*" + acc,
        "kdw_ptr": "*" + acc, "cew_ptr": "*" + acc, "gs_ptr": "*" + acc,
        "d_ptr": "*" + acc, "ce_ptr": "*" + acc,
        "gz_ptr": p if c.need_gz else "*" + acc, "gv_ptr": p if c.need_gv else "*" + acc,
        "C": "i32", "stride_z": "i32", "stride_v": "i32", "stride_zp": "i32",
        "stride_gz": "i32", "stride_gv": "i32",
    }
    for part in ("hi", "lo"):
        for f in ("ts", "tt", "scale", "rho", "alpha", "beta"):
            sig[f"{f}_{part}"] = "fp32"
    sig["ignore_index"] = "i32"
    constexprs = dict(
        KIND=c.kind, HAS_LABELS=c.labels, HAS_CE=c.has_ce and c.labels, CE_SHARED=c.ce_shared,
        WTTM=c.wttm, REVERSE=c.reverse, HAS_ZP=c.has_zp, CENTER=c.center, NEED_GZ=c.need_gz,
        NEED_GV=c.need_gv, ACC=tl.float32, BLOCK=c.block)
    for k in constexprs:
        sig[k] = "constexpr"
    names = _distill_kernel.arg_names
    assert set(sig) == set(names), set(sig) ^ set(names)
    sig = {k: sig[k] for k in names}
    aligned = [k for k in names if k.endswith("_ptr") or k in ("C", "stride_z", "stride_v",
                                                               "stride_zp", "stride_gz", "stride_gv")]
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    return _distill_kernel, sig, constexprs, attrs


def ptxas_tool(cc: int) -> str:
    """The ptxas Triton itself runs for this architecture (bundled; CUDA 12.x for sm_80, the
    newer ``ptxas-blackwell`` for sm_90+, the only bundled one accepting its PTX version there)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(cc).path
    except Exception:  # noqa: BLE001 - other triton versions: the bundled binary by name
        import triton
        base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        name = "ptxas-blackwell" if cc >= 90 and os.path.exists(os.path.join(base, "ptxas-blackwell")) \
            else "ptxas"
        return os.path.join(base, name)


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict:
    regs = [int(x) for x in _RE_REGS.findall(log)]
    sp = [tuple(map(int, m)) for m in _RE_SPILL.findall(log)]
    if not regs or not sp:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return {"regs": max(regs), "stack": max(s[0] for s in sp),
            "spill_st": max(s[1] for s in sp), "spill_ld": max(s[2] for s in sp)}


def compile_one(c: Combo, cc: int) -> dict:
    """AOT-compile one combination for compute capability ``cc``; ptxas -v on its PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kdfast._triton import REGISTERS_PER_BLOCK, max_registers, num_warps_for

    fn, sig, constexprs, attrs = _signature(c)
    target = GPUTarget("cuda", cc, 32)
    nw = c.num_warps or num_warps_for(c.block)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=target, options={"num_warps": nw, "maxnreg": max_registers(nw)})
    ptx = k.asm["ptx"]
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas_tool(cc), "-v", f"--gpu-name={arch}", path, "-o",
                            os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for {c.label()} {arch}:\n{r.stderr}")
    res = parse_ptxas(r.stderr + r.stdout)
    res.update(arch=arch, num_warps=nw, combo=dataclasses.asdict(c), label=c.label(),
               fits=res["regs"] * 32 * nw <= REGISTERS_PER_BLOCK)
    return res


def _job(args):
    c, cc = args
    try:
        return compile_one(c, cc)
    except Exception as e:  # noqa: BLE001 - reported in the table, fails the run
        return {"label": c.label(), "arch": f"sm_{cc}", "error": f"{type(e).__name__}: {e}"}


def run(cs: list[Combo], archs=(80, 90), jobs: int | None = None) -> list[dict]:
    work = [(c, cc) for cc in archs for c in cs]
    jobs = jobs or max(1, min(len(work), os.cpu_count() or 1))
    if jobs == 1:
        return [_job(w) for w in work]
    import multiprocessing as mp
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(_job, work))


def bad(r: dict) -> bool:
    return "error" in r or r["spill_st"] > 0 or r["spill_ld"] > 0 or not r["fits"] or r["regs"] > 255


def table(results: list[dict]) -> str:
    lines = [f"{'kernel (Z/V grads, C = CE)':30s} {'arch':7s} {'warps':>5s} {'regs':>5s} "
             f"{'stack':>6s} {'spill st':>9s} {'spill ld':>9s}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['label']:30s} {r['arch']:7s} ERROR {r['error'].splitlines()[0][:120]}")
            continue
        flag = "" if not bad(r) else "   <-- SPILLS" if r["spill_st"] or r["spill_ld"] else "   <-- TOO MANY"
        lines.append(f"{r['label']:30s} {r['arch']:7s} {r['num_warps']:5d} {r['regs']:5d} "
                     f"{r['stack']:6d} {r['spill_st']:9d} {r['spill_ld']:9d}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdfast.inspect", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--blocks", type=int, nargs="+", default=None)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from kdfast._triton import MAX_BLOCK
    blocks = a.blocks or ([MAX_BLOCK] if a.quick else sorted({1024, 4096, MAX_BLOCK}))
    results = run(combos(blocks, a.dtypes, a.quick), a.arch, a.jobs)
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    n_bad = sum(bad(r) for r in results)
    print(f"\n{len(results)} configurations, {n_bad} with errors, spills or over the register file")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
