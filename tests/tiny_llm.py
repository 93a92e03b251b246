"""A tiny Llama with random weights and a character-level tokenizer, built offline (no download).

Used by the generation predictor's tests and benchmark. ``behaviour`` rigs the weights so a
test can know what greedy decoding does: ``"random"`` (whatever random weights say),
``"stop"`` (always the end of sequence token first: ``finish_reason="stop"``) or ``"repeat"``
(always ``REPEAT_CHAR``, never the end: ``finish_reason="length"``).
"""

from __future__ import annotations

import os
import string

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHARS = sorted(set(string.printable) - set("\x0b\x0c\r"))
REPEAT_CHAR = "a"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A character-level fast tokenizer: one token per character, ``<s>`` first."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_llm(path: str | os.PathLike, *, behaviour: str = "random", seed: int = 0,
                   hidden: int = 32, layers: int = 2, chat_template: str | None = CHAT_TEMPLATE) -> str:
    """Save a tiny LlamaForCausalLM and its tokenizer under ``path``; returns ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if behaviour != "random":
        # Layers add nothing to the residual stream and every embedding is all ones, so the last
        # hidden state is the same vector for any input and the head's one nonzero row always wins.
        winner = tokenizer.eos_token_id if behaviour == "stop" else tokenizer.convert_tokens_to_ids(REPEAT_CHAR)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.embed_tokens.weight.fill_(1.0)
            model.lm_head.weight.zero_()
            model.lm_head.weight[winner] = 1.0
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)
