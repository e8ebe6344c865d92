"""Drop-ins for the trainers LLM distillation runs in (docs/integrations.md):

- :mod:`kdfast.integrations.trl`: ``generalized_jsd_loss`` (TRL's ``GKDTrainer.generalized_jsd_loss``,
  its signature and semantics, on kdfast's fused kernel) and ``GKDTrainer`` (TRL's trainer with that
  loss on the unsliced logits);
- :mod:`kdfast.integrations.transformers`: ``DistillationTrainer``, a ``transformers.Trainer`` for
  logit distillation from a teacher model with any loss of the family (optionally the fused linear
  head: no logits), and ``causal_lm_distill_loss``, the loss it computes.

Transformers and TRL are optional (``pip install kdfast[hf]``): nothing here imports them until a
trainer class is asked for.
"""
