"""Triton-specific checks beyond the backend-parametrised tests (run under TRITON_INTERPRET=1 on
CPU tensors): multi-block rows (a tiny MAX_BLOCK), the backend contract called directly (bad labels
-> NaN rows, grad_z aliasing z, row strides > C, teacher gradient), fp16 and mixed dtypes for every
kind. Shapes are small: the interpreter is slow."""
import dataclasses

import pytest
import torch

import kdfast
from conftest import CASES, FAMILY, LOSSES as CORE, NO_NEG_INF
from conftest import max_err, rand_labels, rand_logits, rand_weights, run_case, scale_of
from kdfast.losses import REGISTRY

triton_backend = pytest.importorskip("kdfast._triton")
R = kdfast.reference

LOSSES = {**CORE, **FAMILY}   # name -> (fused, reference, hyperparameters), tests/conftest.py
# the kernel parameters of each case (kdfast.losses.REGISTRY), for direct backend calls
PARAMS = {case: REGISTRY[name].params(**hyper) for case, (name, hyper) in CASES.items()}


@pytest.fixture
def small_block(monkeypatch):
    """BLOCK = 16 columns: rows of C > 16 take the multi-block path (online rescaling across
    blocks, gradient sweeps over several blocks)."""
    monkeypatch.setattr(triton_backend, "MAX_BLOCK", 16)
    assert triton_backend.launch_config(37) == (16, 4)


def bind(name, shape, dtype, gen):
    fused, ref, hyper = LOSSES[name]
    if name == "retro_kd":
        zp = rand_logits(shape, dtype, gen=gen)
        return (lambda z, v, y, **kw: kdfast.retro_kd_loss(z, v, zp, y, **kw),
                lambda z, v, y, **kw: R.retro_kd_loss(z, v, zp.to(z.dtype), y, **kw), hyper)
    return fused, ref, hyper


@pytest.mark.parametrize("name", list(LOSSES))
def test_multi_block_rows_float64(name, small_block, gen):
    """C = 53 over 16-column blocks: the last block partial, teacher -inf over a whole first block
    (running max -inf at the start) and scattered; a dominant logit in a late block."""
    shape = (5, 53)
    fused, ref, hyper = bind(name, shape, torch.float64, gen)
    z, v = rand_logits(shape, gen=gen), rand_logits(shape, gen=gen)
    z[0, 50] = 40.0                       # the max moves in the last block
    v[1, 45] = 30.0
    if name not in NO_NEG_INF:
        v[2, :16] = float("-inf")         # a whole block of probability-0 classes first
        v[3, 16:40:3] = float("-inf")
    labels = torch.tensor([3, 20, 47, -100, 52])
    w = rand_weights(shape[:-1], gen=gen)
    got, up = run_case(fused, z, v, labels, teacher_grad=True, weights=w, gen=gen,
                       backend="triton", **hyper)
    want, _ = run_case(ref, z, v, labels, teacher_grad=True, weights=w, upstream=up, **hyper)
    for key in want:
        assert torch.isfinite(got[key]).all(), key
        tol = 1e-10 * max(1.0, scale_of(want[key])) * (1 + shape[-1] ** 0.5)
        assert max_err(got[key], want[key]) <= tol, (key, max_err(got[key], want[key]))


@pytest.mark.parametrize("name", ["kd", "dkd", "ls_kd", "jsd", "lm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_block_rows_low_precision(name, dtype, small_block, gen):
    shape = (3, 70)
    fused, ref, hyper = bind(name, shape, dtype, gen)
    z, v = rand_logits(shape, dtype, gen=gen), rand_logits(shape, dtype, gen=gen)
    labels = rand_labels(shape[:-1], shape[-1], ignore_frac=0.0, gen=gen)
    got, up = run_case(fused, z, v, labels, teacher_grad=True, backend="triton", gen=gen, **hyper)
    eager, _ = run_case(ref, z, v, labels, teacher_grad=True, upstream=up, **hyper)
    want, _ = run_case(ref, z.double(), v.double(), labels, teacher_grad=True, upstream=up, **hyper)
    eps = torch.finfo(dtype).eps
    for key in want:
        bound = 2 * max_err(eager[key], want[key]) + 4 * eps * scale_of(want[key])
        assert max_err(got[key], want[key]) <= bound, (key, max_err(got[key], want[key]), bound)


@pytest.mark.parametrize("name", list(LOSSES))
def test_fp16_and_mixed_dtypes(name, gen):
    """float16 student and teacher, and a bfloat16 student with a float32 teacher."""
    shape = (3, 40)
    for dz, dv in [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)]:
        fused, ref, hyper = bind(name, shape, dz, gen)
        z, v = rand_logits(shape, dz, gen=gen), rand_logits(shape, dv, gen=gen)
        labels = rand_labels(shape[:-1], shape[-1], ignore_frac=0.0, gen=gen)
        got, up = run_case(fused, z, v, labels, teacher_grad=True, backend="triton", gen=gen, **hyper)
        want, _ = run_case(ref, z.double(), v.double(), labels, teacher_grad=True, upstream=up,
                           **hyper)
        # fp32 accumulation of upcast inputs: only the gradient's final rounding to dz / dv
        for key, dt in [("loss", torch.float32), ("z", dz), ("v", dv)]:
            tol = 4 * torch.finfo(dt).eps * max(1.0, scale_of(want[key])) + 1e-5 * scale_of(want[key])
            assert max_err(got[key], want[key]) <= tol, (dz, dv, key, max_err(got[key], want[key]))


@pytest.mark.parametrize("name", ["kd", "ttm", "wttm", "lm", "lm_raw", "jsd", "jsd_rev", "retro_kd"])
def test_one_class(name, gen):
    shape = (3, 1)
    fused, ref, hyper = bind(name, shape, torch.float64, gen)
    z, v = rand_logits(shape, gen=gen), rand_logits(shape, gen=gen)
    labels = torch.tensor([0, -100, 0])
    got, up = run_case(fused, z, v, labels, teacher_grad=True, backend="triton", gen=gen, **hyper)
    want, _ = run_case(ref, z, v, labels, teacher_grad=True, upstream=up, **hyper)
    for key in want:
        assert max_err(got[key], want[key]) <= 1e-12, key


# ----------------------------------------------------------------------------- the contract, directly
def call(name, z, v, labels, *, zp=None, need_gz=True, need_gv=True, grad_z=None, kd_w=None,
         ce_w=None, has_ce=True):
    """distill_forward on (N, C) tensors; returns (d, ce, grad_z, grad_v)."""
    n = z.shape[0]
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    p = PARAMS[name]
    if name == "retro_kd" and zp is None:
        zp = torch.randn_like(z)
    if p.rho == 0:
        zp = None
    p = dataclasses.replace(p, has_ce=has_ce, ignore_index=-100)
    kd_w = torch.ones(n, dtype=acc) if kd_w is None else kd_w
    ce_w = torch.ones(n, dtype=acc) if ce_w is None else ce_w
    d, ce = torch.full((n,), 7.0, dtype=acc), torch.full((n,), 7.0, dtype=acc)
    gz = (torch.full_like(z, 7.0) if grad_z is None else grad_z) if need_gz else None
    gv = torch.full_like(v, 7.0) if need_gv else None
    triton_backend.distill_forward(z, v, zp, labels, kd_w, ce_w, torch.ones(1, dtype=acc), d, ce,
                                   gz, gv, p.fparams(), p.iparams())
    return d, ce, gz, gv


@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_labels_give_nan_rows(name, small_block, gen):
    """Labels outside [0, C) (not ignore_index): that row is NaN in d, ce and both gradients; the
    other rows are untouched by it; ignored rows are exact zeros."""
    z, v = rand_logits((5, 37), gen=gen), rand_logits((5, 37), gen=gen)
    zp = rand_logits((5, 37), gen=gen)
    labels = torch.tensor([3, 37, -100, -5, 36])
    d, ce, gz, gv = call(name, z, v, labels, zp=zp)
    good, _, gz1, gv1 = call(name, z[[0, 4]], v[[0, 4]], labels[[0, 4]], zp=zp[[0, 4]])
    for i in (1, 3):
        assert torch.isnan(d[i]) and torch.isnan(ce[i]), i
        assert torch.isnan(gz[i]).all() and torch.isnan(gv[i]).all(), i
    assert d[2] == 0 and ce[2] == 0 and (gz[2] == 0).all() and (gv[2] == 0).all()
    torch.testing.assert_close(d[[0, 4]], good, rtol=0, atol=0)
    torch.testing.assert_close(gz[[0, 4]], gz1, rtol=0, atol=0)
    torch.testing.assert_close(gv[[0, 4]], gv1, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_grad_z_aliases_z(name, small_block, gen):
    """In-place use: grad_z is z itself. Same results as with a separate buffer (the last sweep
    reads every element, and z_y for CE, before writing it); multi-block rows, labels with CE."""
    z, v = rand_logits((4, 37), gen=gen), rand_logits((4, 37), gen=gen)
    zp = rand_logits((4, 37), gen=gen)
    labels = torch.tensor([5, -100, 36, 17])
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        zd, vd, zpd = z.to(dtype), v.to(dtype), zp.to(dtype)
        d0, ce0, gz0, gv0 = call(name, zd.clone(), vd, labels, zp=zpd)
        zz = zd.clone()
        d1, ce1, gz1, gv1 = call(name, zz, vd, labels, zp=zpd, grad_z=zz)
        assert gz1.data_ptr() == zz.data_ptr()
        for a, b in [(d0, d1), (ce0, ce1), (gz0, gz1), (gv0, gv1)]:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["kd", "dkd", "lm", "ls_kd", "jsd", "retro_kd"])
def test_strided_rows_and_partial_grads(name, small_block, gen):
    """Row strides larger than C for z, v, zp and the gradient buffers (no copy), and each gradient
    asked for alone: the same values as contiguous rows with both gradients."""
    bz, bv, bp = (rand_logits((4, 60), gen=gen) for _ in range(3))
    z, v, zp = bz[:, 5:42], bv[:, 11:48], bp[:, 2:39]
    labels = torch.tensor([0, 36, -100, 9])
    ref = call(name, z.contiguous(), v.contiguous(), labels, zp=zp.contiguous())
    gzb, gvb = torch.zeros(4, 50, dtype=z.dtype), torch.zeros(4, 45, dtype=v.dtype)
    gz, gv = gzb[:, 3:40], gvb[:, 1:38]
    n = 4
    p = PARAMS[name]
    d, ce = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    ones = torch.ones(n, dtype=torch.float64)
    triton_backend.distill_forward(z, v, zp if p.rho else None, labels, ones, ones,
                                   torch.ones(1, dtype=torch.float64), d, ce, gz, gv,
                                   p.fparams(), p.iparams())
    torch.testing.assert_close(d, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(gz, ref[2], rtol=0, atol=0)
    torch.testing.assert_close(gv, ref[3], rtol=0, atol=0)
    assert (gzb[:, :3] == 0).all() and (gzb[:, 40:] == 0).all() and (gvb[:, 38:] == 0).all()
    only_z = call(name, z, v, labels, zp=zp, need_gv=False)
    only_v = call(name, z, v, labels, zp=zp, need_gz=False)
    torch.testing.assert_close(only_z[2], ref[2], rtol=0, atol=0)
    torch.testing.assert_close(only_v[3], ref[3], rtol=0, atol=0)
    torch.testing.assert_close(only_v[0], ref[0], rtol=0, atol=0)


def test_no_labels_and_ce_off(gen):
    """labels None -> ce_out 0; has_ce 0 with labels -> ce_out 0 and no CE gradient."""
    z, v = rand_logits((3, 20), gen=gen), rand_logits((3, 20), gen=gen)
    for name in ("kd", "ttm", "dkd", "lm", "ls_kd", "jsd"):
        y = torch.tensor([1, 2, 3])
        d, ce, gz, _ = call(name, z, v, y, has_ce=False)
        assert (ce == 0).all()
        fused, _, hyper = LOSSES[name]
        zz = z.clone().requires_grad_(True)
        fused(zz, v, y, ce_weight=0.0, reduction="sum", backend="torch", **hyper).backward()
        torch.testing.assert_close(gz, zz.grad, rtol=1e-10, atol=1e-12)
        if name != "dkd":
            d2, ce2, _, _ = call(name, z, v, None)
            assert (ce2 == 0).all()
            torch.testing.assert_close(d2, d, rtol=0, atol=0)


def test_launch_config():
    bs, nw = triton_backend.block_size, triton_backend.num_warps_for
    assert bs(1, 8192) == 16 and bs(37, 8192) == 64 and bs(32000, 8192) == 8192
    assert bs(37, 16) == 16 and bs(3, 4) == 4
    assert [nw(b) for b in (16, 1024, 2048, 4096, 8192, 16384)] == [4, 4, 4, 8, 16, 16]
    with pytest.raises(ValueError, match="power of two"):
        bs(10, 12)
