"""MemoryRegistry: named skills -> compressed memories, compressed once, kept in RAM and in a store.

The registry joins the engine (tensors) and a byte store (bytes). A memory's key derives from
everything that determines its tensors (model fingerprint, the EMLoCConfig fields that change tensors,
skill content, format version), so a changed model, config or demonstration can never be served a
stale memory, and a knob that changes only the cost of compressing never forces a new one. Reads
that fail validation (corrupt, truncated, foreign) are logged, deleted and rebuilt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .config import EMLoCConfig
from .engine.compress import compress
from .engine.memory import CompressedMemory
from .engine.prompt import RENDER_VERSION
from .skills import Demonstration, Skill, SkillError, image_bytes, load_image
from .store import DiskCacheStore, LockingByteStore, MemoryFormatError, dump_memory, load_memory
from .store.format import FORMAT_VERSION, read_info

if TYPE_CHECKING:
    from .models.lm import LanguageModel

log = logging.getLogger(__name__)
SKILL_PREFIX = "skill:"
MEMORY_PREFIX = "memory:"


class UnknownSkillError(KeyError):
    """A skill name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class MemoryInfo:
    """How the last ``get`` obtained a memory (for usage metadata and the CLI)."""

    source: Literal["ram", "store", "compressed"]
    seconds: float
    compressed_tokens: int = 0


def skill_to_json(skill: Skill) -> bytes:
    data = skill.model_dump(exclude={"demonstrations"})
    data["demonstrations"] = [
        {"input": d.input, "output": d.output, "images": [base64.b64encode(image_bytes(i)).decode() for i in d.images]}
        for d in skill.demonstrations
    ]
    return json.dumps(data).encode()


def skill_from_json(raw: bytes) -> Skill:
    """The inverse of ``skill_to_json``; anything malformed raises ``SkillError``."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise SkillError("a skill must be a JSON object")
        demos = data.get("demonstrations", [])
        if not isinstance(demos, list) or not all(isinstance(d, dict) for d in demos):
            raise SkillError("demonstrations must be a list of objects")
        data["demonstrations"] = [
            Demonstration(input=d.get("input"), output=d.get("output"),
                          images=[base64.b64decode(i, validate=True) for i in d.get("images", [])])
            for d in demos
        ]
        return Skill.model_validate(data)
    except SkillError:
        raise
    except (ValueError, TypeError, binascii.Error) as e:  # JSON, base64, pydantic
        raise SkillError(f"not a valid skill: {e}") from e


def _made_for(mem: Any, expected: dict[str, Any]) -> bool:
    """Whether a memory's header carries exactly the fields that determine its tensors."""
    return {k: mem.header.get(k) for k in expected} == expected


class MemoryRegistry:
    """Skills by name; ``get(name)`` returns the compressed memory (RAM LRU -> store -> compress).

    Args:
        model: a model name for ``load_model`` (loaded on first use) or a loaded LanguageModel.
        cache_dir: where the default diskcache store lives (``~/.cache/emloc-agents``).
        store: any ``LockingByteStore`` (diskcache, Redis, in-memory); overrides ``cache_dir``.
        config: the EMLoCConfig used to compress (or a dict of its fields).
        max_ram_memories: how many memories to keep decoded in RAM.
        lock_expire: seconds after which a crashed compressor's lock frees itself (a live one renews
            its lock while it compresses, so a compression may take longer).
        device: where a model named by ``model`` runs (``load_model``'s ``device``: "auto", "cpu",
            "cuda", "cuda:N", "mps"); memories move there once, when they enter the RAM cache.
        dtype: the compute dtype of a model named by ``model`` (``load_model``'s ``dtype``: "auto" is
            bfloat16 on CUDA and float32 elsewhere). Memories are keyed by it, as resolved.
    """

    def __init__(
        self,
        model: str | LanguageModel = "default",
        cache_dir: str | Path | None = None,
        store: LockingByteStore | None = None,
        config: EMLoCConfig | dict[str, Any] | None = None,
        max_ram_memories: int = 8,
        progress: bool = False,
        lock_expire: float = 900.0,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        from .models.loader import default_cache_dir, resolve_device, resolve_dtype

        if isinstance(model, str):
            resolve_dtype(dtype, resolve_device(device))  # an unknown device or dtype fails here, not at first use
        self.device = device
        self.dtype = dtype
        self.model_name = model if isinstance(model, str) else model.name
        self._lm = None if isinstance(model, str) else model
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._store = store
        if isinstance(config, dict):
            config = EMLoCConfig.model_validate(config)  # a bad field raises pydantic's ValidationError
        elif config is not None and not isinstance(config, EMLoCConfig):
            raise TypeError(f"config must be an EMLoCConfig (or a dict of its fields), got {type(config).__name__}")
        self.config = config or EMLoCConfig()
        self.max_ram_memories = max_ram_memories
        self.progress = progress
        self.lock_expire = lock_expire
        self._ram: OrderedDict[str, CompressedMemory] = OrderedDict()
        self._skills: dict[str, tuple[Skill, bytes | None]] = {}  # name -> skill, its stored JSON (None: not stored)
        self._lock = threading.RLock()
        self._key_locks: dict[str, threading.Lock] = {}
        self.last_info: dict[str, MemoryInfo] = {}
        self.compressions = 0

    # ---- lazy backends ---------------------------------------------------------------------

    @property
    def loaded_model(self) -> LanguageModel | None:
        """The model if it is loaded already (``lm`` loads it on first use)."""
        return self._lm

    @property
    def lm(self) -> LanguageModel:
        if self._lm is None:
            from .models.loader import load_model

            with self._lock:
                if self._lm is None:
                    self._lm = load_model(self.model_name, dtype=self.dtype, device=self.device)
        return self._lm

    @property
    def store(self) -> LockingByteStore:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = DiskCacheStore(self.cache_dir / "store")
        return self._store

    # ---- skills ----------------------------------------------------------------------------

    def add(self, skill: Skill, persist: bool = True) -> Skill:
        """Register (or replace) a skill; nothing is compressed until first use."""
        if not isinstance(skill, Skill):
            raise TypeError(f"expected a Skill, got {type(skill).__name__}")
        for i, d in enumerate(skill.demonstrations):  # a broken image is refused now, not at first use
            for img in d.images:
                try:
                    load_image(img)
                except SkillError as e:
                    raise SkillError(f"skill {skill.name!r}, demonstration {i}: {e}") from e
        raw = skill_to_json(skill)  # before registering: a skill that cannot be stored replaces nothing
        with self._lock:
            self._skills[skill.name] = (skill, raw if persist else None)
        if persist:
            self.store.mset([(SKILL_PREFIX + skill.name, raw)])
        return skill

    def remove(self, name: str) -> None:
        """Forget a skill and delete its memories for this model and config."""
        skill = self.skill(name)
        key = self.key(skill)
        with self._lock:
            self._skills.pop(name, None)
            self._ram.pop(key, None)
        self.store.mdelete([SKILL_PREFIX + name, key])

    def names(self) -> list[str]:
        """The skills in the store (whoever added them) and this registry's own (``persist=False``)."""
        stored = {k.removeprefix(SKILL_PREFIX) for k in self.store.yield_keys(prefix=SKILL_PREFIX)}
        with self._lock:
            own = {name for name, (_, raw) in self._skills.items() if raw is None}
        return sorted(stored | own)

    def skills(self) -> list[Skill]:
        return [self.skill(n) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def skill(self, name: str | Skill) -> Skill:
        """The skill of that name as the store holds it now: one read of the store per call, so a skill
        another process replaced or removed (a shared Redis store, Ray replicas) is seen at once; it is
        parsed again only when its stored JSON changed. A skill added with ``persist=False`` is this
        registry's own."""
        if isinstance(name, Skill):
            return name
        raw = self.store.mget([SKILL_PREFIX + name])[0]
        with self._lock:
            cached = self._skills.get(name)
        if cached is not None and (cached[1] is None or cached[1] == raw):
            return cached[0]
        if raw is None:
            with self._lock:
                self._skills.pop(name, None)
            known = ", ".join(self.names()) or "none"
            raise UnknownSkillError(f"unknown skill {name!r}; registered skills: {known}")
        try:
            skill = skill_from_json(raw)
        except SkillError as e:
            raise SkillError(f"stored skill {name!r} is unreadable: {e}") from e
        with self._lock:
            self._skills[name] = (skill, raw)
        return skill

    # ---- memories --------------------------------------------------------------------------

    def header(self, skill: Skill) -> dict[str, Any]:
        """Everything that determines the tensors; the key is its hash. Of the config, only the fields
        that change the tensors (``EMLoCConfig.tensor_fields``): a cost-only knob (``lookahead``,
        ``batch_candidates``) reuses the stored memory."""
        from .models.loader import resolve_dtype

        images = skill.has_images or getattr(self.lm, "vision", None) is not None
        return {
            "format_version": FORMAT_VERSION,
            "render_version": RENDER_VERSION,  # how text becomes tokens (a change alters the tensors)
            "model": self.model_name,
            "model_fingerprint": self.lm.fingerprint(),
            # the compression mode as resolved for this skill and model; the dtype as resolved on the
            # model's device ("auto" on the CPU keys as "float32")
            "config": {**self.config.tensor_fields(images), "dtype": resolve_dtype(self.dtype, self.lm.device)},
            "skill_hash": skill.content_hash(),
        }

    def key(self, skill: str | Skill) -> str:
        return self._key_of(self.header(self.skill(skill)))

    @staticmethod
    def _key_of(header: dict[str, Any]) -> str:
        return MEMORY_PREFIX + hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, skill: str | Skill) -> CompressedMemory:
        """The skill's memory: from RAM, else the store, else compressed now (once across processes)."""
        return self.get_with_info(skill)[0]

    def get_with_info(self, skill: str | Skill) -> tuple[CompressedMemory, MemoryInfo]:
        """``get`` plus how this very call obtained the memory. Concurrent callers each get their own
        ``MemoryInfo`` (``info()`` only keeps the latest call's, whichever thread made it)."""
        sk = self.skill(skill)
        t0 = time.perf_counter()
        header = self.header(sk)  # hashes every demonstration (and image): once per call
        key = self._key_of(header)
        with self._lock:
            mem = self._ram.get(key)
            if mem is not None:
                self._ram.move_to_end(key)
                return mem, self._note(sk, MemoryInfo("ram", time.perf_counter() - t0))
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # threads of this process wait here; processes wait on the store lock
            with self._lock:
                if key in self._ram:
                    return self._ram[key], self._note(sk, MemoryInfo("ram", time.perf_counter() - t0))
            mem = self._load(key, sk, header)
            if mem is not None:
                info = MemoryInfo("store", time.perf_counter() - t0)
            else:
                with self.store.lock("compress:" + key, expire=self.lock_expire, timeout=None):
                    mem = self._load(key, sk, header)  # another process may have finished meanwhile
                    if mem is not None:
                        info = MemoryInfo("store", time.perf_counter() - t0)
                    else:
                        mem = self._compress(sk)
                        self.store.mset([(key, dump_memory(mem, header))])
                        info = MemoryInfo("compressed", time.perf_counter() - t0, mem.original_length)
            mem = self._remember(key, mem)
            return mem, self._note(sk, info)

    def _note(self, skill: Skill, info: MemoryInfo) -> MemoryInfo:
        self.last_info[skill.name] = info
        return info

    def info(self, skill: str | Skill) -> MemoryInfo | None:
        """How the latest ``get`` of this skill, in any thread, obtained its memory (for the CLI;
        a caller that needs its own call's answer uses ``get_with_info``)."""
        return self.last_info.get(self.skill(skill).name)

    def warm(self, skills: list[str | Skill] | None = None) -> dict[str, MemoryInfo]:
        """Precompress (or load) the given skills, all registered ones by default."""
        out = {}
        for s in skills if skills is not None else self.names():
            sk = self.skill(s)
            out[sk.name] = self.get_with_info(sk)[1]
        return out

    def cached(self, skill: str | Skill) -> bool:
        """Whether a valid memory for this skill is in the store (no compression)."""
        return self.store.mget([self.key(skill)])[0] is not None

    def certificate(self, skill: str | Skill) -> dict[str, Any] | None:
        """The fidelity certificate of the skill's stored memory (``CompressedMemory.certificate``), read
        from RAM or from the stored envelope without loading tensors; None when the skill is not
        compressed, or its memory was made before memories carried one. Compresses nothing."""
        key = self.key(skill)
        with self._lock:
            mem = self._ram.get(key)
        if mem is not None:
            return mem.certificate
        data = self.store.mget([key])[0]
        if data is None:
            return None
        try:
            got = read_info(data)["stats"].get("certificate")
        except MemoryFormatError:
            return None  # a corrupted entry: the next get replaces it
        return dict(got) if isinstance(got, dict) else None

    def _compress(self, skill: Skill) -> CompressedMemory:
        bar = None
        cb = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=None, desc=f"compressing {skill.name}", unit="step")  # a chunk of the loop, or a stage of the whole-context ranking

            def cb(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

        try:
            mem = compress(self.lm, skill, self.config, progress=cb)
        finally:
            if bar is not None:
                bar.close()
        self.compressions += 1
        return mem

    def _load(self, key: str, skill: Skill, expected: dict[str, Any]) -> CompressedMemory | None:
        raw = self.store.mget([key])[0]
        if raw is None:
            return None
        try:
            mem = load_memory(raw, CompressedMemory)
        except MemoryFormatError as e:
            log.warning("memory %s for skill %r is corrupt (%s); rebuilding", key, skill.name, e)
            self.store.mdelete([key])
            return None
        if not _made_for(mem, expected):
            log.warning("memory %s for skill %r belongs to another model/config/skill; rebuilding", key, skill.name)
            self.store.mdelete([key])
            return None
        return mem

    def _remember(self, key: str, mem: CompressedMemory) -> CompressedMemory:
        """Keep ``mem`` in the RAM cache, on the model's device (moved here once, not per call; the
        store keeps device-neutral bytes, loaded to the CPU)."""
        mem = mem.to(device=self.lm.device)
        with self._lock:
            self._ram[key] = mem
            self._ram.move_to_end(key)
            while len(self._ram) > self.max_ram_memories:
                self._ram.popitem(last=False)
        return mem

    # ---- one file per memory ---------------------------------------------------------------

    def export(self, skill: str | Skill, path: str | Path) -> Path:
        """Write the skill's memory (compressing it if needed) plus the skill itself to one file."""
        sk = self.skill(skill)
        mem = self.get(sk)
        header = self.header(sk) | {"skill_json": skill_to_json(sk).decode()}
        path = Path(path).expanduser()
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(dump_memory(mem, header))
        tmp.replace(path)
        return path

    def import_file(self, path: str | Path) -> Skill:
        """Register the skill in a memory file and its memory, if it matches this model and config."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such memory file: {path}")
        data = path.read_bytes()  # read once: the bytes stored are the bytes validated
        mem = load_memory(data)
        raw = mem.header.get("skill_json")
        if not raw or not isinstance(raw, str):
            raise MemoryFormatError(f"{path}: no skill inside (not written by export)")
        try:
            skill = skill_from_json(raw.encode())
        except SkillError as e:
            raise MemoryFormatError(f"{path}: the skill inside is unreadable: {e}") from e
        expected = self.header(skill)
        if not _made_for(mem, expected):
            raise MemoryFormatError(
                f"{path}: memory was made for model {mem.header.get('model')!r} / another config; "
                f"this registry uses {self.model_name!r}"
            )
        self.add(skill)
        self.store.mset([(self._key_of(expected), data)])
        return skill

    # ---- LangChain ---------------------------------------------------------------------------

    def as_tools(self, chat: Any, *, return_direct: bool = False) -> list[Any]:
        """One LangChain tool per skill, answering with ``chat`` (an ``EMLoCChatModel``) bound to that
        skill; ``return_direct=True``: an agent ends on the skill's answer. The chat model builds them
        (``EMLoCChatModel.skill_tools``): the registry sits below LangChain and imports none of it."""
        if chat is None or not callable(getattr(chat, "skill_tools", None)):
            raise TypeError("as_tools needs the chat model the tools answer with: "
                            "registry.as_tools(EMLoCChatModel(registry=registry))")
        return chat.skill_tools(self, return_direct=return_direct)

    def __repr__(self) -> str:
        return f"MemoryRegistry(model={self.model_name!r}, skills={len(self._skills)}, cache_dir={str(self.cache_dir)!r})"
