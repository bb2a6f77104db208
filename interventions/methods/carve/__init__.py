"""CARVE, contrastive attention crop: the method (`method`), its prompts (`prompts`) and its map-to-image steps (`refine`)."""

from .method import Carve, CarveConfig

__all__ = ["Carve", "CarveConfig"]
