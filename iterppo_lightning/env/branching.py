"""Branch conversations: a second reply at a state pi_k reached, with its own ending, for contrast within a state.

A Monte Carlo critic sees one reply per logged state, so it can explain an outcome by the state as well as by
the reply. A branch goes back to a state of a conversation just collected (replayed exactly from its seed, the
same hidden customer), lets pi_k reply again, optionally at a higher temperature, and plays on to the end with
fresh simulator streams. The branch is a whole conversation (the shared prefix, then its own turns), stored
and used like any other: the critic, PPO's logged states and filtered BC all get it. Its reply's return is a
sample of Q^pi_k(s, a') at the same s as the original reply's, which is the contrast that ranks replies.

Only the embedded simulator can go back to a state; logs and an LLM customer cannot (refused at config time).
"""

from __future__ import annotations

import random

from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.env.episodes import Exploration, play_episodes
from iterppo_lightning.env.sales_simulator import SalesSimulator
from iterppo_lightning.env.simulator_replay import replay
from iterppo_lightning.utils.seeding import derive_seed


def branch_states(conversations: list[Conversation], count: int, rng: random.Random) -> list[tuple[Conversation, int]]:
    """`count` distinct (conversation, agent turn) states of `conversations`, uniformly (all of them if fewer)."""
    states = [(c, t) for c in conversations for t in c.agent_turns]
    return rng.sample(states, min(count, len(states)))


def branch_conversations(
    model,
    tokenizer,
    simulator: SalesSimulator,
    conversations: list[Conversation],
    count: int,
    *,
    seed: int,
    iteration: int,
    reply_temperature: float | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 24,
    max_prompt_tokens: int = 384,
    batch_size: int = 256,
) -> list[Conversation]:
    """`count` branch conversations from states of `conversations` (collected by pi_k = `model` on `simulator`).

    Each is named `<conversation id>-b<turn>` and records metadata "branch" = {"of", "turn", "stream"} (what
    replay needs to rebuild it). Its first new reply is sampled at `reply_temperature` (None: `temperature`,
    pi_k's own reply; a higher one also records metadata "explored_turn"), every later one at `temperature`.
    The states and streams depend only on (`seed`, `iteration`) and the conversations.
    """
    rng = random.Random(derive_seed("branch", seed, iteration))
    episodes = []
    for conversation, turn in branch_states(conversations, count, rng):
        stream = derive_seed("branch", seed, iteration, conversation.conversation_id, turn)
        episode = replay(simulator.config, conversation, turn).fork(stream)
        branch = episode.conversation
        branch.conversation_id = f"{conversation.conversation_id}-b{turn}"
        branch.iteration, branch.policy_id = conversation.iteration, conversation.policy_id
        branch.metadata["branch"] = {"of": conversation.conversation_id, "turn": turn, "stream": stream}
        episodes.append(episode)
    hot = reply_temperature is not None and reply_temperature != temperature
    play_episodes(
        model,
        tokenizer,
        simulator,
        episodes,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        temperature=temperature,
        batch_size=batch_size,
        exploration=Exploration(1.0, reply_temperature, seed) if hot else None,
        progress=f"branch · iteration {iteration}",
    )
    return [episode.conversation for episode in episodes]
