"""Ahead-of-time compile of the Triton kernel family for sm_80 and sm_90a (no GPU needed): every
loss kind at the largest block the launcher uses (the highest register pressure), student and
teacher gradients and CE on, fp32 and bf16 inputs; ptxas must report no spills and a register count
that fits the register file at the launch's num_warps. Runs ``python -m kdfast.inspect`` in a
subprocess without TRITON_INTERPRET (conftest sets it for the interpreter tests)."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _ptxas_present() -> bool:
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.access(os.path.join(base, n), os.X_OK) for n in ("ptxas", "ptxas-blackwell"))


@pytest.mark.skipif(not _ptxas_present(), reason="Triton's bundled ptxas is not installed")
def test_aot_compile_no_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # silence 3.9's warning; fusion is the default
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "aot.json"
    r = subprocess.run([sys.executable, "-m", "kdfast.inspect", "--quick", "--arch", "80", "90",
                        "--json", str(out)], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
    print(r.stdout[-6000:], r.stderr[-3000:])
    assert out.exists(), r.stderr[-3000:]
    results = json.loads(out.read_text())
    from kdfast._triton import MAX_BLOCK, num_warps_for
    kinds = {r["combo"]["name"] for r in results if "error" not in r}
    assert {"kd", "ttm", "wttm", "dkd", "lm", "ls_kd", "jsd", "jsd_rev", "retro_kd"} <= kinds
    assert any(r.get("combo", {}).get("block") == MAX_BLOCK for r in results)
    assert {r["arch"] for r in results} == {"sm_80", "sm_90a"}
    for res in results:
        assert "error" not in res, res
        assert res["num_warps"] == num_warps_for(res["combo"]["block"])
        assert res["spill_st"] == 0 and res["spill_ld"] == 0, res["label"] + " " + res["arch"]
        assert res["regs"] <= 255 and res["regs"] * 32 * res["num_warps"] <= 65536, res
    assert r.returncode == 0
