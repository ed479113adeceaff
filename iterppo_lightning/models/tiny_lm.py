"""A locally trained word-level tokenizer and a tiny GPT-2 built from config.

Nothing is downloaded: the tokenizer is trained with `tokenizers` on the
simulator's text and saved with `save_pretrained`, so the code path (Auto*
classes, `generate`, `save_pretrained`/`from_pretrained`) is exactly the one a
real Hugging Face model takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from iterppo_lightning.data.chat_format import (
    ABSTAIN,
    AGENT,
    BOS,
    CUSTOMER,
    EDITED,
    END,
    PAD,
    PLAIN_CHAT_TEMPLATE,
    REJECTED,
    SPECIAL_TOKENS,
    UNK,
)


def train_word_tokenizer(texts: Iterable[str], min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train a whitespace word-level tokenizer; `<end>` doubles as EOS (it closes every reply)."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece's decoder with an impossible prefix simply joins tokens by spaces.
    tok.decoder = decoders.WordPiece(prefix="\x00", cleanup=False)
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=min_frequency)
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=END,
        padding_side="left",
        additional_special_tokens=[CUSTOMER, AGENT, EDITED, REJECTED, ABSTAIN],
    )
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


@dataclass
class TinyLMConfig:
    """Shape of the tiny GPT-2 used on CPU (policy pi_0 and the critic backbone)."""

    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 512


def build_tiny_causal_lm(tokenizer: PreTrainedTokenizerFast, shape: TinyLMConfig, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 sized for the tokenizer's vocabulary.

    Dropout is off: PPO compares log-probs of the same tokens across several
    forward passes, and dropout noise would make the ratio != 1 at step 0.
    """
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=shape.n_positions,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # The tanh GELU in one kernel (models/fused_ops.py); GPT-2's default "gelu_new" is the same
        # function composed of separate ops.
        activation_function="gelu_pytorch_tanh",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return seeded_model(GPT2LMHeadModel, config, tokenizer, seed)


def seeded_model(model_class, config, tokenizer, seed: int):
    """`model_class(config)` initialised from `seed` without touching the global RNG, generating with the
    tokenizer's pad/EOS."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
