"""Render a skill into token segments: a prefix (instruction) and one segment per demonstration,
with the answer tokens marked. Chat models render turns through their chat template; models
without one use plain "input answer" text, as in the shared task format.

Tokenize what the model reads: the whole prompt is rendered as *one text* and tokenized *once*;
segment and answer boundaries come from character offsets (the tokenizer's offset mapping).
Tokenizing pieces separately changes tokens at every boundary (SmolLM2 reads "\\n\\n" before a
word as '\\n', '\\n', but a lone "\\n\\n" is one token), which cost 21 points of full-ICL accuracy.

A memory ends where a query will continue it, so the demonstrations are tokenized with a *probe*
after them (the start of a typical query: the first demonstration's input) and a query on a
memory is tokenized together with the memory's last segment (``tail_text``), keeping only the
tokens after it. Both therefore match the tokenization of the whole text "memory + query".
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Mode = Literal["chat", "plain"]
DEMO_SEPARATOR = "\n\n"
RENDER_VERSION = 2  # 1: piecewise tokenization; 2: whole text tokenized once (changes memory tensors)

log = logging.getLogger(__name__)


class DemoLike(Protocol):
    input: str
    output: str


@dataclass
class Segment:
    ids: list[int] = field(default_factory=list)
    answer: list[bool] = field(default_factory=list)
    mm: dict[str, Any] | None = None  # processor outputs for this segment's images (VLMs; engine/vision.py)
    text: str = ""  # the characters this segment's tokens start in (for a query's tokenization context)

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

    @property
    def ids(self) -> list[int]:
        return self.prefix.ids + [t for d in self.demos for t in d.ids]

    @property
    def tail_text(self) -> str:
        """The last segment's text: the context a query on this memory is tokenized after."""
        return self.demos[-1].text if self.demos else self.prefix.text

    @property
    def tail_ids(self) -> list[int]:
        return self.demos[-1].ids if self.demos else self.prefix.ids


@dataclass
class _Piece:
    """One segment's text and, within it, the answer's character span (end exclusive)."""

    text: str
    answer: tuple[int, int] | None = None


class PromptError(ValueError):
    """A prompt that cannot be rendered for this model."""


def choose_mode(tokenizer: Any, requested: str = "auto") -> Mode:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "chat" and not has_template:
        raise PromptError("prompt_format='chat' but the tokenizer has no chat template")
    if requested in ("chat", "plain"):
        return requested  # type: ignore[return-value]
    return "chat" if has_template else "plain"


def answer_stops(mode: Mode, outputs: Sequence[str]) -> list[str]:
    """Where an answer on a skill ends, read from its demonstrations' answers: at a newline when
    every demonstrated answer is one line, else at the separator that follows each answer in plain
    text (chat templates end the turn with the end-of-turn token, which ends decoding itself).
    Without it a small model answers, then goes on writing demonstrations of its own."""
    if outputs and all("\n" not in o.strip() for o in outputs):
        return ["\n"]
    return [DEMO_SEPARATOR] if mode == "plain" else []


class Renderer:
    """Turns instruction/demonstrations/queries into token ids for one tokenizer and mode."""

    def __init__(self, tokenizer: Any, mode: Mode) -> None:
        self.tok = tokenizer
        self.mode = mode
        if not getattr(tokenizer, "is_fast", False):
            raise PromptError(
                f"{type(tokenizer).__name__} is a slow tokenizer; EMLoC needs a fast (Rust) tokenizer for offsets"
            )
        bos = getattr(tokenizer, "bos_token_id", None)
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos: list[int] = [bos] if bos is not None and probe and probe[0] == bos else []
        self._warned = False

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    # ---- tokenizing with offsets --------------------------------------------------------------

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not text:
            return [], []
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _lead(self, text: str) -> list[int]:
        """BOS ids for a text that starts a sequence (unless the text spells its BOS itself)."""
        bos_token = getattr(self.tok, "bos_token", None)
        if self.bos and bos_token and text.startswith(bos_token):
            return []
        return list(self.bos)

    def _segments(self, pieces: Sequence[_Piece], probe: str = "") -> list[Segment]:
        """Tokenize the concatenated pieces once (followed by ``probe``, whose tokens are dropped)
        and split the tokens into one segment per piece by their first character."""
        text = "".join(p.text for p in pieces)
        ids, offsets = self._encode(text + probe)
        keep = [i for i, (s, _) in enumerate(offsets) if s < len(text)]
        if keep and offsets[keep[-1]][1] > len(text):  # the probe merged into the last token
            ids, offsets = self._encode(text)
            keep = list(range(len(ids)))
        starts, at = [], 0
        for p in pieces:
            starts.append(at)
            at += len(p.text)
        segs = [Segment(text=p.text) for p in pieces]
        for i in keep:
            s, e = offsets[i]
            k = max(bisect.bisect_right(starts, s) - 1, 0)
            ans = pieces[k].answer
            is_answer = ans is not None and s < starts[k] + ans[1] and e > starts[k] + ans[0]
            segs[k].add([ids[i]], is_answer)
        return segs

    def continue_ids(self, context: str, text: str, context_ids: Sequence[int] | None = None) -> list[int]:
        """Ids of ``text`` as the tokenizer reads it right after ``context`` (tokenized together,
        the context's tokens dropped). ``context_ids``, when given, are the tokens already in the
        cache for the context; a mismatch means the cache does not hold the whole text's tokens."""
        if not context:
            return self.ids(text)
        ids, offsets = self._encode(context + text)
        first = next((i for i, (s, _) in enumerate(offsets) if s >= len(context)), len(ids))
        straddles = first > 0 and offsets[first - 1][1] > len(context)
        n = min(first, len(context_ids or ()))
        differs = n > 0 and ids[first - n : first] != list(context_ids or ())[-n:]
        if (straddles or differs) and not self._warned:
            self._warned = True
            log.warning("a query does not continue its memory on a token boundary (%r + %r); "
                        "its tokens differ from the whole text's", context[-20:], text[:20])
        return self.ids(text) if straddles else ids[first:]

    def label_ids(self, query_text: str, option: str) -> list[int]:
        """Ids of an answer option as read right after the query text (plain: after a space)."""
        lead = "" if self.mode == "chat" or option[:1].isspace() else " "
        return self.continue_ids(query_text, lead + option)

    # ---- chat-template helpers ----------------------------------------------------------------

    def _template(self, messages: list[dict[str, Any]], gen: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def _system(self, instruction: str) -> list[dict[str, Any]]:
        return [{"role": "system", "content": instruction}] if instruction else []

    def _suffix(self, longer: str, shorter: str) -> str:
        if not longer.startswith(shorter):
            raise PromptError("the chat template does not render turns incrementally; use prompt_format='plain'")
        return longer[len(shorter) :]

    def _base_text(self, instruction: str) -> str:
        base = self._system(instruction)
        return self._template(base) if base else ""

    # ---- text pieces --------------------------------------------------------------------------

    def prefix_text(self, instruction: str) -> str:
        if self.mode == "plain":
            return instruction + DEMO_SEPARATOR if instruction else ""
        return self._base_text(instruction)

    def demo_piece(self, input_text: str, output: str, instruction: str = "") -> _Piece:
        if self.mode == "plain":
            lead = "" if output[:1].isspace() or input_text[-1:].isspace() else " "
            start = len(input_text) + len(lead)
            return _Piece(input_text + lead + output + DEMO_SEPARATOR, (start, start + len(output)))
        user = self._system(instruction) + [{"role": "user", "content": input_text}]
        asked = self._template(user, gen=True)
        answered = self._template(user + [{"role": "assistant", "content": output}])
        head = self._suffix(asked, self._base_text(instruction))
        tail = self._suffix(answered, asked)
        at = tail.find(output)
        if at < 0:
            raise PromptError("the chat template changed the assistant's answer text")
        start = len(head) + at
        return _Piece(head + tail, (start, start + len(output)))

    def query_text(self, input_text: str, instruction: str = "", on_memory: bool = True) -> str:
        """The text of a query that continues a memory (or, ``on_memory=False``, follows the prefix)."""
        if self.mode == "plain":
            return input_text.lstrip()  # the demonstrations' separator already ends in a blank line
        user = self._system(instruction) + [{"role": "user", "content": input_text}]
        return self._suffix(self._template(user, gen=True), self._base_text(instruction))

    # ---- public -------------------------------------------------------------------------------

    def render(self, instruction: str, demos: Sequence[DemoLike]) -> Rendered:
        """The instruction and demonstrations as the model reads them: one text, tokenized once."""
        pieces = [_Piece(self.prefix_text(instruction))]
        pieces += [self.demo_piece(d.input, d.output, instruction) for d in demos]
        probe = self.query_text(demos[0].input, instruction) if demos else ""
        segs = self._segments(pieces, probe)
        lead = self._lead(pieces[0].text)
        segs[0].ids[:0] = lead
        segs[0].answer[:0] = [False] * len(lead)
        return Rendered(self.mode, segs[0], segs[1:])

    def prefix(self, instruction: str) -> Segment:
        return self.render(instruction, []).prefix

    def demo(self, input_text: str, output: str, instruction: str = "") -> Segment:
        """One demonstration on its own (as if it were the whole skill after the prefix)."""
        seg = self._segments([self.demo_piece(input_text, output, instruction)],
                             self.query_text(input_text, instruction))[0]
        return seg

    def query(self, input_text: str, instruction: str = "", on_memory: bool = True,
              context: str | None = None, context_ids: Sequence[int] | None = None) -> list[int]:
        """Token ids of a query. On a memory it continues the demonstrations: tokenized after
        ``context`` (the memory's ``tail_text``; default: a demonstration separator in plain mode);
        else it stands alone after the instruction, tokenized with it as one text."""
        text = self.query_text(input_text, instruction, on_memory)
        if on_memory:
            return self.continue_ids(self._default_context() if context is None else context, text, context_ids)
        return self.standalone(self.prefix_text(instruction), text)

    def standalone(self, prefix: str, text: str) -> list[int]:
        """BOS + ``prefix`` + ``text`` tokenized as one text."""
        return self._lead(prefix or text) + self.ids(prefix + text)

    def skill_text(self, instruction: str, demos: Sequence[DemoLike]) -> str:
        """The instruction and demonstrations as the one text the model reads (no BOS)."""
        return self.prefix_text(instruction) + "".join(self.demo_piece(d.input, d.output, instruction).text for d in demos)

    def full_prompt(self, instruction: str, demos: Sequence[DemoLike], input_text: str) -> list[int]:
        """Instruction, demonstrations and query as one text tokenized once: what full-context ICL
        feeds the model, independent of segments and probes (the reference for memory tokens)."""
        return self.standalone(self.skill_text(instruction, demos), self.query_text(input_text, instruction))

    def _default_context(self) -> str:
        return DEMO_SEPARATOR if self.mode == "plain" else ""

    def conversation_text(self, turns: list[dict[str, Any]], instruction: str = "", on_memory: bool = True) -> str:
        if self.mode == "plain":
            parts = []
            for m in turns:
                if m["role"] == "assistant":
                    parts.append(" " + m["content"] + DEMO_SEPARATOR)
                elif m["role"] == "system":
                    parts.append(m["content"] + DEMO_SEPARATOR)
                else:
                    parts.append(m["content"])
            return "".join(parts).lstrip()
        base = self._system(instruction)
        if on_memory:
            return self._suffix(self._template(base + turns, gen=True), self._base_text(instruction))
        if instruction and turns[0]["role"] != "system":
            turns = base + turns
        return self._template(turns, gen=True)

    def conversation(self, turns: list[dict[str, Any]], instruction: str = "", on_memory: bool = True,
                     context: str | None = None, context_ids: Sequence[int] | None = None) -> list[int]:
        """Token ids for a chat history (role/content dicts) ending where the model answers.

        On a memory the turns continue the demonstrations (which already hold the instruction);
        zero-shot they stand alone. Plain mode renders turns like demonstrations."""
        text = self.conversation_text(turns, instruction, on_memory)
        if on_memory:
            return self.continue_ids(self._default_context() if context is None else context, text, context_ids)
        if self.mode == "plain":
            return self.standalone(self.prefix_text(instruction), text)
        return self.standalone("", text)
