"""A tiny random Llama with a locally trained ChatML tokenizer: the chat-model code path in seconds.

Real instruction-tuned models (SmolLM2, Qwen, Llama) render conversations with
their chat template and end replies with an end-of-turn token. Tests use this
stand-in so every chat path (rendering, generation, LoRA, the LLM customer)
runs offline on CPU without downloading weights. Its outputs are random text.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

IM_START, IM_END, PAD, UNK = "<|im_start|>", "<|im_end|>", "<|pad|>", "<|unk|>"

# ChatML, as SmolLM2 and Qwen use it; the reply ends with <|im_end|> (the EOS token).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

BASIC_WORDS = (
    "system user assistant customer agent hi hello what do you need a phone laptop headphones budget cheap "
    "standard premium discount buy yes no thanks bye i want the is for me ok please how about our best "
    "price too expensive would like to offer you , . ? ! [BUY]"
)


def train_chat_tokenizer(texts: Iterable[str] = (), vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer (byte-level, so any text encodes) with ChatML special tokens and template."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, UNK, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([BASIC_WORDS, *texts], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=IM_END, bos_token=IM_START, padding_side="left"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for `tokenizer` (deterministic for a seed)."""
    from iterppo_lightning.models.tiny_lm import seeded_model

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return seeded_model(LlamaForCausalLM, config, tokenizer, seed)


def save_tiny_chat_model(folder, seed: int = 0):
    """Write a tiny chat model + tokenizer to `folder` (a stand-in for a hub checkpoint); returns the folder."""
    tokenizer = train_chat_tokenizer()
    model = build_tiny_llama(tokenizer, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
