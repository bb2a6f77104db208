"""Methods, one module each; importing this package registers them all."""

from . import act, carve, cca, gift, locore, pag, pai, paint, sgrs, var, vhr  # noqa: F401
from .base import METHODS, AttentionCall, Method, ModelInfo, RowRequest
from ..core.params import MethodConfig

__all__ = ["METHODS", "AttentionCall", "Method", "MethodConfig", "ModelInfo", "RowRequest"]
