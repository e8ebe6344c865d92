"""tests/test_cuda.py where there is no GPU (make test): every case is collected and skipped, and
every Triton case the interpreter runs has its CUDA twin there (the same number of items)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
INTERPRETER_SUITES = ["tests/test_triton.py", "tests/test_triton_multi.py", "tests/test_topk.py",
                      "tests/test_multi_teacher.py", "tests/test_fused_linear.py"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0",
                                reason="a GPU run: tests/test_cuda.py runs there")


def _pytest(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def test_every_interpreter_case_has_a_cuda_twin():
    from test_cuda import NO_DEVICE
    ids = _pytest("--collect-only", "tests/test_cuda.py", *INTERPRETER_SUITES).stdout.splitlines()
    twins = [i for i in ids if i.startswith("tests/test_cuda.py::") and "__" in i.split("::")[1]]
    interpreted = [i for i in ids if not i.startswith("tests/test_cuda.py") and "triton" in i
                   and i.split("::")[-1].split("[")[0] not in NO_DEVICE]
    assert len(interpreted) >= 150 and len(twins) == len(interpreted), (len(twins), len(interpreted))


def test_cuda_cases_are_collected_and_skipped():
    last = _pytest("-rs", "tests/test_cuda.py").stdout.strip().splitlines()[-1]
    m = re.match(r"(\d+) skipped(, \d+ warnings?)? in ", last)
    assert m and int(m.group(1)) >= 250, last
