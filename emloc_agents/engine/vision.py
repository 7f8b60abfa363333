"""Vision-language models: images in demonstrations and queries, merged by the model's own code.

A VLM chunk is prefilled like a text chunk, except that the language model receives
``inputs_embeds`` in which the image-token rows already hold the vision features. We do not
re-implement any architecture's merge: :class:`VisionAdapter` calls the VLM's inner model (vision
tower, projector, ``masked_scatter`` ...) and captures the keyword arguments it hands to its
language model (a forward pre-hook that is inert unless a capture is running), then stops.

Each rendered segment (one demonstration, the prefix, a query) is embedded on its own: vision
towers process images independently and the merge is per token, so the concatenation of segment
embeddings equals the embedding of the concatenated sequence.

Positions. 1-D models (LLaVA, Idefics3/SmolVLM): as for text. M-RoPE models (Qwen2-VL,
Qwen2.5-VL): the mask / cache order stays the 1-D sequence index (``CompressedMemory.positions``,
``original_length``), while RoPE gets (3, B, T) ids: every segment is indexed on its own with the
model's ``get_rope_index`` and shifted by the extent (max index + 1) of all content before it, on
all three axes. ``CompressedMemory.next_position`` is the next free M-RoPE index; text-only tokens
after it use ``rope = position + (next_position - original_length)`` (``MemoryCache.rope_delta``).
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from typing import Any, cast

import torch

from ..skills import ImageLike, SkillError, load_image
from .prompt import DEMO_SEPARATOR, DemoLike, Mode, PromptError, Rendered, Renderer, Segment, _Piece

SUPPORTED_VISION = ("qwen2_vl", "qwen2_5_vl", "llava", "idefics3")
MROPE_TYPES = ("qwen2_vl", "qwen2_5_vl")

_CAPTURE: contextvars.ContextVar[bool] = contextvars.ContextVar("emloc_vision_capture", default=False)


class _Captured(Exception):  # noqa: N818 - control flow, never escapes this module
    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("captured")
        self.kwargs = kwargs


def is_vision_model(model: torch.nn.Module) -> bool:
    return getattr(model.config, "model_type", None) in SUPPORTED_VISION


class PromptIds(list):
    """Prompt token ids that also carry the processor outputs for the prompt's images (``mm``).

    A plain ``list[int]`` everywhere else, so it passes through code written for text prompts."""

    mm: dict[str, torch.Tensor] | None = None


def _text_language_model(model: torch.nn.Module) -> torch.nn.Module:
    from .forward import backbone

    return backbone(model)


class VisionAdapter:
    """Embeddings and positions of a VLM's segments, through the model's own vision path."""

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model: Any = cast(Any, model)
        self.processor = processor
        self.model_type = str(self.model.config.model_type)
        if self.model_type not in SUPPORTED_VISION:
            raise TypeError(
                f"vision architecture {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_VISION)}"
            )
        self.mrope = self.model_type in MROPE_TYPES
        self.image_token_id = int(self.model.config.image_token_id)
        self.inner: Any = self.model.model  # the VLM without its LM head
        lm: Any = _text_language_model(model)
        if not getattr(lm, "_emloc_capture_hook", False):
            lm.register_forward_pre_hook(_capture_hook, with_kwargs=True)
            lm._emloc_capture_hook = True

    # ---- embeddings ------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, ids: Sequence[int], mm: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """(T, H) input embeddings of one segment (image rows replaced by vision features)."""
        device = next(self.model.parameters()).device
        t = torch.tensor([list(ids)], dtype=torch.long, device=device)
        if not mm:
            return self.model.get_input_embeddings()(t)[0]
        kwargs = {k: v.to(device) for k, v in mm.items()}
        pos = torch.zeros(3, 1, t.shape[1], dtype=torch.long, device=device) if self.mrope else torch.zeros_like(t)
        token = _CAPTURE.set(True)
        try:
            self.inner(input_ids=t, position_ids=pos, use_cache=False, **kwargs)
        except _Captured as c:
            embeds = c.kwargs.get("inputs_embeds")
        else:  # pragma: no cover - the hook always fires for a supported VLM
            raise RuntimeError(f"{self.model_type}: the language model was not called with inputs_embeds")
        finally:
            _CAPTURE.reset(token)
        if embeds is None:  # pragma: no cover
            raise RuntimeError(f"{self.model_type}: the language model was not called with inputs_embeds")
        return embeds[0]

    # ---- positions -------------------------------------------------------------------------

    def rope(self, ids: Sequence[int], mm: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """(3, T) M-RoPE ids of one segment indexed on its own (starting at 0)."""
        t = torch.tensor([list(ids)], dtype=torch.long)
        if not mm or "image_grid_thw" not in mm:
            return torch.arange(t.shape[1])[None].expand(3, -1).clone()
        types = (t == self.image_token_id).int()
        pos, _ = self.inner.get_rope_index(t, mm_token_type_ids=types, image_grid_thw=mm["image_grid_thw"].cpu())
        return pos[:, 0]

    @staticmethod
    def extent(rope: torch.Tensor) -> int:
        return int(rope.max()) + 1 if rope.numel() else 0

    def segments_inputs(self, segments: Sequence[Segment], rope_start: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Embeddings (1, n, H) of consecutive segments, their RoPE ids (3, 1, n) from ``rope_start``
        (None for 1-D models), and the next free RoPE index."""
        embeds = torch.cat([self.embed(s.ids, s.mm) for s in segments if len(s)], dim=0)[None]
        if not self.mrope:
            return embeds, None, rope_start + embeds.shape[1]
        parts, nxt = [], rope_start
        for s in segments:
            if not len(s):
                continue
            r = self.rope(s.ids, s.mm)
            parts.append(r + nxt)
            nxt += self.extent(r)
        return embeds, torch.cat(parts, dim=1)[:, None].to(embeds.device), nxt

    def packed_inputs(self, segments: Sequence[Segment], rope_start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, T, H) embeddings and (3, 1, T) RoPE ids of segments packed into one row, each starting
        at ``rope_start`` (the replay of a chunk's demonstrations, see engine/replay.py)."""
        parts = [self.segments_inputs([s], rope_start) for s in segments]
        embeds = torch.cat([e for e, _, _ in parts], dim=1)
        ropes = [r for _, r, _ in parts if r is not None]
        return embeds, (torch.cat(ropes, dim=2) if ropes else None)

    def prompt_inputs(self, prompt_ids: Sequence[int], rope_start: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Embeddings and RoPE ids for a prompt with images (None, None for a text prompt)."""
        mm = getattr(prompt_ids, "mm", None)
        if not mm:
            return None, None
        seg = Segment(list(prompt_ids), [False] * len(prompt_ids), mm=mm)
        embeds, rope, _ = self.segments_inputs([seg], rope_start)
        return embeds, rope


def _capture_hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    if _CAPTURE.get():
        raise _Captured(kwargs)
    return None


# ---- rendering ---------------------------------------------------------------------------


def _images(images: Sequence[ImageLike]) -> list[Any]:
    return [load_image(i) for i in images]


class VisionRenderer(Renderer):
    """A :class:`Renderer` whose demonstrations and turns may carry images: user turns with images
    become content lists (``{"type": "image"}`` items, then the text) through the processor's chat
    template, and the image placeholders are expanded and tokenized by the processor."""

    def __init__(self, tokenizer: Any, mode: Mode, processor: Any) -> None:
        super().__init__(tokenizer, mode)
        self.proc = processor
        self.chat_template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        self.image_token = str(getattr(processor, "image_token", "<image>"))

    def _template(self, messages: list[dict[str, Any]], gen: bool = False) -> str:
        return self.tok.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=gen
        )

    def mm_ids(self, text: str, images: list[Any]) -> tuple[list[int], dict[str, torch.Tensor] | None]:
        """Token ids of ``text`` with its image placeholders expanded, and the processor's image tensors."""
        if not images:
            return self.ids(text), None
        try:
            out = self.proc(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
        except (ValueError, TypeError, OSError) as e:
            raise SkillError(f"the processor cannot take these images: {e}") from e
        ids = out["input_ids"][0].tolist()
        mm = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")}
        return ids, mm

    @staticmethod
    def _user(text: str, n_images: int) -> dict[str, Any]:
        if not n_images:
            return {"role": "user", "content": text}
        return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}

    def render(self, instruction: str, demos: Sequence[DemoLike]) -> Rendered:
        """Text-only skills: one text tokenized once. With images, each demonstration goes through
        the processor on its own (chat turns end in special tokens, so the pieces join cleanly)."""
        if not any(getattr(d, "images", None) for d in demos):
            return super().render(instruction, demos)
        segs = [self.demo(d.input, d.output, instruction, images=getattr(d, "images", None) or ()) for d in demos]
        return Rendered(self.mode, self.prefix(instruction), segs)

    def demo(self, input_text: str, output: str, instruction: str = "", images: Sequence[ImageLike] = ()) -> Segment:
        if not images:
            return super().demo(input_text, output, instruction)
        pil = _images(images)
        seg = Segment()
        if self.mode == "plain":
            ids, mm = self.mm_ids(self.image_token * len(pil) + input_text, pil)
            seg.add(ids)
            answer = output if output[:1].isspace() or input_text[-1:].isspace() else " " + output
            seg.add(self.ids(answer), is_answer=True)
            seg.add(self.ids(DEMO_SEPARATOR))
            seg.mm, seg.text = mm, DEMO_SEPARATOR  # a query continues after the separator
            return seg
        base = self._system(instruction)
        user = base + [self._user(input_text, len(pil))]
        asked = self._template(user, gen=True)
        answered = self._template(user + [{"role": "assistant", "content": output}])
        ids, mm = self.mm_ids(self._suffix(asked, self._template(base) if base else ""), pil)
        seg.add(ids)
        seg.mm = mm
        tail = self._suffix(answered, asked)  # the assistant turn: text only, its answer marked
        at = tail.find(output)
        if at < 0:
            raise PromptError("the chat template changed the assistant's answer text")
        turn = self._segments([_Piece(tail, (at, at + len(output)))])[0]
        seg.ids += turn.ids
        seg.answer += turn.answer
        return seg

    def conversation(self, turns: list[dict[str, Any]], instruction: str = "", on_memory: bool = True,
                     context: str | None = None, context_ids: Sequence[int] | None = None) -> list[int]:
        """Like :meth:`Renderer.conversation`; turns may carry ``"images"``. Returns :class:`PromptIds`."""
        pil = [img for t in turns for img in _images(t.get("images") or [])]
        plain = [{"role": t["role"], "content": t["content"]} for t in turns]
        if not pil:
            return super().conversation(plain, instruction, on_memory, context, context_ids)
        if self.mode == "plain":
            text = ""
            for t in turns:
                n = len(t.get("images") or [])
                if t["role"] == "assistant":
                    text += " " + t["content"] + DEMO_SEPARATOR
                elif t["role"] == "system":
                    text += t["content"] + DEMO_SEPARATOR
                else:
                    text += self.image_token * n + t["content"]
            lead = [] if on_memory else self.prefix(instruction).ids
        else:
            msgs = [self._user(t["content"], len(t.get("images") or [])) if t["role"] == "user" else dict(r)
                    for t, r in zip(turns, plain, strict=True)]
            base = self._system(instruction)
            if on_memory:
                text = self._suffix(self._template(base + msgs, gen=True), self._template(base) if base else "")
            else:
                if instruction and msgs[0]["role"] != "system":
                    msgs = base + msgs
                text = self._template(msgs, gen=True)
            bos_token = getattr(self.tok, "bos_token", None)
            lead = self.bos if (not on_memory and self.bos and not (bos_token and text.startswith(bos_token))) else []
        ids, mm = self.mm_ids(text, pil)
        out = PromptIds(list(lead) + ids)
        out.mm = mm
        return out
