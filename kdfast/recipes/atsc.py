"""ATSC: adaptive teaching with a shared classifier (Jang, Kim, Lim & Lee, 2024, arXiv:2406.08528).

The student's penultimate features ``f_s`` go through a small projector ``P`` into the space of the
teacher's penultimate features ``f_t`` and from there through the *teacher's* classifier, which the
student reuses as its own head. Unlike the earlier shared-classifier methods (SimKD), the pretrained
teacher is not frozen: it trains together with the student, so it can move its features towards what
the student can reproduce, while a drift penalty keeps its weights near their pretrained values. The
loss of one step is::

    feature_weight * MSE(P(f_s), f_t)                       # grads: student, P and teacher
  + drift_weight   * sum_k ||theta_k - theta_k^0||^2        # teacher weight tensors (ndim > 1)
  + ce_weight      * CE(z, y)                               # optional (0 in the paper's CIFAR runs)
  + kd_weight      * kdfast.kd_loss(z, v)                   # optional; v = teacher logits, not detached

with ``z`` the student's logits and ``v`` the teacher's. See :class:`ATSC`.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import kd_loss
from ..losses import check_temperature as _check_temperature

__all__ = ["ATSC", "ATSCOutput"]

FEATURE_KINDS = ("conv", "linear")
DRIFT_PARAMS = ("weights", "all")


class ATSCOutput(NamedTuple):
    """What :meth:`ATSC.forward` returns.

    ``loss`` is the weighted total to call ``backward()`` on; ``feature``, ``drift``, ``ce`` and ``kd``
    are the *unweighted* parts (0-d tensors, still in the graph; a disabled part is a constant 0).
    ``logits`` is the student's prediction through the shared classifier, ``teacher_logits`` the
    teacher's own prediction on the same batch (both ``(N, num_classes)``, in the graph).
    """

    loss: Tensor
    feature: Tensor
    drift: Tensor
    ce: Tensor
    kd: Tensor
    logits: Tensor
    teacher_logits: Tensor


def conv_projector(student_channels: int, teacher_channels: int, bottleneck: int = 2) -> nn.Sequential:
    """The projector of the paper for feature maps: 1x1 conv to ``teacher_channels // bottleneck``,
    3x3 conv (padding 1) at that width, 1x1 conv up to ``teacher_channels``, each conv without bias and
    followed by BatchNorm and ReLU. The spatial size is kept."""
    mid = max(1, teacher_channels // bottleneck)
    return nn.Sequential(
        nn.Conv2d(student_channels, mid, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, teacher_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(teacher_channels),
        nn.ReLU(inplace=True),
    )


def _upcast(x: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32 for the cross-entropy; float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_weight(x, name: str) -> float:
    if isinstance(x, Tensor) or isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{name} must be a Python float, got {type(x).__name__}")
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {x}")
    return float(x)


def _check_dim(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return x


class ATSC(nn.Module):
    """Adaptive teaching with a shared classifier (Jang et al., 2024) as one module.

    Args:
        teacher_features: the pretrained teacher up to its penultimate features: ``x -> f_t``, a
            feature map ``(N, C_t, H_t, W_t)`` before global pooling (``feature_kind="conv"``) or a
            vector ``(N, D_t)`` (``"linear"``). It keeps training.
        teacher_classifier: the teacher's classifier, ``(N, C_t) -> (N, K)`` (usually ``nn.Linear``);
            for feature maps it gets the globally average-pooled features. The student shares it.
        student: the student backbone up to its penultimate features, ``x -> f_s``, shaped like
            ``f_t`` up to the channel count (and, for maps, the spatial size).
        student_dim, teacher_dim: ``C_s`` and ``C_t`` (channels or vector sizes); needed to build the
            projector, optional when ``projector`` is given.
        feature_kind: ``"conv"`` (the paper's bottleneck projector, see :func:`conv_projector`) or
            ``"linear"`` (``nn.Linear(student_dim, teacher_dim)``).
        bottleneck: the width factor of the conv projector (its inner width is ``C_t // bottleneck``);
            the paper uses 2.
        projector: a module to use instead of the built one (``f_s -> P(f_s)``, channels ``C_t``).
        student_classifier: optional. The paper's code computes its CE and KD terms on the student
            network's *own* head rather than on the shared one; pass that head (``(N, C_s) -> (N, K)``,
            given pooled features for maps) to do the same. Without it the CE / KD terms use the
            student's shared-classifier prediction. ``logits`` is the shared-classifier prediction
            either way.
        feature_weight, drift_weight, ce_weight, kd_weight: the loss weights (defaults: the paper's
            CIFAR-100 setting ``1, 1, 0, 0``; its ImageNet runs use ``drift_weight=10``).
        temperature: the KD temperature (used when ``kd_weight > 0``).
        ignore_index: labels equal to it are left out of CE and KD.
        backend: passed to :func:`kdfast.kd_loss`.
        drift_params: ``"weights"`` (the paper: teacher tensors with ``ndim > 1``) or ``"all"`` (every
            trainable teacher parameter, biases and norm-layer parameters too; see the note below).

    Spatial sizes: when ``f_s`` and ``f_t`` differ in height or width, the larger map is
    adaptive-average-pooled to the smaller size in that dimension before the projector (student) or
    before the MSE (teacher), as the paper's code does. The student's logits come from the projected,
    globally pooled map; the teacher's from its own full-size map.

    Drift penalty: ``sum_k ||theta_k - theta_k^0||^2`` over every teacher parameter (features and
    classifier) that requires grad and has ``ndim > 1``: the conv and linear weight tensors, the
    shared classifier's weight matrix included; biases and norm-layer affine parameters are free.
    ``theta^0`` is snapshotted at construction as buffers (in ``state_dict``, so a checkpoint resumes
    with the right anchor); build the module *after* loading the teacher's pretrained weights, or
    call :meth:`reset_drift_anchor`. A teacher whose parameters are all frozen gives the SimKD setting
    (no drift, no teacher gradients).

    Collapse: the feature MSE can also be lowered by the teacher *shrinking* its features, and the
    paper's penalty leaves the norm layers' shifts free. On a small network trained with the
    student's learning rate, the last BatchNorm shift of the teacher went negative until most
    features were zero: the MSE fell to ~0.01 while, over 5 seeds, the teacher's accuracy fell from
    100 % to 33-81 % and the student's stayed at 20-62 % (5 classes). A lower teacher learning rate
    (``param_groups(lr, lr / 10)``) or ``drift_params="all"`` prevented it there. Watch the teacher's
    accuracy (``teacher_logits``).

    Training: the teacher stays in the mode of this module (``atsc.train()`` trains the teacher's
    BatchNorm statistics too, as in the paper). One step, with the optional second step of the
    paper's code (fine-tune the classifier's bias on the teacher's CE)::

        atsc = kdfast.recipes.ATSC(teacher_features, teacher.fc, student_backbone,
                                   student_dim=256, teacher_dim=256)
        opt = torch.optim.SGD(atsc.param_groups(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        bias_opt = torch.optim.SGD([atsc.classifier_bias], lr=0.05, momentum=0.9, weight_decay=5e-4)
        atsc.train()
        for x, y in loader:
            out = atsc(x, y)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            atsc.classifier_bias_step(x, y, bias_opt)           # optional
        atsc.eval()
        pred = atsc.predict(x_test).argmax(-1)                  # student + projector + shared head
    """

    def __init__(self, teacher_features: nn.Module, teacher_classifier: nn.Module, student: nn.Module,
                 *, student_dim: Optional[int] = None, teacher_dim: Optional[int] = None,
                 feature_kind: str = "conv", bottleneck: int = 2,
                 projector: Optional[nn.Module] = None,
                 student_classifier: Optional[nn.Module] = None,
                 feature_weight: float = 1.0, drift_weight: float = 1.0, ce_weight: float = 0.0,
                 kd_weight: float = 0.0, temperature: float = 4.0, ignore_index: int = -100,
                 backend: str = "auto", drift_params: str = "weights"):
        super().__init__()
        for name, m in (("teacher_features", teacher_features),
                        ("teacher_classifier", teacher_classifier), ("student", student)):
            if not isinstance(m, nn.Module):
                raise ValueError(f"{name} must be an nn.Module, got {type(m).__name__}")
        if feature_kind not in FEATURE_KINDS:
            raise ValueError(f"feature_kind must be one of {FEATURE_KINDS}, got {feature_kind!r}")
        if projector is None:
            if student_dim is None or teacher_dim is None:
                raise ValueError("student_dim and teacher_dim are needed to build the projector")
            student_dim = _check_dim(student_dim, "student_dim")
            teacher_dim = _check_dim(teacher_dim, "teacher_dim")
            bottleneck = _check_dim(bottleneck, "bottleneck")
            projector = (conv_projector(student_dim, teacher_dim, bottleneck)
                         if feature_kind == "conv" else nn.Linear(student_dim, teacher_dim))
        elif not isinstance(projector, nn.Module):
            raise ValueError(f"projector must be an nn.Module, got {type(projector).__name__}")
        if student_classifier is not None and not isinstance(student_classifier, nn.Module):
            raise ValueError("student_classifier must be an nn.Module or None")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if drift_params not in DRIFT_PARAMS:
            raise ValueError(f"drift_params must be one of {DRIFT_PARAMS}, got {drift_params!r}")

        self.teacher_features = teacher_features
        self.teacher_classifier = teacher_classifier
        self.student = student
        self.projector = projector
        self.student_classifier = student_classifier
        self.feature_kind = feature_kind
        self.feature_weight = _check_weight(feature_weight, "feature_weight")
        self.drift_weight = _check_weight(drift_weight, "drift_weight")
        self.ce_weight = _check_weight(ce_weight, "ce_weight")
        self.kd_weight = _check_weight(kd_weight, "kd_weight")
        self.temperature = _check_temperature(temperature)
        self.ignore_index = ignore_index
        self.backend = backend
        self.drift_params = drift_params
        self.aligned_size: Optional[tuple] = None   # (H, W) the feature maps were compared at
        self.reset_drift_anchor()

    # ------------------------------------------------------------------ drift penalty
    def _teacher_named_parameters(self):
        """Trainable teacher parameters (features, then classifier), each once."""
        seen = set()
        for prefix, mod in (("teacher_features", self.teacher_features),
                            ("teacher_classifier", self.teacher_classifier)):
            for name, p in mod.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    yield f"{prefix}.{name}", p

    def reset_drift_anchor(self) -> None:
        """Snapshot ``theta^0``: the current values of the teacher's trainable parameters with
        ``ndim > 1`` (all of them with ``drift_params="all"``), re-selected by ``requires_grad``.
        Called at construction."""
        anchors = nn.Module()
        names = []
        for name, p in self._teacher_named_parameters():
            if p.ndim > 1 or self.drift_params == "all":
                anchors.register_buffer(f"t{len(names)}", p.detach().clone())
                names.append(name)
        self.drift_anchors = anchors
        self.drift_names: List[str] = names

    def drift_penalty(self) -> Tensor:
        """``sum_k ||theta_k - theta_k^0||^2`` over :attr:`drift_names` (unweighted, in the graph)."""
        terms = [(self.get_parameter(n) - getattr(self.drift_anchors, f"t{i}")).pow(2).sum()
                 for i, n in enumerate(self.drift_names)]
        if not terms:
            p = next(self.parameters(), None)
            return torch.zeros((), device=None if p is None else p.device)
        return torch.stack(terms).sum() if len(terms) > 1 else terms[0]

    # ------------------------------------------------------------------ forward paths
    def _check_features(self, f: Tensor, who: str) -> None:
        want = 4 if self.feature_kind == "conv" else 2
        if not isinstance(f, Tensor) or f.dim() != want:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"feature_kind={self.feature_kind!r} needs {who} features of {want} "
                             f"dims ({'(N, C, H, W)' if want == 4 else '(N, D)'}), got {shape}")

    def _pool(self, f: Tensor) -> Tensor:
        return f.mean(dim=(2, 3)) if self.feature_kind == "conv" else f

    def _project(self, f_s: Tensor, size=None) -> Tensor:
        """P(f_s), the student map first pooled down to ``size`` where it is larger."""
        if size is not None and (f_s.shape[2] > size[0] or f_s.shape[3] > size[1]):
            f_s = F.adaptive_avg_pool2d(f_s, (min(f_s.shape[2], size[0]), min(f_s.shape[3], size[1])))
        return self.projector(f_s)

    def predict(self, x: Tensor) -> Tensor:
        """The student's logits, ``teacher_classifier(pool(P(student(x))))``: the deployed student,
        without a teacher forward. A student map larger than the teacher's is first pooled to the
        size :meth:`forward` aligned the maps to last (:attr:`aligned_size`, kept in ``state_dict``),
        so ``predict`` and ``forward`` give the same logits."""
        f_s = self.student(x)
        self._check_features(f_s, "student")
        return self.teacher_classifier(self._pool(self._project(f_s, self.aligned_size)))

    def get_extra_state(self):
        return {"aligned_size": self.aligned_size}

    def set_extra_state(self, state) -> None:
        size = state.get("aligned_size") if isinstance(state, dict) else None
        self.aligned_size = None if size is None else tuple(int(v) for v in size)

    def teacher_logits(self, x: Tensor) -> Tensor:
        """The teacher's own prediction, ``teacher_classifier(pool(teacher_features(x)))``."""
        return self.teacher_classifier(self._pool(self.teacher_features(x)))

    def forward(self, x: Tensor, labels: Optional[Tensor] = None) -> ATSCOutput:
        """One ATSC step's loss on the batch ``x`` (labels needed when ``ce_weight > 0``)."""
        if self.ce_weight > 0 and labels is None:
            raise ValueError("ce_weight > 0 needs labels")
        f_t = self.teacher_features(x)
        f_s = self.student(x)
        self._check_features(f_t, "teacher")
        self._check_features(f_s, "student")
        target = f_t
        if self.feature_kind == "conv":
            size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
            self.aligned_size = size
            proj = self._project(f_s, size)
            if tuple(f_t.shape[2:]) != size:
                target = F.adaptive_avg_pool2d(f_t, size)
        else:
            proj = self._project(f_s)
        if proj.shape != target.shape:
            raise ValueError(f"projected student features {tuple(proj.shape)} do not match the "
                             f"teacher's {tuple(target.shape)} (check student_dim / teacher_dim)")

        logits = self.teacher_classifier(self._pool(proj))
        v = self.teacher_classifier(self._pool(f_t))
        zero = proj.new_zeros((), dtype=torch.promote_types(proj.dtype, torch.float32))

        feature = F.mse_loss(proj, target) if self.feature_weight > 0 else zero
        drift = self.drift_penalty() if self.drift_weight > 0 else zero
        ce = kd = zero
        if self.ce_weight > 0 or self.kd_weight > 0:
            z = logits if self.student_classifier is None else self.student_classifier(self._pool(f_s))
            if self.ce_weight > 0:
                ce_rows = F.cross_entropy(_upcast(z), labels, ignore_index=self.ignore_index,
                                          reduction="sum")
                ce = ce_rows / (labels != self.ignore_index).sum().clamp_min(1)
            if self.kd_weight > 0:   # the teacher logits keep their graph: the teacher learns too
                kd = kd_loss(z, v, labels, temperature=self.temperature, kd_weight=1.0,
                             ce_weight=0.0, ignore_index=self.ignore_index, backend=self.backend)
        loss = (self.feature_weight * feature + self.drift_weight * drift + self.ce_weight * ce
                + self.kd_weight * kd)
        return ATSCOutput(loss, feature, drift, ce, kd, logits, v)

    # ------------------------------------------------------------------ optimisation
    @property
    def classifier_bias(self) -> nn.Parameter:
        """The shared classifier's bias (``teacher_classifier.bias``), tuned by
        :meth:`classifier_bias_step`."""
        b = getattr(self.teacher_classifier, "bias", None)
        if not isinstance(b, nn.Parameter):
            raise ValueError("teacher_classifier has no bias parameter (the bias step needs "
                             "teacher_classifier.bias, as nn.Linear(..., bias=True) has)")
        return b

    def classifier_bias_loss(self, x: Tensor, labels: Tensor) -> Tensor:
        """The teacher's cross-entropy on ``(x, labels)``, its features computed without gradients
        (only the classifier is in the graph). Runs the teacher in the current mode, like the
        paper's code (in train mode its BatchNorm statistics see the batch a second time)."""
        _ = self.classifier_bias   # fail early without a bias
        with torch.no_grad():
            pooled = self._pool(self.teacher_features(x))
        return F.cross_entropy(_upcast(self.teacher_classifier(pooled)), labels,
                               ignore_index=self.ignore_index)

    def classifier_bias_step(self, x: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer) -> Tensor:
        """The paper code's second step: after the main update, one ``optimizer`` step on the
        teacher's CE for the shared classifier's bias alone. ``optimizer`` should hold only
        :attr:`classifier_bias` (other parameters' ``.grad`` are left untouched). Returns the CE
        (detached)."""
        bias = self.classifier_bias
        loss = self.classifier_bias_loss(x, labels)
        (grad,) = torch.autograd.grad(loss, [bias])   # no other parameter's gradient is formed
        optimizer.zero_grad()
        bias.grad = grad
        optimizer.step()
        bias.grad = None
        return loss.detach()

    def param_groups(self, lr_student: Optional[float] = None, lr_teacher: Optional[float] = None, *,
                     weight_decay: Optional[float] = None,
                     teacher_weight_decay: Optional[float] = None) -> List[dict]:
        """Parameter groups for a ``torch.optim`` optimizer: ``"student"`` (the student backbone, the
        projector and ``student_classifier``) and ``"teacher"`` (the teacher's features and the shared
        classifier), each trainable parameter exactly once (a parameter the student and the teacher
        share goes to the student group). ``lr_*`` / ``*weight_decay`` left None are not set, so the
        optimizer's defaults apply; ``lr_teacher`` defaults to ``lr_student`` and
        ``teacher_weight_decay`` to ``weight_decay`` (the paper uses one optimizer for both). Empty
        groups are left out; the drift anchors are buffers, never parameters.
        """
        seen = set()

        def take(*mods):
            out = []
            for m in mods:
                if m is None:
                    continue
                for p in m.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
            return out

        lr_teacher = lr_student if lr_teacher is None else lr_teacher
        teacher_weight_decay = weight_decay if teacher_weight_decay is None else teacher_weight_decay
        groups = []
        for name, params, lr, wd in (
                ("student", take(self.student, self.projector, self.student_classifier),
                 lr_student, weight_decay),
                ("teacher", take(self.teacher_features, self.teacher_classifier),
                 lr_teacher, teacher_weight_decay)):
            if not params:
                continue
            g = {"params": params, "name": name}
            if lr is not None:
                g["lr"] = lr
            if wd is not None:
                g["weight_decay"] = wd
            groups.append(g)
        return groups

    def extra_repr(self) -> str:
        return (f"feature_kind={self.feature_kind!r}, feature_weight={self.feature_weight}, "
                f"drift_weight={self.drift_weight}, ce_weight={self.ce_weight}, "
                f"kd_weight={self.kd_weight}, temperature={self.temperature}, "
                f"drift_params={self.drift_params!r}, drift_tensors={len(self.drift_names)}")
