"""kdfast.recipes.ATSC: shapes, the drift penalty, gradient flow, the KD term against the eager
reference, the optimizer's parameter groups, the classifier-bias step and a short training run."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdfast
from kdfast.recipes import ATSC

K = 5   # classes


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: intra-op threads only add synchronisation, which on a shared,
    loaded 2-core machine made the training run ~10x slower. The previous count is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conv_teacher(c_t=8, stride=1):
    feats = nn.Sequential(nn.Conv2d(3, c_t, 3, stride=stride, padding=1), nn.BatchNorm2d(c_t), nn.ReLU(),
                          nn.Conv2d(c_t, c_t, 3, padding=1), nn.BatchNorm2d(c_t), nn.ReLU())
    return feats, nn.Linear(c_t, K)


def conv_student(c_s=4, stride=1):
    return nn.Sequential(nn.Conv2d(3, c_s, 3, stride=stride, padding=1), nn.BatchNorm2d(c_s), nn.ReLU())


def conv_atsc(s_stride=1, t_stride=1, dtype=torch.float32, **kw):
    tf, tc = conv_teacher(stride=t_stride)
    m = ATSC(tf, tc, conv_student(stride=s_stride), student_dim=4, teacher_dim=8, **kw)
    return m.to(dtype)


def linear_atsc(dtype=torch.float32, **kw):
    tf = nn.Sequential(nn.Linear(10, 12), nn.LayerNorm(12), nn.Tanh())
    tc = nn.Linear(12, K)
    st = nn.Sequential(nn.Linear(10, 6), nn.Tanh())
    return ATSC(tf, tc, st, student_dim=6, teacher_dim=12, feature_kind="linear", **kw).to(dtype)


def batch(n=6, hw=8, dtype=torch.float32, seed=0, conv=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3, hw, hw) if conv else (n, 10), generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, K, (n,), generator=g)
    return x, y


def expected_logits(m, x):
    """The shared classifier on the globally pooled projection of the student's features, the
    student map first average-pooled to the teacher's size where it is larger."""
    f_s = m.student(x)
    if f_s.dim() == 4:
        f_t = m.teacher_features(x)
        f_s = F.adaptive_avg_pool2d(f_s, (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3])))
        return m.teacher_classifier(m.projector(f_s).mean((2, 3)))
    return m.teacher_classifier(m.projector(f_s))


def expected_feature(m, x):
    """MSE(P(f_s), f_t) with the larger map average-pooled to the smaller size per dimension."""
    f_t, f_s = m.teacher_features(x), m.student(x)
    if f_t.dim() == 4:
        size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
        f_t, f_s = F.adaptive_avg_pool2d(f_t, size), F.adaptive_avg_pool2d(f_s, size)
    return F.mse_loss(m.projector(f_s), f_t)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("s_stride,t_stride", [(1, 1), (1, 2), (2, 1)])   # same, student larger, smaller
def test_conv_shapes_and_feature_loss(s_stride, t_stride):
    m = conv_atsc(s_stride, t_stride, ce_weight=1.0, kd_weight=1.0).eval()
    x, y = batch()
    out = m(x, y)
    assert out.logits.shape == out.teacher_logits.shape == (6, K)
    for part in (out.loss, out.feature, out.drift, out.ce, out.kd):
        assert part.shape == () and torch.isfinite(part)
    torch.testing.assert_close(out.feature, expected_feature(m, x))
    torch.testing.assert_close(out.logits, expected_logits(m, x))
    torch.testing.assert_close(m.predict(x), out.logits)   # no teacher forward, same logits
    assert m.aligned_size == (8 // max(s_stride, t_stride),) * 2
    fresh = conv_atsc(s_stride, t_stride, ce_weight=1.0, kd_weight=1.0).eval()
    fresh.load_state_dict(m.state_dict())                 # the aligned size travels with checkpoints
    torch.testing.assert_close(fresh.predict(x), out.logits)
    torch.testing.assert_close(out.teacher_logits, m.teacher_logits(x))


def test_conv_projector_layout():
    m = conv_atsc()
    convs = [l for l in m.projector if isinstance(l, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == \
        [(4, 4, (1, 1)), (4, 4, (3, 3)), (4, 8, (1, 1))]   # bottleneck 2: C_t // 2 = 4 inside
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(l, nn.BatchNorm2d) for l in m.projector) == 3
    assert sum(isinstance(l, nn.ReLU) for l in m.projector) == 3
    tf, tc = conv_teacher(c_t=16)
    wide = ATSC(tf, tc, conv_student(), student_dim=4, teacher_dim=16, bottleneck=4)
    assert wide.projector[0].out_channels == 4 and wide.projector[6].out_channels == 16


def test_linear_shapes():
    m = linear_atsc(ce_weight=1.0, kd_weight=1.0)
    assert isinstance(m.projector, nn.Linear)
    x, y = batch(conv=False)
    out = m(x, y)
    assert out.logits.shape == out.teacher_logits.shape == (6, K)
    torch.testing.assert_close(out.feature, F.mse_loss(m.projector(m.student(x)), m.teacher_features(x)))
    torch.testing.assert_close(out.logits, m.teacher_classifier(m.projector(m.student(x))))


# ----------------------------------------------------------------------------- drift penalty
def manual_drift(teacher_mods, before):
    return sum(((p.detach() - before[n]) ** 2).sum()
               for n, p in teacher_mods.named_parameters() if p.ndim > 1 and n in before)


def test_drift_penalty_formula():
    m = conv_atsc(drift_weight=3.0, feature_weight=0.5)
    x, _ = batch()
    assert m.drift_penalty().item() == 0.0 and m(x).drift.item() == 0.0
    # the anchors: buffers (checkpointed), one per teacher tensor with ndim > 1, never parameters
    assert m.drift_names == ["teacher_features.0.weight", "teacher_features.3.weight",
                             "teacher_classifier.weight"]
    assert all(k in m.state_dict() for k in ("drift_anchors.t0", "drift_anchors.t2"))
    anchor_ids = {id(b) for b in m.drift_anchors.buffers()}
    assert not anchor_ids & {id(p) for p in m.parameters()}

    teacher = nn.ModuleDict({"f": m.teacher_features, "c": m.teacher_classifier})
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():   # biases and norm parameters are free: no penalty
        for n, p in teacher.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p))
    assert m.drift_penalty().item() == 0.0
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    want = manual_drift(teacher, before)
    assert want > 0
    out = m(x)
    torch.testing.assert_close(out.drift, want)
    torch.testing.assert_close(out.loss, 0.5 * out.feature + 3.0 * out.drift)
    # d(w * drift) / d theta = 2 w (theta - theta0)
    m.zero_grad()
    (3.0 * m.drift_penalty()).backward()
    w = m.teacher_classifier.weight
    torch.testing.assert_close(w.grad, 6.0 * (w.detach() - before["c.weight"]))


def test_drift_skips_frozen_and_resets():
    tf, tc = conv_teacher()
    tf[0].weight.requires_grad_(False)
    m = ATSC(tf, tc, conv_student(), student_dim=4, teacher_dim=8)
    assert "teacher_features.0.weight" not in m.drift_names and len(m.drift_names) == 2
    with torch.no_grad():
        tf[0].weight.add_(1.0)
        tf[3].weight.add_(1.0)
    assert m.drift_penalty().item() == pytest.approx(tf[3].weight.numel())
    m.reset_drift_anchor()
    assert m.drift_penalty().item() == 0.0
    every = ATSC(*conv_teacher(), conv_student(), student_dim=4, teacher_dim=8, drift_params="all")
    assert len(every.drift_names) == len(list(every.teacher_features.parameters())) + 2
    with torch.no_grad():
        every.teacher_features[1].bias.add_(2.0)   # a BatchNorm shift: penalised only with "all"
    assert every.drift_penalty().item() == pytest.approx(4.0 * 8)
    # a checkpoint restores the anchor
    m2 = ATSC(*conv_teacher(), conv_student(), student_dim=4, teacher_dim=8)
    m2.teacher_features[0].weight.requires_grad_(False)
    m2.reset_drift_anchor()
    m2.load_state_dict(m.state_dict())
    assert m2.drift_penalty().item() == 0.0


# ----------------------------------------------------------------------------- gradients
def grads_nonzero(mod):
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in mod.named_parameters()}


def test_default_loss_trains_teacher_features_student_and_projector():
    m = conv_atsc(2, 1)   # defaults: feature 1, drift 1, CE 0, KD 0
    x, y = batch()
    m(x, y).loss.backward()
    for mod in (m.student, m.projector):
        assert all(grads_nonzero(mod).values()), grads_nonzero(mod)
    # the teacher adapts: the feature MSE reaches its convolutions (the target is not detached)
    assert m.teacher_features[0].weight.grad.abs().sum() > 0
    assert m.teacher_features[3].weight.grad.abs().sum() > 0


def test_kd_gradient_reaches_teacher():
    m = conv_atsc(feature_weight=0.0, drift_weight=0.0, kd_weight=1.0)
    x, y = batch()
    m(x, y).loss.backward()
    assert m.teacher_features[0].weight.grad.abs().sum() > 0
    assert all(grads_nonzero(m.teacher_classifier).values())
    assert all(grads_nonzero(m.student).values())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_loss_and_grads_match_manual_reference(backend, kind):
    """Every part against eager autograd with kdfast.reference.kd_loss, float64, teacher not detached."""
    kw = dict(feature_weight=0.7, drift_weight=0.3, ce_weight=0.5, kd_weight=2.0, temperature=3.0,
              backend=backend)
    torch.manual_seed(1)
    m = (conv_atsc(2, 1, dtype=torch.float64, **kw) if kind == "conv"
         else linear_atsc(dtype=torch.float64, **kw))
    with torch.no_grad():   # move the teacher off its anchor so the drift term has a gradient
        for p in list(m.teacher_features.parameters()) + list(m.teacher_classifier.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    x, y = batch(n=7, dtype=torch.float64, conv=kind == "conv")
    y[2] = -100
    params = dict(m.named_parameters())

    out = m(x, y)
    got = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)

    z = expected_logits(m, x)
    v = m.teacher_logits(x)
    kd = kdfast.reference.kd_loss(z, v, y, temperature=3.0, kd_weight=1.0, ce_weight=0.0)
    ce = F.cross_entropy(z, y, ignore_index=-100)
    drift = sum((m.get_parameter(n) - getattr(m.drift_anchors, f"t{i}")).pow(2).sum()
                for i, n in enumerate(m.drift_names))
    feature = expected_feature(m, x)
    total = 0.7 * feature + 0.3 * drift + 0.5 * ce + 2.0 * kd
    want = torch.autograd.grad(total, list(params.values()), allow_unused=True)

    for name, a, b in (("kd", out.kd, kd), ("ce", out.ce, ce), ("drift", out.drift, drift),
                       ("feature", out.feature, feature), ("loss", out.loss, total)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(out.logits, z, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(params, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    assert got[list(params).index("teacher_classifier.bias")].abs().sum() > 0


def test_student_classifier_takes_ce_and_kd():
    tf, tc = conv_teacher()
    head = nn.Linear(4, K)
    m = ATSC(tf, tc, conv_student(), student_dim=4, teacher_dim=8, student_classifier=head,
             feature_weight=0.0, drift_weight=0.0, ce_weight=1.0, kd_weight=1.0, backend="torch")
    x, y = batch()
    out = m(x, y)
    z = head(m.student(x).mean((2, 3)))
    torch.testing.assert_close(out.ce, F.cross_entropy(z, y))
    torch.testing.assert_close(out.kd, kdfast.reference.kd_loss(z, m.teacher_logits(x), y, ce_weight=0.0))
    torch.testing.assert_close(out.logits, m.predict(x))   # the prediction stays the shared head's
    assert any(p is head.weight for g in m.param_groups() if g["name"] == "student" for p in g["params"])


# ----------------------------------------------------------------------------- optimisation
def test_param_groups_cover_each_trainable_parameter_once():
    shared = nn.Conv2d(3, 4, 3, padding=1)      # a module both networks use goes to the student
    st = nn.Sequential(shared, nn.ReLU())
    tf = nn.Sequential(shared, nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
    tf[2].weight.requires_grad_(False)           # a frozen teacher parameter stays out
    tc = nn.Linear(8, K)
    m = ATSC(tf, tc, st, student_dim=4, teacher_dim=8, student_classifier=nn.Linear(4, K))
    groups = m.param_groups(0.1, 0.01, weight_decay=5e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    by_name = {g["name"]: g for g in groups}
    assert by_name["student"]["lr"] == 0.1 and by_name["teacher"]["lr"] == 0.01
    assert by_name["teacher"]["weight_decay"] == by_name["student"]["weight_decay"] == 5e-4
    assert {id(p) for p in by_name["student"]["params"]} >= {id(shared.weight), id(shared.bias)}
    assert {id(p) for p in by_name["teacher"]["params"]} >= {id(tc.weight), id(tc.bias)}
    opt = torch.optim.SGD(m.param_groups(), lr=0.05)       # no lr: the optimizer's default
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
    frozen = ATSC(*conv_teacher(), conv_student(), student_dim=4, teacher_dim=8)
    frozen.teacher_features.requires_grad_(False)
    frozen.teacher_classifier.requires_grad_(False)
    assert [g["name"] for g in frozen.param_groups(0.1)] == ["student"]


def test_classifier_bias_step_moves_only_the_bias():
    m = conv_atsc().eval()
    x, y = batch(n=16)
    bias_opt = torch.optim.SGD([m.classifier_bias], lr=0.5)
    sentinel = torch.full_like(m.teacher_classifier.weight, 7.0)
    m.teacher_classifier.weight.grad = sentinel.clone()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ce0 = F.cross_entropy(m.teacher_logits(x), y)
    first = m.classifier_bias_step(x, y, bias_opt)
    torch.testing.assert_close(first, ce0)
    for _ in range(20):
        last = m.classifier_bias_step(x, y, bias_opt)
    assert last < first
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) == (n != "teacher_classifier.bias"), n
    assert torch.equal(m.teacher_classifier.weight.grad, sentinel)   # other grads untouched
    nobias = ATSC(*conv_teacher(), conv_student(), student_dim=4, teacher_dim=8)
    nobias.teacher_classifier = nn.Linear(8, K, bias=False)
    with pytest.raises(ValueError, match="bias"):
        nobias.classifier_bias_step(x, y, bias_opt)


def test_bad_arguments():
    tf, tc = conv_teacher()
    with pytest.raises(ValueError, match="feature_kind"):
        ATSC(tf, tc, conv_student(), student_dim=4, teacher_dim=8, feature_kind="vit")
    with pytest.raises(ValueError, match="student_dim"):
        ATSC(tf, tc, conv_student())
    with pytest.raises(ValueError, match="drift_weight"):
        ATSC(tf, tc, conv_student(), student_dim=4, teacher_dim=8, drift_weight=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        ATSC(tf, tc, conv_student(), student_dim=4, teacher_dim=8, temperature=0.0)
    m = ATSC(tf, tc, conv_student(), student_dim=4, teacher_dim=8, ce_weight=1.0)
    x, y = batch()
    with pytest.raises(ValueError, match="needs labels"):
        m(x)
    wrong = ATSC(tf, tc, conv_student(), student_dim=4, teacher_dim=6)
    with pytest.raises(ValueError, match="do not match"):
        wrong(x, y)
    flat = ATSC(tf, tc, conv_student(), student_dim=4, teacher_dim=8, feature_kind="linear")
    with pytest.raises(ValueError, match="2 dims"):
        flat(x, y)


# ----------------------------------------------------------------------------- a short run
def test_short_training_run_learns():
    """Pretrain a small teacher on separable data, then ATSC with the paper's loss weights and the
    bias step: the loss falls, the student's shared-classifier prediction becomes accurate and the
    teacher stays accurate. The teacher's learning rate is a tenth of the student's: at the same rate
    this small teacher collapses its features (see the ATSC docstring)."""
    torch.manual_seed(0)
    n, hw = 256, 6
    protos = torch.randn(K, 3, hw, hw)
    y = torch.randint(0, K, (n,))
    x = protos[y] + 0.5 * torch.randn(n, 3, hw, hw)

    tf, tc = conv_teacher(c_t=8)
    t_opt = torch.optim.Adam(list(tf.parameters()) + list(tc.parameters()), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(tc(tf(x).mean((2, 3))), y)
        t_opt.zero_grad()
        loss.backward()
        t_opt.step()

    m = ATSC(tf, tc, conv_student(c_s=6, stride=2), student_dim=6, teacher_dim=8)
    m.eval()
    with torch.no_grad():
        assert (m.teacher_logits(x).argmax(-1) == y).float().mean() > 0.95
        acc0 = (m.predict(x).argmax(-1) == y).float().mean()
    opt = torch.optim.SGD(m.param_groups(0.05, 0.005), momentum=0.9)
    bias_opt = torch.optim.SGD([m.classifier_bias], lr=0.05, momentum=0.9)
    m.train()
    losses = []
    for step in range(60):
        idx = torch.arange(step * 64, (step + 1) * 64) % n
        out = m(x[idx], y[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        m.classifier_bias_step(x[idx], y[idx], bias_opt)
        losses.append(out.loss.item())
    m.eval()
    with torch.no_grad():
        acc = (m.predict(x).argmax(-1) == y).float().mean()
        t_acc = (m.teacher_logits(x).argmax(-1) == y).float().mean()
        final = m(x, y)
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:4]) / 4, losses
    assert acc > 0.8 and acc > acc0 + 0.3, (acc0, acc)
    assert t_acc > 0.9, t_acc
    assert 0 < final.drift.item() < 1.0   # the teacher moved, but stayed near its start
