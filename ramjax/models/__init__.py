"""Models built from ramjax.layers."""

from ramjax.models.lm import LanguageModel
from ramjax.models.mixers import MIXERS

__all__ = ["LanguageModel", "MIXERS"]
