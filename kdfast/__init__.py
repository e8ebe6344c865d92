"""kdfast: fused knowledge-distillation losses for PyTorch (C++ on the CPU, Triton on the GPU).

The losses are declared in :mod:`kdfast.losses`; their functions (``kdfast.kd_loss``, ...) and
modules (``kdfast.KDLoss``, ...) are derived from those declarations.
"""
from . import functional, losses, modules, recipes, reference, teacher_store, vocab_parallel
from .functional import *  # noqa: F401,F403  (every named loss function: functional.__all__)
from .fused_linear import FusedLinearDistillLoss, fused_linear_distill_loss
from .modules import *  # noqa: F401,F403  (every loss module: modules.__all__)
from .multi_teacher import multi_teacher_loss
from .past import PastLogits

__version__ = "0.1.0"
__all__ = (functional.__all__ + ["fused_linear_distill_loss", "multi_teacher_loss"] + modules.__all__
           + ["FusedLinearDistillLoss", "PastLogits", "reference", "recipes", "vocab_parallel", "losses"])
