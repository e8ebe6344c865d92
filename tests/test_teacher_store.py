"""kdfast.teacher_store: round trip, verification on read, and training from the store equal to the
online top-k loss."""
import json
import os

import pytest
import torch

import kdfast
from kdfast.teacher_store import StoreWriter, TeacherStore, precompute

V, L, K, T = 50, 7, 6, 2.0


class Teacher(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, 16, generator=g))
        self.out = torch.nn.Parameter(torch.randn(V, 16, generator=g))

    def forward(self, ids):
        return (self.emb[ids] @ self.out.T) * 2.0


def data(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, L), generator=g)


def batches(ids, bs=3, shuffle=True):
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(2)) if shuffle else torch.arange(len(ids))
    for i in range(0, len(ids), bs):
        s = order[i:i + bs]
        yield ids[s], s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip(tmp_path, dtype):
    ids, teacher = data(), Teacher()
    store = precompute(teacher, batches(ids), tmp_path / "s", num_samples=len(ids), seq_len=L, k=K,
                       temperature=T, dtype=dtype, progress=False)
    assert (store.num_samples, store.seq_len, store.k, store.vocab_size, store.dtype, store.temperature) == \
        (len(ids), L, K, V, dtype, T)
    s = torch.tensor([4, 0, 9])
    lp, idx = store.get(s)
    assert lp.shape == idx.shape == (3, L, K) and lp.dtype == dtype and idx.dtype == torch.int64
    with torch.no_grad():
        want_lp, want_idx = torch.log_softmax(teacher(ids[s]) / T, -1).topk(K, -1)
    assert torch.equal(idx, want_idx) and torch.equal(lp, want_lp.to(dtype))
    one_lp, one_idx = store[9]
    assert torch.equal(one_lp, lp[2]) and torch.equal(one_idx, idx[2])
    # reopened with every expectation
    TeacherStore(tmp_path / "s", vocab_size=V, k=K, seq_len=L, num_samples=len(ids), dtype=dtype, temperature=T)


def test_training_from_store_equals_online(tmp_path):
    """The loss and the student's gradient from the store equal the online top-k loss on the same
    teacher (its top-k rounded to the store's dtype), tail and all."""
    ids, teacher = data(), Teacher()
    store = precompute(teacher, batches(ids), tmp_path / "s", num_samples=len(ids), seq_len=L, k=K,
                       temperature=T, progress=False)
    student = torch.nn.Linear(16, V).double()
    emb = torch.randn(V, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    s = torch.tensor([1, 3, 8, 2])
    y = torch.roll(ids[s], -1, 1)
    y[:, -1] = -100   # causal shift: the last position has no next token
    kw = dict(temperature=T, renormalize=False, tail=True)
    # online
    with torch.no_grad():
        on_lp, on_idx = torch.log_softmax(teacher(ids[s]) / T, -1).topk(K, -1)
    z1 = student(emb[ids[s]])
    a = kdfast.topk_kd_loss(z1, on_lp.to(torch.bfloat16), on_idx, y, **kw)
    ga = torch.autograd.grad(a, student.weight)[0]
    # from the store
    lp, idx = store.get(s)
    z2 = student(emb[ids[s]])
    b = kdfast.topk_kd_loss(z2, lp, idx, y, validate=False, **kw)
    gb = torch.autograd.grad(b, student.weight)[0]
    assert a.item() == b.item() and torch.equal(ga, gb)
    # and close to the full-vocabulary kd loss at T (top-6 of 50 plus the tail bucket is not exact)
    assert b.item() > 0


def test_verification_errors(tmp_path):
    ids, teacher = data(), Teacher()
    p = tmp_path / "s"
    precompute(teacher, batches(ids), p, num_samples=len(ids), seq_len=L, k=K, temperature=T, progress=False)
    for kw, what in [({"vocab_size": V + 1}, "vocab_size"), ({"k": K + 1}, "k = "), ({"seq_len": 3}, "seq_len"),
                     ({"num_samples": 3}, "num_samples"), ({"temperature": 1.0}, "temperature"),
                     ({"dtype": torch.float16}, "dtype")]:
        with pytest.raises(ValueError, match=what):
            TeacherStore(p, **kw)
    with pytest.raises(ValueError, match="in \\[0, 10\\)"):
        TeacherStore(p).get([10])
    # a truncated data file
    with open(p / "indices.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="indices.bin: 100 bytes"):
        TeacherStore(p)
    # header: wrong format / version; no header at all
    q = tmp_path / "q"
    precompute(teacher, batches(ids), q, num_samples=len(ids), seq_len=L, k=K, progress=False)
    h = json.loads((q / "header.json").read_text())
    (q / "header.json").write_text(json.dumps({**h, "version": 99}))
    with pytest.raises(ValueError, match="version"):
        TeacherStore(q)
    (q / "header.json").write_text(json.dumps({**h, "dtype": "float32"}))
    with pytest.raises(ValueError, match="dtype"):
        TeacherStore(q)
    with pytest.raises(ValueError, match="not a teacher store"):
        TeacherStore(tmp_path / "nothing")


def test_incomplete_store(tmp_path):
    ids, teacher = data(), Teacher()
    p = tmp_path / "s"
    with StoreWriter(p, num_samples=len(ids), seq_len=L, k=K, vocab_size=V) as w:
        w.write_logits(torch.tensor([0, 1]), teacher(ids[:2]).detach())
    with pytest.raises(ValueError, match="incomplete"):
        TeacherStore(p)
    st = TeacherStore(p, allow_incomplete=True)
    st.get([0, 1])
    with pytest.raises(ValueError, match="never written"):
        st.get([1, 2])


def test_shorter_sequences_are_padding(tmp_path):
    """Positions beyond a batch's length are padding (-inf on distinct classes): no teacher mass,
    the tail loss there is 0."""
    p = tmp_path / "s"
    with StoreWriter(p, num_samples=2, seq_len=5, k=3, vocab_size=V, temperature=1.0) as w:
        w.write_logits([0, 1], torch.randn(2, 3, V))
    lp, idx = TeacherStore(p).get([0, 1])
    assert torch.isinf(lp[:, 3:]).all() and torch.isfinite(lp[:, :3]).all()
    z = torch.randn(2, 5, V)
    d = kdfast.topk_kd_loss(z, lp, idx, renormalize=False, tail=True, reduction="none")
    assert (d[:, 3:].abs() <= 1e-6).all() and (d[:, :3] > 0).all()


def test_writer_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="k = 9 exceeds"):
        StoreWriter(tmp_path / "a", num_samples=2, seq_len=3, k=9, vocab_size=8)
    with pytest.raises(ValueError, match="dtype"):
        StoreWriter(tmp_path / "b", num_samples=2, seq_len=3, k=2, vocab_size=8, dtype=torch.float32)
    w = StoreWriter(tmp_path / "c", num_samples=2, seq_len=3, k=2, vocab_size=8)
    with pytest.raises(ValueError, match="\\(batch, seq_len, 8\\)"):
        w.write_logits([0], torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match="in \\[0, 2\\)"):
        w.write_logits([2], torch.randn(1, 3, 8))
    w.close()


def test_plain_progress_bar(tmp_path, capsys, monkeypatch):
    """Without tqdm a plain counter on stderr."""
    import builtins
    real = builtins.__import__

    def no_tqdm(name, *a, **k):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    ids = data(4)
    precompute(Teacher(), batches(ids, 2), tmp_path / "s", num_samples=4, seq_len=L, k=K, progress=True)
    assert "4/4 samples" in capsys.readouterr().err
