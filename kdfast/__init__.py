"""kdfast: fused knowledge-distillation losses for PyTorch (C++ on the CPU, Triton on the GPU)."""
from . import recipes, reference, vocab_parallel
from .functional import (dkd_loss, jsd_loss, kd_loss, logit_matching_loss, ls_kd_loss,
                         retro_kd_loss, topk_kd_loss, ttm_loss, wttm_loss)
from .fused_linear import FusedLinearDistillLoss, fused_linear_distill_loss
from .multi_teacher import multi_teacher_loss
from .modules import (DKDLoss, JSDLoss, KDLoss, LogitMatchingLoss, LSKDLoss, RetroKDLoss,
                      TopKKDLoss, TTMLoss, WTTMLoss)
from .past import PastLogits

__version__ = "0.1.0"
__all__ = ["kd_loss", "ttm_loss", "wttm_loss", "dkd_loss", "logit_matching_loss", "ls_kd_loss",
           "jsd_loss", "retro_kd_loss", "topk_kd_loss", "fused_linear_distill_loss", "multi_teacher_loss", "KDLoss", "TTMLoss", "WTTMLoss", "DKDLoss",
           "LogitMatchingLoss", "LSKDLoss", "JSDLoss", "RetroKDLoss", "TopKKDLoss", "FusedLinearDistillLoss", "PastLogits", "reference", "recipes", "vocab_parallel"]
