"""A per-sample cache of a past student state's logits, for :func:`kdfast.retro_kd_loss`."""
from __future__ import annotations

import torch
from torch import Tensor


class PastLogits:
    """Keeps, for every training sample, the logits a past state of the student gave it.

    RetroKD distils towards a mix of the teacher and a *past* student. Storing a whole past model
    and running it costs a forward pass per step; this cache instead keeps the logits the student
    produced for each sample (indexed by its dataset index) and refreshes them every
    ``refresh_every`` epochs, so the "past student" is the student of the last refresh epoch::

        past = kdfast.PastLogits(len(train_set), num_classes, refresh_every=5)
        for epoch in range(epochs):
            for x, y, idx in loader:                  # the loader also yields dataset indices
                z = student(x)
                with torch.no_grad():
                    v = teacher(x)
                zp = past.get(idx, z)                 # samples never stored yet: z itself
                loss = kdfast.retro_kd_loss(z, v, zp, y, past_weight=0.5)
                past.store(idx, z, epoch)             # written only in refresh epochs
                loss.backward(); opt.step(); opt.zero_grad()

    ``get`` before ``store`` reads the logits of the previous refresh. Memory: ``num_samples x
    num_classes`` in ``dtype`` (float16 halves it; the loss upcasts on load).
    """

    def __init__(self, num_samples: int, num_classes: int, *, refresh_every: int = 1,
                 dtype: torch.dtype = torch.float32, device=None):
        if num_samples < 0 or num_classes < 1:
            raise ValueError(f"need num_samples >= 0 and num_classes >= 1, got {num_samples}, {num_classes}")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.refresh_every = refresh_every
        self.logits = torch.zeros(num_samples, num_classes, dtype=dtype, device=device)
        self.filled = torch.zeros(num_samples, dtype=torch.bool, device=device)

    def get(self, index: Tensor, current: Tensor) -> Tensor:
        """Past logits of the samples ``index`` (shape ``(B,)``), in ``current``'s dtype; samples
        never stored get ``current.detach()`` (RetroKD then reduces to KD towards a teacher/student
        mix of the present)."""
        index = index.to(self.logits.device)
        past = self.logits[index].to(device=current.device, dtype=current.dtype)
        have = self.filled[index].to(current.device).unsqueeze(-1)
        return torch.where(have, past, current.detach())

    def store(self, index: Tensor, logits: Tensor, epoch: int) -> bool:
        """Store ``logits`` for ``index`` if ``epoch`` is a refresh epoch; returns whether it did."""
        if epoch % self.refresh_every:
            return False
        index = index.to(self.logits.device)
        self.logits[index] = logits.detach().to(self.logits)
        self.filled[index] = True
        return True
