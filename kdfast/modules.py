"""``nn.Module`` wrappers: hyperparameters and options in the constructor, the tensors in ``forward``.

One class per loss of :data:`kdfast.losses.REGISTRY` (``KDLoss`` for ``kd``, ...), generated from
its declaration: the constructor takes the loss's hyperparameters (with its defaults) and every
option of the function (``kd_weight``, ``ce_weight``, ``ignore_index``, ``reduction``, ``backend``,
``inplace_backward``, and for a dense teacher ``process_group``, ``vocab_start``, ``vocab_size``),
positionally in that order or by keyword; ``forward`` takes the function's positional tensors
(``forward(student, teacher, labels=None)``; retro_kd: ``forward(student, teacher, past_student,
labels=None)``; top-k: ``forward(student, teacher_topk_logprobs, teacher_topk_indices,
labels=None)``) and, keyword-only, the per-batch ``num_items_in_batch=None``.
"""
from __future__ import annotations

import inspect

from torch import Tensor, nn

from . import functional  # noqa: F401  (defines the functions the classes call)
from .losses import REGISTRY, Loss, define


#: options that vary per call: ``forward`` takes them (keyword-only), not the constructor
_PER_CALL = ("num_items_in_batch",)


class _DistillLoss(nn.Module):
    """Holds a loss's keyword arguments and calls its functional form."""

    _fn = None   # the functional loss, set by each subclass

    def __init__(self, **hparams):
        super().__init__()
        self.hparams = hparams

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


def _init(self, **hparams) -> None:
    _DistillLoss.__init__(self, **hparams)


def _forward(self, *tensors, **named) -> Tensor:
    return type(self)._fn(*tensors, **named, **self.hparams)


def _module(loss: Loss) -> type:
    P = inspect.Parameter
    fn = loss.function
    sig = inspect.signature(fn)
    self_ = P("self", P.POSITIONAL_OR_KEYWORD)
    # the constructor: hyperparameters then options, positional-or-keyword, the function's defaults
    # (but the per-call ``num_items_in_batch``, which forward takes)
    kw = [p.replace(kind=P.POSITIONAL_OR_KEYWORD) for p in sig.parameters.values()
          if p.kind == p.KEYWORD_ONLY and p.name not in _PER_CALL]
    init = define("__init__", inspect.Signature([self_] + kw, return_annotation="None"), _init,
                  module=__name__, qualname=f"{loss.module}.__init__", doc=None)
    # forward: the function's positional tensors (labels optional, as in every module)
    pos = [p for p in sig.parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    pos = [p.replace(default=None, annotation="Tensor | None") if p.name == "labels" else p for p in pos]
    pos += [sig.parameters[k] for k in _PER_CALL]   # keyword-only
    forward = define("forward", inspect.Signature([self_] + pos, return_annotation="Tensor"),
                     lambda self, **named: _forward(self, **named), module=__name__,
                     qualname=f"{loss.module}.forward", doc=None)
    doc = (f"Module form of :func:`kdfast.{loss.function_name}`: ``forward("
           f"{', '.join(p.name for p in pos if p.kind == p.POSITIONAL_OR_KEYWORD)}, *, "
           f"num_items_in_batch=None)``{', labels required' if loss.needs_labels else ''}.")
    cls = type(loss.module, (_DistillLoss,), {"__doc__": doc, "__module__": __name__,
                                               "__init__": init, "forward": forward,
                                               "_fn": staticmethod(fn)})
    return cls


for _loss in REGISTRY.values():
    globals()[_loss.module] = _module(_loss)
del _loss

#: every loss module class (``KDLoss``, ...), in declaration order
__all__ = [loss.module for loss in REGISTRY.values()]
