"""Run a policy against an environment for many episodes at once.

All live episodes advance in lockstep: each round renders every pending state,
samples every reply in one batched call (`models.generation.sample_responses`), and steps each episode.
Episode seeds come from `episode_seeds`, so a (namespace, seed) pair always
gives the same customers whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.data.rendering import render_state
from iterppo_lightning.models.generation import sample_responses
from iterppo_lightning.utils.progress import Progress
from iterppo_lightning.utils.seeding import derive_seed, derive_uniform
from iterppo_lightning.utils.stats import summarize_outcomes


class Episode(Protocol):
    conversation: Conversation
    done: bool

    def step(self, suggestion: str | None) -> None: ...


class Environment(Protocol):
    """`new_episode`; optionally `step_batch(episodes, suggestions)` to advance a round in one call."""

    def new_episode(self, seed: int, conversation_id: str) -> Episode: ...


def episode_seeds(namespace: str, seed: int, iteration: int, count: int) -> list[int]:
    """Independent, reproducible episode seeds; different namespaces never share customers in practice."""
    return [derive_seed(namespace, seed, iteration, i) for i in range(count)]


@torch.no_grad()
def suggest(
    model,
    tokenizer,
    conversations: list[Conversation],
    *,
    max_new_tokens: int = 24,
    max_prompt_tokens: int = 384,
    temperature: float = 1.0,
    greedy: bool = False,
    reply_seeds: list[int] | None = None,
) -> list[str | None]:
    """`model`'s reply at each conversation's current state (its last turn), in one batched sampling call.

    An empty reply (or <abstain>) is an abstain (None). `reply_seeds` (one per conversation): each reply samples
    from its own stream (models/generation.py), so it depends on its seed and its state only.
    """
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # keep the most recent turns of long states
    texts = [render_state(c, len(c.turns) - 1, tokenizer) for c in conversations]
    enc = tokenizer(
        texts,
        add_special_tokens=False,
        padding=True,
        truncation=True,
        max_length=max_prompt_tokens,
        return_tensors="pt",
    ).to(device)
    response, _mask = sample_responses(
        model,
        enc["input_ids"],
        enc["attention_mask"],
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        max_new_tokens,
        temperature,
        greedy,
        reply_seeds,
    )
    return [r.strip() or None for r in tokenizer.batch_decode(response, skip_special_tokens=True)]


@dataclass(frozen=True)
class Exploration:
    """Exploring starts for Monte Carlo Q: in a collected conversation, at most one agent reply is sampled from
    pi_k at `temperature` instead of the collection temperature, so the critic's data holds replies pi_k rarely
    makes (and what they lead to) at the states pi_k reaches. The explored reply's own return is an unbiased
    sample of Q^pi_k(s, a) (pi_k plays the rest); the turns before it see a slightly perturbed future.

    At each agent turn of a conversation that has not explored yet, it explores with probability `prob`; the
    draw depends only on (`seed`, conversation id, turn), so it is the same in any batch and on resume.
    """

    prob: float
    temperature: float
    seed: int

    def choose(self, conversations: list[Conversation]) -> list[int]:
        """Indices of the conversations whose next reply explores."""
        return [
            i
            for i, conv in enumerate(conversations)
            if "explored_turn" not in conv.metadata
            and derive_uniform("explore", self.seed, conv.conversation_id, len(conv.turns)) < self.prob
        ]


@torch.no_grad()
def run_episodes(
    model,
    tokenizer,
    environment: Environment,
    seeds: list[int],
    *,
    iteration: int = 0,
    policy_id: str = "",
    id_prefix: str = "",
    max_new_tokens: int = 24,
    max_prompt_tokens: int = 384,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 256,
    exploration: Exploration | None = None,
    progress: str | None = None,
    reply_seed: int | None = None,
) -> list[Conversation]:
    """Play one episode per seed with `model` suggesting every agent reply.

    `exploration` (collection only): exploring starts, at most one reply per conversation sampled at a higher
    temperature (see `Exploration`); the explored turn's index is kept in the conversation's
    metadata["explored_turn"]. `progress` (a label, e.g. "collect"): report finished conversations on stderr
    while it runs long (utils/progress.py).
    """
    episodes = [environment.new_episode(s, f"{id_prefix}{s}") for s in seeds]
    play_episodes(
        model,
        tokenizer,
        environment,
        episodes,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        temperature=temperature,
        greedy=greedy,
        batch_size=batch_size,
        exploration=exploration,
        progress=progress,
        reply_seed=reply_seed,
    )
    for ep in episodes:
        ep.conversation.iteration = iteration
        ep.conversation.policy_id = policy_id
    return [ep.conversation for ep in episodes]


@torch.no_grad()
def play_episodes(
    model,
    tokenizer,
    environment: Environment,
    episodes: list[Episode],
    *,
    max_new_tokens: int = 24,
    max_prompt_tokens: int = 384,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 256,
    exploration: Exploration | None = None,
    progress: str | None = None,
    reply_seed: int | None = None,
) -> None:
    """Advance `episodes` (new, or already under way) to their ends, `model` suggesting every reply (run_episodes).

    `reply_seed`: each reply samples from its own stream of (reply_seed, conversation id, turn), so a conversation
    does not depend on which others are played with it (None: torch's global stream, as collection does).
    """
    report = Progress(progress, len(episodes)) if progress else None
    while True:
        live = [ep for ep in episodes if not ep.done]
        if not live:
            break
        for start in range(0, len(live), batch_size):
            chunk = live[start : start + batch_size]
            conversations = [ep.conversation for ep in chunk]
            settings = dict(max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, greedy=greedy)
            explored = exploration.choose(conversations) if exploration is not None else []
            seeds = None
            if reply_seed is not None:
                seeds = [derive_seed("reply", reply_seed, c.conversation_id, len(c.turns)) for c in conversations]
            if not explored:
                replies = suggest(
                    model, tokenizer, conversations, temperature=temperature, reply_seeds=seeds, **settings
                )
            else:
                # Two generate calls: the explored states at the exploration temperature, the rest as usual.
                rest = [i for i in range(len(chunk)) if i not in set(explored)]
                replies = [None] * len(chunk)
                for group, group_temperature in ((rest, temperature), (explored, exploration.temperature)):
                    if group:
                        texts = suggest(
                            model,
                            tokenizer,
                            [conversations[i] for i in group],
                            temperature=group_temperature,
                            reply_seeds=None if seeds is None else [seeds[i] for i in group],
                            **settings,
                        )
                        for i, text in zip(group, texts):
                            replies[i] = text
                for i in explored:
                    conversations[i].metadata["explored_turn"] = len(conversations[i].turns) - 1
            if hasattr(environment, "step_batch"):
                environment.step_batch(chunk, replies)  # e.g. an LLM customer: one batched generate for all replies
            else:
                for ep, reply in zip(chunk, replies):
                    ep.step(reply)
            if report is not None:
                report.update(sum(ep.done for ep in episodes))
    if report is not None:
        report.close()


def summarize_conversations(conversations: list[Conversation], gamma: float = 1.0) -> dict:
    """Success rate with its Wilson 95% CI, mean agent turns and mean discounted return."""
    returns = [c.returns(gamma)[0] if c.agent_turns else 0.0 for c in conversations]
    return summarize_outcomes([c.success for c in conversations], [len(c.agent_turns) for c in conversations], returns)
