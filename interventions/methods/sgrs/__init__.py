"""Saliency-guided rejection sampling: the method (`method`), its decoding loop (`loop`) and candidate selection (`select`)."""

from .method import Sgrs, SgrsConfig

__all__ = ["Sgrs", "SgrsConfig"]
