"""LanguageModel: a loaded transformers model with its tokenizer, the facts the engine needs, and a
fingerprint of everything that determines a memory's tensors."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from ..engine import CompressedMemory, Renderer, instrument, model_facts
from ..engine.decode import Generation, generate, score_continuations, stream_tokens
from ..engine.prompt import choose_mode
from ..engine.prompt_cache import PromptCache

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def memory_context(memory: CompressedMemory | None) -> dict[str, Any]:
    """What a prompt on ``memory`` is tokenized after: the memory's last segment (text and ids),
    so that memory + prompt tokenize like the whole text. Memories without it: the defaults."""
    if memory is None:
        return {}
    return {"context": memory.header.get("tail_text"), "context_ids": memory.header.get("tail_ids")}


def memory_instruction(memory: CompressedMemory | None, instruction: str) -> str:
    """A chat turn on a memory is rendered after the memory's system turn (its instruction);
    without it, templates such as SmolLM2's insert their default system prompt before the turn."""
    if instruction or memory is None:
        return instruction
    return str(memory.header.get("instruction", ""))


class LanguageModel:
    """A causal LM prepared for EMLoC memories (``instrument`` installs the one hook)."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, name: str, weights_id: str | None = None, processor: Any = None
    ) -> None:
        spread = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()})
        if len(spread) > 1:
            raise ValueError(
                f"{name}: its weights are spread over {', '.join(spread)} (device_map); EMLoC's engine runs "
                "a model on one device (load it with device_map=None and .to(device), or pick a smaller model)")
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.facts = model_facts(model)
        self.processor = processor
        self.vision: Any = None  # engine.vision.VisionAdapter for vision-language models
        from ..engine.vision import VisionAdapter, is_vision_model

        if is_vision_model(model):
            if processor is None:
                raise ValueError(f"{name}: a vision-language model needs its processor (processor=...)")
            if not getattr(tokenizer, "chat_template", None) and getattr(processor, "chat_template", None):
                tokenizer.chat_template = processor.chat_template
            self.vision = VisionAdapter(model, processor)
        instrument(model)
        self._weights_id = weights_id
        self._fingerprint: str | None = None
        self._renderers: dict[str, Renderer] = {}
        self._lock = threading.Lock()
        self.prompt_cache = PromptCache()  # the chat model's recent prompts (engine/prompt_cache.py)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def renderer(self, prompt_format: str = "auto") -> Renderer:
        """``"auto"`` renders plain text for text models (measured: SmolLM2-Instruct answers skills
        with the demonstrations' labels in plain mode, with "I'm sorry" through its chat template)
        and the chat template for vision-language models (images go through the processor)."""
        if prompt_format == "auto":
            prompt_format = "chat" if self.vision is not None and self.has_chat_template else "plain"
        mode = choose_mode(self.tokenizer, prompt_format)
        with self._lock:
            if mode not in self._renderers:
                if self.vision is not None:
                    from ..engine.vision import VisionRenderer

                    self._renderers[mode] = VisionRenderer(self.tokenizer, mode, self.processor)
                else:
                    self._renderers[mode] = Renderer(self.tokenizer, mode)
            return self._renderers[mode]

    def fingerprint(self) -> str:
        """Hash of weights id (or the weights themselves), config, tokenizer, chat template and dtype."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            if self._weights_id:
                h.update(self._weights_id.encode())
            else:
                for name, p in sorted(self.model.state_dict().items()):
                    h.update(name.encode())
                    h.update(p.detach().float().contiguous().cpu().numpy().tobytes())
            config = cast("PretrainedConfig", self.model.config)
            h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
            vocab = self.tokenizer.get_vocab()
            h.update(json.dumps(sorted(vocab.items()), separators=(",", ":")).encode())
            h.update(str(getattr(self.tokenizer, "chat_template", "")).encode())
            h.update(str(self.dtype).encode())
            image_processor = getattr(self.processor, "image_processor", None)
            if image_processor is not None:  # VLMs: resizing/patching changes the memory too
                h.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # ---- the public generate of the contract ---------------------------------------------------

    def _prompt_ids(self, prompt: str, memory: CompressedMemory | None, instruction: str = "") -> list[int]:
        mode = memory.render_mode if memory is not None else "auto"
        instruction = memory_instruction(memory, instruction)
        return self.renderer(mode).query(prompt, instruction=instruction, on_memory=memory is not None,
                                         **memory_context(memory))

    def generate(
        self,
        prompt: str,
        memory: CompressedMemory | None = None,
        max_new_tokens: int = 32,
        *,
        instruction: str = "",
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> str:
        """Answer ``prompt`` (rendered like a demonstration input) on ``memory`` (None: zero-shot)."""
        return self.generate_ids(
            self._prompt_ids(prompt, memory, instruction), memory, max_new_tokens,
            temperature=temperature, top_p=top_p, stop=stop, seed=seed,
        ).text

    @property
    def is_vision(self) -> bool:
        """Whether the model takes images (vision-language models; see engine/vision.py)."""
        return self.vision is not None

    def encode_conversation(
        self, turns: list[dict[str, Any]], instruction: str = "", memory: CompressedMemory | None = None
    ) -> list[int]:
        """Prompt ids for chat turns (``{"role", "content", "images"?}``) that continue ``memory``
        (or stand alone when it is None). Text-only models refuse images with a clear error."""
        if any(t.get("images") for t in turns) and not self.is_vision:
            raise ValueError(f"{self.name} is a text-only model: it cannot take images")
        # zero-shot conversations use the chat template where there is one (a chat assistant)
        mode = memory.render_mode if memory is not None else ("chat" if self.has_chat_template else "plain")
        instruction = memory_instruction(memory, instruction)
        if self.is_vision:  # images stay on the turns; the ids carry the processor outputs (PromptIds.mm)
            return self.renderer(mode).conversation(list(turns), instruction=instruction, on_memory=memory is not None,
                                                    **memory_context(memory))
        plain = [{"role": t["role"], "content": t["content"]} for t in turns]
        return self.renderer(mode).conversation(plain, instruction=instruction, on_memory=memory is not None,
                                                **memory_context(memory))

    def generate_ids(self, prompt_ids: Sequence[int], memory: CompressedMemory | None, max_new_tokens: int = 32, **kw: Any) -> Generation:
        return generate(self, prompt_ids, memory, max_new_tokens=max_new_tokens, **kw)

    def stream_ids(self, prompt_ids: Sequence[int], memory: CompressedMemory | None, max_new_tokens: int = 32, **kw: Any) -> Iterator[tuple[str, Generation | None]]:
        return stream_tokens(self, prompt_ids, memory, max_new_tokens=max_new_tokens, **kw)

    def score(self, prompt: str, options: Sequence[str], memory: CompressedMemory | None = None, instruction: str = "") -> list[float]:
        """Log-likelihood of each option as the answer to ``prompt`` (label ranking)."""
        ids = self._prompt_ids(prompt, memory, instruction)
        renderer = self.renderer(memory.render_mode if memory is not None else "auto")
        text = renderer.query_text(prompt, memory_instruction(memory, instruction), on_memory=memory is not None)
        return score_continuations(self, ids, [renderer.label_ids(text, o) for o in options], memory)

    def __repr__(self) -> str:
        f = self.facts
        return f"LanguageModel({self.name!r}, {f.model_type}, {f.num_layers} layers, {f.num_kv_heads} kv heads)"
