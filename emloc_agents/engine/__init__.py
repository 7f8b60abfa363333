"""The algorithm, no I/O: chunk-wise prefill, importance, JS-checked pruning, decoding on a memory."""

from .cache import MemoryCache
from .compress import METHODS, ContextTooLongError, compress, register_method
from .decode import Generation, generate, score_continuations, stream_tokens
from .facts import SUPPORTED, ModelFacts, UnsupportedModelError, model_facts
from .memory import CompressedMemory
from .presses import EMLoCPress, KVzipPress, Press, RandomPress, SnapKVPress, StreamingLLMPress, UniformPress
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
    "RandomPress",
    "Renderer",
    "SnapKVPress",
    "KVzipPress",
    "StreamingLLMPress",
    "UniformPress",
    "UnsupportedModelError",
    "compress",
    "register_method",
    "generate",
    "instrument",
    "js_divergence",
    "model_facts",
    "score_continuations",
    "stream_tokens",
]
