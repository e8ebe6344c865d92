"""Ahead-of-time compile of the Triton kernel family for sm_80 and sm_90a (no GPU needed): every
loss kind at the largest block the launcher uses (the highest register pressure), student and
teacher gradients and CE on, fp32 and bf16 inputs, with the specialisation a real launch gets
(16-byte aligned pointers, C and row strides multiples of 16). The cubin Triton builds must have no
spills (ptxas' report, cuobjdump's STACK / LOCAL), a register count that fits the register file at
the launch's num_warps, and 128-bit global loads (and gradient stores) in the row sweeps. Runs
``python -m kdfast.aot`` in a subprocess without TRITON_INTERPRET (conftest sets it for the
interpreter tests)."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas_present() -> bool:
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.access(os.path.join(base, n), os.X_OK) for n in ("ptxas", "cuobjdump"))


needs_ptxas = pytest.mark.skipif(not _ptxas_present(),
                                 reason="Triton's bundled ptxas / cuobjdump are not installed")


def _inspect(tmp_path, *args) -> tuple[list, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "aot.json"
    r = subprocess.run([sys.executable, "-m", "kdfast.aot", *args, "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(r.stdout[-8000:], r.stderr[-3000:])
    assert out.exists(), r.stderr[-3000:]
    return json.loads(out.read_text()), r


def _assert_128bit(results):
    """Every load in the column loops (the bulk traffic: z, v, zp rows) and every gradient store
    there moves 128 bits per thread."""
    for res in results:
        where = res["label"] + " " + res["arch"]
        ld = {int(b): n for b, n in res["ld_loop"].items()}
        st = {int(b): n for b, n in res["st_loop"].items()}
        assert ld, "no global loads in the row loops: " + where
        assert set(ld) == {128}, f"row loads narrower than 128 bits ({ld}): {where}"
        if res["combo"]["need_gz"] or res["combo"]["need_gv"]:
            assert set(st) == {128}, f"gradient stores narrower than 128 bits ({st}): {where}"


@needs_ptxas
def test_aot_compile_no_spills_128bit(tmp_path):
    results, r = _inspect(tmp_path, "--quick", "--arch", "80", "90")
    from kdfast._triton import MAX_BLOCK, num_warps_for
    kinds = {r["combo"]["name"] for r in results if "error" not in r}
    from kdfast.aot import _LOSSES   # one case per kernel specialisation of the registry's cases
    assert set(_LOSSES) <= kinds and {"kd", "dkd", "lm", "ls_kd", "jsd", "topk_kd"} <= set(_LOSSES)
    assert any(r.get("combo", {}).get("block") == MAX_BLOCK for r in results)
    assert {r["arch"] for r in results} == {"sm_80", "sm_90a"}
    for res in results:
        assert "error" not in res, res
        where = res["label"] + " " + res["arch"]
        assert res["combo"]["classes"] % 16 == 0          # the aligned specialisation
        assert res["num_warps"] == num_warps_for(res["combo"]["block"])
        assert res["spill_st"] == 0 and res["spill_ld"] == 0, where
        assert res["stack"] == 0 and res["cubin"]["STACK"] == 0 and res["cubin"]["LOCAL"] == 0, where
        assert res["cubin"]["REG"] == res["regs"], where   # the report describes the cubin
        assert res["regs"] <= 255 and res["regs"] * 32 * res["num_warps"] <= 65536, res
    _assert_128bit(results)
    assert r.returncode == 0


@needs_ptxas
def test_128bit_rows_at_c_1000(tmp_path):
    """C = 1000 (ImageNet; not a multiple of 16, so Triton's JIT marks nothing divisible): the
    launcher passes C and the strides in VEC units (VEC = 4 fp32, 8 bf16), and the row traffic is
    128-bit all the same."""
    from kdfast._triton import launch_config
    block, _ = launch_config(1000)
    results, r = _inspect(tmp_path, "--quick", "--arch", "80", "--losses", "kd", "dkd",
                          "--dtypes", "fp32", "bf16", "--classes", "1000", "--blocks", str(block))
    assert len(results) == 4 and all("error" not in res for res in results), results
    assert all(res["aligned_spec"] for res in results)
    _assert_128bit(results)
    assert r.returncode == 0


@needs_ptxas
def test_128bit_check_fails_without_alignment(tmp_path):
    """The 128-bit assertion can fail: C = 1001 (odd: VEC = 1, nothing divisible) at the block the
    launcher picks for it gets scalar loads."""
    from kdfast._triton import launch_config
    block, _ = launch_config(1001)
    results, r = _inspect(tmp_path, "--quick", "--arch", "80", "--losses", "kd", "dkd",
                          "--dtypes", "fp32", "bf16", "--classes", "1001", "--blocks", str(block))
    assert len(results) == 4 and all("error" not in res for res in results), results
    for res in results:
        bits = {"fp32": 32, "bf16": 16}[res["combo"]["dtype"]]
        assert {int(b) for b in res["ld_loop"]} == {bits}, res
        assert not res["aligned_spec"] and not res["ld128"]
    with pytest.raises(AssertionError, match="narrower than 128 bits"):
        _assert_128bit(results)
    assert r.returncode == 0   # narrow loads are expected there: not a failure of the run


def test_ptx_access_widths():
    """The PTX classification the 128-bit check rests on (no compile)."""
    from kdfast.aot import access_bits, global_accesses
    assert access_bits(".v4.b32") == 128 and access_bits(".L1::evict_last.v4.b32") == 128
    assert access_bits(".nc.v2.b64") == 128 and access_bits(".b16") == 16
    assert access_bits(".v2.b32") == 64 and access_bits(".f32") == 32 and access_bits(".u8") == 8
    ptx = "\n".join([
        "\tld.global.b64 { %rd1 }, [ %rd2 + 0 ];",
        "$L__BB0_2:                              // %.lr.ph",
        "\t@%p10 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd3 + 0 ];",
        "\t@%p11 ld.global.b32 { %r5 }, [ %rd4 + 0 ];",
        "\t@%p12 st.global.v4.b32 [ %rd5 + 0 ], { %r1, %r2, %r3, %r4 };",
        "\t@%p45 bra \t$L__BB0_2;",
        "$L__BB0_3:",
        "\t@%p9 bra \t$L__BB0_5;",
        "\tst.global.b32 [ %rd6 + 0 ], { %r7 };",
        "$L__BB0_5:",
        "\tret;",
    ])
    acc = global_accesses(ptx)
    assert acc == {"ld_loop": {128: 1, 32: 1}, "ld_other": {64: 1},
                   "st_loop": {128: 1}, "st_other": {32: 1}}


def test_specialisation_mirrors_jit():
    """aot's integer divisibility rule is the one the installed Triton's JIT applies."""
    from kdfast.aot import _jit_int_spec
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl")
    for v in (1000, 32000, 50257, 0, 1, 16, 131072):
        ty, spec = native_specialize_impl(BaseBackend, v, False, True, True)
        assert _jit_int_spec(v) == ("constexpr" if ty == "constexpr" else spec), v
