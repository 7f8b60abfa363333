"""Vision-language models: chunk-wise compression at keep ratio 1.0 reproduces the full-context
forward of the unmodified model (logits and greedy continuation), per supported VLM architecture."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from PIL import Image

from emloc_agents import Demonstration, EMLoCConfig, Skill, SkillError, compress
from emloc_agents.engine.decode import memory_cache
from emloc_agents.engine.forward import lm_logits, run
from emloc_agents.models.tiny_vlm import TINY_VLM_ARCHS, tiny_vlm

FULL = dict(keep_ratios=(1.0,), storage_dtype="float32")
COLORS = [(220, 20, 20), (20, 200, 40), (30, 40, 230), (240, 230, 20), (120, 20, 160)]
SIZES = [(56, 84), (84, 56), (56, 56), (112, 56), (70, 98)]


def image(i: int) -> Image.Image:
    img = Image.new("RGB", SIZES[i % len(SIZES)], COLORS[i % len(COLORS)])
    img.putpixel((i, i), (255, 255, 255))
    return img


def vision_skill(n: int = 4) -> Skill:
    demos = [
        Demonstration(input=f"What color is picture {i}?", output=["red", "green", "blue", "yellow", "purple"][i % 5],
                      images=[image(i)])
        for i in range(n)
    ]
    return Skill(name="colors", instruction="Name the color.", demonstrations=demos)


_LMS: dict[str, tuple] = {}


def lm_and_reference(arch: str):
    if arch not in _LMS:
        from emloc_agents.models.lm import LanguageModel

        model, proc = tiny_vlm(arch)
        reference = copy.deepcopy(model)  # untouched model: full sequence in one forward
        _LMS[arch] = (LanguageModel(model, proc.tokenizer, f"tiny-{arch}", processor=proc), reference, proc)
    return _LMS[arch]


def _query_logits(lm, memory, turns) -> tuple[torch.Tensor, list[int]]:
    ids = lm.encode_conversation(turns, memory=memory)
    cache, start = memory_cache(lm, memory)
    embeds, rope = lm.vision.prompt_inputs(ids, start + getattr(cache, "rope_delta", 0))
    hidden = run(lm.model, cache, torch.tensor([list(ids)]), start + torch.arange(len(ids))[None],
                 inputs_embeds=embeds, rope_positions=rope)
    return lm_logits(lm.model, lm.facts, hidden[0]), ids


def _reference_inputs(lm, proc, skill: Skill, query: str, query_image: Image.Image) -> dict:
    """The whole conversation rendered by the processor's chat template and processor in one go."""
    msgs = [{"role": "system", "content": skill.instruction}]
    images = []
    for d in skill.demonstrations:
        msgs.append({"role": "user", "content": [{"type": "image"}] * len(d.images) + [{"type": "text", "text": d.input}]})
        msgs.append({"role": "assistant", "content": d.output})
        images += d.images
    msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": query}]})
    images.append(query_image)
    text = proc.tokenizer.apply_chat_template(msgs, chat_template=proc.chat_template, tokenize=False,
                                              add_generation_prompt=True)
    r = lm.renderer()
    bos = r.bos if not text.startswith(str(proc.tokenizer.bos_token)) else []
    out = proc(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
    if bos:
        out["input_ids"] = torch.cat([torch.tensor([bos]), out["input_ids"]], dim=1)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        if "mm_token_type_ids" in out:
            out["mm_token_type_ids"] = torch.cat([torch.zeros(1, len(bos), dtype=out["mm_token_type_ids"].dtype),
                                                  out["mm_token_type_ids"]], dim=1)
    return dict(out)


@pytest.mark.parametrize("arch", TINY_VLM_ARCHS)
def test_keep_all_reproduces_full_context(arch: str) -> None:
    lm, reference, proc = lm_and_reference(arch)
    assert lm.is_vision
    skill = vision_skill(4)
    query, qimg = "What color is this picture?", image(3)
    turns = [{"role": "user", "content": query, "images": [qimg]}]
    ref_inputs = _reference_inputs(lm, proc, skill, query, qimg)
    full_ids = ref_inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref_out = reference(**ref_inputs)
    answers, diffs = [], []
    for per_chunk in (1, 2):
        mem = compress(lm, skill, EMLoCConfig(demos_per_chunk=per_chunk, **FULL))
        logits, q = _query_logits(lm, mem, turns)
        assert mem.original_length + len(q) == len(full_ids)
        assert full_ids[mem.original_length :] == list(q), "query ids continue the demonstrations"
        if lm.vision.mrope:
            assert mem.next_position is not None and mem.next_position < mem.original_length
        else:
            assert mem.next_position is None
        ref = ref_out.logits[0, -len(q) :].float()
        diffs.append(float((logits - ref).abs().max()))
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
        answers.append(lm.generate_ids(q, mem, max_new_tokens=5).token_ids)
    with torch.no_grad():
        gen = reference.generate(**ref_inputs, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=2)
    expected = gen[0, len(full_ids) :].tolist()
    assert answers == [expected, expected]
    print(f"{arch}: max abs logit diff {max(diffs):.2e}")


def test_the_default_compresses_images_chunk_wise() -> None:
    """compression='auto' (the default) takes the chunk-wise loop for images (the whole-context
    ranking repeats token ids, which images are not); 'context' refuses them clearly."""
    lm, _, _ = lm_and_reference(TINY_VLM_ARCHS[0])
    assert compress(lm, vision_skill(4), EMLoCConfig(delta=0.05)).stats["press"] == "emloc"
    with pytest.raises(SkillError, match="text models and skills only"):
        compress(lm, vision_skill(4), EMLoCConfig(compression="context"))


@pytest.mark.parametrize("arch", TINY_VLM_ARCHS)
def test_pruning_runs_and_kept_counts_add_up(arch: str) -> None:
    lm, _, _ = lm_and_reference(arch)
    mem = compress(lm, vision_skill(4), EMLoCConfig(demos_per_chunk=2, delta=0.05))
    assert all(0 < n <= mem.original_length for n in mem.layer_lengths)
    for k, v, p in zip(mem.keys, mem.values, mem.positions, strict=True):
        assert k.shape == v.shape and p.shape == k.shape[:2]
        assert bool((p[:, 1:] > p[:, :-1]).all()) and int(p.max()) < mem.original_length
    assert mem.memory_tokens == sum(mem.layer_lengths)
    assert 0 < mem.kept_ratio <= 1
    turns = [{"role": "user", "content": "What color?", "images": [image(1)]}]
    ids = lm.encode_conversation(turns, memory=mem)
    first, again = (lm.generate_ids(ids, mem, max_new_tokens=2) for _ in range(2))
    assert first.token_ids == again.token_ids and first.prompt_tokens == len(ids)  # the memory is read-only
    assert len(first.token_ids) == 2 or first.finish_reason == "stop"
    text_only = lm.generate_ids(lm._prompt_ids("What color?", mem, ""), mem, max_new_tokens=2)
    assert len(text_only.token_ids) == 2 or text_only.finish_reason == "stop"
    assert len(lm.score("What color?", ["red", "blue"], mem)) == 2


@pytest.mark.parametrize("arch", TINY_VLM_ARCHS)
def test_images_reach_the_model(arch: str) -> None:
    """Guards the exactness test against vacuity: a different image changes the demonstration
    memory and the query logits."""
    lm, _, _ = lm_and_reference(arch)
    skill = vision_skill(2)
    other = vision_skill(2)
    other.demonstrations[1].images = [image(4)]
    a = compress(lm, skill, EMLoCConfig(**FULL))
    b = compress(lm, other, EMLoCConfig(**FULL))
    assert a.original_length == b.original_length or lm.vision.mrope  # qwen: another size, other token count
    if a.original_length == b.original_length:
        assert not torch.equal(a.keys[-1], b.keys[-1])
    turns = [{"role": "user", "content": "Which color?", "images": [image(0)]}]
    la, _ = _query_logits(lm, a, turns)
    turns2 = [{"role": "user", "content": "Which color?", "images": [image(2)]}]
    lb, _ = _query_logits(lm, a, turns2)
    assert float((la[-1] - lb[-1]).abs().max()) > 1e-4


def test_image_bytes_change_the_content_hash() -> None:
    a, b = vision_skill(2), vision_skill(2)
    assert a.content_hash() == b.content_hash()
    b.demonstrations[0].images = [image(4)]
    assert a.content_hash() != b.content_hash()


def test_corrupt_image_is_a_clear_error() -> None:
    lm, _, _ = lm_and_reference("qwen2_vl")
    bad = Skill(name="bad", demonstrations=[Demonstration(input="What?", output="red", images=[b"not an image"])])
    with pytest.raises(SkillError, match="cannot read image"):
        compress(lm, bad, EMLoCConfig(**FULL))
    with pytest.raises(SkillError, match="cannot read image"):
        lm.encode_conversation([{"role": "user", "content": "x", "images": [b"\x89PNG broken"]}])


def test_images_to_a_text_only_model_are_refused(tiny_llama) -> None:
    assert not tiny_llama.is_vision
    with pytest.raises(SkillError, match="text-only"):
        compress(tiny_llama, vision_skill(2), EMLoCConfig(**FULL))
    with pytest.raises(ValueError, match="text-only"):
        tiny_llama.encode_conversation([{"role": "user", "content": "x", "images": [image(0)]}])


def test_png_bytes_and_pil_images_render_alike() -> None:
    lm, _, _ = lm_and_reference("qwen2_vl")
    buf = io.BytesIO()
    image(0).save(buf, format="PNG")
    r = lm.renderer()
    a = r.demo("What?", "red", images=[image(0)])
    b = r.demo("What?", "red", images=[buf.getvalue()])
    assert a.ids == b.ids and torch.equal(a.mm["pixel_values"], b.mm["pixel_values"])
    assert sum(a.answer) > 0


def test_unsupported_architecture_lists_supported_ones() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from emloc_agents.engine import UnsupportedModelError
    from emloc_agents.models.lm import LanguageModel

    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    with pytest.raises(UnsupportedModelError, match="qwen2_vl.*llava.*idefics3"):
        LanguageModel(AutoModelForCausalLM.from_config(cfg), None, "gpt2")
