"""The CPU gradient pool (csrc/grad_pool.cpp, kdfast/_ops.py `buffer`, KDFAST_GRAD_POOL_MB)."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import kdfast
from kdfast import _cpu, _ops

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="the C++ extension is not built")

SHAPE = (1024, 4096)          # 16 MiB in float32: above the 8 MiB threshold
MIB = 1 << 20


@pytest.fixture
def pool():
    C = _cpu.load()
    C.pool_clear()
    yield C
    C.pool_set_cap(_cpu.pool_cap_bytes())
    C.pool_clear()


def test_freed_buffer_is_reused(pool):
    a = _ops.buffer(SHAPE, torch.float32, "cpu")
    ptr = a.data_ptr()
    h0 = _cpu.pool_stats()["hits"]
    del a
    assert _cpu.pool_stats()["free_blocks"] == 1
    b = _ops.buffer(SHAPE, torch.float32, "cpu")
    assert b.data_ptr() == ptr and _cpu.pool_stats()["hits"] == h0 + 1
    assert _cpu.pool_stats()["free_blocks"] == 0


def test_live_buffers_never_alias(pool):
    bufs = [_ops.buffer(SHAPE, torch.float32, "cpu") for _ in range(3)]
    for i, b in enumerate(bufs):
        b.fill_(i)
    assert len({b.data_ptr() for b in bufs}) == 3
    del bufs[1]
    c = _ops.buffer(SHAPE, torch.float32, "cpu").fill_(7)
    assert float(bufs[0][0, 0]) == 0 and float(bufs[1][0, 0]) == 2 and float(c[0, 0]) == 7


def test_small_and_other_sizes(pool):
    m0 = _cpu.pool_stats()["misses"]
    small = _ops.buffer((16, 16), torch.float32, "cpu")
    assert small.numel() == 256            # below the threshold: torch's allocator, not counted
    assert _cpu.pool_stats()["misses"] == m0
    a = _ops.buffer(SHAPE, torch.float32, "cpu")
    del a
    big = _ops.buffer((4096, 4096), torch.float32, "cpu")    # 64 MiB: not served by a 16 MiB block
    assert _cpu.pool_stats()["free_blocks"] == 1
    half = _ops.buffer((1024, 4096), torch.bfloat16, "cpu")  # 8 MiB: 16 MiB is more than 1.25x
    assert _cpu.pool_stats()["free_blocks"] == 1 and big.shape == (4096, 4096) and half.dtype == torch.bfloat16


def test_cap_bounds_the_free_blocks(pool):
    pool.pool_set_cap(40 * MIB)
    bufs = [_ops.buffer(SHAPE, torch.float32, "cpu") for _ in range(4)]   # 4 x 16 MiB
    ev0 = _cpu.pool_stats()["evictions"]
    del bufs
    s = _cpu.pool_stats()
    assert s["free_bytes"] <= 40 * MIB and s["free_blocks"] == 2 and s["evictions"] == ev0 + 2
    pool.pool_set_cap(16 * MIB)             # lowering the cap releases the excess now
    assert _cpu.pool_stats()["free_blocks"] == 1
    pool.pool_set_cap(0)                    # off: nothing is kept, buffers are plain tensors
    a = _ops.buffer(SHAPE, torch.float32, "cpu")
    del a
    assert _cpu.pool_stats()["free_blocks"] == 0


def test_training_loop_reuses_the_gradient(pool):
    torch.manual_seed(0)
    z = torch.randn(*SHAPE).requires_grad_()
    v = torch.randn(*SHAPE)
    y = torch.randint(0, SHAPE[1], (SHAPE[0],))
    ref = z.detach().clone().requires_grad_()
    kdfast.kd_loss(ref, v, y, backend="torch").backward()
    ptrs = []
    for _ in range(3):
        z.grad = None
        kdfast.kd_loss(z, v, y).backward()
        ptrs.append(z.grad.data_ptr())
        torch.testing.assert_close(z.grad, ref.grad, rtol=1e-5, atol=1e-9)
    assert ptrs[1] == ptrs[2]               # step 2 reused step 1's freed gradient
    kept = z.grad                           # a gradient the user keeps is never handed out again
    kept_copy = kept.clone()
    z.grad = None
    kdfast.kd_loss(z, v * 2, y).backward()
    assert z.grad.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, kept_copy)


def test_buffers_freed_on_other_threads(pool):
    bufs = [_ops.buffer(SHAPE, torch.float32, "cpu") for _ in range(8)]
    threads = [threading.Thread(target=bufs.pop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = _cpu.pool_stats()
    assert not bufs and s["free_blocks"] * 16 * MIB == s["free_bytes"] and s["free_blocks"] >= 1


def test_env_turns_the_pool_off():
    code = ("import torch, kdfast\nfrom kdfast import _cpu, _ops\n"
            "a = _ops.buffer((1024, 4096), torch.float32, 'cpu'); p = a.data_ptr(); del a\n"
            "print(_cpu.pool_stats()['cap'], _cpu.pool_stats()['free_blocks'])\n")
    env = {**os.environ, "KDFAST_GRAD_POOL_MB": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0"]
    env["KDFAST_GRAD_POOL_MB"] = "64"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(64 * MIB), "1"]
