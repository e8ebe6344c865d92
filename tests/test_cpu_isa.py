"""The CPU backend's runtime ISA dispatch: the kernel of every ISA this CPU can run (DEFAULT always,
AVX2 / AVX512 where present) gives the reference's results. Each ISA runs in a subprocess with
ATEN_CPU_CAPABILITY set, the switch ATen itself honours; the other tests use the best ISA."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kdfast import _cpu

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="kdfast._C is not built")

ORDER = ["DEFAULT", "AVX2", "AVX512"]

CHILD = r"""
import json, sys, torch, kdfast
from kdfast import _cpu, reference as R
torch.manual_seed(int(sys.argv[1]))
out = {"isa": _cpu.isa(), "err": {}}
# C = 203: full blocks of the 8- and 16-lane kernels plus a ragged tail; N rows across threads
N, C = 7, 203
z = 3 * torch.randn(N, C, dtype=torch.float64); v = 3 * torch.randn(N, C, dtype=torch.float64)
zp = 3 * torch.randn(N, C, dtype=torch.float64)
y = torch.randint(0, C, (N,)); y[2] = -100
cases = {
    "kd": (kdfast.kd_loss, R.kd_loss, {}),
    "wttm": (kdfast.wttm_loss, R.wttm_loss, {}),
    "dkd": (kdfast.dkd_loss, R.dkd_loss, {"beta": 4.0}),
    "lm": (kdfast.logit_matching_loss, R.logit_matching_loss, {}),
    "ls_kd": (kdfast.ls_kd_loss, R.ls_kd_loss, {}),
    "jsd": (kdfast.jsd_loss, R.jsd_loss, {"beta": 0.3}),
    "retro_kd": (lambda a, b, l, **k: kdfast.retro_kd_loss(a, b, zp.to(a.dtype), l, **k),
                 lambda a, b, l, **k: R.retro_kd_loss(a, b, zp.to(a.dtype), l, **k), {}),
}
for name, (f, r, kw) in cases.items():
    for dt in (torch.float64, torch.float32, torch.bfloat16):
        a = z.to(dt).detach().clone().requires_grad_(); b = v.to(dt).detach().clone().requires_grad_()
        loss = f(a, b, y, backend="cpu", **kw); loss.backward()
        a64 = a.detach().double().requires_grad_(); b64 = b.detach().double().requires_grad_()
        ref = r(a64, b64, y, **kw); ref.backward()
        out["err"][f"{name}/{dt}"] = [abs(loss.double().item() - ref.item()) / max(abs(ref.item()), 1e-12),
            ((a.grad.double() - a64.grad).abs().max() / a64.grad.abs().max()).item(),
            ((b.grad.double() - b64.grad).abs().max() / b64.grad.abs().max()).item()]
# the kernel's own vector log (JSD's log m): ulps against float64 over random positive floats, normal
# and subnormal, and near 1; the special values exactly
bits = torch.randint(1, 0x7f800000, (1 << 20,), dtype=torch.int32)
x = torch.cat([bits.view(torch.float32), 1 + (torch.rand(1 << 16) - 0.5) / 64])
ref = x.double().log()
ulp = (torch.nextafter(ref.float().abs(), torch.tensor(float("inf"))) - ref.float().abs()).double()
ok = ref != 0
out["log_ulp"] = ((_cpu.load().vec_log(x).double() - ref).abs()[ok] / ulp[ok]).max().item()
sp = torch.tensor([0.0, -0.0, float("inf"), -1.0, float("nan"), 1.0])
out["log_special"] = [str(t) for t in _cpu.load().vec_log(sp).tolist()]
print(json.dumps(out))
"""

BOUND = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def runnable():
    best = torch.backends.cpu.get_cpu_capability()
    return ORDER[: ORDER.index(best) + 1] if best in ORDER else ["DEFAULT"]


@pytest.mark.parametrize("isa", ORDER)
def test_isa_kernel_matches_reference(isa):
    if isa not in runnable():
        pytest.skip(f"this CPU cannot run the {isa} kernel")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa.lower(), OMP_NUM_THREADS="2")
    seed = int.from_bytes(os.urandom(4), "little")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(seed)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["isa"] == isa
    for key, errs in out["err"].items():
        dt = getattr(torch, key.split("/")[1].replace("torch.", ""))
        # bf16 inputs: the fused kernel rounds each gradient once; the bound is that rounding
        assert max(errs) <= BOUND[dt], (isa, key, errs, seed)
    # the inline log is measured at <= 2 ulp (Sleef / libm in DEFAULT: <= 1)
    assert out["log_ulp"] <= 2.5, (isa, out["log_ulp"], seed)
    assert out["log_special"] == ["-inf", "-inf", "inf", "nan", "nan", "0.0"], out["log_special"]


@pytest.mark.parametrize("isa", ORDER)
def test_randomised_suite_per_isa(isa):
    """tests/test_random.py's CPU cases with the kernel of each other ISA this CPU can run (the main
    run uses the best one): the lane count changes how sums round (8-lane sums once made a small CE
    lose 4.8x plain float32's accuracy), and the DEFAULT build's emulated fmadd rounds twice."""
    if isa not in runnable():
        pytest.skip(f"this CPU cannot run the {isa} kernel")
    if isa == runnable()[-1]:
        pytest.skip("tests/test_random.py itself runs with this ISA")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa.lower())
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(here, "test_random.py"), "-k", "cpu"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (isa, proc.stdout[-4000:], proc.stderr[-2000:])
    assert " passed" in proc.stdout, proc.stdout[-2000:]
