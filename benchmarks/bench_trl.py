"""TRL GKDTrainer with its own loss vs kdfast's drop-ins (issue 16's trial, CPU).

Random-init Llama student (hidden 128, 2 layers) and teacher (hidden 256, 4 layers), vocabulary
32000, batch 8 x 128 tokens (the first 16 of each sequence a masked prompt), ``lmbda=0`` (no
generation), fp32, 2 threads, SGD. Variants, each in a fresh process (peak RSS is per process):

- ``trl``: TRL's ``GKDTrainer`` with its own ``generalized_jsd_loss``;
- ``dropin``: the same trainer after ``GKDTrainer.generalized_jsd_loss =
  staticmethod(kdfast.integrations.trl.generalized_jsd_loss)`` (TRL's ``[:, :-1]`` slices: copied);
- ``subclass``: ``kdfast.integrations.trl.GKDTrainer`` (unsliced logits, shifted labels).

Per variant: the median step time over the steps after a warm-up step, the losses, the process's
peak RSS and its growth over the RSS before training. Then the loss alone (forward + backward) at
the trainer's shape: TRL's on the slices, kdfast's drop-in on the slices, kdfast on the unsliced
logits with shifted labels (what the subclass does), and kdfast on contiguous (1016, 32000) rows.

    python -m benchmarks.bench_trl [--steps 5] [--json benchmarks/trl.json] [--md benchmarks/trl.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tempfile

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

VOCAB, BATCH, SEQ, PROMPT = 32000, 8, 128, 16
THREADS = 2
VARIANTS = ("trl", "dropin", "subclass")
LABELS = {"trl": "TRL's own loss", "dropin": "kdfast drop-in (one-line assignment, sliced views)",
          "subclass": "kdfast GKDTrainer subclass (unsliced logits)"}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _models():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(hidden, layers, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ, pad_token_id=0))
    return llama(128, 2, 0), llama(256, 4, 1)


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                   pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _collate(feats):
    import torch
    x = torch.tensor([f["input_ids"] for f in feats])
    lab = x.clone()
    lab[:, :PROMPT] = -100
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": lab,
            "prompts": x[:, :PROMPT], "prompt_attention_mask": torch.ones(len(feats), PROMPT, dtype=torch.long)}


def one(variant: str, steps: int) -> dict:
    """Runs ``steps`` GKDTrainer steps of ``variant`` in this process."""
    import warnings

    import datasets
    import torch
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    import kdfast.integrations.trl as KT
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (BATCH * steps, SEQ), generator=g)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    cls = GKDTrainer
    if variant == "dropin":
        GKDTrainer.generalized_jsd_loss = staticmethod(KT.generalized_jsd_loss)
    elif variant == "subclass":
        cls = KT.GKDTrainer
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    student, teacher = _models()
    args = GKDConfig(output_dir=tempfile.mkdtemp(prefix="kdfast_bench_trl_"), max_steps=steps, per_device_train_batch_size=BATCH,
                     lmbda=0.0, beta=0.5, report_to="none", save_strategy="no", use_cpu=True,
                     learning_rate=1e-3, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                     disable_tqdm=True, seed=0, dataloader_num_workers=0, max_length=SEQ)
    trainer = cls(model=student, teacher_model=teacher, args=args, train_dataset=ds, data_collator=_collate,
                  processing_class=_tokenizer(), callbacks=[Clock()])
    rss0 = _rss_mib()
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"variant": variant, "step_s": statistics.median(times[1:]), "step_times_s": times,
            "losses": losses, "peak_rss_mib": peak, "rss_before_train_mib": rss0,
            "peak_growth_mib": peak - rss0}


def loss_alone(reps: int = 3) -> dict:
    """Forward + backward of the loss alone on the trainer's (8, 128, 32000) logits, median of reps."""
    import torch
    from trl.experimental.gkd import GKDTrainer

    import kdfast.integrations.trl as KT
    torch.set_num_threads(THREADS)
    trl_loss = GKDTrainer.generalized_jsd_loss
    g = torch.Generator().manual_seed(0)
    z = torch.randn(BATCH, SEQ, VOCAB, generator=g)
    v = torch.randn(BATCH, SEQ, VOCAB, generator=g)
    y = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    y[:, :PROMPT] = -100
    zc, vc, yc = z[:, :-1].contiguous(), v[:, :-1].contiguous(), y[:, 1:].contiguous()
    cases = {
        "trl_sliced": lambda zz: trl_loss(zz[:, :-1], v[:, :-1], y[:, 1:], beta=0.5),
        "kdfast_sliced": lambda zz: KT.generalized_jsd_loss(zz[:, :-1], v[:, :-1], y[:, 1:], beta=0.5),
        "kdfast_unsliced": lambda zz: KT.generalized_jsd_loss(zz, v, KT.shift_labels(y), beta=0.5),
        "kdfast_contiguous": lambda zz: KT.generalized_jsd_loss(zz, vc, yc, beta=0.5),
    }
    out = {}
    for name, fn in cases.items():
        base = zc if name == "kdfast_contiguous" else z
        ts = []
        for _ in range(reps + 1):
            leaf = base.detach().requires_grad_(True)
            t = time.perf_counter()
            fn(leaf).backward()
            ts.append(time.perf_counter() - t)
            del leaf
        out[name] = statistics.median(ts[1:])
    return out


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers
    import trl
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "tokenizers": tokenizers.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": THREADS}


def _md(res: dict) -> str:
    r = {x["variant"]: x for x in res["runs"]}
    base = r["trl"]
    env = res["env"]
    la = res["loss_alone_s"]
    lines = [
        "## GKDTrainer: TRL's loss vs kdfast's drop-ins (CPU)",
        "",
        f"Random-init Llama student (hidden 128, 2 layers) and teacher (256, 4), vocabulary {VOCAB}, "
        f"batch {BATCH} x {SEQ} tokens (first {PROMPT} masked as a prompt), `lmbda=0`, beta 0.5, fp32, "
        f"{THREADS} threads, SGD; {res['steps']} steps per variant, the median of the steps after the "
        "first. Each variant in a fresh process: peak memory is the process's peak RSS (and its growth "
        "over the RSS before `train()`).",
        "",
        f"Machine: {env['cores']} cores, CPU ISA `{env['cpu_capability']}` "
        f"(`torch.backends.cpu.get_cpu_capability()`), torch {env['torch']}, transformers "
        f"{env['transformers']}, trl {env['trl']}. **Loaded machine**: other jobs shared the cores "
        f"(load average {res['load_before'][0]:.1f} before, {res['load_after'][0]:.1f} after, on "
        f"{env['cores']} cores): absolute times are inflated and noisy; the ratios are the point.",
        "",
        "| variant | step (s) | speed-up | peak RSS (MiB) | growth (MiB) | growth vs TRL | losses |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in VARIANTS:
        x = r[k]
        lines.append(
            f"| {LABELS[k]} | {x['step_s']:.3f} | {base['step_s'] / x['step_s']:.2f}x | "
            f"{x['peak_rss_mib']:.0f} | {x['peak_growth_mib']:.0f} | "
            f"{x['peak_growth_mib'] / base['peak_growth_mib']:.2f}x | "
            f"{', '.join(f'{v:.6g}' for v in x['losses'])} |")
    lines += [
        "",
        f"Loss alone, forward + backward on the trainer's ({BATCH}, {SEQ}, {VOCAB}) fp32 logits "
        f"(median of 3):",
        "",
        "| input | time (s) | vs contiguous |",
        "|---|---|---|",
    ]
    names = {"trl_sliced": "TRL's loss, `[:, :-1]` slices",
             "kdfast_sliced": "kdfast drop-in, `[:, :-1]` slices (copied)",
             "kdfast_unsliced": "kdfast drop-in, unsliced logits + shifted labels (the subclass)",
             "kdfast_contiguous": f"kdfast drop-in, contiguous ({BATCH * (SEQ - 1)}, {VOCAB}) rows"}
    for k, name in names.items():
        lines.append(f"| {name} | {la[k]:.4f} | {la[k] / la['kdfast_contiguous']:.2f}x |")
    t = res["targets"]
    lines += [
        "",
        "Targets (issue 16): drop-in step >= 4x faster than TRL's loss: "
        f"{t['dropin_speedup']:.2f}x (one-line assignment), {t['subclass_speedup']:.2f}x (subclass); peak "
        f"memory <= 0.5x TRL's: {t['dropin_peak_ratio']:.2f}x / {t['subclass_peak_ratio']:.2f}x of the "
        f"process peak ({t['dropin_growth_ratio']:.2f}x / {t['subclass_growth_ratio']:.2f}x of the growth "
        f"during training); loss alone on the trainer's inputs within 1.5x of contiguous: "
        f"{t['unsliced_vs_contiguous']:.2f}x (subclass, unsliced), {t['sliced_vs_contiguous']:.2f}x "
        "(sliced views, copied).",
        "",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default="benchmarks/trl.json")
    ap.add_argument("--md", default="benchmarks/trl.md")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--loss-alone", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.steps)))
        return
    if a.loss_alone:
        print("RESULT " + json.dumps(loss_alone()))
        return

    def child(*extra):
        p = subprocess.run([sys.executable, "-m", "benchmarks.bench_trl", "--steps", str(a.steps), *extra],
                           capture_output=True, text=True, check=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):])

    load_before = os.getloadavg()
    runs = []
    for v in VARIANTS:
        runs.append(child("--one", v))
        print(f"{v}: {runs[-1]['step_s']:.3f} s/step, peak {runs[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    la = child("--loss-alone")
    print("loss alone:", la, flush=True)
    r = {x["variant"]: x for x in runs}
    res = {"env": _versions(), "steps": a.steps, "runs": runs, "loss_alone_s": la,
           "load_before": load_before, "load_after": os.getloadavg(),
           "targets": {
               "dropin_speedup": r["trl"]["step_s"] / r["dropin"]["step_s"],
               "subclass_speedup": r["trl"]["step_s"] / r["subclass"]["step_s"],
               "dropin_peak_ratio": r["dropin"]["peak_rss_mib"] / r["trl"]["peak_rss_mib"],
               "subclass_peak_ratio": r["subclass"]["peak_rss_mib"] / r["trl"]["peak_rss_mib"],
               "dropin_growth_ratio": r["dropin"]["peak_growth_mib"] / r["trl"]["peak_growth_mib"],
               "subclass_growth_ratio": r["subclass"]["peak_growth_mib"] / r["trl"]["peak_growth_mib"],
               "unsliced_vs_contiguous": la["kdfast_unsliced"] / la["kdfast_contiguous"],
               "sliced_vs_contiguous": la["kdfast_sliced"] / la["kdfast_contiguous"]}}
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    with open(a.md, "w") as f:
        f.write(_md(res))
    print(_md(res))


if __name__ == "__main__":
    main()
