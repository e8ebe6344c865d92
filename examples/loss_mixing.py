"""Instance-wise loss mixing, learnt on a small problem with kdfast's per-row weight gradients, in the
spirit of ALM-KD (Sivasubramanian, Maheshwari, Shenoy, Prathosh & Ramakrishnan, "Adaptive Mixing of
Auxiliary Losses in Supervised Learning", arXiv 2202.03250, 2022).

Each training sample i gets its own mixing weight lambda_i = sigmoid(a_i) and the student minimises
    mean_i [ lambda_i * KD_i + (1 - lambda_i) * CE_i ]
with ``kd_weight=lam, ce_weight=1 - lam`` (tensors: the fused loss returns d loss / d lambda_i).
The a_i are learnt so that a student step lowers the loss on a small *clean* validation set: for a
step theta' = theta - eta * grad_theta L_train(theta, lambda), the validation loss changes with
lambda_i as
    dL_val(theta') / d lambda_i = -eta * < grad L_val(theta), grad_theta (KD_i - CE_i)(theta) >.
The inner product is a directional derivative of the per-row terms along g = grad L_val, so
    dL_val / d lambda = -eta / (2 eps) * d/d lambda [ L_train(theta + eps g, lambda) - L_train(theta - eps g, lambda) ]
and that lambda-gradient is exactly what the fused loss gives for tensor weights: two extra forward
passes, no second-order autograd.

The problem: 10 Gaussian classes, 40 % of the training labels flipped at random, a teacher trained on
clean data. Learnt lambdas should trust the teacher (lambda -> 1) on the mislabelled samples.
Run: python examples/loss_mixing.py  (a few seconds on a CPU)
"""
import argparse

import torch
from torch import nn
from torch.func import functional_call

import kdfast


FIXED = {"ce only": 0.0, "0.5": 0.5, "kd only": 1.0}   # constant lambdas to compare with


def make_data(n, gen, centers):
    y = torch.randint(0, centers.shape[0], (n,), generator=gen)
    x = centers[y] + 2.5 * torch.randn(n, centers.shape[1], generator=gen)
    return x, y


def mlp(d, c):
    return nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, c))


def train(mode, x, y_noisy, x_val, y_val, teacher_logits, steps, seed, backend):
    torch.manual_seed(seed)
    student = mlp(x.shape[1], 10)
    opt = torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9)
    a = torch.zeros(x.shape[0], requires_grad=True)          # lambda_i = sigmoid(a_i)
    opt_a = torch.optim.Adam([a], lr=0.1)
    eta, eps, batch = 0.2, 1e-2, 256
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        lam = torch.sigmoid(a[idx]) if mode == "learnt" else torch.full((batch,), FIXED[mode])
        if mode == "learnt":
            # meta-gradient of the validation loss with respect to this batch's lambdas
            params = {k: p.detach().requires_grad_() for k, p in student.named_parameters()}
            val = nn.functional.cross_entropy(functional_call(student, params, x_val), y_val)
            g = torch.autograd.grad(val, list(params.values()))
            with torch.no_grad():
                params = {k: p.detach() for k, p in params.items()}
                plus = {k: p + eps * gi for (k, p), gi in zip(params.items(), g)}
                minus = {k: p - eps * gi for (k, p), gi in zip(params.items(), g)}
                zp, zm = functional_call(student, plus, x[idx]), functional_call(student, minus, x[idx])
            diff = (kdfast.kd_loss(zp, teacher_logits[idx], y_noisy[idx], kd_weight=lam,
                                   ce_weight=1 - lam, temperature=2.0, backend=backend)
                    - kdfast.kd_loss(zm, teacher_logits[idx], y_noisy[idx], kd_weight=lam,
                                     ce_weight=1 - lam, temperature=2.0, backend=backend))
            opt_a.zero_grad()
            (-eta / (2 * eps) * diff).backward()            # d L_val / d a via the weight gradients
            opt_a.step()
            lam = torch.sigmoid(a[idx]).detach()
        loss = kdfast.kd_loss(student(x[idx]), teacher_logits[idx], y_noisy[idx], kd_weight=lam,
                              ce_weight=1 - lam, temperature=2.0, backend=backend)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student, torch.sigmoid(a).detach()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    centers = 2.0 * torch.randn(10, 20, generator=gen)
    x, y = make_data(2000, gen, centers)
    x_val, y_val = make_data(200, gen, centers)            # small clean validation set
    x_test, y_test = make_data(4000, gen, centers)
    flip = torch.rand(x.shape[0], generator=gen) < 0.4
    y_noisy = torch.where(flip, torch.randint(0, 10, y.shape, generator=gen), y)
    noisy = y_noisy != y

    torch.manual_seed(0)
    teacher = mlp(20, 10)                                  # trained on clean labels
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    with torch.no_grad():
        t_logits = teacher(x)
        t_acc = (teacher(x_test).argmax(-1) == y_test).float().mean().item()
    print(f"teacher test accuracy {t_acc:.3f}; {int(noisy.sum())} of {len(y)} training labels flipped")
    print(f"{'mixing':>8} | {'test acc (mean +- std)':>24} | mean lambda on clean / flipped samples")
    for mode in (*FIXED, "learnt"):
        accs, lams = [], []
        for seed in range(args.seeds):
            student, lam = train(mode, x, y_noisy, x_val, y_val, t_logits, args.steps, seed, args.backend)
            with torch.no_grad():
                accs.append((student(x_test).argmax(-1) == y_test).float().mean().item())
            lams.append(lam)
        acc = torch.tensor(accs)
        lam = torch.stack(lams).mean(0)
        if mode in FIXED:
            lam_txt = f"{FIXED[mode]:.3f} (fixed)"
        else:
            lam_txt = f"{lam[~noisy].mean():.3f} / {lam[noisy].mean():.3f}"
        print(f"{mode:>8} | {acc.mean():17.3f} +- {acc.std():.3f} | {lam_txt}")


if __name__ == "__main__":
    main()
