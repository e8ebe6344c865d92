"""The loss declarations and the contract between the Python layer and the backend kernels.

Every loss of docs/spec.md is one *kind* of the fused row kernel plus a few parameters; a named loss
(``kd``, ``ttm``, ...) is a :class:`KernelParams` built from its hyperparameters by its declaration
in ``kdfast/losses.py``.

Backend contract
----------------
Each backend (``kdfast._C`` for the CPU, ``kdfast._triton`` for CUDA / the Triton interpreter)
exposes one function::

    distill_forward(z, v, zp, labels, kd_w, ce_w, grad_scale,
                    d_out, ce_out, grad_z, grad_v, fparams, iparams) -> None

Tensors (all on one device):

- ``z``: student logits ``(N, C)``, ``stride(1) == 1``, any ``stride(0)`` (>= C or 0 for N<=1).
- ``v``: teacher logits ``(N, C)``, ``stride(1) == 1``, any ``stride(0)``; its dtype may differ
  from ``z``'s. Dtypes are float32, bfloat16 or float16 each (accumulation in float32), or both
  float64 (accumulation in float64): the Python layer never mixes float64 with another dtype.
- ``zp``: ``None`` or past-student logits ``(N, C)`` (retro_kd), ``stride(1) == 1``, ``z``'s dtype.
  The teacher row the loss sees is then ``r = (1 - rho) * v + rho * zp``.
- ``labels``: ``None`` or int64 ``(N,)`` contiguous. A row whose label is ``ignore_index`` is
  *ignored*: ``d_out = ce_out = 0`` and its gradient rows are 0. A label outside ``[0, C)`` that is
  not ``ignore_index`` must never be read or written out of bounds: that row gets NaN in
  ``d_out``, ``ce_out`` and its gradient rows (the CPU Python layer raises before calling).
  With ``labels is None`` every row is valid and there is no CE term.
- ``kd_w``, ``ce_w``: per-row weights ``(N,)`` contiguous, accumulation dtype.
- ``grad_scale``: a 1-element tensor, accumulation dtype: the factor folded into the gradients
  (``1 / max(n_valid, 1)`` for ``reduction="mean"``, else 1). Read it on the device (no host sync).
- ``d_out``, ``ce_out``: ``(N,)`` contiguous, accumulation dtype; the kernel writes the
  *unweighted* per-row distillation term ``D_i`` and cross-entropy ``CE_i`` (0 without labels or
  when ``has_ce == 0``).
- ``grad_z``: ``None`` or ``(N, C)`` in ``z``'s dtype, ``stride(1) == 1``; the kernel writes
  ``grad_scale * (kd_w_i * dD_i/dz + ce_w_i * dCE_i/dz)``. It may alias ``z`` (in-place use): the
  last sweep over a row must read each element before writing it.
- ``grad_v``: ``None`` or ``(N, C)`` in ``v``'s dtype: ``grad_scale * kd_w_i * dD_i/dv`` (for
  retro_kd this includes the factor ``1 - rho``). Never aliases anything.

``fparams`` (Python floats) and ``iparams`` (Python ints) are :class:`KernelParams` as two lists,
laid out by :class:`FParam` and :class:`IParam` (``fparams[FParam.RHO]``, ``iparams[IParam.KIND]``);
see :class:`KernelParams` for their meaning per kind.

Top-k (sparse) teacher (``kdfast.topk_kd_loss``, ``topk_reverse_kd_loss``, ``topk_jsd_loss``; kind
``TOPK``, the divergence a parameter: :class:`Divergence`)::

    topk_forward(z, t_lp, t_idx, labels, kd_w, ce_w, grad_scale, d_out, ce_out, grad_z,
                 fparams, iparams) -> None

- ``t_lp``: ``(N, k)`` the teacher's log-probabilities (accumulation dtype, ``stride(1) == 1``);
  ``t_idx``: ``(N, k)`` int64 their classes; the rest as in ``distill_forward`` (no ``grad_v``: the
  teacher is data). ``fparams`` / ``iparams``: :class:`TopkParams`, laid out by
  :class:`TopkFParam` and :class:`TopkIParam`.

The layouts (and :class:`Kind`) are also declared in ``csrc/kernel_api.h`` (``fparam::``,
``iparam::``, ``topk_fparam::``, ``topk_iparam::``) and the kinds in the Triton kernel
(``KIND_*``); ``tests/test_spec.py`` parses those files and fails when they differ from this one.

Multi-teacher (``kdfast.multi_teacher_loss``), the same contract with M teachers::

    multi_forward(z, vs, zp, labels, kd_w, ce_w, grad_scale,
                  d_out, ce_out, grad_z, grad_v, fparams, iparams) -> None

- ``vs``: a list of M teacher tensors, each as ``v`` above, all of one dtype (the CPU backend takes
  1 <= M <= 8; Triton reads them in place when they are equally spaced in memory, e.g. the
  ``unbind(0)`` of an (M, N, C) tensor, and stacks them otherwise).
- ``kd_w``: ``(M, N)`` contiguous: teacher m's row weights; ``d_out``: ``(M, N)`` contiguous: the
  unweighted ``D_{m,i}``; ``ce_out``: ``CE_i`` once.
- ``grad_z``: ``grad_scale * (sum_m kd_w_{m,i} dD_{m,i}/dz + ce_w_i dCE_i/dz)``;
  ``grad_v``: ``None`` or one ``(M, N, C)`` buffer, ``grad_v[m] = grad_scale * kd_w_{m,i} dD_{m,i}/dv_m``.
- The student row is read once per pass of the row kernel whatever M is. With M = 1 the result is
  ``distill_forward``'s.

Two phases (tensor parallelism: the columns of every row split over the ranks of a group; the
kinds of :data:`PHASED_KINDS`, single- and multi-teacher, CE included)::

    stats_forward(z, vs, zp, labels, stats, fparams, iparams, col0, vocab, round=0, gprev=None) -> None
    finish_forward(z, vs, zp, labels, kd_w, ce_w, grad_scale, gstats, d_out, ce_out, coef, part,
                   grad_z, grad_v, fparams, iparams, col0, vocab) -> None

``vs``, ``kd_w`` ``(M, N)``, ``d_out`` ``(M, N)`` and ``grad_v`` (``None`` or ``(M, N, C)``) as in
``multi_forward``, for any M >= 1. The tensors are this rank's columns ``[col0, col0 + C)`` of rows of ``vocab`` columns; ``vs`` is a
list of M teachers as in ``multi_forward`` (M = 1: ``distill_forward``'s); ``labels`` are global
class ids (``[0, vocab)`` or ``ignore_index``): one rank holds each label's column. The fused
single-device kernel is the same row function run with both phases in one call, the combine below
taken over its vector lanes instead of ranks (and the statistics sweep's exponentials kept for the
gradient sweep, which the split phases cannot do).

- **Phase 1** ``stats_forward`` writes ``stats``, float64 ``(N, K)`` contiguous,
  ``K = stats_width(params, M, round)``: each row's statistics over the local columns (KL and
  DKD: :class:`KLStat`, then :class:`KLTeacherStat` for each teacher, DKD's streams over the
  columns other than the label's; LM: :class:`LMStat`, then each teacher's sum of logits; JSD and
  LS: :class:`JSDTeacherStat`, :class:`LSStat`). An (M, S) pair is a max and the sum of ``exp(x -
  M)`` relative to it (``S`` = 0 for a stream with no mass here, ``M`` then -inf or the float's
  lowest; the float's lowest and -inf are both allowed, the combine skips ranks with ``S_r = 0``);
  ``W`` is ``sum_j w_j d_j`` of the KL statistic (docs/kernel-math.md, "KL") with ``w_j``
  the weighting stream's ``exp(x_j - M)`` (the teacher's; the student's when ``reverse``) and
  ``d_j`` relative to that M and to ``R``, the other stream's value at the weighting stream's
  argmax; the label logits are the values where this rank holds the label, else 0; sums of logits
  are exact double sums of the local values. Ignored rows:
  anything (never read).
- **Rounds.** A kind whose statistics need global ones first (JSD: :func:`stats_rounds`) runs
  ``stats_forward`` once per round; round ``r > 0`` takes ``gprev``, float64 ``(world, N, K_0 + ...
  + K_{r-1})``: the earlier rounds' gathered statistics concatenated along the last dimension, and
  ``finish_forward``'s ``gstats`` holds every round's so.
- **Combine** (inside phase 2): ``gstats`` is every rank's ``stats``, float64 ``(world, N, K)``
  contiguous (an all-gather). Per row and stream: ``M = max_r M_r``, ``S = sum_r S_r e^(M_r - M)``;
  ``R`` is the reference of the first rank with ``M_r = M`` and ``S_r > 0``;
  ``W = sum_r e^(M_r - M) (W_r - S_r ((M - M_r) - (R - R_r)))`` over ranks with ``S_r > 0``; label
  logits and sums add. These are the formulas of the kernel's horizontal (lane) finish: a rank is a lane.
- **Phase 2** ``finish_forward`` (the global statistics, the shard offset ``col0``) writes the local
  gradients (exactly as ``multi_forward`` would write those columns of the whole rows; ``grad_z``
  may alias ``z``) and each row's loss terms in a form that sums over ranks: term ``k`` (the M
  teachers' ``D_{m,i}``, then ``CE_i``) is ``b + a * log1p(X)``, or ``b + X`` where ``a = 0``, with
  ``b`` in ``d_out`` (M, N) / ``ce_out`` (N,), ``a`` in ``coef[k]`` and this rank's part of ``X``
  in ``part[k]`` (``coef``, ``part``: float64 ``(M + 1, N)`` contiguous; ``b``, ``a`` equal on
  every rank). The caller sums ``part`` over the ranks (one ``all_reduce``) and applies
  :func:`finish_terms`. ``a = X = 0`` where ``b`` is the term (a one-pass value that is accurate);
  ``a != 0`` where the term needs the log1p of a sum over all columns of nonnegative terms
  (docs/kernel-math.md, "accurate loss"); ``a = 0``, ``X != 0`` for a term that is itself such a sum
  (logit matching's squares).

The single-device call is ``world = 1``: ``gstats = stats[None]``; tests/test_phases.py checks that
the phases over column shards give the fused kernel's result on the whole rows.
"""
from __future__ import annotations

import dataclasses
import enum
import functools


class Kind(enum.IntEnum):
    """The kernel's loss kinds (a compile-time parameter of the row kernel in every backend)."""

    KL = 0   # s * KL(p || q), p = softmax(v / Tt), q = softmax(z / Ts); kd, ttm, wttm, retro_kd,
             # jsd at beta = 0; with ``reverse``: s * KL(q || p) (jsd at beta = 1)
    DKD = 1  # decoupled KD, temperature T = t_student = t_teacher, weights alpha, beta; needs labels
    LM = 2   # logit matching, (1 / 2C) * sum_j ((z_j - zbar) - (v_j - vbar))^2 (center) or no centering
    LS = 3   # logit standardisation: kd (scale T^2, T = t_student = t_teacher) on standardised rows
    JSD = 4  # generalised JSD for 0 < beta < 1 at temperature T = t_student = t_teacher
    TOPK = 5  # a top-k (sparse) teacher: its own entry point, topk_forward (TopkParams; forward KL,
              # reverse KL or JSD over the teacher's support: TopkParams.divergence)


class Divergence(enum.IntEnum):
    """The top-k kernel's divergence (:attr:`TopkParams.divergence`), over the support buckets P, Q
    (docs/spec.md, topk_kd)."""

    FORWARD = 0   # KL(P || Q): topk_kd (the student over all C classes, see docs/spec.md)
    REVERSE = 1   # KL(Q || P): topk_reverse_kd, topk_jsd at beta = 1
    JSD = 2       # beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q: topk_jsd, 0 < beta < 1


class FParam(enum.IntEnum):
    """Index of each :class:`KernelParams` float field in ``fparams`` (named as the field)."""

    T_STUDENT = 0
    T_TEACHER = 1
    SCALE = 2
    RHO = 3
    ALPHA = 4
    BETA = 5


class IParam(enum.IntEnum):
    """Index of each :class:`KernelParams` int / bool field in ``iparams`` (named as the field)."""

    KIND = 0
    WTTM = 1
    REVERSE = 2
    CENTER = 3
    HAS_CE = 4
    IGNORE_INDEX = 5


class TopkFParam(enum.IntEnum):
    """Index of each :class:`TopkParams` float field in the top-k ``fparams``."""

    T = 0
    SCALE = 1
    BETA = 2


class TopkIParam(enum.IntEnum):
    """Index of each :class:`TopkParams` int / bool field in the top-k ``iparams``."""

    RENORMALIZE = 0
    HAS_CE = 1
    IGNORE_INDEX = 2
    TAIL = 3
    DIVERGENCE = 4


def _to_lists(p, fields: type[enum.IntEnum], ints: type[enum.IntEnum]) -> tuple[list[float], list[int]]:
    """``p``'s fields as the two lists of the layouts ``fields`` (floats) and ``ints``."""
    return ([float(getattr(p, f.name.lower())) for f in fields],
            [int(getattr(p, f.name.lower())) for f in ints])


@functools.lru_cache(maxsize=256)
def _cached_lists(p) -> tuple[list[float], list[int]]:
    """:meth:`KernelParams.lists` / :meth:`TopkParams.lists`, once per distinct (frozen) parameters:
    a training loop calls with the same ones every step. The lists are shared: never mutate them."""
    return _to_lists(p, *_LAYOUTS[type(p)])


def _from_lists(cls, fparams, iparams, fields: type[enum.IntEnum], ints: type[enum.IntEnum]):
    kw = {f.name.lower(): float(fparams[f]) for f in fields}
    for f in ints:   # each int field back to the type of its default (Kind, bool or int)
        kw[f.name.lower()] = type(cls.__dataclass_fields__[f.name.lower()].default)(int(iparams[f]))
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class KernelParams:
    """What a backend kernel needs beyond the tensors. Fields unused by a kind are ignored."""

    kind: Kind = Kind.KL
    t_student: float = 1.0   # temperature applied to the student logits
    t_teacher: float = 1.0   # temperature applied to the teacher logits
    scale: float = 1.0       # constant factor of D (T^2 for kd); ignored when ``wttm``
    wttm: bool = False       # KL kind: the factor is U_i = exp(lse(v/T) - lse(v)/T), no gradient
    reverse: bool = False    # KL kind: KL(q || p) instead of KL(p || q)
    rho: float = 0.0         # retro_kd past weight (used only when ``zp`` is given)
    alpha: float = 1.0       # dkd alpha
    beta: float = 0.0        # dkd beta, jsd beta
    center: bool = True      # logit matching: subtract the row means
    has_ce: bool = True      # compute CE (only when labels are given)
    ignore_index: int = -100

    def fparams(self) -> list[float]:
        """The float fields in the :class:`FParam` layout."""
        return _to_lists(self, FParam, IParam)[0]

    def iparams(self) -> list[int]:
        """The int / bool fields in the :class:`IParam` layout."""
        return _to_lists(self, FParam, IParam)[1]

    def lists(self) -> tuple[list[float], list[int]]:
        """``(fparams(), iparams())``, cached per distinct parameters (shared: do not mutate)."""
        return _cached_lists(self)

    @classmethod
    def from_lists(cls, fparams, iparams) -> "KernelParams":
        return _from_lists(cls, fparams, iparams, FParam, IParam)


@dataclasses.dataclass(frozen=True)
class TopkParams:
    """The top-k kernel's parameters (``topk_forward``; kind :attr:`Kind.TOPK`)."""

    t: float = 1.0             # temperature of the student (and of the teacher when ``renormalize``)
    scale: float = 1.0         # constant factor of D (T^2)
    renormalize: bool = True   # the teacher is softmax(logprobs / T) over its k classes
    has_ce: bool = True        # compute CE (only when labels are given)
    ignore_index: int = -100
    tail: bool = False         # the teacher's leftover mass 1 - sum_k p_k is a (k+1)-th bucket
                               # matched against the student's 1 - sum_k q_{i_k} (renormalize off)
    beta: float = 0.0          # JSD's mixture weight, 0 < beta < 1 (the endpoints are FORWARD / REVERSE)
    divergence: Divergence = Divergence.FORWARD   # REVERSE / JSD: with renormalize or tail

    kind = Kind.TOPK           # (a class constant, not a field)

    def fparams(self) -> list[float]:
        """The float fields in the :class:`TopkFParam` layout."""
        return _to_lists(self, TopkFParam, TopkIParam)[0]

    def iparams(self) -> list[int]:
        """The int / bool fields in the :class:`TopkIParam` layout."""
        return _to_lists(self, TopkFParam, TopkIParam)[1]

    def lists(self) -> tuple[list[float], list[int]]:
        """``(fparams(), iparams())``, cached per distinct parameters (shared: do not mutate)."""
        return _cached_lists(self)

    @classmethod
    def from_lists(cls, fparams, iparams) -> "TopkParams":
        return _from_lists(cls, fparams, iparams, TopkFParam, TopkIParam)


# the list layouts of each parameter class (_cached_lists)
_LAYOUTS = {KernelParams: (FParam, IParam), TopkParams: (TopkFParam, TopkIParam)}


class Phase(enum.IntEnum):
    """Which part of the row function a kernel call runs (``KernelArgs::phase`` in csrc/kernel_api.h)."""

    FUSED = 0    # both phases in one call (single device: distill_forward / multi_forward)
    STATS = 1    # phase 1: stats_forward
    FINISH = 2   # phase 2: finish_forward


class KLStat(enum.IntEnum):
    """Column of a row's ``stats`` (KL kind): the student's part, then :class:`KLTeacherStat` per
    teacher. ``Z`` is the student at ``t_student`` (a = z / Ts); ``ONE`` the raw student, CE's lse
    (a copy of ``Z``'s pair when Ts = 1; 0, 0 when the row has no CE)."""

    M_Z = 0
    S_Z = 1
    M_ONE = 2
    S_ONE = 3
    Z_Y = 4        # z at the label (this rank holds it), else 0
    COUNT = 5


class KLTeacherStat(enum.IntEnum):
    """Column offset within teacher m's block of a row's ``stats``
    (``KLStat.COUNT + m * KLTeacherStat.COUNT + field``): the teacher at ``t_teacher`` (c = v / Tt),
    the KL statistic W with its reference R, the raw teacher's lse (wttm's U; 0, 0 otherwise) and
    its label logit."""

    M_V = 0
    S_V = 1
    R = 2
    W = 3
    M_U = 4
    S_U = 5
    V_Y = 6
    COUNT = 7


class LMStat(enum.IntEnum):
    """Column of a row's ``stats`` (LM kind), then one per teacher: the sum of its logits."""

    SUM_Z = 0      # the sum of the student's logits (exact in double)
    M_ONE = 1      # CE's lse of z (0, 0 when the row has no CE)
    S_ONE = 2
    Z_Y = 3
    COUNT = 4


class JSDTeacherStat(enum.IntEnum):
    """JSD's round 1 (after the combined round 0, :class:`KLStat` / :class:`KLTeacherStat` with only
    the lse pairs and the student's label logit used): per teacher, this rank's parts of
    ``SP = sum_j p_j sp(-delta_j)`` and ``SQ = sum_j q_j sp(delta_j)`` (docs/kernel-math.md, "JSD")."""

    SP = 0
    SQ = 1
    COUNT = 2


class LSStat(enum.IntEnum):
    """LS's rounds: round 0 is :class:`LMStat`'s layout (the sums of z and of each v, CE's lse, the
    label logit), round 1 the centred sums of squares (z's, then each v's: 1 + M columns), round 2
    these columns of the standardised streams (a = z' / T, c = v' / T), then :class:`LSTeacherStat`
    per teacher."""

    M_A = 0
    S_A = 1
    QU = 2         # sum_j e^(a_j - M_A) u_zj (u = z - zbar), at the scale of M_A
    COUNT = 3


class LSTeacherStat(enum.IntEnum):
    """Per teacher in LS's round 2: c's lse, the KL statistic W (reference R), and the chain-rule
    sums through the standard deviations at the scale of M_C: PU = sum e^(c - M_C) u_z,
    PUV = sum e^(c - M_C) u_v, PCU = sum e^(c - M_C) d u_v (kept like W, with PUV as its mass)."""

    M_C = 0
    S_C = 1
    R = 2
    W = 3
    PU = 4
    PCU = 5
    PUV = 6
    COUNT = 7


#: the kinds with the two-phase form (stats_forward / finish_forward)
PHASED_KINDS = frozenset({Kind.KL, Kind.DKD, Kind.LM, Kind.JSD, Kind.LS})


def stats_rounds(params: "KernelParams") -> int:
    """Rounds of ``stats_forward`` (each followed by an all-gather): JSD's sums need the global
    log-sum-exps first (2); LS needs the means, then the standard deviations, then the standardised
    streams' statistics (3); 1 for the others."""
    return {Kind.JSD: 2, Kind.LS: 3}.get(params.kind, 1)


def stats_width(params: "KernelParams", teachers: int = 1, round: int = 0) -> int:
    """``K``: the float64 statistics a row of ``stats_forward`` has in ``round`` for ``params`` and
    ``teachers``."""
    if params.kind not in PHASED_KINDS:
        raise ValueError(f"kind {params.kind.name} has no two-phase form yet")
    if params.kind == Kind.LM or (params.kind == Kind.LS and round == 0):
        return LMStat.COUNT + teachers
    if params.kind == Kind.LS:
        return 1 + teachers if round == 1 else LSStat.COUNT + teachers * LSTeacherStat.COUNT
    if params.kind == Kind.JSD and round == 1:
        return JSDTeacherStat.COUNT * teachers
    return KLStat.COUNT + teachers * KLTeacherStat.COUNT


def finish_terms(b, coef, part):
    """The row terms from ``finish_forward``'s outputs after ``part`` was summed over the ranks:
    ``b + coef * log1p(part)`` where ``coef != 0``, else ``b + part``; float64."""
    import torch
    b = b.to(torch.float64)
    return torch.where(coef != 0, b + coef * torch.log1p(part), b + part)
