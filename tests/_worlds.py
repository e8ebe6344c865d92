"""Multi-process test worlds on loopback gloo (tests/test_vocab_parallel.py, tests/test_dtensor.py).

Each of those files is also its own worker: run as ``python FILE rank world store out`` it joins a
FileStore rendezvous at ``store`` and saves ``out/rank{r}.pt``. :func:`run_worlds` starts every rank
of every world size at once and returns {world: [per-rank results]}."""
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worlds(script: str, tmp: str, worlds=(2, 4), timeout: float = 150) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    procs = []
    t0 = time.perf_counter()
    for world in worlds:
        out = os.path.join(tmp, f"w{world}")
        os.makedirs(out)
        store = os.path.join(tmp, f"store{world}")
        for r in range(world):
            procs.append((world, r, subprocess.Popen(
                [sys.executable, os.path.abspath(script), str(r), str(world), store, out],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    failed = []
    deadline = time.time() + timeout
    for world, r, p in procs:
        try:
            text = p.communicate(timeout=max(1, deadline - time.time()))[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            for _, _, q in procs:
                if q.poll() is None:
                    q.kill()
            text = p.communicate()[0].decode(errors="replace")
            failed.append(f"world {world} rank {r}: timed out\n{text[-3000:]}")
            continue
        if p.returncode:
            failed.append(f"world {world} rank {r}: exit {p.returncode}\n{text[-3000:]}")
    assert not failed, "\n".join(failed)
    print(f"workers: {time.perf_counter() - t0:.1f} s")
    return {w: [torch.load(os.path.join(tmp, f"w{w}", f"rank{r}.pt"), weights_only=False) for r in range(w)]
            for w in worlds}
