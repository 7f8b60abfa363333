"""The algorithm, no I/O: the compression methods (``compress``, ``METHODS``), EMLoC's press, decoding on a
memory. The baselines the benchmark compares live in ``emloc_agents.bench.presses``."""

from .cache import MemoryCache
from .compress import METHODS, ContextTooLongError, compress, register_method
from .decode import Generation, generate, score_continuations, stream_batch, stream_tokens
from .facts import SUPPORTED, ModelFacts, UnsupportedModelError, model_facts
from .memory import CompressedMemory
from .presses import EMLoCPress, Press
from .prompt import PromptError, Renderer
from .replay import js_divergence
from .runtime import instrument

__all__ = [
    "METHODS",
    "SUPPORTED",
    "CompressedMemory",
    "ContextTooLongError",
    "EMLoCPress",
    "Generation",
    "MemoryCache",
    "ModelFacts",
    "Press",
    "PromptError",
    "Renderer",
    "UnsupportedModelError",
    "compress",
    "register_method",
    "generate",
    "instrument",
    "js_divergence",
    "model_facts",
    "score_continuations",
    "stream_batch",
    "stream_tokens",
]
