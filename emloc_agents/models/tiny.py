"""Tiny random-weight models built from configs, one per supported architecture family, with a
byte-level BPE tokenizer trained in-process. They run the engine's exactness tests in seconds
with no download; they are also what ``load_model("tiny-llama")`` etc. return."""

from __future__ import annotations

from typing import Any

import torch

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Review: a great film with a warm heart. Sentiment: positive",
    "Review: dull, slow and far too long. Sentiment: negative",
    "Question: What city hosts the Eiffel Tower? Type: location",
    "Article: The central bank raised interest rates again. Topic: business",
    "the quick brown fox jumps over the lazy dog 0123456789 !?.,;:'\"()-",
]


def tiny_tokenizer(chat_template: bool = True) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<bos>", "<eos>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = _CHATML
    return fast


def tiny_config(arch: str, vocab_size: int) -> Any:
    from transformers import AutoConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=True,
    )
    if arch == "gemma3_text":
        common.update(head_dim=16, sliding_window=24, layer_types=["sliding_attention", "full_attention"] * 2,
                      query_pre_attn_scalar=16)
    elif arch == "mistral":
        common.update(sliding_window=None)
    elif arch == "qwen3":
        common.update(head_dim=16)
    if arch not in TINY_ARCHS:
        raise ValueError(f"no tiny config for {arch!r}; have {', '.join(TINY_ARCHS)}")
    return AutoConfig.for_model(arch, **common)


def tiny_model(arch: str = "llama", seed: int = 0, chat_template: bool = True) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer(chat_template)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok)), dtype=torch.float32)
    return model.eval(), tok
