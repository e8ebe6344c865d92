"""A teacher store: a teacher's top-k log-probabilities per token, computed once over a dataset and
read back by sample index, so that the student trains with :func:`kdfast.topk_kd_loss` without the
teacher in memory.

Use::

    from kdfast.teacher_store import TeacherStore, precompute

    # once: batches of (input_ids (B, L), sample_indices (B,)); the teacher returns (B, L, V) logits
    precompute(teacher, loader, "teacher-topk", num_samples=len(dataset), seq_len=L, k=64,
               temperature=2.0, dtype=torch.bfloat16)

    # training
    store = TeacherStore("teacher-topk", vocab_size=V, k=64, temperature=2.0)  # verified on open
    lp, idx = store.get(sample_indices, device="cuda")                         # (B, L, k) each
    loss = kdfast.topk_kd_loss(student(input_ids).logits, lp, idx, labels, temperature=2.0,
                               renormalize=False, tail=True, validate=False)

What is stored (``docs/spec.md``, "Teacher store"): for every sample ``s`` and position ``t`` the ``k``
largest values of ``log_softmax(teacher_logits[s, t] / T)`` (the teacher's log-probabilities at the
distillation temperature ``T``, over the full vocabulary, not renormalised over the k) and their class
ids. Hence the loss's ``renormalize=False`` (the values are used as given, at ``temperature=T``) and
``tail=True`` (the mass ``1 - sum_k p_k`` the k classes miss is one more bucket). Positions are stored
as the teacher saw them: with a causal LM, position ``t`` predicts token ``t + 1`` for the teacher and
the student alike, and the student's labels mask padding (``-100``) as they would online.

Format: a directory of three files,

- ``header.json``: format name and version, ``num_samples``, ``seq_len``, ``k``, ``vocab_size``,
  ``dtype`` (``"float16"`` or ``"bfloat16"``), ``temperature``, ``complete`` (set when the writer
  closes);
- ``logprobs.bin``: ``(num_samples, seq_len, k)`` 16-bit values, little-endian, C order (bfloat16
  stored as its raw 16 bits: numpy has no bfloat16);
- ``indices.bin``: ``(num_samples, seq_len, k)`` int32 class ids, same order;
- ``written.bin``: one byte per sample, 1 once it was written (a read of an unwritten sample raises).

Why a memory-mapped raw file and not safetensors or Arrow: the store is written in chunks as the
teacher runs (hours over a large corpus), and read one random mini-batch of samples at a time.
A fixed-stride memory map gives both directly: a sample is at a computed offset, written in place
(no whole-tensor serialisation at the end, no copy at read beyond the rows asked for, the OS page
cache shared between data-loader workers), with no dependency beyond numpy. safetensors writes a
tensor in one piece (its header holds the offsets of data written at once: no appending or filling
in place) and reads whole tensors; Arrow (pyarrow) would add a dependency and a row-group layout
made for columnar scans, with no bfloat16 type. The JSON header keeps the file self-describing and
is what the reader verifies: shape, vocabulary size, k, dtype, temperature, completeness, and the
files' sizes.

Cost: ``num_samples * seq_len * k * 6`` bytes (k = 64, 2048-token samples: 786 KiB per sample).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["TeacherStore", "StoreWriter", "precompute", "FORMAT", "VERSION"]

FORMAT = "kdfast-teacher-topk"
VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_FILES = ("logprobs.bin", "indices.bin", "written.bin")


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")


def _positive_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return x


class _Progress:
    """tqdm when installed, else a plain ``\\r done/total`` line on stderr (at most every 0.5 s)."""

    def __init__(self, total: Optional[int], desc: str, enabled: bool):
        self.n, self.total, self.desc, self.enabled = 0, total, desc, enabled
        self._bar, self._last = None, 0.0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, unit="sample")
        except ImportError:
            pass

    def update(self, n: int) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= 0.5 or (self.total is not None and self.n >= self.total):
            self._last = now
            tot = f"/{self.total}" if self.total is not None else ""
            sys.stderr.write(f"\r{self.desc}: {self.n}{tot} samples")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


# ----------------------------------------------------------------------------- writing
class StoreWriter:
    """Writes a store in chunks: :meth:`write_logits` (the teacher's logits of a batch) or
    :meth:`write_topk` (already reduced), each for a batch of sample indices; :meth:`close` marks it
    complete (a context manager closes it). Creating a writer over an existing store replaces it."""

    def __init__(self, path: Union[str, os.PathLike], *, num_samples: int, seq_len: int, k: int,
                 vocab_size: int, temperature: float = 1.0, dtype: torch.dtype = torch.bfloat16):
        self.path = os.fspath(path)
        n, L = _positive_int(num_samples, "num_samples"), _positive_int(seq_len, "seq_len")
        self.k, self.vocab_size = _positive_int(k, "k"), _positive_int(vocab_size, "vocab_size")
        if self.k > self.vocab_size:
            raise ValueError(f"k = {k} exceeds vocab_size = {vocab_size}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.dtype = dtype
        self.header = {"format": FORMAT, "version": VERSION, "num_samples": n, "seq_len": L,
                       "k": self.k, "vocab_size": self.vocab_size, "dtype": _dtype_name(dtype),
                       "temperature": self.temperature, "complete": False}
        os.makedirs(self.path, exist_ok=True)
        self._write_header()
        shape = (n, L, self.k)
        self._lp = np.memmap(os.path.join(self.path, "logprobs.bin"), dtype=np.uint16, mode="w+", shape=shape)
        self._idx = np.memmap(os.path.join(self.path, "indices.bin"), dtype=np.int32, mode="w+", shape=shape)
        self._written = np.memmap(os.path.join(self.path, "written.bin"), dtype=np.uint8, mode="w+", shape=(n,))
        self.closed = False

    def _write_header(self) -> None:
        tmp = os.path.join(self.path, "header.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.header, f, indent=1)
        os.replace(tmp, os.path.join(self.path, "header.json"))

    def _samples(self, sample_indices) -> np.ndarray:
        s = torch.as_tensor(sample_indices).reshape(-1)
        if s.dtype.is_floating_point or s.dtype == torch.bool:
            raise ValueError("sample indices must be integers")
        s = s.to("cpu", torch.int64).numpy()
        n = self.header["num_samples"]
        if s.size and (s.min() < 0 or s.max() >= n):
            raise ValueError(f"sample indices must be in [0, {n})")
        return s

    @torch.no_grad()
    def write_logits(self, sample_indices, logits: Tensor) -> None:
        """Store the top-k of ``log_softmax(logits / T)`` (float32 or wider) for a batch:
        ``logits`` ``(B, seq_len, vocab_size)`` (or ``(B, L', V)`` with ``L' <= seq_len``: the
        positions beyond are left as padding, ``-inf`` on class 0..k-1)."""
        if logits.dim() != 3 or logits.shape[-1] != self.vocab_size:
            raise ValueError(f"teacher logits must be (batch, seq_len, {self.vocab_size}), got "
                             f"{tuple(logits.shape)}")
        x = logits.float() if logits.dtype != torch.float64 else logits
        lp = torch.log_softmax(x / self.temperature, dim=-1)
        vals, idx = lp.topk(self.k, dim=-1)
        self.write_topk(sample_indices, vals, idx)

    def write_topk(self, sample_indices, logprobs: Tensor, indices: Tensor) -> None:
        """Store already reduced top-k log-probabilities ``(B, L', k)`` (at this store's temperature)
        and their classes ``(B, L', k)``, ``L' <= seq_len`` (the rest of each sample is padding)."""
        if self.closed:
            raise ValueError("the writer is closed")
        s = self._samples(sample_indices)
        L = self.header["seq_len"]
        if logprobs.dim() != 3 or logprobs.shape[0] != s.size or logprobs.shape[-1] != self.k or \
                logprobs.shape[1] > L or indices.shape != logprobs.shape:
            raise ValueError(f"logprobs and indices must be (batch = {s.size}, <= {L}, k = {self.k}), got "
                             f"{tuple(logprobs.shape)} and {tuple(indices.shape)}")
        lq = logprobs.detach().to("cpu", self.dtype).contiguous()
        iq = indices.detach().to("cpu", torch.int32).contiguous()
        Lp = lq.shape[1]
        if Lp < L:   # padding positions: -inf (no teacher mass) on k distinct classes
            pad_lp = torch.full((s.size, L - Lp, self.k), float("-inf"), dtype=self.dtype)
            pad_ix = torch.arange(self.k, dtype=torch.int32).expand(s.size, L - Lp, self.k)
            lq, iq = torch.cat([lq, pad_lp], 1), torch.cat([iq, pad_ix], 1)
        order = np.argsort(s, kind="stable")   # ascending offsets: sequential writes
        s = s[order]
        self._lp[s] = lq.view(torch.int16).numpy().view(np.uint16)[order]
        self._idx[s] = iq.numpy()[order]
        self._written[s] = 1

    def close(self) -> None:
        """Flush the data and mark the store complete when every sample was written."""
        if self.closed:
            return
        for m in (self._lp, self._idx, self._written):
            m.flush()
        missing = int((np.asarray(self._written) == 0).sum())
        self.header["complete"] = missing == 0
        self._write_header()
        del self._lp, self._idx, self._written
        self.closed = True

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _logits_of(out) -> Tensor:
    """A model's output as logits: a tensor, an object with ``.logits`` (Hugging Face), a dict with
    ``"logits"``, or a tuple whose first element is the logits."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(f"the teacher must return logits (a tensor, .logits, ['logits'] or a tuple), got "
                     f"{type(out).__name__}")


def _batch_of(batch) -> tuple:
    """(model input, sample indices) of a batch: a ``(input_ids, sample_indices)`` pair, or a dict
    with ``"sample_index"`` (or ``"sample_indices"``) whose other entries are the model's keyword
    arguments."""
    if isinstance(batch, dict):
        key = "sample_index" if "sample_index" in batch else "sample_indices"
        if key not in batch:
            raise ValueError("a dict batch needs a 'sample_index' entry")
        return {k: v for k, v in batch.items() if k != key}, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("a batch must be (input_ids, sample_indices) or a dict with 'sample_index'")


@torch.no_grad()
def precompute(teacher: Callable, batches: Iterable, path: Union[str, os.PathLike], *, num_samples: int,
               seq_len: int, k: int, temperature: float = 1.0, dtype: torch.dtype = torch.bfloat16,
               vocab_size: Optional[int] = None, progress: bool = True) -> "TeacherStore":
    """Run ``teacher`` (a callable or ``nn.Module``: ``teacher(input_ids)``, or ``teacher(**batch)``
    for dict batches) over ``batches`` and store its top-k log-probabilities at ``temperature``;
    returns the store opened for reading. ``vocab_size``: the teacher's (taken from the first batch
    when None). The batches are passed to the teacher as they come (put them on its device); each
    batch's logits are reduced there, only ``(B, L, k)`` leaves it.
    The teacher runs in eval mode under ``no_grad``."""
    writer = None
    if isinstance(teacher, torch.nn.Module):
        teacher.eval()
    bar = _Progress(num_samples, "teacher top-k", progress)
    try:
        for batch in batches:
            x, s = _batch_of(batch)
            logits = _logits_of(teacher(**x) if isinstance(x, dict) else teacher(x))
            if writer is None:
                writer = StoreWriter(path, num_samples=num_samples, seq_len=seq_len, k=k,
                                     vocab_size=vocab_size or logits.shape[-1], temperature=temperature,
                                     dtype=dtype)
            writer.write_logits(s, logits)
            bar.update(int(torch.as_tensor(s).numel()))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError("no batches")
    return TeacherStore(path)


# ----------------------------------------------------------------------------- reading
class TeacherStore:
    """A store opened for reading, verified: the header's format and version, the files' sizes
    against its shape, completeness (``allow_incomplete=False``), and each expectation given
    (``vocab_size``, ``k``, ``seq_len``, ``num_samples``, ``dtype``, ``temperature``): a
    ``ValueError`` naming what differs. ``store.get(samples)`` / ``store[samples]`` return
    ``(logprobs, indices)`` ``(B, seq_len, k)`` tensors (the stored 16-bit dtype and int64)."""

    def __init__(self, path: Union[str, os.PathLike], *, vocab_size: Optional[int] = None,
                 k: Optional[int] = None, seq_len: Optional[int] = None, num_samples: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, temperature: Optional[float] = None,
                 allow_incomplete: bool = False):
        self.path = os.fspath(path)
        hp = os.path.join(self.path, "header.json")
        if not os.path.exists(hp):
            raise ValueError(f"{self.path}: not a teacher store (no header.json)")
        with open(hp) as f:
            try:
                h = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{hp}: not valid JSON ({e})") from None
        if h.get("format") != FORMAT:
            raise ValueError(f"{hp}: format {h.get('format')!r}, expected {FORMAT!r}")
        if h.get("version") != VERSION:
            raise ValueError(f"{hp}: version {h.get('version')!r}, this kdfast reads version {VERSION}")
        for key in ("num_samples", "seq_len", "k", "vocab_size"):
            if not isinstance(h.get(key), int) or h[key] <= 0:
                raise ValueError(f"{hp}: {key} must be a positive int, got {h.get(key)!r}")
        if h.get("dtype") not in _DTYPES:
            raise ValueError(f"{hp}: dtype {h.get('dtype')!r}, expected one of {sorted(_DTYPES)}")
        self.header = h
        self.num_samples, self.seq_len, self.k = h["num_samples"], h["seq_len"], h["k"]
        self.vocab_size, self.temperature = h["vocab_size"], float(h["temperature"])
        self.dtype = _DTYPES[h["dtype"]]
        expect = {"vocab_size": vocab_size, "k": k, "seq_len": seq_len, "num_samples": num_samples,
                  "temperature": temperature}
        for key, want in expect.items():
            if want is not None and getattr(self, key) != want:
                raise ValueError(f"{self.path}: stored {key} = {getattr(self, key)!r}, expected {want!r}")
        if dtype is not None and dtype != self.dtype:
            raise ValueError(f"{self.path}: stored dtype = {self.dtype}, expected {dtype}")
        if not h.get("complete") and not allow_incomplete:
            raise ValueError(f"{self.path}: incomplete (the writer was not closed, or some samples were "
                             "never written); allow_incomplete=True reads the written ones")
        shape = (self.num_samples, self.seq_len, self.k)
        per = {"logprobs.bin": 2 * math.prod(shape), "indices.bin": 4 * math.prod(shape),
               "written.bin": self.num_samples}
        for name, size in per.items():
            p = os.path.join(self.path, name)
            got = os.path.getsize(p) if os.path.exists(p) else None
            if got != size:
                raise ValueError(f"{p}: {got} bytes, the header's shape {shape} needs {size}")
        self._lp = np.memmap(os.path.join(self.path, "logprobs.bin"), dtype=np.uint16, mode="r", shape=shape)
        self._idx = np.memmap(os.path.join(self.path, "indices.bin"), dtype=np.int32, mode="r", shape=shape)
        self._written = np.memmap(os.path.join(self.path, "written.bin"), dtype=np.uint8, mode="r",
                                  shape=(self.num_samples,))

    def __len__(self) -> int:
        return self.num_samples

    def get(self, sample_indices: Union[int, Sequence[int], Tensor], device=None) -> tuple[Tensor, Tensor]:
        """``(logprobs, indices)`` of the samples, ``(B, seq_len, k)`` each (``(seq_len, k)`` for an
        int): the stored dtype and int64, on ``device`` (copied from the map; pinned first for a CUDA
        device), ready for ``topk_kd_loss(..., renormalize=False, tail=True,
        temperature=store.temperature)``."""
        one = isinstance(sample_indices, int)
        s = torch.as_tensor([sample_indices] if one else sample_indices).reshape(-1)
        if s.dtype.is_floating_point or s.dtype == torch.bool:
            raise ValueError("sample indices must be integers")
        s = s.to("cpu", torch.int64).numpy()
        if s.size and (s.min() < 0 or s.max() >= self.num_samples):
            raise ValueError(f"sample indices must be in [0, {self.num_samples})")
        if s.size and not np.asarray(self._written[s]).all():
            raise ValueError(f"{self.path}: sample(s) {s[np.asarray(self._written[s]) == 0].tolist()[:8]} "
                             "were never written")
        lp = torch.from_numpy(np.ascontiguousarray(self._lp[s]).view(np.int16)).view(self.dtype)
        ix = torch.from_numpy(np.ascontiguousarray(self._idx[s])).long()
        if one:
            lp, ix = lp[0], ix[0]
        if device is not None and torch.device(device).type == "cuda":
            lp, ix = lp.pin_memory(), ix.pin_memory()
        if device is not None:
            lp, ix = lp.to(device, non_blocking=True), ix.to(device, non_blocking=True)
        return lp, ix

    __getitem__ = get

    def __repr__(self) -> str:
        return (f"TeacherStore({self.path!r}, num_samples={self.num_samples}, seq_len={self.seq_len}, "
                f"k={self.k}, vocab_size={self.vocab_size}, dtype={self.dtype}, "
                f"temperature={self.temperature})")
