"""Ahead-of-time resource check of the Triton kernel family: ``python -m kdfast.aot``.

Compiles ``kdfast._triton.kernel._distill_kernel`` for every loss kind x a representative set of
``tl.constexpr`` combinations (input dtype, NEED_GZ / NEED_GV, HAS_CE, BLOCK with the ``num_warps``
the launcher picks for it, up to the largest block ``MAX_BLOCK``) for sm_80 and sm_90a, with no GPU:
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` emits PTX and the cubin Triton
would launch. Per configuration it reports

* registers and spills: the ``-v`` report of the ptxas run in which Triton builds the cubin (the
  bundled ptxas it picks for the architecture, with its own flags), and the bundled ``cuobjdump
  --dump-resource-usage`` of that cubin (REG, STACK, LOCAL: spilled registers land in STACK);
* shared memory: the dynamic shared memory Triton requests at launch (``metadata.shared``: the
  cross-warp reduction scratch) plus any static shared memory of the cubin;
* global memory access width, from the PTX: the loads inside the column loops (the row sweeps of
  z / v / zp) and the gradient stores, by bits per instruction. 128-bit is ``ld.global.v4.b32``
  for every 32- and 16-bit dtype (fp32: 4 elements, bf16 / fp16: 8 elements packed in 4 x b32)
  and ``v2.b64`` for fp64; narrower accesses mean the compiler could not prove 16-byte alignment.

The specialisation is the one a real launch gets (``triton.runtime.jit``): pointers divisible by 16
(fresh CUDA allocations are), and each integer argument marked divisible by 16 exactly when its
value is, for a row-contiguous call with ``--classes C`` columns (C and the row strides are C;
absent tensors pass stride 0). The default C = 32000 is 16-aligned; a C that is not a multiple of
16 (e.g. 1000) shows what such calls get. Prints a table and exits non-zero when any configuration
spills, cannot launch (registers x threads > 64K), or, with 16-aligned C, streams the rows with
loads narrower than 128 bits.

Options: ``--arch 80 90`` (compute capabilities), ``--blocks 1024 8192``, ``--dtypes fp32 bf16``,
``--losses kd dkd``, ``--classes 32000 1000``, ``--quick`` (only the largest block, both gradients
and CE on: the highest register pressure of each kind), ``--teachers 1 2 4`` (teacher counts M:
M > 1 is the fused multi-teacher launch of ``kdfast._triton.multi_forward``, teachers stacked
(M, N, C), each block clamped to the launcher's ``MAX_BLOCK // next_power_of_2(M)``; without
``--teachers`` the set is one teacher, plus M = 2 and 4 for kd and dkd unless ``--quick``),
``--jobs N`` (parallel compiles), ``--json FILE``. Works with Triton 3.6 and 3.9 (same ``ASTSource`` / ``GPUTarget`` /
``triton.compile`` signatures). Triton must not run in interpreter mode here: run as a script it
removes ``TRITON_INTERPRET`` before importing triton (run it in a fresh process when the tests set
it; ``compile_one`` called in an interpreter-mode process is not supported).
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

if __name__ == "__main__":
    # The AOT compile needs the real (non-interpreted) JIT: drop the interpreter flag before triton
    # is imported in this process (worker processes inherit the environment). Only when run as a
    # script: a test process importing the helpers below keeps its interpreter mode.
    os.environ.pop("TRITON_INTERPRET", None)
    # (the compiles pass enable_fp_fusion=FP_FUSION, as the launches do: what is inspected is what runs)

from kdfast._spec import Kind  # noqa: E402  (no triton import: the flag above is set first)

#: the class count of the modelled call when none is given: a multiple of 16
DEFAULT_CLASSES = 32000


@dataclasses.dataclass(frozen=True)
class Combo:
    """One specialisation of ``_distill_kernel`` (mirrors ``kdfast._triton.distill_forward``)."""

    name: str          # the case of kdfast.losses.REGISTRY it stands for
    kind: int          # kdfast._spec.Kind
    dtype: str         # "fp32" | "bf16" | "fp16" | "fp64" (student and teacher)
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
    renormalize: bool = True   # the top-k kernel's RENORM
    tail: bool = False         # the top-k kernel's TAIL
    divergence: int = 0        # the top-k kernel's DIV (kdfast._spec.Divergence)
    num_warps: int | None = None   # None: what the launcher picks for ``block`` (and ``teachers``)
    classes: int = DEFAULT_CLASSES  # C of the modelled call: decides the integer specialisation
    teachers: int = 1  # M: > 1 models kdfast._triton.multi_forward (teachers stacked (M, N, C))

    def label(self) -> str:
        flags = "".join([("Z" if self.need_gz else "-"), ("V" if self.need_gv else "-"),
                         ("C" if self.has_ce else "-")])
        name = self.name if self.teachers == 1 else f"{self.name}x{self.teachers}"
        return f"{name:11s} {self.dtype:4s} {flags} B={self.block:<5d} C={self.classes:<6d}"

    @property
    def mb(self) -> int:
        """Teacher slots of the kernel: next_power_of_2(teachers)."""
        return 1 << max(self.teachers - 1, 0).bit_length()


def specialisation(params) -> tuple[int, dict]:
    """(kind, Combo flags) of the kernel launch for the kernel parameters ``params``
    (``KernelParams`` or ``TopkParams``) with labels and CE: the flags ``kdfast._triton`` derives
    (mirrors ``_launch`` and ``topk_forward``: CE shares the student's lse at T = 1, the KL flags
    only for the KL kind, ``center`` only for LM, the past student when ``rho != 0``)."""
    from kdfast._spec import Kind
    kind = Kind(params.kind)
    if kind == Kind.TOPK:
        flags = {"ce_shared": params.t == 1.0, "renormalize": params.renormalize, "tail": params.tail,
                 "divergence": int(params.divergence)}
    else:
        flags = {"ce_shared": kind in (Kind.KL, Kind.DKD, Kind.JSD) and params.t_student == 1.0,
                 "wttm": params.wttm and kind == Kind.KL, "reverse": params.reverse and kind == Kind.KL,
                 "has_zp": params.rho != 0, "center": params.center and kind == Kind.LM}
    defaults = {f.name: f.default for f in dataclasses.fields(Combo)}
    return int(kind), {k: v for k, v in flags.items() if v != defaults[k]}


def _losses() -> dict:
    """case name -> (kind, flags): every case of every loss of kdfast.losses.REGISTRY (its
    hyperparameter sets that reach each kernel specialisation), a case whose specialisation an
    earlier one already has left out (e.g. jsd at beta = 0 is kd's)."""
    from kdfast.losses import REGISTRY
    out, seen = {}, set()
    for loss in REGISTRY.values():
        for name, hyper in loss.cases.items():
            kind, flags = specialisation(loss.params(**hyper))
            key = (kind, tuple(sorted(flags.items())))
            if key not in seen:
                seen.add(key)
                out[name] = (kind, flags)
    return out


#: case name -> (kind, flags) (:func:`_losses`): kd, ttm, wttm, dkd, lm, lm_raw, ls_kd, jsd, jsd_rev,
#: retro_kd, topk_kd, topk_kd_raw, topk_kd_tail, topk_reverse_kd, topk_reverse_kd_tail, topk_jsd,
#: topk_jsd_tail, topk_jsd_fwd, topk_jsd_rev
_LOSSES = _losses()

#: float64 rows launch with at most this block (mirrors kdfast._triton.MAX_BLOCK_FP64)
MAX_BLOCK_FP64 = 1024

#: k of the modelled top-k teacher
TOPK_K = 64

#: rows of the modelled multi-teacher call (decides the divisibility of the teacher strides N * C)
MULTI_ROWS = 4096

#: the multi-teacher configurations of the default (non --quick) set: loss -> teacher counts
MULTI_DEFAULT = {"kd": (2, 4), "dkd": (2, 4)}


def combos(blocks=(1024, 4096, 8192), dtypes=("fp32", "bf16"), quick=False, losses=None,
           classes=(DEFAULT_CLASSES,), teachers=None, max_block=8192) -> list[Combo]:
    """The configurations to compile. ``teachers``: teacher counts for every selected loss (top-k
    excepted); None: one teacher, plus ``MULTI_DEFAULT`` unless ``quick``. A multi-teacher combo
    with MB teacher slots clamps each block to the largest the launcher picks for it,
    ``max_block // MB`` (``MAX_BLOCK_FP64 // MB`` for fp64): the block of a row of that many
    columns."""
    out = []
    grads = [(True, True)] if quick else [(True, False), (True, True)]
    ces = [True] if quick else [True, False]
    for name, (kind, flags) in _LOSSES.items():
        if losses and name not in losses:
            continue
        if teachers is not None:
            ms = sorted(set(teachers))
            if kind == Kind.TOPK:   # the top-k kernel has one teacher
                ms = [m for m in ms if m == 1]
        else:
            ms = [1] + ([] if quick else list(MULTI_DEFAULT.get(name, ())))
        for m in ms:
            mb = 1 << max(m - 1, 0).bit_length()
            for ncls in classes:
                for dtype in dtypes:
                    cap = min(max_block, MAX_BLOCK_FP64) if dtype == "fp64" else max_block
                    if m == 1:
                        mblocks = list(blocks)
                    else:
                        mblocks = sorted({min(b, max(cap // mb, 1)) for b in blocks})
                    for block in mblocks:
                        if dtype == "fp64" and block * mb > MAX_BLOCK_FP64:
                            continue   # the launcher never uses it (kdfast._triton.MAX_BLOCK_FP64)
                        for need_gz, need_gv in grads:
                            for ce in ces:
                                f = dict(flags)
                                if not ce:
                                    f["ce_shared"] = False
                                out.append(Combo(name, kind, dtype, block, need_gz, need_gv, labels=ce,
                                                 has_ce=ce, classes=ncls, teachers=m, **f))
    return out


def _jit_int_spec(value: int) -> str:
    """How ``triton.runtime.jit`` specialises an int argument (3.6 and 3.9 alike): 1 becomes a
    constexpr, a multiple of 16 is marked ``tt.divisibility = 16`` ("D"), anything else nothing.
    There is no intermediate level: C = 1000 (a multiple of 8) gets no divisibility at all."""
    if value == 1:
        return "constexpr"
    return "D" if value % 16 == 0 else ""


def _signature(c: Combo):
    """(kernel, signature, constexprs, attrs) for ASTSource: the specialisation a real launch of
    ``distill_forward`` gets with freshly allocated (16-byte aligned) row-contiguous tensors of
    ``c.classes`` columns. Pointers are "D"; C and the row strides are "D" iff C % 16 == 0; the
    strides of absent tensors are 0 ("D"); ignore_index (-100) is not. One teacher: M = 1 is a
    constexpr (the JIT's specialisation of the value 1), the teacher strides 0. ``c.teachers`` > 1
    models ``multi_forward`` on an (M, N, C) stack of N = MULTI_ROWS rows: teacher strides N * C."""
    import triton.language as tl

    from kdfast._triton.kernel import _distill_kernel

    if c.classes < 2:
        raise ValueError("--classes must be >= 2 (C = 1 is a constexpr specialisation)")
    if c.kind == Kind.TOPK:
        return _topk_signature(c)
    acc = "fp64" if c.dtype == "fp64" else "fp32"
    p = "*" + c.dtype
    sig = {
        "z_ptr": p, "v_ptr": p, "zp_ptr": p, "lab_ptr": "*i64" if c.labels else "*" + acc,
        "kdw_ptr": "*" + acc, "cew_ptr": "*" + acc, "gs_ptr": "*" + acc,
        "d_ptr": "*" + acc, "ce_ptr": "*" + acc,
        "gz_ptr": p if c.need_gz else "*" + acc, "gv_ptr": p if c.need_gv else "*" + acc,
        "C_vec": "i32", "stride_z_vec": "i32", "stride_v_vec": "i32", "stride_zp_vec": "i32",
        "stride_gz_vec": "i32", "stride_gv_vec": "i32",
        "M": "i32", "stride_vm_vec": "i32", "stride_gvm_vec": "i32", "stride_wm": "i32",
    }
    for part in ("hi", "lo"):
        for f in ("ts", "tt", "scale", "rho", "alpha", "beta"):
            sig[f"{f}_{part}"] = "fp32"
    sig["ignore_index"] = "i32"
    # the two phases' tensors and shard (unused by the fused launch modelled here: PHASE 0; the
    # launcher passes d_out for the tensors, 0 for the integers)
    sig.update(st_ptr="*" + acc, coef_ptr="*" + acc, part_ptr="*" + acc, col0="i32", vocab="i32",
               world="i32")
    constexprs = dict(
        KIND=c.kind, HAS_LABELS=c.labels, HAS_CE=c.has_ce and c.labels, CE_SHARED=c.ce_shared,
        WTTM=c.wttm, REVERSE=c.reverse, HAS_ZP=c.has_zp, CENTER=c.center, NEED_GZ=c.need_gz,
        NEED_GV=c.need_gv, ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK=c.block,
        VEC=_vec(c), MB=c.mb, PHASE=0, ROUND=0)
    for k in constexprs:
        sig[k] = "constexpr"
    names = _distill_kernel.arg_names
    assert set(sig) == set(names), set(sig) ^ set(names)
    sig = {k: sig[k] for k in names}
    cv = c.classes // _vec(c)   # C and the row strides in VEC units, as the launcher passes them
    multi = c.teachers > 1      # teachers stacked (M, N, C), N = MULTI_ROWS: teacher stride N * C
    ints = {"C_vec": cv, "stride_z_vec": cv, "stride_v_vec": cv,
            "stride_zp_vec": cv if c.has_zp else 0,
            "stride_gz_vec": cv if c.need_gz else 0,
            "stride_gv_vec": cv if c.need_gv else 0, "ignore_index": -100,
            "M": c.teachers, "stride_vm_vec": MULTI_ROWS * cv if multi else 0,
            "stride_gvm_vec": MULTI_ROWS * cv if multi and c.need_gv else 0,
            "stride_wm": MULTI_ROWS if multi else 0, "col0": 0, "vocab": 0, "world": 0}
    for k, v in ints.items():   # what the JIT does with an int argument of value 1
        if _jit_int_spec(v) == "constexpr":
            sig[k] = "constexpr"
            constexprs[k] = v
    aligned = [k for k in names if k.endswith("_ptr") or _jit_int_spec(ints.get(k, 1)) == "D"]
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    return _distill_kernel, sig, constexprs, attrs


def _num_warps(c: Combo) -> int:
    """The warps ``kdfast._triton.launch_config`` picks for ``c.block`` (and ``c.teachers``)."""
    from kdfast._triton import launch_config
    if c.teachers == 1:
        from kdfast._triton import num_warps_for
        return num_warps_for(c.block)
    elems = 16 // {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}[c.dtype]
    return launch_config(c.block, max_block=c.block * c.mb, fp64=c.dtype == "fp64",
                         teachers=c.teachers, vec=elems)[1]


def _vec(c: Combo) -> int:
    """The VEC ``kdfast._triton.vec_for`` picks for contiguous rows of ``c.classes`` columns."""
    vec = 16 // {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}[c.dtype]
    while vec > 1 and c.classes % vec:
        vec //= 2
    return vec


def _aligned(c: Combo) -> bool:
    """Rows start 16-byte aligned in the modelled call: the distill kernel's VEC reaches 16 bytes
    (C a multiple of 4 fp32 / 8 bf16 / 2 fp64 elements); the top-k kernel (no VEC) needs C % 16 == 0."""
    if c.kind == Kind.TOPK:
        return c.classes % 16 == 0
    return _vec(c) * {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}[c.dtype] == 16


def _topk_signature(c: Combo):
    """The specialisation ``kdfast._triton.topk_forward`` launches (teacher: (N, k) fp32/fp64
    log-probabilities and int64 classes, k = TOPK_K)."""
    import triton
    import triton.language as tl

    from kdfast._triton.topk import _topk_kernel

    acc = "fp64" if c.dtype == "fp64" else "fp32"
    p = "*" + c.dtype
    sig = {"z_ptr": p, "lp_ptr": "*" + acc, "idx_ptr": "*i64",
           "lab_ptr": "*i64" if c.labels else "*" + acc, "kdw_ptr": "*" + acc, "cew_ptr": "*" + acc,
           "gs_ptr": "*" + acc, "d_ptr": "*" + acc, "ce_ptr": "*" + acc,
           "gz_ptr": p if c.need_gz else "*" + acc, "C": "i32", "K": "i32", "stride_z": "i32",
           "stride_lp": "i32", "stride_idx": "i32", "stride_gz": "i32",
           "t_hi": "fp32", "t_lo": "fp32", "scale_hi": "fp32", "scale_lo": "fp32",
           "beta_hi": "fp32", "beta_lo": "fp32", "ignore_index": "i32"}
    constexprs = dict(HAS_LABELS=c.labels, HAS_CE=c.has_ce and c.labels, CE_SHARED=c.ce_shared,
                      RENORM=c.renormalize, TAIL=c.tail, DIV=c.divergence,
                      NEED_GZ=c.need_gz, ACC=tl.float64 if acc == "fp64" else tl.float32,
                      BLOCK=c.block, KBLOCK=max(16, triton.next_power_of_2(TOPK_K)))
    for k in constexprs:
        sig[k] = "constexpr"
    names = _topk_kernel.arg_names
    assert set(sig) == set(names), set(sig) ^ set(names)
    sig = {k: sig[k] for k in names}
    ints = {"C": c.classes, "K": TOPK_K, "stride_z": c.classes, "stride_lp": TOPK_K,
            "stride_idx": TOPK_K, "stride_gz": c.classes if c.need_gz else 0, "ignore_index": -100}
    aligned = [k for k in names if k.endswith("_ptr") or _jit_int_spec(ints.get(k, 1)) == "D"]
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    return _topk_kernel, sig, constexprs, attrs


def _bin_dir() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def ptxas_tool(cc: int) -> str:
    """The ptxas Triton itself runs for this architecture: 3.9's ``get_ptxas`` picks the bundled
    ``ptxas-blackwell`` for sm_90+ (its PTX 9.x is rejected by the older plain ``ptxas``), 3.6's
    picks plain ``ptxas`` below sm_100 (its PTX is 8.x)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(cc).path
    except Exception:  # noqa: BLE001 - other triton versions: the bundled binary by name
        base = _bin_dir()
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


_RE_RES = re.compile(r"Function (\S+):\s*\n\s*(REG:.*)")


def parse_resource_usage(text: str) -> dict:
    """``cuobjdump --dump-resource-usage`` of a one-kernel cubin -> {"REG": .., "LOCAL": .., ...}."""
    m = _RE_RES.search(text)
    if not m:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    out = {}
    for item in m.group(2).split():
        k, _, v = item.partition(":")
        if v.isdigit():
            out[k] = int(v)
    return out


def cubin_resources(cubin: bytes, workdir: str) -> dict:
    path = os.path.join(workdir, "triton.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    r = subprocess.run([os.path.join(_bin_dir(), "cuobjdump"), "--dump-resource-usage", path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump failed:\n{r.stderr}")
    return parse_resource_usage(r.stdout)


# ld / st of global memory, optionally predicated: "@%p3 ld.global.L1::evict_last.v4.b32 {...}"
_RE_GMEM = re.compile(r"^\s*(?:@!?%\w+\s+)?(ld|st)\.global((?:\.[\w:]+)+)\s", re.M)
_RE_LABEL = re.compile(r"^(\$L__BB\d+_\d+):", re.M)
_RE_BRA = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+)\s*;")


def access_bits(suffixes: str) -> int:
    """Bits moved per thread by one ld/st given its suffixes (".v4.b32" -> 128, ".b16" -> 16)."""
    vec, bits = 1, None
    for part in suffixes.strip(".").split("."):
        m = re.fullmatch(r"v(\d+)", part)
        if m:
            vec = int(m.group(1))
            continue
        m = re.fullmatch(r"(?:b|s|u|f|bf)(\d+)", part)
        if m:
            bits = int(m.group(1))
    if bits is None:
        raise ValueError(f"no element type in {suffixes!r}")
    return vec * bits


def global_accesses(ptx: str) -> dict:
    """Global loads / stores of a PTX kernel by width in bits, split into those inside loops (the
    column sweeps over the row: the bulk traffic) and the rest (per-row scalars: label, weights,
    grad scale, z[y], the loss outputs). A loop is the line span from a label to a backward branch
    to it. Returns {"ld_loop": {bits: n}, "ld_other": .., "st_loop": .., "st_other": ..}."""
    labels = {m.group(1): ptx.count("\n", 0, m.start()) for m in _RE_LABEL.finditer(ptx)}
    loops = []
    for m in _RE_BRA.finditer(ptx):
        line = ptx.count("\n", 0, m.start())
        start = labels.get(m.group(1))
        if start is not None and start < line:
            loops.append((start, line))
    out = {"ld_loop": {}, "ld_other": {}, "st_loop": {}, "st_other": {}}
    for m in _RE_GMEM.finditer(ptx):
        line = ptx.count("\n", 0, m.start())
        where = "loop" if any(a <= line <= b for a, b in loops) else "other"
        d = out[f"{m.group(1)}_{where}"]
        bits = access_bits(m.group(2))
        d[bits] = d.get(bits, 0) + 1
    return out


def _widths(d: dict) -> str:
    """{128: 16, 32: 2} -> "16x128 2x32" (widest first); "-" when empty."""
    return " ".join(f"{n}x{b}" for b, n in sorted(d.items(), reverse=True)) or "-"


def all_128(d: dict) -> bool:
    """True iff there are accesses and every one moves 128 bits."""
    return bool(d) and set(d) == {128}


def _triton_compile(src, target, options):
    """``triton.compile`` with Triton's own ptxas log captured: (kernel, log or None).

    Triton assembles the cubin itself (3.9 adds ``-lineinfo --regAllocOptLevel=2``, which change
    the register allocation) and prints that ptxas's ``-v`` report when
    ``knobs.nvidia.dump_ptxas_log`` is set; ``always_compile`` bypasses the cache so the report
    is always produced. Both knobs exist in Triton 3.6 and 3.9."""
    import contextlib
    import io

    import triton
    knobs = getattr(triton, "knobs", None)
    saved = []
    for group, name in (("nvidia", "dump_ptxas_log"), ("compilation", "always_compile")):
        g = getattr(knobs, group, None)
        if g is not None and hasattr(g, name):
            saved.append((g, name, getattr(g, name)))
            setattr(g, name, True)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=target, options=options)
    finally:
        for g, name, v in saved:
            setattr(g, name, v)
    log = buf.getvalue()
    return k, (log if _RE_REGS.search(log) else None)


def compile_one(c: Combo, cc: int) -> dict:
    """AOT-compile one combination for compute capability ``cc``: Triton's ptxas -v report of the
    cubin it builds, cuobjdump's resource usage of that cubin, access widths from the PTX."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kdfast._triton import FP_FUSION, REGISTERS_PER_BLOCK, max_registers, num_warps_for

    fn, sig, constexprs, attrs = _signature(c)
    target = GPUTarget("cuda", cc, 32)
    nw = c.num_warps or _num_warps(c)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k, log = _triton_compile(src, target, {"num_warps": nw, "maxnreg": max_registers(nw), "enable_fp_fusion": FP_FUSION})
    ptx = k.asm["ptx"]
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        source = "triton"
        if log is None:  # no captured report (another Triton): re-assemble with the same ptxas
            source = "re-assembled"
            path = os.path.join(d, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            r = subprocess.run([ptxas_tool(cc), "-lineinfo", "-v", f"--gpu-name={arch}", path,
                                "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"ptxas failed for {c.label()} {arch}:\n{r.stderr}")
            log = r.stderr + r.stdout
        cub = cubin_resources(k.asm["cubin"], d)
    res = parse_ptxas(log)
    if source == "re-assembled":   # its flags may differ from Triton's: the cubin's count rules
        res["regs"] = cub.get("REG", res["regs"])
    acc = global_accesses(ptx)
    smem_dyn = int(getattr(k.metadata, "shared", 0) or 0)
    res.update(arch=arch, num_warps=nw, combo=dataclasses.asdict(c), label=c.label(),
               ptxas_report=source, fits=res["regs"] * 32 * nw <= REGISTERS_PER_BLOCK,
               cubin=cub, smem_dynamic=smem_dyn, smem_static=cub.get("SHARED", 0),
               aligned_spec=_aligned(c),
               # None: no row loads at all (the top-k reverse / JSD over the k renormalised
               # entries without CE reads only the k gathered logits), no gradient stores
               ld128=all_128(acc["ld_loop"]) if acc["ld_loop"] else None,
               st128=all_128(acc["st_loop"]) if acc["st_loop"] else None, **acc)
    return res


def _job(args):
    c, cc = args
    try:
        return compile_one(c, cc)
    except Exception as e:  # noqa: BLE001 - reported in the table, fails the run
        return {"label": c.label(), "arch": f"sm_{cc}", "combo": dataclasses.asdict(c),
                "error": f"{type(e).__name__}: {e}"}


def run(cs: list[Combo], archs=(80, 90), jobs: int | None = None) -> list[dict]:
    work = [(c, cc) for cc in archs for c in cs]
    jobs = jobs or max(1, min(len(work), os.cpu_count() or 1))
    if jobs == 1:
        return [_job(w) for w in work]
    import multiprocessing as mp
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(_job, work))


def spills(r: dict) -> bool:
    """ptxas reports spill bytes, or the cubin has a stack frame or local memory (ptxas puts
    spilled registers in the stack frame: cuobjdump's STACK, LOCAL stays 0)."""
    cub = r["cubin"]
    return (r["spill_st"] > 0 or r["spill_ld"] > 0 or r["stack"] > 0
            or cub.get("STACK", 0) > 0 or cub.get("LOCAL", 0) > 0)


def narrow(r: dict) -> bool:
    """Row loads (or gradient stores) narrower than 128 bits where the call is 16-aligned."""
    return r["aligned_spec"] and (r["ld128"] is False or r["st128"] is False)


def bad(r: dict) -> bool:
    return ("error" in r or spills(r) or not r["fits"] or r["regs"] > 255
            or r["cubin"].get("REG", r["regs"]) != r["regs"] or narrow(r))


def table(results: list[dict]) -> str:
    lines = [f"{'kernel (Z/V grads, C = CE)':38s} {'arch':7s} {'warps':>5s} {'regs':>4s} "
             f"{'spill st/ld':>11s} {'stk/loc':>7s} {'smem dyn+st':>11s}  {'row loads (n x bits)':22s} "
             f"{'grad stores':12s} {'128b':4s}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['label']:38s} {r['arch']:7s} ERROR {r['error'].splitlines()[0][:120]}")
            continue
        flag = ("   <-- SPILLS" if spills(r) else "   <-- TOO MANY REGISTERS" if not r["fits"]
                else "   <-- NARROW LOADS" if narrow(r) else "   <-- ptxas/cubin REG differ"
                if bad(r) else "")
        wide = "yes" if r["ld128"] is not False and r["st128"] is not False else "no"
        stk = f"{r['cubin'].get('STACK', 0)}/{r['cubin'].get('LOCAL', 0)}"
        smem = f"{r['smem_dynamic']}+{r['smem_static']}"
        lines.append(f"{r['label']:38s} {r['arch']:7s} {r['num_warps']:5d} {r['regs']:4d} "
                     f"{r['spill_st']:>5d}/{r['spill_ld']:<5d} {stk:>7s} {smem:>11s}  "
                     f"{_widths(r['ld_loop']):22s} {_widths(r['st_loop']):12s} {wide:4s}{flag}")
    return "\n".join(lines)


LEGEND = """\
regs: registers per thread, from the -v report of the ptxas run that built Triton's cubin (equal to
  cuobjdump's REG of that cubin); spill st/ld: bytes; stk/loc: STACK / LOCAL bytes per thread of
  the cubin (spilled registers land in the stack frame).
smem: shared bytes per program, dynamic (Triton's launch request: cross-warp reduction scratch) +
  static SHARED of the cubin (1024 in every sm_90a cubin although the PTX declares only the
  dynamic array: added by ptxas for sm_90, origin not established here).
row loads: global loads inside the column loops (every pass, every input) as count x bits per
  thread; grad stores likewise; 128b: all of them 128-bit (fp32 / bf16 / fp16: ld.global.v4.b32,
  fp64: v2.b64). Per-row scalar loads (label, weights, z[y]) are outside the loops, not counted."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdfast.aot", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--blocks", type=int, nargs="+", default=None)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"],
                    choices=["fp32", "bf16", "fp16", "fp64"])
    ap.add_argument("--losses", nargs="+", default=None, choices=sorted(_LOSSES))
    ap.add_argument("--classes", type=int, nargs="+", default=[DEFAULT_CLASSES],
                    help="C of the modelled call (decides the divisibility specialisation)")
    ap.add_argument("--teachers", type=int, nargs="+", default=None,
                    help="teacher counts M (multi_forward; default: 1, plus M = 2, 4 for kd and dkd "
                         "without --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import triton

    from kdfast._triton import MAX_BLOCK
    blocks = a.blocks or ([MAX_BLOCK] if a.quick else sorted({1024, 4096, MAX_BLOCK}))
    results = run(combos(blocks, a.dtypes, a.quick, a.losses, a.classes, a.teachers, MAX_BLOCK),
                  a.arch, a.jobs)
    print(f"triton {triton.__version__}; ptxas: "
          + ", ".join(f"sm_{cc}: {os.path.basename(ptxas_tool(cc))}" for cc in a.arch))
    print(table(results))
    print(LEGEND)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    n_bad = sum(bad(r) for r in results)
    print(f"\n{len(results)} configurations, {n_bad} with errors, spills, over the register file "
          "or (16-aligned C) narrower than 128-bit row loads")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
