"""The loss family: every named loss declared once.

A declaration is the function that turns the loss's hyperparameters (its keyword arguments, with the
loss's defaults) into the kernel parameters, checking them, decorated with what else the package
needs to know about the loss::

    @declare("ttm", reference.ttm_loss, module="TTMLoss", cases={"ttm": {"temperature": 2.5}})
    def _ttm(temperature: float = 2.0) -> KernelParams:
        \"\"\"Transformed teacher matching (Zheng & Yang, 2024): ...\"\"\"   # kdfast.ttm_loss's doc
        t = check_temperature(temperature)
        return KernelParams(Kind.KL, 1.0, t, 1.0)   # KL(softmax(v / t) || softmax(z))

Everything else is derived from :data:`REGISTRY`: the public functions (``kdfast.ttm_loss``, with
its real signature: positional tensors, then the hyperparameters, then the common options), the
``nn.Module`` classes (``kdfast.TTMLoss``), the ``method=`` tables of :mod:`kdfast.fused_linear`,
:mod:`kdfast.multi_teacher` and :mod:`kdfast.vocab_parallel`, the AOT kernel inspection
(``python -m kdfast.aot``), the tests (``tests/conftest.py``) and the benchmarks. Adding a loss is
one declaration here (plus its eager version in :mod:`kdfast.reference`) and, when no existing kernel
kind computes it, its kind (``_spec.Kind`` and the kernels).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable, Optional, Union

from torch import Tensor

from . import reference
from ._spec import Divergence, KernelParams, Kind, TopkParams

__all__ = ["Loss", "REGISTRY", "declare", "check_temperature", "check_unit", "check_finite",
           "check_bool", "define"]


# ----------------------------------------------------------------------------- hyperparameter checks
def _python_float(x, name: str) -> float:
    if isinstance(x, Tensor) or not isinstance(x, (int, float)) or isinstance(x, bool):
        raise ValueError(f"{name} must be a Python float, got {type(x).__name__}")
    return float(x)


def check_temperature(t: float, name: str = "temperature") -> float:
    """A finite float > 0."""
    t = _python_float(t, name)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {t}")
    return t


def check_unit(x: float, name: str) -> float:
    """A float in [0, 1]."""
    x = _python_float(x, name)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return x


def check_finite(x: float, name: str) -> float:
    x = _python_float(x, name)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def check_bool(x: bool, name: str) -> bool:
    if not isinstance(x, bool):
        raise ValueError(f"{name} must be a bool, got {type(x).__name__}")
    return x


# ----------------------------------------------------------------------------- the declaration
@dataclasses.dataclass(frozen=True)
class Loss:
    """One named loss. ``name`` gives ``kdfast.<name>_loss`` and ``method="<name>"``."""

    name: str
    #: hyperparameters (keyword arguments with the loss's defaults and annotations) -> the kernel
    #: parameters (:class:`KernelParams`, or :class:`TopkParams`); raises ValueError on a bad value.
    #: Its docstring is the public function's.
    params: Callable[..., Union[KernelParams, TopkParams]]
    #: the eager version (``kdfast.reference.<name>_loss``, the same arguments without ``backend``)
    reference: Callable[..., Tensor]
    #: the ``nn.Module`` class's name in :mod:`kdfast.modules`
    module: str
    #: named hyperparameter sets that together reach every kernel specialisation of the loss (its
    #: kind's flags and special cases); the tests run each, ``python -m kdfast.aot`` compiles each
    cases: dict
    #: why labels are required (part of the error message), or "" when they are optional
    needs_labels: str = ""
    #: the fewest classes the loss is defined for
    min_classes: int = 1
    #: the teacher: ``"logits"`` (dense ``(..., C)`` teacher logits) or ``"topk"`` (its top-k
    #: log-probabilities and their classes: its own op and kernel; not for the fused-linear,
    #: multi-teacher and vocabulary-parallel entry points)
    teacher: str = "logits"
    #: takes ``past_student_logits`` (positional, after the teacher)
    past_student: bool = False
    #: the hyperparameters' names, in order (filled from ``params``' signature)
    hyperparameters: tuple = ()

    def __post_init__(self):
        sig = inspect.signature(self.params)
        object.__setattr__(self, "hyperparameters", tuple(sig.parameters))
        if self.teacher not in ("logits", "topk"):
            raise ValueError(f"teacher must be 'logits' or 'topk', got {self.teacher!r}")

    @property
    def function_name(self) -> str:
        return f"{self.name}_loss"

    @property
    def dense(self) -> bool:
        """Dense teacher logits: the loss works in every entry point (fused linear, multi-teacher,
        vocabulary-parallel)."""
        return self.teacher == "logits"

    @property
    def function(self) -> Callable[..., Tensor]:
        """The public function ``kdfast.<name>_loss``."""
        from . import functional
        return getattr(functional, self.function_name)

    def signature(self) -> inspect.Signature:
        """The hyperparameters (keyword-only, with the loss's defaults and annotations)."""
        return inspect.signature(self.params)

    def defaults(self) -> dict:
        return {k: p.default for k, p in self.signature().parameters.items()}

    def positional(self) -> list[inspect.Parameter]:
        """The function's positional tensor arguments: student, teacher (one or two tensors), past
        student, labels (required when ``needs_labels``)."""
        P = inspect.Parameter
        names = ["student_logits"]
        names += ["teacher_logits"] if self.dense else ["teacher_topk_logprobs", "teacher_topk_indices"]
        names += ["past_student_logits"] if self.past_student else []
        out = [P(n, P.POSITIONAL_OR_KEYWORD, annotation="Tensor") for n in names]
        if self.needs_labels:
            out.append(P("labels", P.POSITIONAL_OR_KEYWORD, annotation="Tensor"))
        else:
            out.append(P("labels", P.POSITIONAL_OR_KEYWORD, default=None, annotation="Optional[Tensor]"))
        return out


#: name -> declaration, in declaration order
REGISTRY: dict[str, Loss] = {}


def declare(name: str, reference_fn: Callable[..., Tensor], *, module: str, cases: dict,
            needs_labels: str = "", min_classes: int = 1, teacher: str = "logits",
            past_student: bool = False):
    """Decorator: declare the loss ``name`` whose kernel parameters the decorated function builds
    (see :class:`Loss` for the fields)."""
    def deco(params):
        if name in REGISTRY:
            raise ValueError(f"loss {name!r} declared twice")
        REGISTRY[name] = Loss(name, params, reference_fn, module, dict(cases), needs_labels,
                              min_classes, teacher, past_student)
        return params
    return deco


# ----------------------------------------------------------------------------- the losses
@declare("kd", reference.kd_loss, module="KDLoss", cases={"kd": {"temperature": 3.0}})
def _kd(temperature: float = 4.0) -> KernelParams:
    """Hinton et al. (2015): ``T^2 * KL(softmax(v/T) || softmax(z/T))`` per row, plus CE with labels.

    Example::

        loss = kdfast.kd_loss(student(x), teacher(x).detach(), y, temperature=4.0)
    """
    t = check_temperature(temperature)
    return KernelParams(Kind.KL, t, t, t * t)


@declare("reverse_kd", reference.reverse_kd_loss, module="ReverseKDLoss",
         cases={"reverse_kd": {"temperature": 2.0}})
def _reverse_kd(temperature: float = 1.0) -> KernelParams:
    """Reverse KD: ``T^2 * KL(softmax(z/T) || softmax(v/T))`` per row, plus CE with labels: the
    student's distribution weights the log-ratio (mode-seeking, the token-level objective of reverse-KL
    LLM distillation, e.g. Gu et al., MiniLLM, ICLR 2024). Equal to ``T^2 *`` :func:`jsd_loss` at
    ``beta=1``.
    """
    t = check_temperature(temperature)
    return KernelParams(Kind.KL, t, t, t * t, reverse=True)


@declare("ttm", reference.ttm_loss, module="TTMLoss", cases={"ttm": {"temperature": 2.5}})
def _ttm(temperature: float = 2.0) -> KernelParams:
    """Transformed teacher matching (Zheng & Yang, 2024): ``KL(softmax(v/T) || softmax(z))``.

    The temperature acts on the teacher only and there is no ``T^2``. The default ``T = 2``
    (``gamma = 1/T = 0.5``) sits in the middle of the range the paper tunes (gamma in 0.1-0.8).
    """
    t = check_temperature(temperature)
    return KernelParams(Kind.KL, 1.0, t, 1.0)


@declare("wttm", reference.wttm_loss, module="WTTMLoss", cases={"wttm": {"temperature": 2.5}})
def _wttm(temperature: float = 2.0) -> KernelParams:
    """Weighted TTM (Zheng & Yang, 2024): ``U * KL(softmax(v/T) || softmax(z))`` per row with
    ``U = sum_j softmax(v)_j^(1/T)`` (a constant: no gradient flows through it). Default ``T = 2``
    as for :func:`ttm_loss`.
    """
    t = check_temperature(temperature)
    return KernelParams(Kind.KL, 1.0, t, 1.0, wttm=True)


@declare("dkd", reference.dkd_loss, module="DKDLoss",
         cases={"dkd": {"temperature": 3.0, "alpha": 0.7, "beta": 5.0}},
         needs_labels="the target class splits the distribution", min_classes=2)
def _dkd(temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0) -> KernelParams:
    """Decoupled KD (Zhao et al., 2022): ``T^2 (alpha * TCKD + beta * NCKD)`` per row, where TCKD is the
    KL of the binary target / non-target split and NCKD the KL among the non-target classes.
    Needs labels and C >= 2. Defaults as in mdistiller (T = 4, alpha = 1, beta = 8).
    """
    t = check_temperature(temperature)
    return KernelParams(Kind.DKD, t, t, t * t, alpha=check_finite(alpha, "alpha"),
                        beta=check_finite(beta, "beta"))


@declare("logit_matching", reference.logit_matching_loss, module="LogitMatchingLoss",
         cases={"lm": {}, "lm_raw": {"center": False}})
def _logit_matching(center: bool = True) -> KernelParams:
    """Logit matching, the T -> infinity limit of KD: ``(1/2C) ||(z - mean z) - (v - mean v)||^2``
    per row (``center=False``: ``(1/2C) ||z - v||^2``)."""
    return KernelParams(Kind.LM, center=check_bool(center, "center"))


@declare("ls_kd", reference.ls_kd_loss, module="LSKDLoss", cases={"ls_kd": {"temperature": 2.0}},
         min_classes=2)
def _ls_kd(temperature: float = 2.0) -> KernelParams:
    """KD on standardised logits (Sun et al., 2024): each row becomes ``(x - mean) / (1e-7 + std)``
    (unbiased std) before ``T^2 KL`` at temperature T; the gradient flows through the student's mean
    and std. Needs C >= 2.
    """
    t = check_temperature(temperature)
    return KernelParams(Kind.LS, t, t, t * t)


@declare("jsd", reference.jsd_loss, module="JSDLoss",
         cases={"jsd": {"beta": 0.3, "temperature": 1.5},
                "jsd_fwd": {"beta": 0.0, "temperature": 2.0},    # exactly the KL kind
                "jsd_rev": {"beta": 1.0, "temperature": 2.0}})   # the reverse KL kind
def _jsd(beta: float = 0.5, temperature: float = 1.0) -> KernelParams:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al., 2023):
    ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``, ``p`` the teacher's and
    ``q`` the student's softmax at T (no T^2). Exactly forward KL ``KL(p || q)`` at beta = 0 and
    reverse KL ``KL(q || p)`` at beta = 1 (as TRL's ``generalized_jsd_loss``).
    """
    t, b = check_temperature(temperature), check_unit(beta, "beta")
    if b in (0.0, 1.0):   # exactly forward / reverse KL
        return KernelParams(Kind.KL, t, t, 1.0, reverse=b == 1.0)
    return KernelParams(Kind.JSD, t, t, 1.0, beta=b)


@declare("retro_kd", reference.retro_kd_loss, module="RetroKDLoss",
         cases={"retro_kd": {"temperature": 3.0, "past_weight": 0.4}}, past_student=True)
def _retro_kd(temperature: float = 4.0, past_weight: float = 0.5) -> KernelParams:
    """RetroKD (Jandial et al., 2023): KD towards ``r = (1 - rho) v + rho z_past``, ``z_past`` the
    logits of a past state of the student (a constant; see :class:`kdfast.PastLogits` for a cache),
    ``rho = past_weight`` in [0, 1]. The teacher's gradient, when it requires grad, is
    ``(1 - rho)`` times the gradient with respect to ``r``.
    """
    t = check_temperature(temperature)
    return KernelParams(Kind.KL, t, t, t * t, rho=check_unit(past_weight, "past_weight"))


@declare("topk_kd", reference.topk_kd_loss, module="TopKKDLoss", teacher="topk",
         cases={"topk_kd": {"temperature": 2.0}, "topk_kd_raw": {"renormalize": False},
                "topk_kd_tail": {"renormalize": False, "tail": True, "temperature": 2.0}})
def _topk_kd(temperature: float = 1.0, renormalize: bool = True, tail: bool = False,
             validate: Optional[bool] = None) -> TopkParams:
    """KD against a sparse teacher that kept only its top-k log-probabilities (offline teachers, k = 8..128):
    ``T^2 * sum_k p_k (log p_k - log q_{i_k})`` per row, ``q = softmax(z / T)`` over all C classes.

    - ``teacher_topk_logprobs``: ``(..., k)`` floats, the teacher's log-probabilities (or logits) on
      the classes ``teacher_topk_indices`` (``(..., k)`` integers in ``[0, C)``, distinct within a
      row; pad a short row with any unused class and ``-inf``).
    - ``renormalize=True``: the teacher is ``softmax(logprobs / T)`` over its k classes.
      ``renormalize=False``: ``p_k = exp(logprobs_k)`` as given, the teacher's log-probabilities at
      the distillation temperature ``T`` (as stored, e.g. by :mod:`kdfast.teacher_store`); its mass
      may be below 1 and the loss is then the KL restricted to the k classes.
    - ``tail=True`` (needs ``renormalize=False``): the teacher's leftover mass
      ``P_tail = 1 - sum_k p_k`` is one more bucket, matched against the student's leftover
      ``Q_tail = 1 - sum_k q_{i_k}``: ``T^2 * (sum_k p_k (log p_k - log q_{i_k}) + P_tail (log P_tail -
      log Q_tail))``, a forward KL over k + 1 buckets (padding entries, ``-inf``, are in the tail).
    - ``validate``: check the teacher's tensors (indices in ``[0, C)`` and distinct within a row, no
      NaN; with ``renormalize=False`` also log-probabilities ``<= 0`` and ``sum_k exp <= 1`` up to
      rounding) and raise ``ValueError``. ``None`` (default): on CPU tensors only (on CUDA the checks
      would cost a host synchronisation; a bad class there makes its row NaN); ``True``: always
      (one host sync on CUDA); ``False``: never.

    No dense teacher tensor is built: the kernel sweeps the student row (its log-sum-exp) and gathers
    the k columns. The teacher gets no gradient (it is data). Equal to :func:`kd_loss` with the
    teacher scattered into a row of ``-inf`` logits (``kdfast.reference.topk_kd_loss``). The reverse
    KL and the generalised JSD over the same teacher: :func:`topk_reverse_kd_loss`,
    :func:`topk_jsd_loss`.
    """
    t = _check_topk(temperature, renormalize, tail, validate)
    return TopkParams(t, t * t, renormalize, tail=tail)


def _check_topk(temperature, renormalize, tail, validate, divergence: str = "") -> float:
    """The top-k losses' common hyperparameters (``divergence``: the name of a reverse / JSD loss,
    which needs a normalised support); returns the temperature."""
    t = check_temperature(temperature)
    check_bool(renormalize, "renormalize")
    check_bool(tail, "tail")
    if validate is not None:
        check_bool(validate, "validate")
    if tail and renormalize:
        raise ValueError("tail=True needs renormalize=False: a teacher renormalized over its k classes "
                         "has no leftover mass")
    if divergence and not (renormalize or tail):
        raise ValueError(f"{divergence} needs renormalize=True (teacher and student renormalized over the "
                         "k classes) or tail=True (the k + 1 buckets): the k probabilities as given, "
                         "without the tail, are not a distribution")
    return t


@declare("topk_reverse_kd", reference.topk_reverse_kd_loss, module="TopKReverseKDLoss", teacher="topk",
         cases={"topk_reverse_kd": {"temperature": 2.0}, "topk_reverse_kd_t1": {},   # (CE shares the lse at T = 1)
                "topk_reverse_kd_tail": {"renormalize": False, "tail": True, "temperature": 2.0}})
def _topk_reverse_kd(temperature: float = 1.0, renormalize: bool = True, tail: bool = False,
                     validate: Optional[bool] = None) -> TopkParams:
    """Reverse KD against a sparse top-k teacher (the offline :func:`reverse_kd_loss`):
    ``T^2 * KL(Q || P) = T^2 * sum_b Q_b (log Q_b - log P_b)`` per row over the support buckets ``b``
    below. Equal to ``T^2 *`` :func:`topk_jsd_loss` at ``beta=1``. With ``tail=True`` a teacher
    with no leftover mass (``P_tail = 0``) against a student with some gives ``+inf``, as
    :func:`reverse_kd_loss` with a ``-inf`` teacher logit.

    The support buckets (docs/spec.md, topk_kd): ``renormalize=True`` (default): the k finite
    entries, the teacher ``P = softmax(logprobs / T)`` and the student ``Q = softmax(z_k / T)``, both
    renormalised over the k classes (``z_k`` the student's logits there; its mass outside them is not
    part of the divergence, whose gradient is 0 there). ``renormalize=False, tail=True``: the k + 1
    buckets of :func:`topk_kd_loss` (``P``: the stored log-probabilities at ``T``, and ``P_tail``;
    ``Q``: ``softmax(z / T)`` at the k classes, and ``Q_tail``). ``renormalize=False`` without
    ``tail`` is a ``ValueError`` (the k probabilities as given are not a distribution). The teacher's
    tensors and ``validate`` as in :func:`topk_kd_loss`; the teacher gets no gradient.
    """
    t = _check_topk(temperature, renormalize, tail, validate, "topk_reverse_kd")
    return TopkParams(t, t * t, renormalize, tail=tail, divergence=Divergence.REVERSE)


@declare("topk_jsd", reference.topk_jsd_loss, module="TopKJSDLoss", teacher="topk",
         cases={"topk_jsd": {"beta": 0.3, "temperature": 1.5},
                "topk_jsd_tail": {"beta": 0.7, "renormalize": False, "tail": True, "temperature": 2.0},
                "topk_jsd_fwd": {"beta": 0.0, "temperature": 2.0},    # exactly topk_kd's kernel
                "topk_jsd_rev": {"beta": 1.0, "temperature": 2.0}})   # topk_reverse_kd's
def _topk_jsd(beta: float = 0.5, temperature: float = 1.0, renormalize: bool = True, tail: bool = False,
              validate: Optional[bool] = None) -> TopkParams:
    """Generalised Jensen-Shannon divergence against a sparse top-k teacher (the offline
    :func:`jsd_loss`): ``beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1 - beta) Q``
    per row over the support buckets of :func:`topk_reverse_kd_loss` (the same conditions: at every
    beta, 0 included), no T^2. As :func:`jsd_loss`: exactly the forward KL at ``beta = 0``
    (:func:`topk_kd_loss` divided by T^2; note that with ``renormalize=True`` its student is the
    softmax over all C classes, not the one renormalised over the k: docs/spec.md) and the reverse KL
    ``KL(Q || P)`` at ``beta = 1`` (:func:`topk_reverse_kd_loss` divided by T^2).
    """
    t = _check_topk(temperature, renormalize, tail, validate, "topk_jsd")
    b = check_unit(beta, "beta")
    if b == 0.0:   # exactly the forward top-k KL
        return TopkParams(t, 1.0, renormalize, tail=tail)
    if b == 1.0:   # exactly the reverse KL
        return TopkParams(t, 1.0, renormalize, tail=tail, divergence=Divergence.REVERSE)
    return TopkParams(t, 1.0, renormalize, tail=tail, beta=b, divergence=Divergence.JSD)


# ----------------------------------------------------------------------------- generated functions
def define(name: str, sig: inspect.Signature, impl: Callable, *, module: str, doc: Optional[str],
           qualname: Optional[str] = None) -> Callable:
    """A real ``def name<sig>: return impl(p1=p1, p2=p2, ...)`` (every parameter passed on by
    keyword; a ``**kwargs`` parameter unpacked), compiled from generated source as :mod:`dataclasses`
    does for ``__init__``: ``help()``, ``inspect.signature`` and introspecting IDEs see its
    parameters, defaults and annotations, and ``torch.compile`` traces it like any function."""
    ns = {"__impl": impl}
    params, call, star = [], [], False
    for p in sig.parameters.values():
        if p.kind == p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        if p.kind == p.VAR_KEYWORD:
            params.append(f"**{p.name}")
            call.append(f"**{p.name}")
            continue
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise ValueError(f"{name}: unsupported parameter kind {p.kind} of {p.name!r}")
        if p.default is p.empty:
            params.append(p.name)
        else:
            ns[f"__d_{p.name}"] = p.default
            params.append(f"{p.name}=__d_{p.name}")
        call.append(f"{p.name}={p.name}")
    src = f"def {name}({', '.join(params)}):\n    return __impl({', '.join(call)})\n"
    exec(compile(src, f"<kdfast generated {module}.{name}>", "exec"), ns)
    fn = ns[name]
    fn.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()
                          if p.annotation is not p.empty}
    if sig.return_annotation is not sig.empty:
        fn.__annotations__["return"] = sig.return_annotation
    fn.__module__, fn.__qualname__, fn.__doc__ = module, qualname or name, doc
    return fn
