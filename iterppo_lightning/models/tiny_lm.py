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

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
CUSTOMER, AGENT, END = "<customer>", "<agent>", "<end>"
EDITED, REJECTED, ABSTAIN = "<edited>", "<rejected>", "<abstain>"
SPECIAL_TOKENS = [PAD, UNK, BOS, CUSTOMER, AGENT, END, EDITED, REJECTED, ABSTAIN]

# The marker format of rendering.render_plain_state as a chat template, so an exported
# tiny policy is deployable like any chat model: `apply_chat_template(messages,
# add_generation_prompt=True)` gives exactly the text it was trained on. Messages:
# {"role": "user", "content": customer message} and {"role": "assistant", "content":
# message sent, "suggestion": the agent's suggestion (None = abstained),
# "business_action": "accept" (default) | "edit" | "reject"}.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ('' if loop.first else ' ') + '<customer> ' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set action = message.get('business_action') or 'accept' -%}"
    "{%- set suggestion = (message.get('suggestion') if action in ['edit', 'reject'] else message['content']) or '' -%}"
    "{%- set suggestion = suggestion | trim -%}"
    "{{- ' <agent> ' + (suggestion if suggestion else '<abstain>') + ' <end>' -}}"
    "{%- if action == 'edit' -%}{{- ' <edited> ' + message['content'] -}}"
    "{%- elif action == 'reject' -%}{{- ' <rejected> ' + message['content'] -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' <agent>' -}}{%- endif -%}"
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
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return seeded_model(GPT2LMHeadModel, config, tokenizer, seed)


def seeded_model(model_class, config, tokenizer, seed: int):
    """`model_class(config)` initialised from `seed` without touching the global RNG, generating with the tokenizer's pad/EOS."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
