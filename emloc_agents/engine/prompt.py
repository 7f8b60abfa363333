"""Render a skill into token segments: a prefix (instruction) and one segment per demonstration,
with the answer tokens marked. Chat models render turns through their chat template; models
without one use plain "input answer" text, as in the shared task format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["chat", "plain"]
DEMO_SEPARATOR = "\n\n"


@dataclass
class Segment:
    ids: list[int] = field(default_factory=list)
    answer: list[bool] = field(default_factory=list)
    mm: dict[str, Any] | None = None  # processor outputs for this segment's images (VLMs; engine/vision.py)

    def add(self, ids: list[int], is_answer: bool = False) -> None:
        self.ids.extend(ids)
        self.answer.extend([is_answer] * len(ids))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Rendered:
    mode: Mode
    prefix: Segment
    demos: list[Segment]

    @property
    def num_tokens(self) -> int:
        return len(self.prefix) + sum(len(d) for d in self.demos)


class PromptError(ValueError):
    """A prompt that cannot be rendered for this model."""


def choose_mode(tokenizer: Any, requested: str = "auto") -> Mode:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "chat" and not has_template:
        raise PromptError("prompt_format='chat' but the tokenizer has no chat template")
    if requested in ("chat", "plain"):
        return requested  # type: ignore[return-value]
    return "chat" if has_template else "plain"


class Renderer:
    """Turns instruction/demonstrations/queries into token ids for one tokenizer and mode."""

    def __init__(self, tokenizer: Any, mode: Mode) -> None:
        self.tok = tokenizer
        self.mode = mode
        bos = getattr(tokenizer, "bos_token_id", None)
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos: list[int] = [bos] if bos is not None and probe and probe[0] == bos else []

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    # ---- chat-template helpers ----------------------------------------------------------------

    def _template(self, messages: list[dict[str, Any]], gen: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def _system(self, instruction: str) -> list[dict[str, Any]]:
        return [{"role": "system", "content": instruction}] if instruction else []

    def _with_bos(self, text: str) -> list[int]:
        bos_token = getattr(self.tok, "bos_token", None)
        if self.bos and bos_token and text.startswith(bos_token):
            return self.ids(text)
        return self.bos + self.ids(text)

    def _suffix(self, longer: str, shorter: str) -> str:
        if not longer.startswith(shorter):
            raise PromptError("the chat template does not render turns incrementally; use prompt_format='plain'")
        return longer[len(shorter) :]

    # ---- public -------------------------------------------------------------------------------

    def prefix(self, instruction: str) -> Segment:
        seg = Segment()
        if self.mode == "plain":
            seg.add(self.bos + self.ids(instruction + DEMO_SEPARATOR if instruction else ""))
        else:
            seg.add(self._with_bos(self._template(self._system(instruction))) if instruction else self.bos)
        return seg

    def demo(self, input_text: str, output: str, instruction: str = "") -> Segment:
        seg = Segment()
        if self.mode == "plain":
            seg.add(self.ids(input_text))
            answer = output if output[:1].isspace() or input_text[-1:].isspace() else " " + output
            seg.add(self.ids(answer), is_answer=True)
            seg.add(self.ids(DEMO_SEPARATOR))
            return seg
        base = self._system(instruction)
        user = base + [{"role": "user", "content": input_text}]
        asked = self._template(user, gen=True)
        answered = self._template(user + [{"role": "assistant", "content": output}])
        seg.add(self.ids(self._suffix(asked, self._template(base) if base else "")))
        self._add_answer(seg, asked, answered, output)
        return seg

    def _add_answer(self, seg: Segment, asked: str, answered: str, output: str) -> None:
        """Append the assistant turn (``answered`` minus ``asked``), marking the answer's tokens."""
        tail = self._suffix(answered, asked)
        at = tail.find(output)
        if at < 0:
            raise PromptError("the chat template changed the assistant's answer text")
        seg.add(self.ids(tail[:at]))
        seg.add(self.ids(output), is_answer=True)
        seg.add(self.ids(tail[at + len(output) :]))

    def query(self, input_text: str, instruction: str = "", on_memory: bool = True) -> list[int]:
        """Token ids of a query; on a memory it continues the demonstrations, else it stands alone."""
        if self.mode == "plain":
            if on_memory:
                return self.ids(input_text)
            return self.prefix(instruction).ids + self.ids(input_text)
        base = self._system(instruction)
        user = base + [{"role": "user", "content": input_text}]
        if on_memory:
            return self.ids(self._suffix(self._template(user, gen=True), self._template(base) if base else ""))
        return self._with_bos(self._template(user, gen=True))

    def conversation(self, turns: list[dict[str, Any]], instruction: str = "", on_memory: bool = True) -> list[int]:
        """Token ids for a chat history (role/content dicts) ending where the model answers.

        On a memory the turns continue the demonstrations (which already hold the instruction);
        zero-shot they stand alone. Plain mode renders turns like demonstrations."""
        if self.mode == "plain":
            parts = []
            for m in turns:
                if m["role"] == "assistant":
                    parts.append(" " + m["content"] + DEMO_SEPARATOR)
                elif m["role"] == "system":
                    parts.append(m["content"] + DEMO_SEPARATOR)
                else:
                    parts.append(m["content"])
            text = "".join(parts)
            if on_memory:
                return self.ids(text)
            return self.prefix(instruction).ids + self.ids(text)
        base = self._system(instruction)
        if on_memory:
            return self.ids(self._suffix(self._template(base + turns, gen=True), self._template(base) if base else ""))
        if instruction and turns[0]["role"] != "system":
            turns = base + turns
        return self._with_bos(self._template(turns, gen=True))
