"""CCA, concentric causal attention: the method (`method`) and its ring geometry (`geometry`)."""

from .method import Cca, CcaConfig

__all__ = ["Cca", "CcaConfig"]
