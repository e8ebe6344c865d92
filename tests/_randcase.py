"""Randomised differential cases for tests/test_random.py: drawing a case from a seed, running it
three ways, and the error metric.

Each case is drawn from ``(kind, name, backend, seed)`` alone (``case_id`` = ``"kind:name:backend:seed"``),
so any failure can be re-run by itself::

    KDFAST_RANDCASE=family:kd:cpu:123 .venv/bin/python -m pytest -q tests/test_random.py -p no:cacheprovider
    .venv/bin/python tests/_randcase.py family:kd:cpu:123          # prints the case and every error

Three evaluations of one case, on the same (possibly low-precision) input values:

- **truth**: the eager reference (``kdfast.reference``) on the inputs upcast with ``.double()``,
  weights and upstream gradient in float64, gradients by autograd;
- **plain**: the same reference evaluated in the lower-precision dtype of the case (student and
  teacher cast to the less precise of their two dtypes; weights and upstream gradient too): "the
  loss written plainly" in that precision. float64 cases have no plain evaluation;
- **kernel**: the kdfast loss with ``backend="cpu"`` (the C++ kernel) or ``"triton"`` (the
  interpreter).

Every weight, upstream gradient and hyperparameter value is drawn representable in the case's
lowest dtype, so all three evaluations see identical numbers and differ only in their arithmetic.

The rule, per output (the loss value(s), the student's gradient, the teacher's gradient(s), the
gradients of tensor weights, of the fused head's h / W / b):

1. finiteness: the kernel's output is finite exactly where the truth *rounded to the output's
   dtype* is finite (a float64 truth above 65504 is +-inf for a float16 gradient), with the same
   infinity where it is infinite;
2. ``err(kernel) <= max(TOL[dtype], K * err(plain))`` for a low-precision output (``dtype`` the
   output's own dtype: float32 for the loss of a bf16 case, the student's dtype for its gradient);
   ``err(kernel) <= TOL[float64]`` for a float64 output.

``err`` (see :func:`row_err`) is the largest per-row relative error: row ``i`` of an output is one
loss value (reduction ``none``), one gradient row over the class dimension (over H for the fused
head's ``grad_h``, over H for one class of ``grad_W``), the scalar loss or ``grad_b`` as a single
row; ``err_i = ||x_i - t_i||_2 / ||t_i||_2``. So a kernel that is accurate relative to the size of
each row passes however small the row is (near-equal student and teacher, saturated softmaxes) and
however the rows' sizes differ within one tensor; one that is accurate only relative to the
largest row, or only in absolute terms, fails on the small rows where the plain loss does better.
Refinements:

- a row whose truth is exactly 0 (ignored rows, identical student and teacher, C = 1) is compared
  absolutely: ``err_i = ||x_i|| / M_i`` with ``M_i`` the row's *natural magnitude* (below), i.e.
  such a row passes when ``||x_i|| <= TOL * M_i`` (or ``K * err(plain)`` by the same measure);
- low precision: the part of the truth below the output dtype's smallest normal number cannot be
  represented with relative accuracy, so its norm is subtracted from ``||x_i - t_i||`` and the
  denominator is at least that smallest normal (matters for float16 gradients, smallest normal
  6e-5; for float32 / bf16 only below 1e-38);
- the truth's own uncertainty: the float64 reference carries an absolute cancellation error of
  about ``eps64 * max|logit / T|`` times the output's scale in saturated rows (a teacher gradient
  whose exact value is 1e-19 comes out as 0), so every row's difference is reduced by
  ``FLOOR64 * eps64 * M_i`` before it counts, and a row whose truth is below that is compared with
  ``M_i`` as for an exact zero. For float64 outputs this is the rule's absolute floor:
  ``||x_i - t_i|| <= TOL64 * ||t_i|| + FLOOR64 * eps64 * M_i``. For low-precision outputs it only
  removes differences the truth cannot resolve (~1e-13 of M_i, far below TOL32); without it a kernel
  more accurate than the float64 reference failed against the reference's error.

- low-precision gradients (student, teacher, fused head): differences below ``LPFLOOR`` float32
  eps of the row's entry size ``G_i = |upstream_i| |weight_i| S`` are not counted (a gradient entry
  such as ``q_j - p_j`` with both near 1 is a difference of float32 numbers: neither a float32 kernel
  nor the plain loss resolves it below that). ``G_i`` has no ``max|logit / T|`` factor, so an error
  that grows with the logits' offset is still caught;
- fused linear with bf16 / fp16 inputs: the logits are themselves a low-precision matmul rounded in
  different orders by the kernel and the plain loss, so every output gets an absolute floor of
  ``LPFLOOR`` eps of the input dtype times ``M_i``;
- ``KNOWN_OPEN`` lists cases that fail today, with the reason: reported, not failing the test, and
  the test fails once one of them passes (the list must then shrink).

The natural magnitude ``M_i`` of a row (:func:`natural_scales`, :func:`_kind_scales`) is
``|upstream_i| * |weight_i| * S * (1 + A_i + log C)``: ``S`` the scale of that output for the loss
(``T^2`` for kd's loss, ``T`` for its gradients, ``1/T`` for jsd's, ``U`` for wttm's loss,
``T^2 (|alpha| + |beta|)`` for dkd's, ``(1 - rho) T`` for retro_kd's teacher gradient, ...), ``A_i``
the largest ``|logit / T|`` of the row (log-softmax's absolute rounding error is ``eps * A``); logit
matching uses ``S = max_j |d_j - mean d|`` (``d = z - v``, the loss) or ``1/C`` (the gradients) and
``A = max|logit|``; ls_kd adds ``max|x| / std(x)`` (the standardisation's cancellation) and has
``S = T / std`` for the gradients; the top-k JSD has jsd's ``S`` and ``A``; the top-k reverse KL with
``tail`` adds ``Q_tail / P_tail`` to ``A`` (its tail term ``Q_tail log(Q_tail / P_tail)`` moves by
``Q_tail`` times ``P_tail``'s relative error, and ``P_tail = -expm1(lse lp)`` is itself uncertain by a
few eps64: a float64 store of a saturated teacher leaves ``P_tail`` at the rounding level, where the
truth's tail term is uncertain by ~``eps64 Q_tail / P_tail``); the CE term adds
``|ce_weight_i| * (1 + max|z_i| + log C)``; the
fused head uses ``|h| |W|^T + |b|`` for the logits' size and ``M(grad_z) * ||W||`` for ``grad_h``.
So ``FLOOR64 * eps64 * M_i`` is FLOOR64 (256) times the float64 reference's worst-case cancellation
error of that row: within the "few hundred eps, not looser than ~100x" asked for.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
import zlib

import numpy as np
import torch
import torch.nn.functional as F

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:   # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import CASES, FAMILY, LOSSES  # noqa: E402  (sets TRITON_INTERPRET before triton loads)

import kdfast  # noqa: E402
from kdfast.losses import REGISTRY  # noqa: E402

R = kdfast.reference

# ----------------------------------------------------------------------------- the constants
#: The kernel may be this many times less accurate than the loss written plainly in the same
#: precision (max over rows of the per-row relative error, see row_err). A fused kernel that
#: accumulates in float32 should be *more* accurate than a bf16 / fp16 / fp32 eager loss; 4 leaves
#: room for a different (not worse) order of operations: e.g. a 20-ulp vector exp against libm's
#: 1-ulp one is a factor of ~2-3 on rows dominated by the exponentials. Not to be raised to make a
#: case pass: a failure is a finding.
K = 4.0

#: Per-dtype floor of the allowed relative error (the dtype of the output): float32 ~8 eps (the
#: CPU kernel's exp_u20 is <= 20 ulp in the worst case, ~1 ulp typical); bf16 / fp16: 4 eps (the
#: output's own rounding is 0.5 eps per element). float64: the kernel against the float64 truth,
#: with the absolute floor FLOOR64 below (no plain evaluation exists in float64).
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-6,
    torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps,   # 0.031
    torch.float16: 4 * torch.finfo(torch.float16).eps,     # 0.0039
}

#: float64 absolute floor per row: FLOOR64 * eps64 * M_i (M_i the row's natural magnitude: about
#: the float64 reference's own worst-case absolute cancellation error divided by eps64, see the
#: module docstring). Applies to float64 outputs only.
FLOOR64 = 256
EPS64 = torch.finfo(torch.float64).eps

#: Low-precision *gradients* (student, teacher, fused head): a difference below LPFLOOR float32 eps of
#: the row's entry size G_i (``|upstream_i| |weight_i| S``: an entry made of probabilities of order 1,
#: see natural_scales(entry=True)) is not counted. A gradient entry such as ``q_j - p_j`` with both
#: near 1 is a difference of float32 numbers: no float32 kernel, and not the plain loss either,
#: resolves it below that (the plain loss then passes or fails by the luck of its roundings). G_i has
#: no ``max|logit / T|`` factor, so an error growing with the logits' offset is still caught.
LPFLOOR = 4
EPS32 = torch.finfo(torch.float32).eps

#: Fused linear with bf16 / fp16 inputs: the logits themselves are a low-precision matmul, which the
#: kernel (chunked) and the plain loss (one F.linear) round in different orders; at large |logit| a
#: loss of those logits is ill-conditioned (e.g. logit matching of near-equal rows at |z| ~ 500 in
#: bf16), and the two evaluations differ by the logits' rounding, ~eps(dtype) |z|. Every output of such
#: a case gets an absolute floor of LPFLOOR * eps(input dtype) * M_i (M_i includes max|logit|).
def _logit_floor(case, M):
    if case.kind != "linear" or case.zdt not in (torch.bfloat16, torch.float16):
        return None
    return LPFLOOR * torch.finfo(case.zdt).eps * M


#: Cases that fail today and why, kept visible: test_random reports them without failing, and fails
#: when one of them passes (the entry must then go). An issue is resolved only with this empty.
KNOWN_OPEN: dict = {
}

TABLE = {**LOSSES, **FAMILY}   # name -> (fused, reference, hyperparameters): conftest's tables
#: the top-k groups -> (fused, reference)
TOPK = {"topk": (kdfast.topk_kd_loss, R.topk_kd_loss), "topk_tail": (kdfast.topk_kd_loss, R.topk_kd_loss),
        "topk_rev": (kdfast.topk_reverse_kd_loss, R.topk_reverse_kd_loss),
        "topk_jsd": (kdfast.topk_jsd_loss, R.topk_jsd_loss)}
METHOD = {case: name for case, (name, _) in CASES.items()}   # case -> loss ("lm_raw" -> "logit_matching")
MIN_C = {name: loss.min_classes for name, loss in REGISTRY.items()}

_PREC = [torch.float64, torch.float32, torch.float16, torch.bfloat16]   # most to least precise


def lower(*dtypes):
    """The least precise of ``dtypes`` (largest eps): the dtype of the plain evaluation."""
    return max(dtypes, key=_PREC.index)


def acc_of(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _short(dt):
    return {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dt]


# ----------------------------------------------------------------------------- the case
@dataclasses.dataclass
class Case:
    kind: str                  # "family" | "topk" | "multi" | "linear"
    name: str                  # TABLE name (family, multi, linear); topk: "topk", "topk_tail" (topk_kd),
                               # "topk_rev" (topk_reverse_kd), "topk_jsd" (topk_jsd)
    backend: str
    seed: int
    lead: tuple = (1,)
    C: int = 1
    zdt: torch.dtype = torch.float32
    vdt: torch.dtype = torch.float32
    hyper: dict = dataclasses.field(default_factory=dict)
    regime: str = "indep"       # "indep": student and teacher drawn independently; "near": v = z + noise
    std_z: float = 1.0
    off_z: float = 0.0
    std_v: float = 1.0
    off_v: float = 0.0
    near_rel: float = 0.0       # "near": noise std relative to std_z
    labels: str = "none"        # "none" (no labels) | "valid" | "some" (some ignored) | "ignored" (all)
    ignore_index: int = -100
    reduction: str = "none"
    teacher_grad: bool = False
    weights: str = "float"      # "float" | "tensor" (per row, requires grad) | "scalar" (0-d; test_random's own test)
    kd_w: float = 1.0
    ce_w: float = 1.0
    layout: str = "contig"      # "contig" | "rowpad" (row stride > C) | "colstride" (column stride 2)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def cid(self):
        return f"{self.kind}:{self.name}:{self.backend}:{self.seed}"

    @property
    def n(self):
        return math.prod(self.lead)

    @property
    def pdt(self):
        """The plain evaluation's dtype (None for float64 cases)."""
        d = lower(self.zdt, self.vdt)
        return None if d == torch.float64 else d

    @property
    def dtypes(self):
        return _short(self.zdt) if self.zdt == self.vdt else f"{_short(self.zdt)}/{_short(self.vdt)}"

    def describe(self):
        hy = ",".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.hyper.items())
        ex = ",".join(f"{k}={v}" for k, v in self.extra.items())
        reg = (f"near(rel={self.near_rel:.1e})" if self.regime == "near" else "indep")
        return (f"{self.cid} lead={self.lead} C={self.C} {self.dtypes} [{hy}] {reg} "
                f"z~{self.std_z:.3g}{self.off_z:+.3g} v~{self.std_v:.3g}{self.off_v:+.3g} "
                f"labels={self.labels} red={self.reduction} tgrad={int(self.teacher_grad)} "
                f"w={self.weights} layout={self.layout}" + (f" {ex}" if ex else ""))


def parse_cid(cid: str):
    kind, name, backend, seed = cid.split(":")
    return kind, name, backend, int(seed)


def _rng(kind, name, backend, seed):
    return np.random.default_rng([zlib.crc32(f"{kind}:{name}:{backend}".encode()), seed])


def _round_to(x: float, dt) -> float:
    return float(torch.tensor(x, dtype=torch.float64).to(dt).double())


def _logu(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _sig(x, d=3):
    return float(f"{x:.{d}g}")


def draw_case(kind: str, name: str, backend: str, seed: int) -> Case:
    """The case of ``(kind, name, backend, seed)``; deterministic."""
    rng = _rng(kind, name, backend, seed)
    c = Case(kind, name, backend, seed)
    triton = backend == "triton"
    # --- shape: C mostly small, some ~1000, a few 1e4..1e5 with N <= 2 (Triton: C <= 300, N <= 6)
    u = rng.random()
    if triton:
        C = int(round(_logu(rng, 1, 64))) if u < 0.6 else int(rng.integers(65, 301))
    elif u < 0.70:
        C = int(round(_logu(rng, 1, 64)))
    elif u < 0.93:
        C = int(round(_logu(rng, 200, 3000)))
    else:
        C = int(round(_logu(rng, 1e4, 1e5)))
    if kind == "linear":
        C = min(C, 3000)
    base = TABLE.get(name, (None, None, {}))[2] if kind != "topk" else {}
    min_c = MIN_C.get(METHOD.get(name, name), 1)
    C = max(C, min_c)
    nmax = 2 if C >= 10000 else (6 if triton else 8)
    u = rng.random()
    if u < 0.08:
        lead = (0,)
    elif u < 0.25 and nmax >= 4:
        b = int(rng.integers(1, 3))
        lead = (b, int(rng.integers(1, nmax // b + 1)))
    else:
        lead = (int(rng.integers(1, nmax + 1)),)
    c.lead, c.C = lead, C
    # --- dtypes
    u = rng.random()
    lows = [torch.float32, torch.bfloat16, torch.float16]
    if u < 0.25:
        c.zdt = c.vdt = torch.float64
    elif u < 0.60:
        c.zdt = c.vdt = torch.float32
    elif u < 0.75:
        c.zdt = c.vdt = torch.bfloat16
    elif u < 0.85:
        c.zdt = c.vdt = torch.float16
    else:
        i, j = rng.choice(3, size=2, replace=False)
        c.zdt, c.vdt = lows[i], lows[j]
    if kind == "linear" and c.zdt == torch.float16:
        c.zdt = torch.bfloat16
    # --- logits: std 1e-2..1e3 (log-uniform), a per-tensor offset up to +-50
    c.std_z = _sig(_logu(rng, 1e-2, 1e3))
    c.off_z = _sig(rng.uniform(-50, 50)) if rng.random() < 0.6 else 0.0
    if rng.random() < 0.25:
        c.regime = "near"
        c.near_rel = _sig(_logu(rng, 1e-6, 1e-1), 2)
        c.std_v = c.std_z
        c.off_v = _sig(c.off_z + rng.uniform(-50, 50)) if rng.random() < 0.3 else c.off_z
    else:
        c.std_v = _sig(_logu(rng, 1e-2, 1e3))
        c.off_v = _sig(rng.uniform(-50, 50)) if rng.random() < 0.6 else 0.0
    # --- hyperparameters (names from conftest's table entry; values drawn)
    hy = {}
    lowest = lower(c.zdt, c.vdt)

    def temp():   # (1, 2 and 4 exactly: the CPU kernel's CE stream is derived from the student's there)
        u = rng.random()
        if u < 0.3:
            return 1.0 if u < 0.15 else 2.0 if u < 0.24 else 4.0
        return _round_to(_sig(_logu(rng, 0.5, 20)), lowest)

    if kind == "topk" and name == "topk_tail":   # the leftover masses as a (k+1)-th bucket
        hy = {"renormalize": False, "tail": True, "temperature": temp()}
    elif kind == "topk" and name in ("topk_rev", "topk_jsd"):
        # reverse KL / JSD: over the k renormalised entries, or the k + 1 buckets of tail; JSD's beta
        # 0 and 1 exactly (the forward / reverse kernels) besides (0, 1) drawn towards both ends
        ren = bool(rng.random() < 0.6)
        hy = {"renormalize": ren, "tail": not ren, "temperature": temp()}
        if name == "topk_jsd":
            u = rng.random()
            hy = {"beta": 0.0 if u < 0.15 else 1.0 if u < 0.3 else
                  _sig(_logu(rng, 1e-3, 0.5) if rng.random() < 0.5 else 1 - _logu(rng, 1e-3, 0.5)), **hy}
    elif kind == "topk":
        ren = bool(rng.random() < 0.7)
        hy = {"renormalize": ren, "temperature": temp() if ren else 1.0}
    else:
        for key, val in base.items():
            if key == "temperature":
                hy[key] = temp()
            elif key == "alpha":
                hy[key] = _round_to(_sig(_logu(rng, 0.1, 4)), lowest)
            elif key == "beta" and name == "dkd":
                hy[key] = 0.0 if rng.random() < 0.1 else _round_to(_sig(_logu(rng, 0.1, 10)), lowest)
            elif key == "beta" and name == "jsd":   # (0, 1); jsd_fwd / jsd_rev keep exactly 0 / 1
                hy[key] = _sig(_logu(rng, 1e-3, 0.5) if rng.random() < 0.5 else 1 - _logu(rng, 1e-3, 0.5))
            elif key == "past_weight":
                u = rng.random()
                hy[key] = 0.0 if u < 0.1 else 1.0 if u < 0.2 else _sig(rng.uniform(0, 1), 2)
            else:
                hy[key] = val
    c.hyper = hy
    # --- labels, reduction, gradients, weights, layout
    if name == "dkd":
        c.labels = str(rng.choice(["valid", "some", "ignored"], p=[0.5, 0.35, 0.15]))
    else:
        c.labels = str(rng.choice(["none", "valid", "some", "ignored"], p=[0.3, 0.35, 0.25, 0.1]))
    c.ignore_index = -100 if rng.random() < 0.8 else -1
    c.reduction = str(rng.choice(["mean", "sum", "none"]))
    c.teacher_grad = bool(rng.random() < 0.5) and kind in ("family", "multi")
    c.weights = str(rng.choice(["float", "tensor"], p=[0.6, 0.4]))
    if c.weights == "float":
        c.kd_w = 1.0 if rng.random() < 0.5 else _round_to(rng.uniform(0.2, 2.0), lowest)
        u = rng.random()
        c.ce_w = 1.0 if u < 0.4 else 0.0 if u < 0.6 else _round_to(rng.uniform(0.2, 2.0), lowest)
    c.layout = str(rng.choice(["contig", "rowpad", "colstride"], p=[0.7, 0.2, 0.1]))
    # --- kind-specific
    if kind == "topk":
        k = int(rng.integers(1, min(C, 64) + 1))
        c.extra = {"k": k, "pad": int(rng.integers(0, k + 1)) if rng.random() < 0.3 else 0,
                   "lp": "raw" if (hy["renormalize"] and rng.random() < 0.5) else "logprob"}
        c.teacher_grad = False
    elif kind == "multi":
        c.extra = {"M": int(rng.integers(2, 4)),
                   "tw": str(rng.choice(["none", "float", "tensor"], p=[0.3, 0.35, 0.35])),
                   "stacked": bool(rng.random() < 0.2)}
        if c.extra["stacked"]:
            c.teacher_grad = False
    elif kind == "linear":
        c.extra = {"H": int(rng.integers(2, 33)), "bias": bool(rng.random() < 0.6),
                   "teacher": str(rng.choice(["logits", "hidden"])),
                   "chunk": int(rng.integers(1, 9)) if rng.random() < 0.5 else None}
        c.teacher_grad = False
        c.layout = "contig"
        if c.extra["teacher"] == "hidden":
            c.vdt = c.zdt
    return c


# ----------------------------------------------------------------------------- the inputs
def _gen(case, salt):
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"{case.cid}:{salt}".encode()))
    return g


def _layout(x: torch.Tensor, layout: str, gen) -> torch.Tensor:
    """``x`` (..., C) placed in a wider buffer: ``rowpad`` = ``wide[..., :C]`` (row stride > C),
    ``colstride`` = ``wide[..., ::2]``; the buffer's other entries are garbage."""
    if layout == "contig" or x.numel() == 0:
        return x.contiguous()
    c = x.shape[-1]
    if layout == "rowpad":
        wide = torch.randn(*x.shape[:-1], c + 3, generator=gen, dtype=torch.float64).to(x.dtype) * 1e3
        wide[..., :c] = x
        return wide[..., :c]
    wide = torch.randn(*x.shape[:-1], 2 * c, generator=gen, dtype=torch.float64).to(x.dtype) * 1e3
    wide[..., ::2] = x
    return wide[..., ::2]


def _logits64(shape, std, off, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * std + off


def _labels(case, gen):
    if case.labels == "none":
        return None
    y = torch.randint(0, case.C, case.lead, generator=gen)
    if case.labels == "some":
        drop = torch.rand(case.lead, generator=gen) < 0.4
        y = y.masked_fill(drop, case.ignore_index)
    elif case.labels == "ignored":
        y = torch.full(case.lead, case.ignore_index, dtype=torch.long)
    return y


def _weights(case, gen, lowest, shape=None):
    """(kd_w, ce_w): floats, or float64 tensors (values exact in ``lowest``)."""
    if case.weights == "float":
        return case.kd_w, case.ce_w
    shape = case.lead if case.weights == "tensor" else ()
    return tuple((torch.rand(shape, generator=gen, dtype=torch.float64) * 1.8 + 0.2).to(lowest).double()
                 for _ in range(2))


def _upstream(case, gen, lowest):
    if case.reduction == "none":
        return torch.randn(case.lead, generator=gen, dtype=torch.float64).to(lowest).double()
    if torch.rand((), generator=gen) < 0.3:
        return torch.tensor(1.0, dtype=torch.float64)
    return torch.randn((), generator=gen, dtype=torch.float64).to(lowest).double()


def make_inputs(case: Case) -> dict:
    """The case's tensors at the kernel's dtypes and layout (float64 values exactly representable)."""
    g = _gen(case, "inputs")
    shape = (*case.lead, case.C)
    lowest = lower(case.zdt, case.vdt)
    z64 = _logits64(shape, case.std_z, case.off_z, g)

    def teacher(z_ref):
        if case.regime == "near":
            return (z_ref + torch.randn(shape, generator=g, dtype=torch.float64) * case.std_z * case.near_rel
                    + (case.off_v - case.off_z))
        return _logits64(shape, case.std_v, case.off_v, g)

    inp = {"lowest": lowest}
    if case.kind == "linear":
        return _linear_inputs(case, g, lowest, inp)
    z = z64.to(case.zdt)
    inp["z"] = _layout(z, case.layout, g)
    if case.kind == "family":
        inp["v"] = _layout(teacher(z.double()).to(case.vdt), case.layout, g)
        if case.name == "retro_kd":   # the past student: its own draw, or close to the student
            if torch.rand((), generator=g) < 0.5:
                zp = _logits64(shape, case.std_z, case.off_z, g)
            else:
                zp = z.double() + torch.randn(shape, generator=g, dtype=torch.float64) * case.std_z * 0.1
            inp["zp"] = zp.to(case.zdt)
    elif case.kind == "multi":
        m = case.extra["M"]
        vs = []
        for i in range(m):   # the first teacher follows the case's regime, the others are drawn apart
            if i == 0 or case.regime == "near":
                vs.append(teacher(z.double()).to(case.vdt))
            else:
                vs.append(_logits64(shape, _logu(np.random.default_rng(case.seed + i), 1e-2, 1e3),
                                    case.off_v, g).to(case.vdt))
        inp["vs"] = vs
        inp["vreq"] = [case.teacher_grad and (i == 0 or bool(torch.rand((), generator=g) < 0.5))
                       for i in range(m)]
        if case.name == "retro_kd":
            inp["zp"] = _logits64(shape, case.std_z, case.off_z, g).to(case.zdt)
        tw = case.extra["tw"]
        if tw == "float":
            inp["tw"] = [_round_to(float(x), lowest) for x in torch.rand(m, generator=g, dtype=torch.float64) + 0.1]
        elif tw == "tensor":
            inp["tw"] = (torch.rand((m, *case.lead), generator=g, dtype=torch.float64) + 0.1).to(lowest).double()
        else:
            inp["tw"] = None
    elif case.kind == "topk":
        k, pad = case.extra["k"], case.extra["pad"]
        v = teacher(z.double())
        if case.hyper.get("tail"):   # the teacher's log-probabilities at the temperature, as stored
            v = torch.log_softmax(v / case.hyper["temperature"], -1)
        elif case.extra["lp"] == "logprob" or not case.hyper["renormalize"]:
            v = torch.log_softmax(v, -1)
        lp, idx = v.topk(k, dim=-1) if v.numel() else (v[..., :k], torch.zeros((*case.lead, k), dtype=torch.long))
        if not case.hyper["renormalize"]:   # valid log-probabilities after rounding: a margin below 0
            eps = torch.finfo(case.vdt).eps
            lp = lp - eps * (2 + lp.abs())
        if pad:
            lp[..., k - pad:] = float("-inf")
        perm = torch.argsort(torch.rand(lp.shape, generator=g), dim=-1)
        inp["lp"], inp["idx"] = lp.gather(-1, perm).to(case.vdt), idx.gather(-1, perm)
    inp["y"] = _labels(case, g)
    inp["w"] = _weights(case, g, lowest)
    inp["up"] = _upstream(case, g, lowest)
    return inp


def _linear_inputs(case, g, lowest, inp):
    n, H, V = case.n, case.extra["H"], case.C
    # logits ~ std_z: h ~ N(0, 1) * sqrt(std), W ~ N(0, 1/H) * sqrt(std); the offset through the bias
    sh = math.sqrt(case.std_z)
    h = torch.randn((*case.lead, H), generator=g, dtype=torch.float64) * sh
    w = torch.randn((V, H), generator=g, dtype=torch.float64) * sh / math.sqrt(H)
    b = None
    if case.extra["bias"]:
        b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1 * case.std_z + case.off_z
    inp["h"], inp["W"] = h.to(case.zdt), w.to(case.zdt)
    inp["b"] = None if b is None else b.to(case.zdt)
    z64 = F.linear(inp["h"].double(), inp["W"].double(), None if b is None else inp["b"].double())
    if case.extra["teacher"] == "hidden":
        ht = torch.randn((*case.lead, 5), generator=g, dtype=torch.float64) * math.sqrt(case.std_v)
        wt = torch.randn((V, 5), generator=g, dtype=torch.float64) * math.sqrt(case.std_v / 5)
        bt = torch.randn(V, generator=g, dtype=torch.float64) + case.off_v
        inp["teacher"] = {"teacher_hidden": ht.to(case.vdt), "teacher_weight": wt.to(case.vdt),
                          "teacher_bias": bt.to(case.vdt)}
    else:
        if case.regime == "near":
            v = z64 + torch.randn(z64.shape, generator=g, dtype=torch.float64) * case.std_z * case.near_rel
        else:
            v = _logits64(z64.shape, case.std_v, case.off_v, g)
        inp["teacher"] = {"teacher_logits": v.to(case.vdt)}
    if case.name == "retro_kd":
        inp["zp"] = _logits64(z64.shape, case.std_z, case.off_z, g).to(case.zdt)
    inp["y"] = _labels(case, g)
    inp["w"] = _weights(case, g, lowest)
    inp["up"] = _upstream(case, g, lowest)
    return inp


# ----------------------------------------------------------------------------- running a case
def _cast(x, dt):
    return None if x is None else x.to(dt)


def _leaf(x, req):
    return x.detach().requires_grad_(req)


def _mode_dtypes(case, mode):
    """(student dtype, teacher dtype, weight dtype) of an evaluation."""
    if mode == "truth":
        return torch.float64, torch.float64, torch.float64
    if mode == "plain":
        return case.pdt, case.pdt, case.pdt
    return case.zdt, case.vdt, acc_of(case.zdt, case.vdt)


def _weight_leaves(case, inp, wdt):
    kd, ce = inp["w"]
    if case.weights == "float":
        return kd, ce, {}
    kd, ce = _leaf(kd.to(wdt), True), _leaf(ce.to(wdt), True)
    return kd, ce, {"gkd": kd, "gce": ce}


def _grads(loss, up, leaves):
    """Backward with ``up``; the gradients of ``leaves`` (name -> leaf or list of leaves) as float64
    (a leaf the loss does not reach, e.g. ce_weight without labels, has gradient 0)."""
    loss.backward(up.to(loss.dtype))
    out = {"loss": loss.detach().double()}
    for k, x in leaves.items():
        xs = x if isinstance(x, list) else [x]
        gs = [torch.zeros(t.shape, dtype=torch.float64) if t.grad is None else t.grad.double() for t in xs]
        out[k] = torch.stack(gs) if isinstance(x, list) else gs[0]
    return out


def run(case: Case, inp: dict, mode: str) -> tuple[dict, dict]:
    """One evaluation (``mode``: "kernel", "truth", "plain"): (outputs as float64, their dtypes)."""
    zd, vd, wd = _mode_dtypes(case, mode)
    kernel = mode == "kernel"
    kd_w, ce_w, leaves = _weight_leaves(case, inp, wd)
    common = {"kd_weight": kd_w, "ce_weight": ce_w, "reduction": case.reduction,
              "ignore_index": case.ignore_index}
    if kernel:
        common["backend"] = case.backend
    y = inp["y"]
    dts = {"gkd": wd, "gce": wd}
    if case.kind == "family":
        fused, ref, _ = TABLE[case.name]
        z = _leaf(inp["z"] if kernel else inp["z"].to(zd), True)
        v = _leaf(inp["v"] if kernel else inp["v"].to(vd), case.teacher_grad)
        args = (z, v) if "zp" not in inp else (z, v, _cast(inp["zp"], zd))
        loss = (fused if kernel else ref)(*args, y, **case.hyper, **common)
        leaves = {"gz": z, **({"gv": v} if case.teacher_grad else {}), **leaves}
        dts.update(gz=zd, gv=vd)
    elif case.kind == "topk":
        z = _leaf(inp["z"] if kernel else inp["z"].to(zd), True)
        lp = inp["lp"] if kernel else inp["lp"].to(vd)
        fused, ref = TOPK[case.name]
        loss = (fused if kernel else ref)(z, lp, inp["idx"], y, **case.hyper, **common)
        leaves = {"gz": z, **leaves}
        dts.update(gz=zd)
    elif case.kind == "multi":
        z = _leaf(inp["z"] if kernel else inp["z"].to(zd), True)
        vs = [_leaf(v if kernel else v.to(vd), r) for v, r in zip(inp["vs"], inp["vreq"])]
        tw = inp["tw"]
        if isinstance(tw, torch.Tensor):
            tw = _leaf(tw.to(wd), True)
            leaves["gtw"] = tw
            dts["gtw"] = wd
        zp = _cast(inp.get("zp"), zd)
        if kernel:
            teachers = torch.stack(vs) if case.extra["stacked"] else vs
            kw = {} if zp is None else {"past_student_logits": zp}
            loss = kdfast.multi_teacher_loss(METHOD.get(case.name, case.name), z, teachers, y,
                                             teacher_weights=tw, **kw, **case.hyper, **common)
        else:
            m = len(vs)
            ws = [1.0 / m] * m if tw is None else (list(tw.unbind(0)) if isinstance(tw, torch.Tensor) else tw)
            ref = TABLE[case.name][1]
            extra = () if zp is None else (zp,)
            loss = None
            for i in range(m):
                kw = dict(common, kd_weight=kd_w * ws[i], ce_weight=ce_w if i == 0 else 0.0)
                term = ref(z, vs[i], *extra, y, **case.hyper, **kw)
                loss = term if loss is None else loss + term
        leaves = {"gz": z, **leaves}
        if any(inp["vreq"]):
            leaves["gv"] = vs
        dts.update(gz=zd, gv=vd)
    elif case.kind == "linear":
        h = _leaf(inp["h"].to(zd), True)
        w = _leaf(inp["W"].to(zd), True)
        b = None if inp["b"] is None else _leaf(inp["b"].to(zd), True)
        t = {k: x.to(vd) for k, x in inp["teacher"].items()} if not kernel else inp["teacher"]
        zp = _cast(inp.get("zp"), zd)
        method = METHOD.get(case.name, case.name)
        if kernel:
            kw = {} if zp is None else {"past_student_logits": zp}
            loss = kdfast.fused_linear_distill_loss(h, w, y, method=method, student_bias=b, **t, **kw,
                                                    chunk_size=case.extra["chunk"], **case.hyper, **common)
        else:
            common.pop("backend", None)
            z = F.linear(h, w, b)
            if "teacher_logits" in t:
                v = t["teacher_logits"]
            else:
                v = F.linear(t["teacher_hidden"], t["teacher_weight"], t["teacher_bias"])
            extra = () if zp is None else (zp,)
            loss = TABLE[case.name][1](z, v.detach(), *extra, y, **case.hyper, **common)
        leaves = {"gh": h, "gW": w, **({"gb": b} if b is not None else {}), **leaves}
        dts.update(gh=zd, gW=zd, gb=zd)
    dts["loss"] = loss.dtype
    out = _grads(loss, inp["up"], leaves)
    return out, {k: dts[k] for k in out}


# ----------------------------------------------------------------------------- natural magnitudes
def _amax(x):
    """Per-row max |x| over the last dim, ignoring non-finite entries (0 for an empty row)."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    return x.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).amax(-1)


def _kind_scales(name, hyper, z, v, zp=None):
    """Per row (A, S_D, S_z, S_v, zgain) of a single-teacher loss on float64 (N, C) rows: A the
    largest |logit / T| (log-softmax's absolute rounding is eps * A), S_* the scale of the loss, of
    its student and teacher gradients, zgain the factor from a student-logit error to A's units."""
    C = z.shape[-1]
    T = hyper.get("temperature", 1.0)
    one = torch.ones(z.shape[:-1], dtype=torch.float64)
    if name in ("kd", "reverse_kd", "retro_kd"):   # T^2 KL either way round
        A = torch.maximum(_amax(z), _amax(v)) / T
        sv = T
        if name == "retro_kd":
            rho = hyper["past_weight"]
            A = torch.maximum(A, _amax(zp) / T)
            sv = (1 - rho) * T
        return A, one * T * T, one * T, one * sv, 1 / T
    if name == "ttm":
        return torch.maximum(_amax(z), _amax(v) / T), one, one, one / T, 1.0
    if name == "wttm":
        u = torch.exp(torch.logsumexp(v / T, -1) - torch.logsumexp(v, -1) / T) if v.numel() else one
        A = torch.maximum(torch.maximum(_amax(z), _amax(v) / T), _amax(v))
        return A, u, u, u / T, 1.0
    if name == "dkd":
        s = abs(hyper["alpha"]) + abs(hyper["beta"])
        return torch.maximum(_amax(z), _amax(v)) / T, one * T * T * s, one * T * s, one * T * s, 1 / T
    if name in ("lm", "lm_raw"):
        d = z - v
        if name == "lm":
            d = d - d.mean(-1, keepdim=True)
        return torch.maximum(_amax(z), _amax(v)), _amax(d), one / C, one / C, 1.0
    if name == "ls_kd":
        sz, sv = z.std(-1), v.std(-1)
        kz, kv = (1e-7 + sz), (1e-7 + sv)
        zs = (z - z.mean(-1, keepdim=True)) / kz.unsqueeze(-1)
        vs = (v - v.mean(-1, keepdim=True)) / kv.unsqueeze(-1)
        A = torch.maximum(_amax(zs), _amax(vs)) / T + _amax(z) / kz + _amax(v) / kv
        return A, one * T * T, T / kz, T / kv, 1 / kz
    if name.startswith("jsd"):
        A = torch.maximum(_amax(z), _amax(v)) / T
        b = hyper["beta"]
        if 0 < b < 1:
            A = A + abs(math.log(b)) + abs(math.log1p(-b))
        return A, one, one / T, one / T, 1 / T
    raise KeyError(name)


def _row_g(case, up, y):
    """Per-row factor of the gradients: the upstream (none) or upstream / n_valid (mean)."""
    n = case.n
    if case.reduction == "none":
        return up.reshape(n).abs()
    g = float(up.abs())
    if case.reduction == "mean":
        nv = n if y is None else int((y != case.ignore_index).sum())
        g /= max(nv, 1)
    return torch.full((n,), g, dtype=torch.float64)


def _w_rows(w, n):
    if isinstance(w, torch.Tensor):
        return w.abs().reshape(-1).expand(n) if w.dim() == 0 else w.abs().reshape(n)
    return torch.full((n,), abs(float(w)), dtype=torch.float64)


def natural_scales(case: Case, inp: dict, entry: bool = False) -> dict:
    """Per output, the natural magnitude M_i of each of its rows (float64, one entry per row). With
    ``entry``, the size of one entry of a gradient row instead (the same without the log-softmax factor
    ``1 + A + log C``): what an entry computed from probabilities of order 1 is made of."""
    n, C = case.n, case.C
    logc = math.log(C)
    y = inp["y"]
    valid = torch.ones(n, dtype=torch.bool) if y is None else (y.reshape(n) != case.ignore_index)
    kdw, cew = (_w_rows(w, n) for w in inp["w"])
    has_ce = y is not None and not (case.weights == "float" and case.ce_w == 0)
    g = _row_g(case, inp["up"], y)
    if case.kind == "linear":
        h64, w64 = inp["h"].double().reshape(n, case.extra["H"]), inp["W"].double()
        b64 = None if inp["b"] is None else inp["b"].double()
        z = F.linear(h64, w64, b64)
        zabs = F.linear(h64.abs(), w64.abs(), None if b64 is None else b64.abs())
        t = inp["teacher"]
        v = (t["teacher_logits"].double().reshape(n, C) if "teacher_logits" in t else
             F.linear(t["teacher_hidden"].double().reshape(n, 5), t["teacher_weight"].double(),
                      t["teacher_bias"].double()))
    else:
        z = inp["z"].double().reshape(n, C)
    zp = None if inp.get("zp") is None else inp["zp"].double().reshape(n, C)
    ce_base = (1 if entry else 1 + _amax(z) + logc) * has_ce

    if case.kind == "topk":
        T = case.hyper["temperature"]
        lp = inp["lp"].double().reshape(n, case.extra["k"])
        A = torch.maximum(_amax(z), _amax(lp)) / T
        if case.name == "topk_jsd":   # no T^2 (jsd's scales, its log beta terms)
            b = case.hyper["beta"]
            if 0 < b < 1:
                A = A + abs(math.log(b)) + abs(math.log1p(-b))
            per = [(torch.ones(n, dtype=torch.float64), A, 1.0, 1 / T, 0.0)]
        else:
            per = [(torch.ones(n, dtype=torch.float64), A, T * T, T, 0.0)]
        if case.hyper.get("tail") and (case.name == "topk_rev" or case.hyper.get("beta") == 1.0):
            # the reverse KL's tail term Q_tail log(Q_tail / P_tail) moves by Q_tail times the relative
            # error of P_tail = -expm1(lse lp), whose absolute error is a few eps: where the teacher's
            # mass outside its k classes is itself at the rounding level (a float64 store of a
            # saturated teacher), the float64 truth is uncertain by ~eps64 Q_tail / P_tail
            idx = inp["idx"].reshape(n, case.extra["k"])
            with torch.no_grad():
                pt = (-torch.expm1(torch.logsumexp(lp, -1))).clamp_min(0) if lp.numel() else lp.new_ones(n)
                inK = torch.zeros(z.shape, dtype=torch.bool).scatter(-1, idx, lp > float("-inf"))
                qt = torch.softmax(z / T, -1).masked_fill(inK, 0.0).sum(-1)   # (padding: in the tail)
            cond = torch.where(pt > 0, qt / pt.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
            per = [(w, a + cond, sd, sz, sv) for w, a, sd, sz, sv in per]
    elif case.kind == "multi":
        m = case.extra["M"]
        tw = inp["tw"]
        per = []
        for i in range(m):
            v = inp["vs"][i].double().reshape(n, C)
            A, sd, sz, sv, _ = _kind_scales(case.name, case.hyper, z, v, zp)
            wm = (torch.full((n,), 1.0 / m, dtype=torch.float64) if tw is None else
                  torch.full((n,), abs(tw[i]), dtype=torch.float64) if isinstance(tw, list) else tw[i].abs().reshape(n))
            per.append((wm, A, sd, sz, sv))
    else:
        v = v if case.kind == "linear" else inp["v"].double().reshape(n, C)
        A, sd, sz, sv, zgain = _kind_scales(case.name, case.hyper, z, v, zp)
        if case.kind == "linear":
            A = A + zgain * _amax(zabs)
        per = [(torch.ones(n, dtype=torch.float64), A, sd, sz, sv)]

    base = [(wm, 1 if entry else 1 + A + logc, sd, sz, sv) for wm, A, sd, sz, sv in per]
    m_loss = sum(kdw * wm * sd * b for wm, b, sd, sz, sv in base) + cew * ce_base
    m_gz = g * (sum(kdw * wm * sz * b for wm, b, sd, sz, sv in base) + cew * ce_base)
    out = {}
    if case.reduction == "none":
        out["loss"] = m_loss
    else:
        s = float(m_loss[valid].sum()) if n else 0.0
        out["loss"] = torch.tensor([s / max(int(valid.sum()), 1) if case.reduction == "mean" else s])
    out["gz"] = m_gz
    gv = [g * kdw * wm * sv * b for wm, b, sd, sz, sv in base]
    out["gv"] = torch.cat(gv) if case.kind == "multi" else gv[0]
    gkd = g * sum(wm * sd * b for wm, b, sd, sz, sv in base)
    gce = g * ce_base
    if case.weights == "scalar":
        gkd, gce = gkd.sum().reshape(1), gce.sum().reshape(1)
    out["gkd"], out["gce"] = gkd, gce
    if case.kind == "multi":
        out["gtw"] = torch.cat([g * kdw * sd * b for wm, b, sd, sz, sv in base])
    if case.kind == "linear":
        out["gh"] = m_gz * float(w64.norm())
        col = float((m_gz * h64.norm(dim=-1)).sum()) if n else 0.0
        out["gW"] = torch.full((C,), col, dtype=torch.float64)
        out["gb"] = torch.tensor([float(m_gz.sum()) if n else 0.0])
    return out


# ----------------------------------------------------------------------------- the metric
def _rows(x: torch.Tensor, key: str, case: Case) -> torch.Tensor:
    """An output as (rows, width): see the module docstring."""
    if key == "gb" or x.dim() == 0:
        return x.reshape(1, -1)
    if key in ("gz", "gv", "gh", "gW"):
        return x.reshape(-1, x.shape[-1]) if x.numel() else x.reshape(0, 1)
    return x.reshape(-1, 1)


def finite_mismatch(x, t, dtype) -> int:
    """Number of elements where the kernel's finiteness (or infinity) differs from the truth rounded
    to the output dtype."""
    tr = t.to(dtype).double() if dtype != torch.float64 else t
    fin = torch.isfinite(tr)
    bad = fin != torch.isfinite(x)
    inf = torch.isinf(tr)
    bad |= inf & (x != tr)
    bad |= torch.isnan(tr) & ~torch.isnan(x)
    return int(bad.sum())


def row_err(x, t, M, dtype, G=None, extra=None) -> tuple[float, int]:
    """(max over rows of the row error, the row), for an output of ``dtype`` (see module docstring).
    ``x``, ``t``: (rows, width) float64; ``M``: (rows,) natural magnitudes. Elements where both are
    the same infinity count as equal; other non-finite elements of ``x`` make the error inf."""
    if x.numel() == 0:
        return 0.0, -1
    both = (x == t) & torch.isinf(t)
    diff = (x - t).masked_fill(both, 0.0)
    tt = t.masked_fill(~torch.isfinite(t), 0.0)
    if not torch.isfinite(diff).all():
        bad = ~torch.isfinite(diff).all(-1)
        return math.inf, int(bad.nonzero()[0, 0])
    d = diff.norm(dim=-1)
    nt = tt.norm(dim=-1)
    M = M.reshape(-1).expand(d.shape) if M.numel() == 1 else M.reshape(-1)
    # the float64 truth's own uncertainty, FLOOR64 * eps64 * M_i per row, for every output dtype: a
    # difference below it is not an error of the kernel (in a saturated row the true value can be
    # 1e-19 while the reference, by cancellation, says 0), and a row whose truth is below it is
    # compared with M_i as an exact zero is
    floor = FLOOR64 * EPS64 * M
    if G is not None and dtype != torch.float64:   # a low-precision gradient: see LPFLOOR
        G = G.reshape(-1).expand(d.shape) if G.numel() == 1 else G.reshape(-1)
        floor = floor + LPFLOOR * EPS32 * G
    if extra is not None:
        floor = floor + (extra.reshape(-1).expand(d.shape) if extra.numel() == 1 else extra.reshape(-1))
    d = (d - floor).clamp_min(0.0)
    if dtype == torch.float64:
        den = torch.where(nt > floor, nt, M)
    else:   # the part of the truth below the dtype's smallest normal has no relative precision
        tiny = torch.finfo(dtype).tiny
        d = (d - tt.masked_fill(tt.abs() >= tiny, 0.0).norm(dim=-1)).clamp_min(0.0)
        den = torch.where(nt > floor, nt.clamp_min(tiny), M)
    e = torch.where(d == 0, torch.zeros_like(d), d / den)
    e = torch.where((d > 0) & (den == 0), torch.full_like(d, math.inf), e)
    i = int(e.argmax())
    return float(e[i]), i


def row_info(t, M, row) -> tuple[float, float]:
    """(||t_row||, M_row) of a (rows, width) truth: is a failing row tiny against its natural size?"""
    if row < 0 or t.numel() == 0:
        return math.nan, math.nan
    M = M.reshape(-1).expand(t.shape[0]) if M.numel() == 1 else M.reshape(-1)
    return float(t[row].masked_fill(~torch.isfinite(t[row]), 0).norm()), float(M[row])


@dataclasses.dataclass
class Finding:
    case: Case
    key: str             # output
    dtype: torch.dtype   # the output's dtype
    err_k: float
    err_p: float         # nan for float64 outputs
    bound: float
    row: int
    what: str            # "error" | "nonfinite"
    t_norm: float = math.nan   # the failing row's truth norm and natural magnitude
    m_row: float = math.nan

    @property
    def ratio(self):
        if self.bound == 0:            # an exception
            return math.inf
        if self.err_p != self.err_p:   # float64: against TOL
            return self.err_k / self.bound
        return self.err_k / self.err_p if self.err_p > 0 else math.inf

    def line(self):
        p = "-" if self.err_p != self.err_p else f"{self.err_p:.2e}"
        return (f"{self.case.cid:<28} {self.key:<4} {_short(self.dtype):<4} {self.what:<9} "
                f"k={self.err_k:.2e} p={p:<8} bound={self.bound:.1e} ratio={self.ratio:.3g} "
                f"row={self.row} | {self.case.describe()}")


GRADS = ("gz", "gv", "gh", "gW", "gb")   # the outputs LPFLOOR applies to


def check(case: Case, inp: dict | None = None, verbose: bool = False) -> list[Finding]:
    """Run a case three ways and apply the rule; the findings (empty when it passes)."""
    inp = make_inputs(case) if inp is None else inp
    got, dts = run(case, inp, "kernel")
    want, _ = run(case, inp, "truth")
    plain = run(case, inp, "plain")[0] if case.pdt is not None else None
    scales = natural_scales(case, inp)
    entries = natural_scales(case, inp, entry=True)
    out = []
    for key, t in want.items():
        x, dt = got[key], dts[key]
        xr, tr = _rows(x, key, case), _rows(t, key, case)
        M = scales[key]
        nbad = finite_mismatch(x, t, dt)
        G = entries[key] if key in GRADS else None
        L = _logit_floor(case, M)
        ek, row = row_err(xr, tr, M, dt, G, L)
        if dt == torch.float64:
            ep, bound = math.nan, TOL[dt]
        else:
            ep = row_err(_rows(plain[key], key, case), tr, M, dt, G, L)[0] if plain is not None else 0.0
            bound = max(TOL[dt], K * ep)
        if verbose:
            print(f"  {key:<5} {_short(dt):<4} err(kernel)={ek:.3e} err(plain)={ep:.3e} bound={bound:.3e}"
                  f" row={row} nonfinite-mismatch={nbad} {'FAIL' if nbad or ek > bound else 'ok'}")
        if nbad:
            if row < 0 or math.isfinite(ek):   # the row of the first mismatch
                bad = ~(torch.isfinite(xr) == torch.isfinite(tr.to(dt).double() if dt != torch.float64 else tr))
                row = int(bad.any(-1).nonzero()[0, 0]) if bad.any() else row
            out.append(Finding(case, key, dt, ek, ep, bound, row, "nonfinite", *row_info(tr, M, row)))
        elif ek > bound:
            out.append(Finding(case, key, dt, ek, ep, bound, row, "error", *row_info(tr, M, row)))
    return out


def check_safely(case: Case) -> list[Finding]:
    """check(), with an exception turned into a finding (the message in ``what``)."""
    try:
        return check(case)
    except Exception as e:  # noqa: BLE001 - a crash is a finding of its own
        return [Finding(case, "-", torch.float64, math.inf, math.nan, 0.0, -1,
                        f"raised {type(e).__name__}: {str(e).splitlines()[0][:120]}")]


def table(findings: list[Finding], limit: int = 40) -> str:
    """A failure report: a summary per (name, backend, dtype, output) and the worst lines."""
    groups = {}
    for f in findings:
        g = (f.case.kind, f.case.name, f.case.backend, f.case.dtypes, f.key, f.what.split(":")[0])
        n, worst = groups.get(g, (0, 0.0))
        groups[g] = (n + 1, max(worst, f.ratio))
    ncases = len({f.case.cid for f in findings})
    lines = [f"{ncases} failing case(s), {len(findings)} failing output(s); "
             "re-run one with KDFAST_RANDCASE=<case id> or `python tests/_randcase.py <case id>`",
             "group (kind name backend dtypes output what): count, worst ratio"]
    for g, (n, worst) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {' '.join(g)}: {n}, {worst:.3g}")
    lines.append("worst outputs (ratio = err(kernel) / err(plain), or err / TOL for float64):")
    for f in sorted(findings, key=lambda f: -f.ratio)[:limit]:
        lines.append("  " + f.line())
    return "\n".join(lines)


def main(argv):
    warnings.filterwarnings("ignore", category=RuntimeWarning)   # the interpreter's NaN lanes
    torch.set_num_threads(1)
    for cid in argv:
        case = draw_case(*parse_cid(cid))
        print(case.describe())
        fs = check(case, verbose=True)
        print("FAIL" if fs else "pass")


if __name__ == "__main__":
    main(sys.argv[1:])


def make_case(kind: str, name: str, backend: str, seed: int, **fields) -> Case:
    """A case with explicit fields (the regression tests): defaults are one float32 row set without
    labels, float weights 1, reduction none; the inputs are drawn from the seed as for random cases."""
    c = Case(kind, name, backend, seed)
    for k, v in fields.items():
        if not hasattr(c, k):
            raise AttributeError(k)
        setattr(c, k, v)
    return c
