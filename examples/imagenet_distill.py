"""Distil a torchvision ResNet-34 teacher into a ResNet-18 student on an ImageFolder (ImageNet-style
``DIR/<class>/<image>``), with large batches, mixed precision and, optionally, torch.compile.

The distillation loss is one call, and kdfast's is a one-line swap for the eager one:

    # eager PyTorch (three (N, C) softmax temporaries, a separate cross-entropy pass)
    loss = (ce_w * F.cross_entropy(s, y)
            + kd_w * T * T * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
                                      reduction="batchmean", log_target=True))
    # kdfast (one fused pass, gradient computed in the forward)
    loss = kdfast.kd_loss(s, t, y, temperature=T, kd_weight=kd_w, ce_weight=ce_w)

``--loss`` picks kd, ttm, wttm, dkd, ls_kd, jsd, logit_matching (each with kdfast's default
hyperparameters unless ``--temperature`` / ``--kd-weight`` / ``--ce-weight`` say otherwise) or ce
(no teacher term); ``--backend torch`` runs kdfast's eager reference through the same call, so the
two can be timed against each other.

    pip install kdfast[vision]           # torchvision
    python examples/imagenet_distill.py --data /data/imagenet/train --teacher-weights r34.pth \\
        --batch-size 256 --loss kd --compile
    python examples/imagenet_distill.py --fake-data --image-size 64 --batch-size 32 --steps 3

Teacher: ``--teacher-weights PATH`` loads a ResNet-34 state dict (for example torchvision's
``ResNet34_Weights.IMAGENET1K_V1`` saved with ``torch.save(model.state_dict(), PATH)``); without
it the teacher is randomly initialised and the run only measures speed (it says so).
``--fake-data`` trains on torchvision's ``FakeData`` (random images, nothing read from disk): a smoke
test of the whole loop (``make vision-smoke``).

Mixed precision (``--amp auto``): ``torch.autocast`` in bfloat16 on CUDA GPUs that support it, else
float16 with a gradient scaler; on the CPU bfloat16 where the CPU has it natively (AVX512-BF16 or AMX),
float32 otherwise: on the 2-core AVX2 development machine bf16 autocast made a step ~9x slower than
float32 (``--amp bf16`` forces it anyway). The logits reach kdfast in the autocast dtype; the fused
kernels accumulate in float32 and return a float32 loss.

Throughput (images / s, teacher forward + student forward and backward + optimiser step, data
loading included) is shown on a progress bar (tqdm when installed, a plain printed bar otherwise);
the summary leaves out the first step (warm-up, compilation). No validation pass: this example is
about the training step.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import kdfast

LOSSES = {
    "ce": None,
    "kd": kdfast.kd_loss,
    "ttm": kdfast.ttm_loss,
    "wttm": kdfast.wttm_loss,
    "dkd": kdfast.dkd_loss,
    "ls_kd": kdfast.ls_kd_loss,
    "jsd": kdfast.jsd_loss,
    "logit_matching": kdfast.logit_matching_loss,
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="ImageFolder root (DIR/<class>/<image>)")
    src.add_argument("--fake-data", action="store_true", help="torchvision FakeData (smoke test)")
    ap.add_argument("--num-classes", type=int, default=1000, help="classes of --fake-data")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--lr", type=float, default=0.1, help="SGD learning rate for batch 256 "
                    "(scaled linearly with --batch-size), cosine decay")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--loss", default="kd", choices=list(LOSSES))
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "torch"],
                    help="kdfast backend; torch = the eager reference")
    ap.add_argument("--temperature", type=float, default=None, help="default: the loss's own")
    ap.add_argument("--kd-weight", type=float, default=1.0)
    ap.add_argument("--ce-weight", type=float, default=1.0)
    ap.add_argument("--teacher-weights", default=None, help="ResNet-34 state dict (.pth)")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                    help="autocast dtype (auto: bf16 on CUDA, fp16 on a GPU without bf16; on the "
                    "CPU bf16 if it is native there, else none)")
    ap.add_argument("--compile", action="store_true", help="torch.compile teacher and student")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="channels_last memory format (default: on for CUDA)")
    ap.add_argument("--save", default=None, help="save the student's state dict here at the end")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default, one per core)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def make_loader(args, device):
    import torchvision
    from torchvision import transforms as T

    norm = T.Normalize(MEAN, STD)
    if args.fake_data:
        n = args.batch_size * (args.steps + 1 if args.steps else 8)
        ds = torchvision.datasets.FakeData(size=n, image_size=(3, args.image_size, args.image_size),
                                           num_classes=args.num_classes,
                                           transform=T.Compose([T.ToTensor(), norm]),
                                           random_offset=args.seed)
        classes = args.num_classes
    else:
        ds = torchvision.datasets.ImageFolder(args.data, transform=T.Compose([
            T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
        classes = len(ds.classes)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed))
    if len(loader) == 0:
        raise SystemExit(f"fewer images ({len(ds)}) than one batch ({args.batch_size})")
    return loader, classes


def make_models(args, classes, device, memory_format):
    from torchvision.models import resnet18, resnet34

    torch.manual_seed(args.seed)
    student = resnet18(num_classes=classes).to(device, memory_format=memory_format).train()
    if args.loss == "ce":
        print("teacher: none (--loss ce, the baseline without distillation)")
        return None, student
    teacher = resnet34(num_classes=classes)
    if args.teacher_weights:
        state = torch.load(args.teacher_weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        teacher.load_state_dict(state)
        print(f"teacher: ResNet-34 from {args.teacher_weights}")
    else:
        print("teacher: ResNet-34, RANDOM initialisation (no --teacher-weights): the run measures "
              "speed only, the student learns nothing useful")
    teacher = teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
    return teacher, student


def distill_loss(args):
    """The loss as a function (student logits, teacher logits, labels) -> scalar."""
    fn = LOSSES[args.loss]
    if fn is None:
        return lambda s, t, y: F.cross_entropy(s.float(), y)
    kw = {"kd_weight": args.kd_weight, "ce_weight": args.ce_weight, "backend": args.backend}
    if args.temperature is not None:
        if args.loss == "logit_matching":
            raise SystemExit("logit_matching has no temperature")
        kw["temperature"] = args.temperature
    return lambda s, t, y: fn(s, t, y, **kw)


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (Linux: the avx512_bf16 / amx_bf16 flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


class Progress:
    """tqdm when it is installed, otherwise a bar printed on one line (one line per update when
    stdout is not a terminal)."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.tty = sys.stdout.isatty()

    def update(self, info: str):
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(1)
            return
        width = 30
        done = int(width * self.n / self.total)
        line = f"[{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} {info}"
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            print()


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    amp = args.amp
    if amp == "auto":
        if cuda:
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16" if cpu_has_native_bf16() else "none"
            if amp == "none":
                print("amp: this CPU has no native bfloat16 (avx512_bf16 / amx_bf16), where bf16 "
                      "autocast is several times slower than float32: float32 (--amp bf16 forces it)")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    if amp_dtype is torch.float16 and not cuda:
        raise SystemExit("--amp fp16 needs a CUDA device; use bf16 on the CPU")
    channels_last = cuda if args.channels_last is None else args.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    loader, classes = make_loader(args, device)
    teacher, student = make_models(args, classes, device, memory_format)
    total = len(loader) * args.epochs
    if args.steps:
        total = min(total, args.steps)
    lr = args.lr * args.batch_size / 256
    decay = [p for p in student.parameters() if p.ndim > 1]
    no_decay = [p for p in student.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    loss_fn = distill_loss(args)
    fwd_t, fwd_s = teacher, student
    if args.compile:
        fwd_t = teacher if teacher is None else torch.compile(teacher)
        fwd_s = torch.compile(student)

    print(f"student: ResNet-18, {classes} classes; {args.image_size}px, batch {args.batch_size}, "
          f"{total} steps; loss {args.loss} (kdfast backend {args.backend}); amp {amp}; "
          f"compile {args.compile}; device {device}"
          + ("" if cuda else f", {torch.get_num_threads()} torch thread(s)")
          + f"; torch {torch.__version__}; kdfast from {os.path.dirname(kdfast.__file__)}")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    progress = Progress(total)
    step, times, last = 0, [], float("nan")
    sync()
    t_prev = time.perf_counter()
    for _ in range(args.epochs):
        for x, y in loader:
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                t_logits = None
                if fwd_t is not None:
                    with torch.no_grad():
                        t_logits = fwd_t(x)
                s_logits = fwd_s(x)
            loss = loss_fn(s_logits, t_logits, y)   # outside autocast: kdfast takes the dtypes as given
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            last = loss.item()      # synchronises, so the step time below is the real one
            now = time.perf_counter()
            times.append(now - t_prev)
            t_prev = now
            step += 1
            if not math.isfinite(last):
                raise SystemExit(f"step {step}: loss is {last}")
            recent = times[1:][-20:] or times
            ips = args.batch_size * len(recent) / sum(recent)
            progress.update(f"loss {last:.4f} {ips:,.0f} img/s")
            if step == total:
                break
        if step == total:
            break
    progress.close()
    steady = times[1:] or times
    ips = args.batch_size * len(steady) / sum(steady)
    print(f"done: {step} steps, final loss {last:.4f}; {ips:,.1f} images/s over steps "
          f"{2 if len(times) > 1 else 1}-{step} (first step {times[0]:.2f} s)")
    if args.save:
        torch.save(student.state_dict(), args.save)
        print(f"student saved to {args.save}")
    return {"steps": step, "loss": last, "images_per_s": ips}


if __name__ == "__main__":
    main()
