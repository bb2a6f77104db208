"""PAINT: the method (`method`) and the received-attention scores of CLS-less towers (`received`)."""

from .method import Paint, PaintConfig

__all__ = ["Paint", "PaintConfig"]
