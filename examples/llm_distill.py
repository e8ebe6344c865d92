"""Distil a small causal LM into a smaller one on the Python standard library's own sources, in Hugging
Face trainers, on the CPU, with nothing downloaded.

The data: the ``.py`` files at the top level of this interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``; CPython 3.11: 168 files, 4.7 MB), sorted by name; every 10th
file (by that order) is the validation set, the rest the training set: a split by file, so no
validation function was seen in training. The text differs between Python versions, so the numbers
below are for CPython 3.11.7.

The tokenizer: a byte-level BPE (``tokenizers``) trained on the training files, vocabulary 8192,
cached in ``--work-dir``. Each split's files are tokenized, joined with an end-of-text token and cut
into sequences of ``seq_len`` tokens; the validation set is the first ``val_seqs`` of its sequences.

The models: ``transformers`` Llama configurations, random initialisation. The teacher (hidden 192,
4 layers, 4 heads, 4.9 M parameters, 3.1 M of them the embedding and the head) trains here first
with cross-entropy on the whole training set (150 steps x 16 x 128 tokens; cached in the work dir for
later runs with the same configuration, ``--fresh-teacher`` retrains); the student (hidden 96,
2 layers, 1.8 M parameters) then trains in each run with the same budget: the same initial weights
(seed), the same ``student_steps`` x ``batch`` x ``seq_len`` training tokens (60 x 16 x 128: the first
sequences of a fixed shuffle of the training set, in the same order), AdamW (lr 2e-3, cosine, 5 %
warm-up, weight decay 0.01, gradient norm clipped at 1). The sizes are what a loaded 2-core machine
trains in about 15 minutes: the teacher is far from converged, the students more so. The runs:

1. ``ce``: ``transformers.Trainer``, the model's own cross-entropy;
2. ``kd``: ``kdfast.integrations.transformers.DistillationTrainer`` with ``loss="kd"`` online (the
   teacher runs every step): ``0.5 CE + 0.5 KL(teacher || student)`` per token at T = 1;
3. ``gkd_jsd``: ``kdfast.integrations.trl.GKDTrainer`` (TRL's ``GKDTrainer`` on kdfast's fused
   generalised JSD) with ``lmbda=0`` (the dataset's sequences, no generation), ``beta=0.5``: the
   JSD alone, no CE (TRL's GKD loss);
4. ``topk``: offline. The teacher's top-k (k = 32) log-probabilities at T = 1 of every training
   token are computed once into a ``kdfast.teacher_store`` (a memory-mapped file in the work dir),
   then the student trains without calling the teacher (it stays in this process only for the other
   runs; its memory is counted before the peak, not in it) in a ``Trainer`` whose loss is
   ``kdfast.topk_kd_loss(..., renormalize=False, tail=True)`` from the store (the mass outside the
   k classes as one more bucket), mixed like ``kd``: ``0.5 CE + 0.5 KL``. Needs
   ``kdfast/teacher_store.py`` and ``topk_kd_loss(tail=...)``; without them the row says "not
   available".

For each run: the validation perplexity (exp of the mean next-token cross-entropy over the validation
tokens) at a few points and at the end, the training tokens per second (``trainer.train()``'s wall
time, including the teacher's forward for the online runs, excluding the evaluations) and the peak
memory growth (``VmHWM`` of ``/proc/self/status`` after ``trainer.train()``, minus ``VmRSS`` before
it, the peak reset by writing ``5`` to ``/proc/self/clear_refs`` just before). A markdown table and a
plot (``llm_distill.md``, ``llm_distill.png`` in ``--out-dir``).

    python examples/llm_distill.py                  # the full run (about 15 min on 2 loaded cores)
    python examples/llm_distill.py --quick          # tiny models, a few steps: under a minute
    python examples/llm_distill.py --runs ce,kd     # a subset

``tests/test_examples.py`` runs ``--quick``. The recorded full run and its discussion:
``examples/llm_distill.md``.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ("ce", "kd", "gkd_jsd", "topk")
PAD, EOS = "<|pad|>", "<|endoftext|>"

CONFIGS = {
    "full": dict(
        vocab=8192, seq_len=128, batch=16, val_seqs=64, max_files=None,
        teacher=dict(hidden=192, layers=4, heads=4), teacher_steps=150, teacher_lr=2e-3,
        student=dict(hidden=96, layers=2, heads=4), student_steps=60, student_lr=2e-3,
        evals=4, k=32, temperature=1.0),
    "quick": dict(
        vocab=300, seq_len=32, batch=4, val_seqs=8, max_files=12,
        teacher=dict(hidden=32, layers=1, heads=2), teacher_steps=12, teacher_lr=3e-3,
        student=dict(hidden=16, layers=1, heads=2), student_steps=6, student_lr=3e-3,
        evals=2, k=8, temperature=1.0),
}
SEED = 0
KD_WEIGHTS = dict(kd_weight=0.5, ce_weight=0.5)   # kd and topk: 0.5 CE + 0.5 KL
GKD_BETA = 0.5


# ----------------------------------------------------------------------------- memory and machine
def _status(key: str) -> float:
    """A ``/proc/self/status`` field in MiB (NaN where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak() -> float:
    """Reset the peak RSS (``VmHWM``) to the current RSS; returns the current RSS (MiB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    return (f"{cpu}, {os.cpu_count()} cores visible, ISA {isa}, torch {torch.__version__} "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


# ----------------------------------------------------------------------------- data
def stdlib_files(max_files=None) -> tuple[list[str], list[str]]:
    """(train, validation) paths: the stdlib's top-level .py files sorted by name, every 10th for
    validation. ``max_files``: the first ones only (the quick version)."""
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if max_files:
        files = files[:max_files]
    if len(files) < 2:
        raise RuntimeError(f"no standard library sources found under {root}")
    val = files[::10]
    train = [f for f in files if f not in set(val)]
    return train, val


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def get_tokenizer(train_files: list[str], vocab: int, work_dir: str):
    """A byte-level BPE trained on the training files, cached as ``tokenizer-<vocab>-<n files>.json``;
    returned as a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    path = os.path.join(work_dir, f"tokenizer-{vocab}-{len(train_files)}.json")
    if not os.path.exists(path):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[PAD, EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((read(f) for f in train_files), trainer=trainer)
        tok.save(path + ".tmp")
        os.replace(path + ".tmp", path)
    return PreTrainedTokenizerFast(tokenizer_file=path, pad_token=PAD, eos_token=EOS)


def sequences(tokenizer, files: list[str], seq_len: int) -> torch.Tensor:
    """The files tokenized, each followed by EOS, concatenated and cut into (n, seq_len) rows."""
    ids = []
    for enc in tokenizer(([read(f) for f in files]), add_special_tokens=False)["input_ids"]:
        ids += enc + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)


# ----------------------------------------------------------------------------- models, trainers
def llama(vocab: int, seq_len: int, hidden: int, layers: int, heads: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(8 * hidden / 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=seq_len, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def perplexity(model, val: torch.Tensor, batch: int = 32) -> float:
    """exp(mean next-token cross-entropy) over every position of ``val`` that has a next token."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, val.shape[0], batch):
        x = val[i:i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                   reduction="sum").item()
        count += x[:, 1:].numel()
    model.train(was)
    return math.exp(total / count)


def collate(feats):
    """input_ids, attention_mask, labels (= input_ids: the trainers shift them), the sample index
    (the teacher store's key) and the prompt fields TRL's GKD trainer reads (empty-ish: lmbda=0 never
    generates)."""
    x = torch.tensor([f["input_ids"] for f in feats])
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone(),
            "sample_index": torch.tensor([f["sample_index"] for f in feats]),
            "prompts": x[:, :1], "prompt_attention_mask": torch.ones(len(feats), 1, dtype=torch.long)}


def _training_args(cls, cfg: dict, work_dir: str, steps: int, lr: float, **extra):
    return cls(output_dir=os.path.join(work_dir, "trainer"), max_steps=steps,
               per_device_train_batch_size=cfg["batch"], learning_rate=lr, weight_decay=0.01,
               lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), max_grad_norm=1.0,
               seed=SEED, data_seed=SEED, use_cpu=True, report_to="none", save_strategy="no",
               logging_steps=max(1, steps // 20), disable_tqdm=True, dataloader_num_workers=0,
               remove_unused_columns=False, **extra)


def _model_inputs(inputs: dict) -> dict:
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
            "labels": inputs["labels"]}


def _make_classes():
    """Trainer subclasses defined once transformers is imported: the plain one drops the collator's
    extra fields before the model sees them; the offline one reads the teacher store."""
    from transformers import Trainer

    from kdfast.integrations.trl import shift_labels

    class CETrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, _model_inputs(inputs), return_outputs, num_items_in_batch)

    class TopKStoreTrainer(Trainer):
        """``0.5 CE + 0.5 KL`` against the stored top-k teacher, per token, summed and divided by the
        Trainer's ``num_items_in_batch``."""

        def __init__(self, *a, store, topk_loss, **kw):
            import inspect
            self.store, self.topk_loss = store, topk_loss
            self.takes_count = "num_items_in_batch" in inspect.signature(topk_loss).parameters
            super().__init__(*a, **kw)
            self.model_accepts_loss_kwargs = True   # count num_items_in_batch, no extra division

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            lp, idx = self.store.get(inputs["sample_index"])
            kw = dict(temperature=self.store.temperature, renormalize=False, tail=True, validate=False,
                      **KD_WEIGHTS)
            y = shift_labels(inputs["labels"])
            if num_items_in_batch is None:
                loss = self.topk_loss(out.logits, lp, idx, y, **kw)
            elif self.takes_count:
                loss = self.topk_loss(out.logits, lp, idx, y, num_items_in_batch=num_items_in_batch, **kw)
            else:   # a kdfast without num_items_in_batch= on its losses: the same value, divided here
                loss = self.topk_loss(out.logits, lp, idx, y, reduction="sum", **kw) / num_items_in_batch
            return (loss, out) if return_outputs else loss

    return CETrainer, TopKStoreTrainer


def _eval_callback(val, every: int, curve: list, clock: list):
    """Validation perplexity every ``every`` steps into ``curve`` as (step, ppl); the seconds it
    took added to ``clock[0]`` (subtracted from the training time)."""
    from transformers import TrainerCallback

    class EvalCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                t0 = time.perf_counter()
                curve.append((state.global_step, perplexity(model, val)))
                clock[0] += time.perf_counter() - t0

    return EvalCallback()


def train(trainer_fn, model, val, steps: int, evals: int) -> dict:
    """Build the trainer (``trainer_fn(callbacks)``), train, measure."""
    curve, clock = [(0, perplexity(model, val))], [0.0]
    from transformers.trainer_callback import PrinterCallback
    trainer = trainer_fn([_eval_callback(val, max(1, steps // evals), curve, clock)])
    trainer.remove_callback(PrinterCallback)   # the per-log dicts on stdout
    rss0 = reset_peak()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    wall = time.perf_counter() - t0
    peak = _status("VmHWM")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"curve": curve, "ppl": curve[-1][1], "train_s": wall - clock[0], "peak_growth_mib": peak - rss0,
            "rss_before_mib": rss0, "train_loss": losses}


def topk_api():
    """(teacher_store module, topk_kd_loss) when this kdfast has the offline top-k path with the
    tail bucket, else (None, why)."""
    import inspect

    import kdfast
    try:
        from kdfast import teacher_store
    except ImportError as e:
        return None, f"kdfast.teacher_store is missing ({e})"
    fn = getattr(kdfast, "topk_kd_loss", None)
    if fn is None:
        return None, "kdfast.topk_kd_loss is missing"
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind == p.VAR_KEYWORD for p in params.values()) and "tail" not in params:
        return None, "kdfast.topk_kd_loss has no tail= option"
    return teacher_store, fn


# ----------------------------------------------------------------------------- the experiment
def run(cfg: dict, runs, work_dir: str, log=print, reuse_teacher: bool = True) -> dict:
    import datasets
    from transformers import TrainingArguments

    from kdfast.integrations.transformers import DistillationTrainer
    CETrainer, TopKStoreTrainer = _make_classes()
    os.makedirs(work_dir, exist_ok=True)
    res = {"config": cfg, "runs": {}, "load_before": load_average()}
    t_all = time.perf_counter()

    # data and tokenizer
    t0 = time.perf_counter()
    train_files, val_files = stdlib_files(cfg["max_files"])
    tok = get_tokenizer(train_files, cfg["vocab"], work_dir)
    vocab = len(tok)
    train_all = sequences(tok, train_files, cfg["seq_len"])
    val = sequences(tok, val_files, cfg["seq_len"])[:cfg["val_seqs"]]
    n_student = cfg["student_steps"] * cfg["batch"]
    g = torch.Generator().manual_seed(SEED)
    train_all = train_all[torch.randperm(train_all.shape[0], generator=g)]
    if train_all.shape[0] < n_student:
        raise RuntimeError(f"{train_all.shape[0]} training sequences, the student budget needs {n_student}")
    student_set = train_all[:n_student]
    res["data"] = {"train_files": len(train_files), "val_files": len(val_files), "vocab": vocab,
                   "train_seqs": train_all.shape[0], "student_seqs": n_student, "val_seqs": val.shape[0],
                   "seq_len": cfg["seq_len"], "prep_s": time.perf_counter() - t0}
    log(f"data: {len(train_files)} train / {len(val_files)} validation files; BPE vocabulary {vocab}; "
        f"{train_all.shape[0]} training sequences of {cfg['seq_len']} tokens (the student's budget: the "
        f"first {n_student}), {val.shape[0]} validation sequences; {res['data']['prep_s']:.1f} s")

    def dataset(x):
        return datasets.Dataset.from_dict({"input_ids": x.tolist(), "sample_index": list(range(x.shape[0]))})

    # teacher
    tc, sc = cfg["teacher"], cfg["student"]
    teacher = llama(vocab, cfg["seq_len"], seed=SEED + 1, **tc)
    t_steps = cfg["teacher_steps"]
    key = "teacher-" + "-".join(str(cfg[k]) for k in ("vocab", "seq_len", "batch", "teacher_steps", "teacher_lr"))
    key = os.path.join(work_dir, key + "-" + "-".join(str(v) for v in tc.values()) + f"-{len(train_files)}")
    if reuse_teacher and os.path.exists(key + ".json"):
        teacher.load_state_dict(torch.load(key + ".pt"))
        with open(key + ".json") as f:
            t_res = json.load(f)
        t_res["cached"] = True
    else:
        t_res = train(lambda cbs: CETrainer(
            model=teacher, args=_training_args(TrainingArguments, cfg, work_dir, t_steps, cfg["teacher_lr"]),
            train_dataset=dataset(train_all), data_collator=collate, callbacks=cbs),
            teacher, val, t_steps, cfg["evals"])
        t_res["params"] = n_params(teacher)
        t_res["tokens_per_s"] = t_steps * cfg["batch"] * cfg["seq_len"] / t_res["train_s"]
        torch.save(teacher.state_dict(), key + ".pt")
        with open(key + ".json", "w") as f:
            json.dump(t_res, f)
    teacher.eval().requires_grad_(False)
    res["teacher"] = t_res
    log(f"teacher: Llama hidden {tc['hidden']}, {tc['layers']} layers, {t_res['params'] / 1e6:.2f} M "
        f"parameters; {t_steps} steps x {cfg['batch']} x {cfg['seq_len']} tokens in {t_res['train_s']:.1f} s"
        f"{' (an earlier run: cached in the work dir)' if t_res.get('cached') else ''}; "
        f"validation perplexity {t_res['ppl']:.2f}")

    tokens = n_student * cfg["seq_len"]
    for name in runs:
        student = llama(vocab, cfg["seq_len"], seed=SEED, **sc)
        lr = cfg["student_lr"]
        ds = dataset(student_set)
        extra = {}
        if name == "ce":
            def fn(cbs):
                return CETrainer(model=student, args=_training_args(TrainingArguments, cfg, work_dir, cfg["student_steps"], lr),
                                 train_dataset=ds, data_collator=collate, callbacks=cbs)
        elif name == "kd":
            def fn(cbs):
                return DistillationTrainer(
                    model=student, teacher_model=teacher,
                    args=_training_args(TrainingArguments, cfg, work_dir, cfg["student_steps"], lr),
                    train_dataset=ds, data_collator=collate, callbacks=cbs, loss="kd",
                    loss_kwargs={"temperature": cfg["temperature"]}, **KD_WEIGHTS)
        elif name == "gkd_jsd":
            from kdfast.integrations.trl import GKDTrainer
            from trl.experimental.gkd import GKDConfig

            def fn(cbs):
                args = _training_args(GKDConfig, cfg, work_dir, cfg["student_steps"], lr, lmbda=0.0,
                                      beta=GKD_BETA, max_length=cfg["seq_len"])
                return GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                  data_collator=collate, processing_class=tok, callbacks=cbs)
        elif name == "topk":
            store_mod, topk_loss = topk_api()
            if store_mod is None:
                log(f"topk: not available: {topk_loss}")
                res["runs"][name] = {"unavailable": topk_loss}
                continue
            # once: the teacher's top-k log-probabilities of every student training token, then no
            # teacher in the run (it stays in this process for the other runs; the run never calls it)
            path = os.path.join(work_dir, "teacher-topk")
            t0 = time.perf_counter()
            rss0 = reset_peak()
            bs = 32
            batches = ((student_set[i:i + bs], torch.arange(i, min(i + bs, n_student)))
                       for i in range(0, n_student, bs))
            store = store_mod.precompute(teacher, batches, path, num_samples=n_student, seq_len=cfg["seq_len"],
                                         k=cfg["k"], temperature=cfg["temperature"], dtype=torch.bfloat16,
                                         vocab_size=vocab, progress=False)
            extra = {"precompute_s": time.perf_counter() - t0,
                     "precompute_peak_growth_mib": _status("VmHWM") - rss0,
                     "store_mib": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20}
            store = store_mod.TeacherStore(path, vocab_size=vocab, k=cfg["k"], num_samples=n_student,
                                           seq_len=cfg["seq_len"], temperature=cfg["temperature"])

            def fn(cbs):
                return TopKStoreTrainer(
                    model=student, args=_training_args(TrainingArguments, cfg, work_dir, cfg["student_steps"], lr),
                    train_dataset=ds, data_collator=collate, callbacks=cbs, store=store, topk_loss=topk_loss)
        else:
            raise ValueError(f"unknown run {name!r}; choose from {RUNS}")
        r = train(fn, student, val, cfg["student_steps"], cfg["evals"])
        r.update(extra)
        r["params"] = n_params(student)
        r["tokens_per_s"] = tokens / r["train_s"]
        res["runs"][name] = r
        log(f"{name}: validation perplexity {r['ppl']:.2f}; {r['tokens_per_s']:.0f} tokens/s; peak memory "
            f"+{r['peak_growth_mib']:.0f} MiB; {r['train_s']:.1f} s"
            + (f" (+ {extra['precompute_s']:.1f} s precompute, store {extra['store_mib']:.1f} MiB)" if extra else ""))
    res["total_s"] = time.perf_counter() - t_all
    res["load_after"] = load_average()
    return res


# ----------------------------------------------------------------------------- report
DESCRIPTION = {
    "ce": "CE only (`Trainer`)",
    "kd": "online KD, 0.5 CE + 0.5 KL, T = 1 (`DistillationTrainer`)",
    "gkd_jsd": "online JSD beta 0.5, no CE (kdfast `GKDTrainer`, lmbda 0)",
    "topk": "offline top-k + tail from the store, 0.5 CE + 0.5 KL (`Trainer` + `topk_kd_loss`)",
}


def table(res: dict) -> str:
    runs = res["runs"]
    ce = runs.get("ce", {}).get("ppl")
    lines = ["| run | validation ppl | vs CE only | tokens/s | peak memory growth (MiB) |",
             "|---|--:|---|--:|--:|"]
    t = res["teacher"]
    lines.append(f"| teacher ({t['params'] / 1e6:.2f} M params, CE) | {t['ppl']:.2f} | - | "
                 f"{t['tokens_per_s']:.0f} | {t['peak_growth_mib']:.0f} |")
    for name, r in runs.items():
        desc = DESCRIPTION.get(name, name)
        if "unavailable" in r:
            lines.append(f"| {desc} | not available | - | - | - |")
            continue
        if name == "ce" or ce is None:
            verdict = "-" if name == "ce" else "no CE run"
        elif r["ppl"] < ce:
            verdict = f"beats CE ({(1 - r['ppl'] / ce) * 100:.1f} % lower)"
        else:
            verdict = f"does not beat CE ({(r['ppl'] / ce - 1) * 100:.1f} % higher)"
        lines.append(f"| {desc} | {r['ppl']:.2f} | {verdict} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_growth_mib']:.0f} |")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {n: r for n, r in res["runs"].items() if "unavailable" not in r}
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.5))
    for n, r in runs.items():
        s, p = zip(*r["curve"])
        a1.plot(s, p, marker="o", label=n, color="black" if n == "ce" else None)
    a1.axhline(res["teacher"]["ppl"], ls="--", color="gray", lw=1, label="teacher")
    a1.set(xlabel="student step", ylabel="validation perplexity", yscale="log",
           title="validation perplexity during training")
    a1.legend(fontsize=8)
    names = list(runs)
    colors = ["black" if n == "ce" else "tab:blue" for n in names]
    a2.bar(names, [runs[n]["ppl"] for n in names], color=colors)
    a2.axhline(res["teacher"]["ppl"], ls="--", color="gray", lw=1)
    a2.set(ylabel="validation perplexity", title="after the last step (lower is better)")
    a3.bar(names, [runs[n]["tokens_per_s"] for n in names], color=colors)
    for i, n in enumerate(names):
        a3.annotate(f"+{runs[n]['peak_growth_mib']:.0f} MiB", (i, runs[n]["tokens_per_s"]),
                    ha="center", va="bottom", fontsize=8)
    a3.set(ylabel="training tokens / s", title="throughput (label: peak memory growth)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models and vocabulary, a few steps")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh-teacher", action="store_true",
                    help="train the teacher even when the work dir holds one trained with this configuration")
    ap.add_argument("--work-dir", default=None,
                    help="tokenizer cache, teacher store, trainer output (default: OUT_DIR/llm_distill_work)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "out"),
                    help="where llm_distill.md / .png / .json go")
    args = ap.parse_args(argv)
    runs = [n.strip() for n in args.runs.split(",") if n.strip()]
    bad = [n for n in runs if n not in RUNS]
    if bad:
        ap.error(f"unknown run(s) {bad}; choose from {list(RUNS)}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    cfg = CONFIGS["quick" if args.quick else "full"]
    os.makedirs(args.out_dir, exist_ok=True)
    work = args.work_dir or os.path.join(args.out_dir, "llm_distill_work" + ("_quick" if args.quick else ""))
    print(f"machine: {machine()}; load average {load_average()}", flush=True)
    res = run(cfg, runs, work, log=lambda s: print(s, flush=True), reuse_teacher=not args.fresh_teacher)
    res["machine"] = machine()
    tab = table(res)
    c = cfg
    md = "\n".join([
        f"# llm_distill {'--quick' if args.quick else '(full)'}", "",
        f"Machine: {res['machine']}; load average (1, 5, 15 min) {res['load_before']} before, "
        f"{res['load_after']} after; {res['total_s']:.0f} s in all.", "",
        f"Data: {res['data']['train_files']} / {res['data']['val_files']} stdlib files (train / validation), "
        f"byte-level BPE vocabulary {res['data']['vocab']}, sequences of {c['seq_len']} tokens; "
        f"{res['data']['val_seqs']} validation sequences. Teacher: Llama hidden {c['teacher']['hidden']}, "
        f"{c['teacher']['layers']} layers, {c['teacher_steps']} steps x {c['batch']} sequences. Student: "
        f"hidden {c['student']['hidden']}, {c['student']['layers']} layers, "
        f"{res['runs'][next(iter(res['runs']))].get('params', 0) / 1e6:.2f} M parameters, "
        f"{c['student_steps']} steps x {c['batch']} sequences in every run (same seed, data, order).", "",
        tab, ""])
    if "topk" in res["runs"] and "precompute_s" in res["runs"]["topk"]:
        r = res["runs"]["topk"]
        md += (f"\ntopk: the store (k = {c['k']}, bfloat16 log-probs + int32 ids) took "
               f"{r['precompute_s']:.1f} s to compute (peak +{r['precompute_peak_growth_mib']:.0f} MiB) "
               f"and holds {r['store_mib']:.1f} MiB; its tokens/s exclude that.\n")
    print("\n" + tab)
    with open(os.path.join(args.out_dir, "llm_distill.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out_dir, "llm_distill.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    plot(res, os.path.join(args.out_dir, "llm_distill.png"))
    print(f"\nwritten: {os.path.join(args.out_dir, 'llm_distill.md')}, .png, .json; {res['total_s']:.0f} s in all")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
