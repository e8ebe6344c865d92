"""kdfast/losses.py declares each loss once; the functions, the modules, the method tables of the other
entry points, the AOT inspection and the test cases are derived from those declarations."""
import inspect

import pytest
import torch

import kdfast
import kdfast.aot as aot
import kdfast.functional as F
import kdfast.fused_linear as FL
import kdfast.multi_teacher as MT
import kdfast.vocab_parallel as VP
from conftest import CASES, FAMILY, LOSSES
from kdfast.losses import REGISTRY

OPTIONS = ["kd_weight", "ce_weight", "ignore_index", "reduction", "backend", "inplace_backward",
           "num_items_in_batch"]
SHARDED = ["process_group", "vocab_start", "vocab_size"]
DENSE = [name for name, loss in REGISTRY.items() if loss.dense]


def test_public_signatures_are_unchanged():
    """The generated functions have the signatures the hand-written ones had."""
    assert str(inspect.signature(kdfast.kd_loss)) == (
        "(student_logits: 'Tensor', teacher_logits: 'Tensor', labels: 'Optional[Tensor]' = None, *, "
        "temperature: 'float' = 4.0, kd_weight: 'Weight' = 1.0, ce_weight: 'Weight' = 1.0, "
        "ignore_index: 'int' = -100, reduction: 'str' = 'mean', backend: 'str' = 'auto', "
        "inplace_backward: 'bool' = False, num_items_in_batch: 'Union[None, int, Tensor]' = None, "
        "process_group=None, vocab_start: 'Optional[int]' = None, "
        "vocab_size: 'Optional[int]' = None) -> 'Tensor'")
    assert str(inspect.signature(kdfast.dkd_loss)).startswith(
        "(student_logits: 'Tensor', teacher_logits: 'Tensor', labels: 'Tensor', *, temperature: "
        "'float' = 4.0, alpha: 'float' = 1.0, beta: 'float' = 8.0, kd_weight")
    assert str(inspect.signature(kdfast.retro_kd_loss)).startswith(
        "(student_logits: 'Tensor', teacher_logits: 'Tensor', past_student_logits: 'Tensor', labels: "
        "'Optional[Tensor]' = None, *, temperature: 'float' = 4.0, past_weight: 'float' = 0.5, kd_weight")
    assert str(inspect.signature(kdfast.topk_kd_loss)) == (
        "(student_logits: 'Tensor', teacher_topk_logprobs: 'Tensor', teacher_topk_indices: 'Tensor', "
        "labels: 'Optional[Tensor]' = None, *, temperature: 'float' = 1.0, renormalize: 'bool' = True, "
        "tail: 'bool' = False, validate: 'Optional[bool]' = None, "
        "kd_weight: 'Weight' = 1.0, ce_weight: 'Weight' = 1.0, ignore_index: 'int' = -100, "
        "reduction: 'str' = 'mean', backend: 'str' = 'auto', inplace_backward: 'bool' = False, "
        "num_items_in_batch: 'Union[None, int, Tensor]' = None) -> 'Tensor'")
    assert "Hinton et al. (2015)" in kdfast.kd_loss.__doc__ and "Common arguments" in kdfast.kd_loss.__doc__
    assert kdfast.kd_loss.__module__ == "kdfast.functional" and kdfast.kd_loss.__name__ == "kd_loss"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_function_and_module_follow_the_declaration(name):
    loss = REGISTRY[name]
    fn = getattr(kdfast, f"{name}_loss")
    assert fn is loss.function and fn.__name__ in kdfast.__all__
    params = inspect.signature(fn).parameters
    hyper = inspect.signature(loss.params).parameters
    kw = [k for k, p in params.items() if p.kind == p.KEYWORD_ONLY]
    assert kw == list(hyper) + OPTIONS + (SHARDED if loss.dense else [])
    for k, p in hyper.items():
        assert params[k].default == p.default and params[k].annotation == p.annotation, (name, k)
    assert ("labels" in params) and (params["labels"].default is inspect.Parameter.empty) == bool(loss.needs_labels)
    # the module: every option of the function but the per-call num_items_in_batch in the
    # constructor (with its default), the function's positional tensors and num_items_in_batch
    # (keyword-only) in forward
    cls = getattr(kdfast, loss.module)
    assert cls.__name__ in kdfast.__all__
    init = inspect.signature(cls).parameters
    assert list(init) == [k for k in kw if k != "num_items_in_batch"]
    assert all(init[k].default == params[k].default for k in init)
    fwd = list(inspect.signature(cls.forward).parameters)[1:]
    assert fwd == [k for k, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD] + ["num_items_in_batch"]


def test_modules_take_inplace_backward_and_process_group():
    z = torch.randn(4, 7, requires_grad=True)
    v = torch.randn(4, 7)
    crit = kdfast.KDLoss(2.0, backend="cpu", inplace_backward=True)
    assert "inplace_backward=True" in repr(crit)
    crit(z, v).backward()
    g = z.grad.clone()
    z.grad = None
    kdfast.kd_loss(z, v, temperature=2.0, backend="cpu").backward()
    torch.testing.assert_close(g, z.grad, rtol=0, atol=0)
    # process_group reaches the vocabulary-parallel path (no group initialised here: its error)
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="initialised"):
            kdfast.DKDLoss(process_group=object())(z, v, torch.zeros(4, dtype=torch.long))


def test_method_tables_are_the_registry():
    assert list(F.METHODS) == DENSE and list(FL.METHODS) == DENSE and list(VP.METHODS) == DENSE
    assert list(MT._LOSSES) == DENSE
    assert all(F.METHODS[k] is REGISTRY[k].params for k in DENSE)
    assert all(getattr(VP, f"{k}_loss") is VP.METHODS[k] for k in DENSE)
    # fused linear: every hyperparameter of every method, keyword-only, default None
    params = inspect.signature(kdfast.fused_linear_distill_loss).parameters
    union = []
    for k in DENSE:
        union += [h for h in REGISTRY[k].hyperparameters if h not in union]
    kw = list(params)
    i = kw.index("past_student_bias") + 1
    assert kw[i:i + len(union)] == union
    assert all(params[h].default is None for h in union)


def test_cases_cover_the_family():
    """conftest's cases are the registry's (LOSSES / FAMILY keep their (fused, reference, hyper)
    layout), and the AOT inspection compiles each distinct kernel specialisation of them."""
    assert set(CASES) == {c for k in DENSE for c in REGISTRY[k].cases}
    assert set(LOSSES) | set(FAMILY) == set(CASES) and not set(LOSSES) & set(FAMILY)
    for case, (fused, ref, hyper) in {**LOSSES, **FAMILY}.items():
        name = CASES[case][0]
        assert fused is REGISTRY[name].function and ref is REGISTRY[name].reference
        assert hyper == REGISTRY[name].cases[case]
    assert {c for c in aot._LOSSES} <= {c for loss in REGISTRY.values() for c in loss.cases}
    seen = []
    for loss in REGISTRY.values():
        for hyper in loss.cases.values():
            s = aot.specialisation(loss.params(**hyper))
            if s not in seen:
                seen.append(s)
    assert sorted(map(repr, seen)) == sorted(map(repr, aot._LOSSES.values()))


def test_every_loss_has_a_kind_every_backend_knows():
    from kdfast._spec import Kind
    kinds = {loss.params().kind for loss in REGISTRY.values()}
    assert kinds <= set(Kind)
