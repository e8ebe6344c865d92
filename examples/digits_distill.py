"""Distil an MLP teacher into a small MLP student on scikit-learn's handwritten digits, with each
kdfast loss, two teachers at once, and the ATSC recipe, on the CPU in about two minutes.

The data: ``sklearn.datasets.load_digits`` (1797 8x8 images, 10 classes; ships with scikit-learn,
nothing is downloaded), split 75 / 25 (stratified, fixed seed), pixels scaled to [0, 1]. The
teacher: 64-256-256-10 MLP trained with cross-entropy (Adam, one fixed seed). The students: 64-H-10
MLPs (H = 16 by default), SGD (lr 0.02, momentum 0.9, batch 64, gradient norm clipped at 1: without
the clipping DKD's large T^2 * beta gradients make its training erratic), trained with cross-entropy
only ("ce") and with each distillation loss mixed with cross-entropy,
``ce_weight * CE + kd_weight * D``, at the mixing weights the loss's own paper or reference code
uses (see ``LOSSES``; every other hyperparameter is kdfast's default). Two more rows:

- ``multi_teacher``: ``kdfast.multi_teacher_loss("kd", ...)`` with the teacher above and a second,
  smaller one (64-64-10, trained the same way), weights 0.5 / 0.5, and kd's setting otherwise
  (T = 4, ce 0.1, kd 0.9).
- ``atsc``: ``kdfast.recipes.ATSC(feature_kind="linear")``. The student's hidden layer (64-16, ReLU)
  is its backbone, a ``Linear(16, 256)`` projector maps it onto the teacher's last hidden layer, and
  the teacher's last linear layer is the shared classifier, which is also the student's prediction
  (``atsc.predict``; the student's own 16-10 layer is unused). Each seed gets a fresh copy of the
  pretrained teacher, which trains with the student. The recipe's weights (feature MSE 1, drift 1,
  CE 0) plus its KD term (kd_weight 1, T = 4), and the teacher at 1/100 of the student's learning
  rate (``atsc.param_groups(lr, lr / 100)``; each group's gradient norm clipped at 1 on its own).
  Why not the defaults (seeds 0 and 1, 40 epochs): with the MSE and drift alone (the recipe's
  default, ``kd_weight=0``) the student was still at chance (9.6 %) after 10 epochs and at 66-74 %
  after 40, whether the teacher trained at lr / 100, at lr / 10 or not at all. With the KD term and
  the teacher at lr / 10, the lower rate ``docs/recipes.md`` suggests, the KD term's gradient into
  the teacher's logits dragged the teacher from 97.8 % down to 28-32 % test accuracy within the
  first epochs, and the students ended at 58 and 76 %; ``drift_params="all"`` did not stop the drop
  (29-33 %), only let the teacher recover (students 95.6 and 97.1 %). Those settings were compared
  on this test split, so the atsc row is a tuned one.

Everything is deterministic: the split, the teachers, each student's initialisation and its
minibatch order come from fixed seeds, so a run with ``--backend torch`` (kdfast's eager
reference) follows the same training curves as the fused kernels up to floating-point rounding;
``tests/test_examples.py`` checks that step by step.

    python examples/digits_distill.py                       # all rows, 5 seeds, 40 epochs
    python examples/digits_distill.py --backend torch       # the eager reference: same curves
    python examples/digits_distill.py --losses ce,kd,dkd --seeds 3 --epochs 20 --out-dir /tmp/d

It prints a table (test accuracy after the last epoch, mean +- std over seeds; the first epoch after
which the seeds' mean test accuracy is >= 95 %; the training time per epoch) and saves
``digits_distill.png`` (test accuracy per epoch; final accuracy per loss) in ``--out-dir``.

A run (``python examples/digits_distill.py``: ``--backend auto``, i.e. the fused C++ kernels,
5 seeds (0-4), 40 epochs) on an AMD EPYC, 2 cores AVX2 shared with other work (load ~4.5),
torch 2.13.0+cpu, 1 thread; teacher 97.78 %, second teacher (64-64-10) 96.89 % test accuracy,
106 s in all:

| loss | test acc % (mean +- std, 5 seeds) | epochs to 95 % | ms / epoch |
|---|--:|--:|--:|
| ce | 97.11 +- 0.16 | 16 | 19.8 |
| kd | 97.29 +- 0.33 | 11 | 35.1 |
| ttm | 97.16 +- 0.10 | 9 | 38.9 |
| wttm | 97.11 +- 0.16 | 9 | 38.4 |
| dkd | 96.71 +- 0.40 | 14 | 33.7 |
| ls_kd | 97.07 +- 0.10 | 5 | 34.2 |
| jsd | 97.24 +- 0.20 | 14 | 32.8 |
| logit_matching | 97.16 +- 0.19 | 12 | 33.0 |
| retro_kd | 97.24 +- 0.20 | 12 | 40.2 |
| multi_teacher | 97.20 +- 0.20 | 10 | 54.6 |
| atsc | 96.93 +- 0.40 | 12 | 102.9 |

(atsc: the adapted teachers ended at 96.67-97.33 % test accuracy.) The first nine rows are the
same, to the digit, as in the run before the last two were added. ``--backend torch`` printed the
same accuracies, to the digit; its per-step training losses differ from the fused ones by at most
2.2e-5 relative over all losses, seeds and epochs (ls_kd, dkd; multi_teacher below 5e-7, atsc below
3.5e-6, the others below 1.2e-5), and no test prediction changed except one sample in one dkd
epoch. On this small, easy problem the students end within about one standard deviation of
cross-entropy alone (dkd, with its CIFAR-100 beta = 8 on 10 classes, a little below); where the
teacher helps is the speed of learning: every distilled student reaches 95 % sooner than
cross-entropy alone (ls_kd in a third of the epochs).

The two new rows give nothing over kd here. The second teacher is weaker than the first and
moves the result by less than the spread over seeds (one epoch sooner to 95 %), at 1.6x kd's time
per epoch in the run above (then one kd_loss call per teacher). With the fused multi-teacher kernel
(one call for both teachers) a later run (``--losses ce,kd,multi_teacher``) printed the same
accuracies and epochs to the digit, at 45.8 ms / epoch against kd's 40.9 (1.1x).
ATSC ends 0.4 points below kd, within its spread, one epoch later to 95 %, at 2.9x kd's time per
epoch (the teacher's forward and backward, and the drift penalty, every step), and its deployed
student is larger: backbone, projector and shared classifier hold 7,962 parameters against the
plain 64-16-10 student's 1,210. ATSC is built for deep networks whose teacher features a small
student cannot reproduce; a 2-layer MLP on digits is not that case.

The time per epoch is that of 21 steps of 64 rows x 10 classes: Python, autograd and the two small
matmuls dominate it, and at this size the fused loss costs about what the eager one does (the
``--backend torch`` run measured 17-45 ms / epoch, the same range; for the two new rows, in a
second run, multi_teacher 50 ms fused / 40 ms eager, atsc 91 / 99). This example shows that the
losses train a model the same way as the reference, not that they are fast (``benchmarks/`` does
that, at sizes where it matters).
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import kdfast

# name -> (loss function, keyword arguments besides backend). The mixing weights:
# kd: ce 0.1 / kd 0.9, T = 4 (Hinton et al.'s alpha-mixing, as in mdistiller's KD baseline);
# dkd: ce 1, alpha 1, beta 8, T = 4 and the DKD term ramped up linearly over the first WARMUP epochs
#      (mdistiller's DKD recipe: 20 of 240 epochs);
# ls_kd: ce 0.1 / kd 9 (Sun et al.'s logit-standardised KD: the KD term scaled by 10x);
# ttm, wttm, jsd, logit_matching, retro_kd: ce 1 + kd 1 (the distillation term added to CE).
LOSSES = {
    "ce": (None, {}),
    "kd": (kdfast.kd_loss, {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}),
    "ttm": (kdfast.ttm_loss, {}),
    "wttm": (kdfast.wttm_loss, {}),
    "dkd": (kdfast.dkd_loss, {"warmup": True}),
    "ls_kd": (kdfast.ls_kd_loss, {"ce_weight": 0.1, "kd_weight": 9.0}),
    "jsd": (kdfast.jsd_loss, {}),
    "logit_matching": (kdfast.logit_matching_loss, {}),
    "retro_kd": (kdfast.retro_kd_loss, {}),   # past student: a copy of the student at each epoch's start
    # two teachers (the 64-256-256-10 one and a 64-64-10 one), equal weights, kd's setting otherwise
    "multi_teacher": (functools.partial(kdfast.multi_teacher_loss, "kd"),
                      {"teacher_weights": [0.5, 0.5], "temperature": 4.0, "ce_weight": 0.1,
                       "kd_weight": 0.9}),
    # kdfast.recipes.ATSC: the recipe's feature / drift weights (1, 1) and ce_weight 0, plus its KD
    # term (kd_weight 1, T = 4: with the MSE alone the student is still near chance after 10
    # epochs), the teacher at 1/100 of the student's learning rate (at 1/10 the KD term, whose
    # gradient reaches the teacher's logits, drags the teacher down to ~30 % test accuracy)
    "atsc": (None, {"kd_weight": 1.0, "teacher_lr_scale": 0.01}),
}

BATCH = 64
WARMUP = 10
SPLIT_SEED = 0
TEACHER_SEED = 0


@functools.lru_cache(maxsize=None)
def load_data():
    """(x_train, y_train, x_test, y_test) as float32 / int64 tensors; the same split on every call."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=SPLIT_SEED,
                                              stratify=y)

    def f(a):
        return torch.tensor(a, dtype=torch.float32) / 16.0

    def i(a):
        return torch.tensor(a, dtype=torch.int64)

    return f(x_tr), i(y_tr), f(x_te), i(y_te)


def mlp(*sizes: int) -> nn.Sequential:
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def accuracy(model, x, y) -> float:
    """Test accuracy of ``model`` (a module or any ``x -> logits`` callable)."""
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def batches(n: int, gen: torch.Generator):
    """One epoch's minibatch indices: a permutation drawn from ``gen``, cut into BATCH-sized pieces
    (the last, shorter one is dropped so every step has the same shape)."""
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]


TEACHER = (256, 256)         # hidden widths of the main teacher
SMALL_TEACHER = (64,)        # the second teacher of the multi_teacher row


def train_teacher(hidden: tuple = TEACHER, epochs: int = 30):
    """Train a teacher MLP (64-hidden...-10, Adam, cross-entropy, seed TEACHER_SEED) and return
    (the model, its test accuracy). Cached: every student of a run distils from the same teachers;
    a caller that trains the teacher further (ATSC) must work on a copy. Training one re-seeds
    torch's global generator, so call this before seeding a student."""
    return _train_teacher(tuple(hidden), int(epochs))


@functools.lru_cache(maxsize=None)
def _train_teacher(hidden: tuple, epochs: int):
    x, y, x_te, y_te = load_data()
    torch.manual_seed(TEACHER_SEED)
    teacher = mlp(x.shape[1], *hidden, 10)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(TEACHER_SEED)
    for _ in range(epochs):
        for idx in batches(x.shape[0], gen):
            loss = F.cross_entropy(teacher(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return teacher, accuracy(teacher, x_te, y_te)


@functools.lru_cache(maxsize=None)
def teacher_logits(hidden: tuple = TEACHER, epochs: int = 30):
    """(the teacher's logits on the training set, its test accuracy); see :func:`train_teacher`."""
    teacher, acc = train_teacher(hidden, epochs)
    with torch.no_grad():
        return teacher(load_data()[0]), acc


def train_student(loss_name: str, seed: int, backend: str = "auto", epochs: int = 40,
                  hidden: int = 16, lr: float = 0.02, clip: float = 1.0,
                  loss_kwargs: dict | None = None) -> dict:
    """Train one student with ``LOSSES[loss_name]`` (SGD, lr 0.02, momentum 0.9, batch 64, the
    gradient norm clipped at ``clip``; 0 turns clipping off). ``loss_kwargs`` overrides the loss's
    keyword arguments of ``LOSSES``.

    ``atsc``: the student's hidden layer (64-H, ReLU) is the backbone, a ``Linear(H, 256)`` projector
    (built by the recipe) maps it to the teacher's last hidden layer and the teacher's last linear
    layer is the shared classifier; a fresh copy of the pretrained teacher trains with the student,
    at ``teacher_lr_scale`` x ``lr`` (one SGD, two parameter groups, each group's gradient norm
    clipped at ``clip`` on its own). The test accuracy is the recipe's prediction (student, projector,
    shared classifier); ``teacher_acc`` holds the adapted teacher's after each epoch.

    Returns a dict with ``step_loss`` (the training loss of every step, floats), ``epoch_loss``
    (their mean per epoch), ``test_acc`` (test accuracy after each epoch) and ``epoch_time`` (seconds
    of training per epoch, evaluation excluded). The initialisation and the minibatch order depend
    on ``seed`` only, never on ``backend``.
    """
    if loss_name not in LOSSES:
        raise ValueError(f"unknown loss {loss_name!r}; choose from {', '.join(LOSSES)}")
    fn, kwargs = LOSSES[loss_name]
    kwargs = {**kwargs, **(loss_kwargs or {})}
    warmup = kwargs.pop("warmup", False)
    kd_weight = kwargs.get("kd_weight", 1.0)
    x, y, x_te, y_te = load_data()
    t_logits, _ = teacher_logits()      # the teachers first: training one re-seeds torch
    if loss_name == "multi_teacher":
        t_logits = [t_logits, teacher_logits(SMALL_TEACHER)[0]]
    if loss_name == "atsc":
        teacher = copy.deepcopy(train_teacher()[0])   # this seed's own copy: it trains
    torch.manual_seed(seed)
    student = mlp(x.shape[1], hidden, 10)
    atsc = None
    if loss_name == "atsc":
        scale = kwargs.pop("teacher_lr_scale")
        atsc = kdfast.recipes.ATSC(teacher[:-1], teacher[-1], student[:2], student_dim=hidden,
                                   teacher_dim=TEACHER[-1], feature_kind="linear", backend=backend,
                                   **kwargs)
        groups = atsc.param_groups(lr, lr * scale)
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
        clip_groups = [g["params"] for g in groups]
        model = atsc.predict
    else:
        opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
        clip_groups = [list(student.parameters())]
        model = student
    gen = torch.Generator().manual_seed(1000 + seed)
    out = {"step_loss": [], "epoch_loss": [], "test_acc": [], "epoch_time": []}
    if atsc is not None:
        out["teacher_acc"] = []
    for epoch in range(epochs):
        if warmup:
            kwargs["kd_weight"] = kd_weight * min((epoch + 1) / WARMUP, 1.0)
        past = copy.deepcopy(student).requires_grad_(False) if loss_name == "retro_kd" else None
        steps = batches(x.shape[0], gen)
        t0 = time.perf_counter()
        losses = []
        for idx in steps:
            if atsc is not None:
                loss = atsc(x[idx], y[idx]).loss
            else:
                z = student(x[idx])
                if loss_name == "ce":
                    loss = F.cross_entropy(z, y[idx])
                elif loss_name == "multi_teacher":
                    loss = fn(z, [t[idx] for t in t_logits], y[idx], backend=backend, **kwargs)
                elif past is not None:
                    with torch.no_grad():
                        zp = past(x[idx])
                    loss = fn(z, t_logits[idx], zp, y[idx], backend=backend, **kwargs)
                else:
                    loss = fn(z, t_logits[idx], y[idx], backend=backend, **kwargs)
            opt.zero_grad()
            loss.backward()
            if clip:
                for params in clip_groups:
                    nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            losses.append(loss.detach())
        out["epoch_time"].append(time.perf_counter() - t0)
        losses = torch.stack(losses).tolist()
        out["step_loss"] += losses
        out["epoch_loss"].append(sum(losses) / len(losses))
        out["test_acc"].append(accuracy(model, x_te, y_te))
        if atsc is not None:
            out["teacher_acc"].append(accuracy(atsc.teacher_logits, x_te, y_te))
    return out


def plot(results: dict, teacher_acc: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(results)
    for name in names:
        acc = torch.tensor([r["test_acc"] for r in results[name]])     # (seeds, epochs)
        m = acc.mean(0)
        ax1.plot(range(1, len(m) + 1), m * 100, label=name, lw=2.0 if name == "ce" else 1.2,
                 color="black" if name == "ce" else None)
    ax1.axhline(teacher_acc * 100, ls="--", color="gray", lw=1, label="teacher")
    ax1.set(xlabel="epoch", ylabel="test accuracy (%), mean over seeds",
            title="student test accuracy per epoch")
    ax1.set_ylim(85, 100)
    ax1.legend(fontsize=8, ncol=2, loc="lower right")
    final = [[r["test_acc"][-1] * 100 for r in results[n]] for n in names]
    means = [statistics.mean(f) for f in final]
    stds = [statistics.stdev(f) if len(f) > 1 else 0.0 for f in final]
    ax2.bar(names, means, yerr=stds, capsize=3,
            color=["black" if n == "ce" else "tab:blue" for n in names])
    ax2.axhline(teacher_acc * 100, ls="--", color="gray", lw=1)
    lo = min(m - s for m, s in zip(means, stds))
    ax2.set_ylim(max(0.0, lo - 2), 100)
    ax2.set(ylabel="final test accuracy (%), mean +- std", title="after the last epoch")
    ax2.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "torch"],
                    help="kdfast backend: auto/cpu = the fused C++ kernels, torch = eager reference")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 per loss")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--losses", default=",".join(LOSSES),
                    help=f"comma-separated subset of {','.join(LOSSES)}")
    ap.add_argument("--hidden", type=int, default=16, help="student hidden width")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (64 x 10 logits: a second thread only adds synchronisation)")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args()
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        ap.error(f"unknown loss(es) {unknown}; choose from {list(LOSSES)}")
    torch.use_deterministic_algorithms(True)   # the CPU ops used here are deterministic anyway
    torch.set_num_threads(args.threads)

    x, _, x_te, _ = load_data()
    _, t_acc = teacher_logits()
    print(f"digits: {x.shape[0]} train / {x_te.shape[0]} test; teacher 64-256-256-10 test accuracy "
          f"{t_acc * 100:.2f}%; student 64-{args.hidden}-10; backend {args.backend}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "multi_teacher" in names:
        print(f"second teacher (multi_teacher) 64-{'-'.join(map(str, SMALL_TEACHER))}-10 test "
              f"accuracy {teacher_logits(SMALL_TEACHER)[1] * 100:.2f}%")
    results = {}
    for name in names:
        results[name] = [train_student(name, s, args.backend, args.epochs, args.hidden)
                         for s in range(args.seeds)]
    print(f"\n| loss | test acc % (mean +- std, {args.seeds} seeds) | epochs to 95 % | ms / epoch |")
    print("|---|--:|--:|--:|")
    for name, runs in results.items():
        final = [r["test_acc"][-1] * 100 for r in runs]
        sd = statistics.stdev(final) if len(final) > 1 else 0.0
        ms = statistics.median(t * 1e3 for r in runs for t in r["epoch_time"])
        mean_acc = torch.tensor([r["test_acc"] for r in runs]).mean(0)
        reached = (mean_acc >= 0.95).nonzero()
        to95 = str(int(reached[0]) + 1) if len(reached) else "-"
        print(f"| {name} | {statistics.mean(final):.2f} +- {sd:.2f} | {to95} | {ms:.1f} |")
    if "atsc" in results:
        t_final = [r["teacher_acc"][-1] * 100 for r in results["atsc"]]
        print(f"\natsc: the adapted teachers' own test accuracy after the last epoch "
              f"{min(t_final):.2f}-{max(t_final):.2f}% (pretrained: {t_acc * 100:.2f}%)")
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "digits_distill.png")
    plot(results, t_acc, path)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
