"""Training recipes built on the kdfast losses: ``nn.Module`` wrappers that own the models, the
extra layers a method adds and its loss, and say which parameters an optimizer must update.

- :class:`ATSC`: adaptive teaching with a shared classifier (Jang et al., 2024).
"""
from .atsc import ATSC, ATSCOutput

__all__ = ["ATSC", "ATSCOutput"]
