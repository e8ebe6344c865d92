"""One source for the kernel kinds and the parameter layout: ``kdfast/_spec.py`` declares them
(``Kind``, ``FParam``, ``IParam``, ``TopkFParam``, ``TopkIParam``); the C++ interface
(``csrc/kernel_api.h``) and the Triton kernels (``KIND_*`` in ``kdfast/_triton/*.py``) declare them
again in their own languages. These tests parse those files and fail when a value differs."""
import glob
import os
import re

import pytest

from kdfast._spec import (Divergence, FParam, IParam, JSDTeacherStat, KernelParams, Kind, KLStat, KLTeacherStat,
                          LMStat, LSStat, LSTeacherStat, Phase, TopkFParam, TopkIParam, TopkParams)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_API = os.path.join(ROOT, "csrc", "kernel_api.h")
ENUM_ITEM = re.compile(r"(\w+)\s*=\s*(-?\d+)")


def _read(path):
    with open(path) as f:
        return re.sub(r"//[^\n]*", "", f.read())   # comments out: they may quote other values


def _cpp_enum(pattern: str) -> dict:
    """``NAME = value`` pairs of the first C++ enum body matched by ``pattern`` (a regex ending at
    its opening brace) in csrc/kernel_api.h."""
    m = re.search(pattern + r"([^}]*)\}", _read(KERNEL_API))
    assert m, f"no enum matching {pattern!r} in {KERNEL_API}"
    return {k: int(v) for k, v in ENUM_ITEM.findall(m.group(1))}


def _as_dict(e) -> dict:
    return {x.name: int(x) for x in e}


def test_cpp_kinds_are_spec_kinds():
    assert _cpp_enum(r"enum\s+class\s+Kind\s*:\s*int\s*\{") == _as_dict(Kind)


@pytest.mark.parametrize("namespace,layout", [("fparam", FParam), ("iparam", IParam),
                                              ("topk_fparam", TopkFParam), ("topk_iparam", TopkIParam)])
def test_cpp_parameter_layout_is_spec_layout(namespace, layout):
    cpp = _cpp_enum(rf"namespace\s+{namespace}\s*\{{\s*enum\s*:\s*int\s*\{{")
    assert cpp.pop("COUNT") == len(layout), namespace
    assert cpp == _as_dict(layout), namespace


@pytest.mark.parametrize("namespace,layout", [
    ("klstat", KLStat), ("klteacherstat", KLTeacherStat), ("lmstat", LMStat), ("jsdstat", JSDTeacherStat),
    ("lsstat", LSStat), ("lsteacherstat", LSTeacherStat)])
def test_cpp_stats_layout_is_spec_layout(namespace, layout):
    """The two-phase kernels' per-row statistics (kdfast/_spec.py "Two phases")."""
    cpp = _cpp_enum(rf"namespace\s+{namespace}\s*\{{\s*enum\s*:\s*int\s*\{{")
    assert cpp.pop("COUNT") == len(layout) - 1, namespace   # (the Python enums carry COUNT as a member)
    assert cpp == {k: v for k, v in _as_dict(layout).items() if k != "COUNT"}, namespace


def test_cpp_phases_are_spec_phases():
    assert _cpp_enum(r"enum\s+class\s+Phase\s*:\s*int\s*\{") == _as_dict(Phase)


def test_triton_kinds_are_spec_kinds():
    """Every ``KIND_<NAME> ... = tl.constexpr(<value>)`` of the Triton backend is ``Kind.<NAME>``, and
    every kind of the dense kernel (all but TOPK, the top-k kernel's own) is declared there."""
    found = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "kdfast", "_triton", "*.py"))):
        for name, value in re.findall(r"^KIND_(\w+)\s*(?::[^=\n]*)?=\s*(?:tl\.constexpr\()?\s*(\d+)",
                                      _read(path), re.M):
            assert found.setdefault(name, int(value)) == int(value), (path, name)
    assert found, "no KIND_* constants in kdfast/_triton"
    spec = _as_dict(Kind)
    for name, value in found.items():
        assert spec.get(name) == value, f"KIND_{name} = {value} in the Triton kernel, Kind.{name} = {spec.get(name)}"
    assert set(spec) - set(found) <= {"TOPK"}, set(spec) - set(found)


def test_divergences_are_spec_divergences():
    """The top-k kernel's divergence: ``enum class Divergence`` of csrc/kernel_api.h and the Triton
    kernel's ``DIV_<NAME>`` constants are ``kdfast._spec.Divergence``."""
    assert _cpp_enum(r"enum\s+class\s+Divergence\s*:\s*int\s*\{") == _as_dict(Divergence)
    path = os.path.join(ROOT, "kdfast", "_triton", "topk.py")
    found = {name: int(v) for name, v in re.findall(
        r"^DIV_(\w+)\s*(?::[^=\n]*)?=\s*(?:tl\.constexpr\()?\s*(\d+)", _read(path), re.M)}
    assert found == _as_dict(Divergence), found


def test_params_round_trip_through_the_layout():
    """The lists a backend gets are the fields at their layout's indices."""
    p = KernelParams(Kind.DKD, 2.0, 3.0, 4.0, wttm=True, reverse=False, rho=0.25, alpha=0.5, beta=6.0,
                     center=False, has_ce=False, ignore_index=-7)
    f, i = p.fparams(), p.iparams()
    assert (len(f), len(i)) == (len(FParam), len(IParam))
    assert f[FParam.T_STUDENT] == 2.0 and f[FParam.T_TEACHER] == 3.0 and f[FParam.RHO] == 0.25
    assert i[IParam.KIND] == Kind.DKD and i[IParam.WTTM] == 1 and i[IParam.IGNORE_INDEX] == -7
    assert KernelParams.from_lists(f, i) == p
    t = TopkParams(2.0, 4.0, renormalize=False, has_ce=True, ignore_index=3, tail=True)
    f, i = t.fparams(), t.iparams()
    assert f[TopkFParam.SCALE] == 4.0 and i[TopkIParam.RENORMALIZE] == 0 and i[TopkIParam.IGNORE_INDEX] == 3
    assert i[TopkIParam.TAIL] == 1
    assert TopkParams.from_lists(f, i) == t and t.kind == Kind.TOPK
    t = TopkParams(1.5, 1.0, renormalize=True, beta=0.25, divergence=Divergence.JSD)
    f, i = t.fparams(), t.iparams()
    assert (len(f), len(i)) == (len(TopkFParam), len(TopkIParam))
    assert f[TopkFParam.BETA] == 0.25 and i[TopkIParam.DIVERGENCE] == Divergence.JSD
    back = TopkParams.from_lists(f, i)
    assert back == t and type(back.divergence) is Divergence
