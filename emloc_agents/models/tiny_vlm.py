"""Tiny random-weight vision-language models built from configs, with real processors built
in-process (pure-code image processors + the in-process BPE tokenizer of ``tiny.py`` extended with
the image special tokens). No download; used by the VLM exactness tests.

``tiny_vlm("qwen2_vl")`` -> (model, processor); ``load_tiny_vlm("qwen2_vl")`` -> LanguageModel.
"""

from __future__ import annotations

from typing import Any

import torch

from .tiny import tiny_tokenizer

TINY_VLM_ARCHS = ("qwen2_vl", "llava", "idefics3", "qwen2_5_vl")

_TEXT: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=2,
)

# ChatML with content lists: {"type": "image"} -> the model's image placeholder.
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_IMAGE_TEMPLATE = _QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")


def _tokenizer(extra: list[str], template: str) -> Any:
    tok = tiny_tokenizer(chat_template=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *extra]})
    tok.chat_template = template
    return tok


def _no_video(cls: type) -> type:
    """The processor class without the (torchvision-only) video processor type check."""

    class NoVideo(cls):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    NoVideo.__name__ = cls.__name__
    return NoVideo


def _qwen(arch: str) -> tuple[Any, Any, Any]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], _QWEN_TEMPLATE)
    ids = tok.convert_tokens_to_ids
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16}, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    text = dict(_TEXT, vocab_size=len(tok), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": [2, 3, 3]})
    vision: dict[str, Any] = dict(depth=1, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    cfg: Any
    model_cls: type[Any]
    proc_cls: type[Any]
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        vision.update(embed_dim=32)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
        model_cls, proc_cls = Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        vision.update(intermediate_size=64, out_hidden_size=64, window_size=56, fullatt_block_indexes=[0])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **tokens)
        model_cls, proc_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    proc = _no_video(proc_cls)(image_processor=image_processor, tokenizer=tok, chat_template=_QWEN_TEMPLATE)
    return model_cls, cfg, proc


def _llava() -> tuple[Any, Any, Any]:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer(["<image>"], _IMAGE_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), **_TEXT)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=True)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=_IMAGE_TEMPLATE)
    return LlavaForConditionalGeneration, cfg, proc


def _idefics3() -> tuple[Any, Any, Any]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = _tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"], _IMAGE_TEMPLATE)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 56}, max_image_size={"longest_edge": 28}, do_image_splitting=False
    )
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        text_config=dict(model_type="llama", vocab_size=len(tok), **_TEXT),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2, tie_word_embeddings=True,
    )
    proc = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=1,
                             chat_template=_IMAGE_TEMPLATE)
    return Idefics3ForConditionalGeneration, cfg, proc


def tiny_vlm(arch: str = "qwen2_vl", seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A random-weight VLM of ``arch`` (float32, eval) and its processor (``processor.tokenizer``)."""
    arch = arch.replace("-", "_")
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        model_cls, cfg, proc = _qwen(arch)
    elif arch == "llava":
        model_cls, cfg, proc = _llava()
    elif arch in ("idefics3", "smolvlm"):
        model_cls, cfg, proc = _idefics3()
    else:
        raise ValueError(f"no tiny VLM for {arch!r}; have {', '.join(TINY_VLM_ARCHS)}")
    torch.manual_seed(seed)
    model = model_cls(cfg).to(torch.float32).eval()
    return model, proc


def load_tiny_vlm(arch: str = "qwen2_vl", seed: int = 0) -> Any:
    """``tiny_vlm`` wrapped as a :class:`~emloc_agents.models.lm.LanguageModel`."""
    from .lm import LanguageModel

    model, proc = tiny_vlm(arch, seed)
    return LanguageModel(model, proc.tokenizer, f"tiny-{arch.replace('_', '-')}", processor=proc)
