"""docs/spec.md, "Errors": a ValueError naming the argument, before any kernel runs."""
import warnings

import pytest
import torch

import kdfast
from kdfast import functional

Z = torch.randn(4, 5)
V = torch.randn(4, 5)
Y = torch.tensor([0, 1, 2, -100])

CASES = [  # (kwargs for kd_loss or a callable, expected words in the message)
    (dict(teacher_logits=torch.randn(4, 6)), "teacher_logits shape"),
    (dict(teacher_logits=torch.randn(3, 5)), "teacher_logits shape"),
    (dict(student_logits=torch.randint(0, 3, (4, 5))), "student_logits must be float"),
    (dict(teacher_logits=torch.randn(4, 5, dtype=torch.complex64)), "teacher_logits must be float"),
    (dict(student_logits=torch.tensor(1.0)), "student_logits must have a class dimension"),
    (dict(labels=torch.tensor([0, 1, 2])), "labels must have the leading shape"),
    (dict(labels=torch.zeros(4)), "labels must be an integer"),
    (dict(labels=torch.tensor([0, 1, 5, 0])), "labels must be in [0, 5)"),
    (dict(labels=torch.tensor([0, 1, -1, 0])), "labels must be in [0, 5)"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(reduction="avg"), "reduction"),
    (dict(backend="cuda"), "backend"),
    (dict(kd_weight=torch.ones(3)), "kd_weight"),
    (dict(ce_weight=torch.ones(4, 2)), "ce_weight"),
    (dict(kd_weight="1"), "kd_weight"),
    (dict(ignore_index=1.5), "ignore_index"),
]


@pytest.mark.parametrize("kwargs,words", CASES)
@pytest.mark.parametrize("fn", [kdfast.kd_loss, kdfast.ttm_loss, kdfast.wttm_loss])
def test_value_errors(fn, kwargs, words):
    args = dict(student_logits=Z, teacher_logits=V, labels=Y)
    args.update(kwargs)
    backend = args.pop("backend", "cpu")
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        fn(**args, backend=backend)


def test_devices_must_match():
    meta = torch.randn(4, 5, device="meta")
    with pytest.raises(ValueError, match="teacher_logits are on meta"):
        kdfast.kd_loss(Z, meta)
    with pytest.raises(ValueError, match="labels are on meta"):
        kdfast.kd_loss(Z, V, torch.zeros(4, dtype=torch.long, device="meta"))


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    assert functional._resolve_backend("auto", torch.device("cpu")) == "torch"
    assert functional._resolve_backend("cpu", torch.device("cpu")) == "cpu"   # explicit wins
    monkeypatch.setenv("KDFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="KDFAST_BACKEND"):
        kdfast.kd_loss(Z, V)
    monkeypatch.delenv("KDFAST_BACKEND")
    # explicit "cpu" raises when the extension is missing; "auto" falls back with one warning
    def missing():
        raise ImportError("kdfast._C is not built")
    monkeypatch.setattr(functional._cpu, "load", missing)
    monkeypatch.setattr(functional._cpu, "available", lambda: False)
    monkeypatch.setattr(functional, "_warned_fallback", False)
    with pytest.raises(ImportError, match="not built"):
        kdfast.kd_loss(Z, V, backend="cpu")
    with pytest.warns(RuntimeWarning, match="eager reference"):
        a = kdfast.kd_loss(Z, V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = kdfast.kd_loss(Z, V)   # warned once only
    torch.testing.assert_close(a, b)


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        kdfast.kd_loss(Z, V, backend="triton")


def test_nan_propagates():
    z = Z.clone()
    z[1, 2] = float("nan")
    loss = kdfast.kd_loss(z, V, reduction="none", backend="cpu")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
