"""Hugging Face Transformers drop-in: logit distillation from a teacher model in ``Trainer``.

- :func:`causal_lm_distill_loss`: the loss of a causal-LM student against a causal-LM teacher on
  one batch (any loss of kdfast's family with a dense teacher; labels shifted as causal LMs do,
  ``-100`` masked, ``num_items_in_batch`` honoured; optionally the fused linear head, so that
  neither model's ``(B, T, V)`` logits exist);
- :class:`DistillationTrainer`: ``transformers.Trainer`` whose ``compute_loss`` is that loss::

      from kdfast.integrations.transformers import DistillationTrainer
      trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args,
                                    train_dataset=ds, data_collator=collator,
                                    loss="kd", loss_kwargs={"temperature": 2.0}, ce_weight=0.5)
      trainer.train()

``transformers`` is imported when :class:`DistillationTrainer` is first asked for (the helper needs
only ``torch``). See docs/integrations.md.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..fused_linear import fused_linear_distill_loss
from ..losses import REGISTRY
from .trl import shift_labels

__all__ = ["causal_lm_distill_loss", "DistillationTrainer", "shift_labels"]

#: config attributes that change the logits after the head (a fused head would compute other logits)
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _check_loss(loss: str, loss_kwargs: Optional[dict]) -> dict:
    if loss not in REGISTRY or not REGISTRY[loss].dense:
        names = sorted(k for k, x in REGISTRY.items() if x.dense and not x.past_student)
        raise ValueError(f"loss must be one of {names}, got {loss!r}")
    if REGISTRY[loss].past_student:
        raise ValueError(f"{loss!r} needs the student's past logits: not supported by this trainer")
    kw = dict(loss_kwargs or {})
    REGISTRY[loss].params(**kw)   # unknown or bad hyperparameters fail now (TypeError / ValueError)
    return kw


def _head(model: nn.Module, what: str):
    """(backbone, head) of a ``*ForCausalLM`` model: its ``base_model`` (returns the final hidden
    states, after the last norm) and ``get_output_embeddings()`` (the LM head, a Linear)."""
    config = getattr(model, "config", None)
    for k in _HEAD_EXTRAS:
        x = getattr(config, k, None)
        if x not in (None, 1, 1.0):
            raise ValueError(f"use_fused_linear: the {what}'s config sets {k}={x!r}: its logits are "
                             "not hidden @ lm_head.weight.T; use use_fused_linear=False")
    base, head = getattr(model, "base_model", None), model.get_output_embeddings()
    if base is None or base is model or not isinstance(head, nn.Linear):
        raise ValueError(f"use_fused_linear: the {what} must be a causal LM with a backbone "
                         "(model.base_model) and a Linear head (model.get_output_embeddings())")
    return base, head


def causal_lm_distill_loss(model: nn.Module, teacher_model: nn.Module, inputs: dict, *,
                           loss: str = "kd", loss_kwargs: Optional[dict] = None,
                           kd_weight: float = 1.0, ce_weight: float = 1.0,
                           num_items_in_batch: Union[None, int, Tensor] = None,
                           use_fused_linear: bool = False, chunk_size: Optional[int] = None,
                           inplace_backward: bool = False):
    """``(loss, student_outputs)`` of a causal-LM batch: per position ``t``,
    ``kd_weight * D(student_t, teacher_t) + ce_weight * CE(student_t, labels_{t+1})`` with
    ``D`` the registry loss ``loss`` (``"kd"``, ``"jsd"``, ``"dkd"``, ... with ``loss_kwargs``, e.g.
    ``{"temperature": 2.0}``), then kdfast's ``"mean"``: the sum over the positions whose next label
    is not ``-100``, divided by ``num_items_in_batch`` when given (as ``Trainer`` passes it: the
    count of ``labels[..., 1:] != -100`` over the accumulated batch and the ranks) or by their local
    number.

    - ``inputs``: the model inputs and ``labels`` (``(B, T)``, ``-100`` masked: the prompt, the
      padding), or ``shift_labels`` already aligned with the logits. The labels are not passed to
      the models (no loss of the model's own).
    - ``use_fused_linear=False``: the student's and teacher's ``(B, T, V)`` logits, read in place
      by the fused kernel with :func:`~kdfast.integrations.trl.shift_labels` (no ``[:, :-1]`` copy).
      ``True``: both models' backbones give their last hidden states and
      :func:`kdfast.fused_linear_distill_loss` computes the loss from them and the LM heads' weights
      chunk by chunk (``chunk_size`` rows; default from kdfast's memory budget): no logits at all.
      ``student_outputs`` are then the backbone's outputs (no ``logits``).
    - ``ce_weight=0``: distillation only (the labels then only mask positions).
    """
    kw = _check_loss(loss, loss_kwargs)
    feed = {k: x for k, x in inputs.items() if k not in ("labels", "shift_labels")}
    y = inputs.get("shift_labels")
    if y is None:
        if inputs.get("labels") is None:
            raise ValueError("causal_lm_distill_loss needs labels (or shift_labels) in inputs")
        y = shift_labels(inputs["labels"])
    teacher_model.eval()
    if use_fused_linear:
        base, head = _head(model, "student")
        t_base, t_head = _head(teacher_model, "teacher")
        outputs = base(**feed)
        with torch.no_grad():
            t_hidden = t_base(**feed).last_hidden_state
        # gradients: d loss / d h = G w, d loss / d w = G^T h, d loss / d b = 1^T G for G the
        # (kernel-written) gradient of the loss at the logits z = h w^T + b, chunk by chunk
        # (kdfast/fused_linear.py); the teacher is a constant
        value = fused_linear_distill_loss(
            outputs.last_hidden_state, head.weight, y, student_bias=head.bias,
            teacher_hidden=t_hidden, teacher_weight=t_head.weight.detach(),
            teacher_bias=None if t_head.bias is None else t_head.bias.detach(), method=loss,
            kd_weight=kd_weight, ce_weight=ce_weight, num_items_in_batch=num_items_in_batch,
            chunk_size=chunk_size, **kw)
        return value, outputs
    outputs = model(**feed)
    with torch.no_grad():
        t_logits = teacher_model(**feed).logits
    # the kernel writes d loss / d z in the forward (the loss's gradient, docs/kernel-math.md, times
    # the row weights and 1 / count); backward hands it on
    value = REGISTRY[loss].function(outputs.logits, t_logits, y, **kw, kd_weight=kd_weight,
                                    ce_weight=ce_weight, num_items_in_batch=num_items_in_batch,
                                    inplace_backward=inplace_backward)
    return value, outputs


def _make_trainer():
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """``transformers.Trainer`` for logit distillation: the loss is
        :func:`causal_lm_distill_loss` of the student (``model``) against ``teacher_model``.

        Keyword arguments beyond ``Trainer``'s: ``teacher_model`` (required; moved to
        ``args.device`` unless it has a device map, put in eval mode, frozen), ``loss`` (a registry
        loss name, default ``"kd"``), ``loss_kwargs`` (its hyperparameters), ``kd_weight``,
        ``ce_weight`` (default 1: CE on the labels too; 0: distillation only),
        ``use_fused_linear`` (default False; True: no logits, see the helper; single process: the
        backbones are called on the unwrapped models, which DDP / FSDP wrappers do not allow),
        ``chunk_size``.

        Normalisation: the Trainer always counts ``num_items_in_batch`` for this loss (the
        positions with a next label over the accumulated batch, and the ranks with
        ``average_tokens_across_devices``), so micro-batches add up to the whole batch's mean and
        the Trainer does not divide the loss by the accumulation steps again. The saved gradient is
        scaled in place in backward (one backward per loss).
        """

        def __init__(self, *args, teacher_model: nn.Module, loss: str = "kd",
                     loss_kwargs: Optional[dict] = None, kd_weight: float = 1.0,
                     ce_weight: float = 1.0, use_fused_linear: bool = False,
                     chunk_size: Optional[int] = None, **kwargs):
            self.distill_loss = loss
            self.distill_loss_kwargs = _check_loss(loss, loss_kwargs)
            self.kd_weight, self.ce_weight = kd_weight, ce_weight
            self.use_fused_linear, self.chunk_size = bool(use_fused_linear), chunk_size
            super().__init__(*args, **kwargs)
            if getattr(teacher_model, "hf_device_map", None) is None:
                teacher_model = teacher_model.to(self.args.device)
            self.teacher_model = teacher_model.eval().requires_grad_(False)
            # The loss divides by num_items_in_batch: have the Trainer count it (it does so for
            # models whose forward takes loss kwargs) over the shifted labels, and treat the loss
            # as normalised over the accumulated batch.
            self.model_accepts_loss_kwargs = True
            self._loss_shifts_labels = True
            if use_fused_linear:
                _head(self.model, "student")
                _head(self.teacher_model, "teacher")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.use_fused_linear:
                inner = self.accelerator.unwrap_model(model)
                if inner is not model and isinstance(model, nn.parallel.DistributedDataParallel):
                    raise NotImplementedError("use_fused_linear=True calls the backbone of the "
                                              "unwrapped model: not under DDP")
                model = inner
            loss, outputs = causal_lm_distill_loss(
                model, self.teacher_model, inputs, loss=self.distill_loss,
                loss_kwargs=self.distill_loss_kwargs, kd_weight=self.kd_weight,
                ce_weight=self.ce_weight, num_items_in_batch=num_items_in_batch,
                use_fused_linear=self.use_fused_linear, chunk_size=self.chunk_size,
                inplace_backward=model.training and torch.is_grad_enabled())
            if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
                # num_items_in_batch counts every rank's tokens and DDP averages the gradients over
                # the ranks: scale back up, as Trainer.compute_loss does (a scalar factor, in place
                # on the saved gradient in backward)
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                factor = self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu
                if factor != 1:
                    loss = loss * factor
            return (loss, outputs) if return_outputs else loss

    DistillationTrainer.__module__ = __name__
    return DistillationTrainer


_LAZY = {}


def __getattr__(name: str):
    """``DistillationTrainer`` is built (and transformers imported) on first access."""
    if name == "DistillationTrainer":
        if name not in _LAZY:
            _LAZY[name] = _make_trainer()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
