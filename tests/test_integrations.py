"""The Hugging Face drop-ins (kdfast/integrations, docs/integrations.md): TRL's own
``generalized_jsd_loss`` against kdfast's on random inputs (values and gradients), one training
step of TRL's ``GKDTrainer`` with its own loss, with the one-line assignment and with kdfast's
subclass, and one ``DistillationTrainer`` step with and without the fused linear head against an
eager reference. Tiny random-init Llama / GPT-2 models from configs, an in-memory dataset, no
download. Skipped when transformers / trl are missing (``make test`` installs them)."""
import os
import warnings

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import kdfast  # noqa: E402
from kdfast.integrations import trl as KT  # noqa: E402
from kdfast.integrations import transformers as KH  # noqa: E402

TRL_GKD = KT._gkd_base()
TRL_LOSS = TRL_GKD.generalized_jsd_loss   # TRL's own static method (before any assignment)
V = 48          # vocabulary of the tiny models
# (value rtol, value atol, gradient atol) per dtype: float64 agrees to rounding; float32 within
# the rounding of TRL's per-element float32 arithmetic summed over the batch
TOL = {torch.float64: (1e-10, 1e-12, 1e-12), torch.float32: (2e-5, 2e-6, 2e-6)}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread (a second OpenMP thread spinning on a busy core made each call of
    TRL's function 50x slower on the shared 2-core test machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- the loss function
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd_loss_matches_trl(beta, dtype, gen):
    """Every reduction, with / without labels (-100 masked), with / without num_items_in_batch
    (int and tensor), two temperatures: same shape, values and gradients (student and teacher)."""
    rtol, atol, gatol = TOL[dtype]
    z0 = (torch.randn(3, 7, V, generator=gen, dtype=torch.float64) * 3).to(dtype)
    v0 = (torch.randn(3, 7, V, generator=gen, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, V, (3, 7), generator=gen)
    y[0, :3] = -100
    y[2, -1] = -100
    for temperature in (1.0, 2.5):
        for labels in (None, y):
            for reduction in ("batchmean", "sum", "mean", "none"):
                for num in (None, 9, torch.tensor(11.0)):
                    outs = []
                    for fn in (TRL_LOSS, KT.generalized_jsd_loss):
                        z, v = z0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
                        loss = fn(z, v, labels, beta=beta, temperature=temperature, reduction=reduction,
                                  num_items_in_batch=num)
                        w = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
                        (loss * w).sum().backward()   # a non-constant upstream for "none"
                        outs.append((loss.detach(), z.grad, v.grad))
                    (a, az, av), (b, bz, bv) = outs
                    what = (temperature, labels is not None, reduction, num)
                    assert a.shape == b.shape, what
                    torch.testing.assert_close(b, a.to(b.dtype), rtol=rtol, atol=atol, msg=str(what))
                    torch.testing.assert_close(bz, az, rtol=rtol, atol=gatol, msg=str(what))
                    torch.testing.assert_close(bv, av, rtol=rtol, atol=gatol, msg=str(what))


def test_unsliced_logits_with_shifted_labels_equal_trl_slices(gen):
    """What the GKDTrainer subclass does (whole logits, shift_labels) equals TRL's call on the
    [:, :-1] slices with labels[:, 1:]; the loss reads the whole logits in place."""
    z0 = torch.randn(2, 9, V, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 9, V, generator=gen, dtype=torch.float64)
    y = torch.randint(0, V, (2, 9), generator=gen)
    y[:, :4] = -100
    n = (y[:, 1:] != -100).sum()
    for num in (None, n):
        za, zb = z0.clone().requires_grad_(True), z0.clone().requires_grad_(True)
        a = TRL_LOSS(za[:, :-1], v[:, :-1], y[:, 1:], beta=0.4, num_items_in_batch=num)
        b = KT.generalized_jsd_loss(zb, v, KT.shift_labels(y), beta=0.4, num_items_in_batch=num)
        a.backward()
        b.backward()
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(zb.grad, za.grad, rtol=1e-12, atol=1e-14)
    assert KT.shift_labels(y)[:, -1].eq(-100).all() and KT.shift_labels(y)[:, :-1].equal(y[:, 1:])


def test_labels_are_a_mask_only(gen):
    """TRL's labels only mask: out-of-vocabulary labels are fine and no CE is added."""
    z, v = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    y = torch.tensor([7, -100, 2, 123])
    torch.testing.assert_close(KT.generalized_jsd_loss(z, v, y), TRL_LOSS(z, v, y))


# ----------------------------------------------------------------------------- trainers
def _tokenizer():
    from tokenizers import Tokenizer, models
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"t{i}": i for i in range(3, V)}}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
        pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _llama(hidden, layers, seed):
    """A float64 Llama (so that TRL's per-element loss and kdfast's agree to rounding)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).double()


def _gpt2(hidden, layers, seed):
    """A float64 GPT-2 (tied head) without dropout."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=hidden, n_layer=layers, n_head=2, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).double()


B, T = 4, 10
PLEN = [3, 4, 2, 5]   # prompt lengths: masked in the labels


def _dataset():
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, V, (B, T), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "plen": PLEN})


def _collate(feats):
    """input_ids, attention_mask (the first sample right-padded by 2), labels (-100 on the prompt
    and the padding), and the prompt fields GKD's trainer expects."""
    x = torch.tensor([f["input_ids"] for f in feats])
    am = torch.ones_like(x)
    am[0, -2:] = 0
    lab = x.masked_fill(am == 0, -100)
    for i, f in enumerate(feats):
        lab[i, :f["plen"]] = -100
    p = max(f["plen"] for f in feats)
    return {"input_ids": x, "attention_mask": am, "labels": lab, "prompts": x[:, :p],
            "prompt_attention_mask": torch.ones(len(feats), p, dtype=torch.long)}


LR = 0.5
COMMON = dict(max_steps=1, per_device_train_batch_size=B, report_to="none", save_strategy="no",
              use_cpu=True, learning_rate=LR, lr_scheduler_type="constant", optim="sgd",
              max_grad_norm=0.0, logging_steps=1, disable_tqdm=True, seed=0,
              dataloader_num_workers=0)


def _train(trainer):
    before = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    step = {k: (before[k] - p.detach()) / LR for k, p in trainer.model.named_parameters()}  # = grad
    return trainer.state.log_history[0]["loss"], step


def test_gkd_trainer_step_with_trl_loss_assignment_and_subclass(tmp_path):
    """One GKDTrainer step (lmbda=0: the dataset's sequences, beta=0.3) with TRL's own loss, with
    GKDTrainer.generalized_jsd_loss = staticmethod(kdfast's) and with kdfast's subclass: the same
    loss and the same SGD step (= gradient) of every student parameter."""
    cfg = dict(COMMON, output_dir=str(tmp_path), lmbda=0.0, beta=0.3)
    from trl.experimental.gkd import GKDConfig   # noqa: PLC0415

    def run(cls):
        args = GKDConfig(**cfg)
        t = cls(model=_llama(16, 1, 1), teacher_model=_llama(24, 2, 2), args=args,
                train_dataset=_dataset(), data_collator=_collate, processing_class=_tokenizer())
        return _train(t)

    ref_loss, ref_step = run(TRL_GKD)
    TRL_GKD.generalized_jsd_loss = staticmethod(KT.generalized_jsd_loss)
    try:
        results = [run(TRL_GKD)]
    finally:
        TRL_GKD.generalized_jsd_loss = staticmethod(TRL_LOSS)
    results.append(run(KT.GKDTrainer))
    assert ref_loss > 0
    for loss, step in results:
        assert loss == pytest.approx(ref_loss, rel=1e-6)   # (the Trainer logs a float32)
        for k, g in ref_step.items():
            torch.testing.assert_close(step[k], g, rtol=1e-8, atol=1e-12, msg=k)


def _reference_step(student, teacher, batch, beta, ce_weight):
    """The loss and gradient the DistillationTrainer step must give, eagerly: per position t with
    a next label, ce_weight * CE(z_t, y_{t+1}) + JSD_beta(z_t, v_t) (kdfast's reference), summed and
    divided by the number of such positions (the Trainer's num_items_in_batch)."""
    student.zero_grad()
    feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    z = student(**feed).logits[:, :-1]
    with torch.no_grad():
        v = teacher(**feed).logits[:, :-1]
    y = batch["labels"][:, 1:]
    loss = kdfast.reference.jsd_loss(z, v, y, beta=beta, ce_weight=ce_weight, reduction="sum")
    loss = loss / (y != -100).sum()
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in student.named_parameters()}


@pytest.mark.parametrize("fused", [False, True])
def test_distillation_trainer_step(fused, tmp_path):
    """One DistillationTrainer step (GPT-2 student and a wider, deeper GPT-2 teacher; tied heads;
    jsd with CE at weight 0.5): loss and SGD step equal the eager reference, with the logits and
    with the fused linear head."""
    student, teacher = _gpt2(16, 1, 3), _gpt2(24, 2, 4)
    ref_loss, ref_grad = _reference_step(_gpt2(16, 1, 3), teacher, _collate(list(_dataset())), 0.3, 0.5)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), remove_unused_columns=False, **COMMON)
    trainer = KH.DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                     train_dataset=_dataset(), data_collator=_collate, loss="jsd",
                                     loss_kwargs={"beta": 0.3}, ce_weight=0.5, use_fused_linear=fused)
    loss, step = _train(trainer)
    assert loss == pytest.approx(ref_loss, rel=1e-6)   # (the Trainer logs a float32)
    for k, g in ref_grad.items():
        torch.testing.assert_close(step[k], g, rtol=1e-8, atol=1e-12, msg=k)


def test_distillation_trainer_rejects_bad_losses():
    with pytest.raises(ValueError, match="loss must be one of"):
        KH.causal_lm_distill_loss(None, None, {}, loss="topk_kd")
    with pytest.raises(TypeError):
        KH.causal_lm_distill_loss(None, None, {}, loss="kd", loss_kwargs={"betta": 1.0})
