"""The oracle critic: Q of every PPO rollout reply from simulator continuations, instead of a learned critic
(model.loop.oracle_critic; docs/critic.md, "The oracle critic").

PPO against it separates the solver's error from the critic's: the policy phase is the same, only Q is exact up
to Monte Carlo noise. A reply's Q is the critic probe's ground truth (loop/critic_probe.py,
`continuation_returns`): the logged state is rebuilt from its episode seed (env/simulator_replay.py), the reply is
sent, and pi_k plays the rest of M continuations; Q = the mean of their discounted returns (data.gamma).

pi_k is a frozen copy of the policy taken when the oracle is made, before the policy phase's first update, so
every rollout of the phase is scored under the same pi_k, as a fitted Q_k would be.

Determinism: continuation j of logged state s in rollout r draws only from streams of (run seed, iteration,
"oracle_critic", oracle seed, r, s, j), the same for every reply to s in the rollout (common random numbers, as in
the probe). A reply's Q depends on nothing else: not on the other rows, the length groups or the batch size, nor
on a restart (a policy phase is redone whole on resume, and its rollouts are numbered from 0).
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.loop.critic_probe import ProbeContext, continuation_returns
from iterppo_lightning.loop.probe_config import OracleCriticConfig

StateKey = tuple[str, int]
"""A logged state: (conversation id, turn index), as data/datamodule.py's TurnExample names it."""


class OracleCritic(nn.Module):
    """Q(s, a) = the mean discounted return of simulated continuations after reply a at logged state s, pi_k
    playing the rest. `score` has the CriticModule's signature plus the rows' states: PolicyModule passes them to a
    critic whose `needs_states` is True (the policy batches carry them as "state_keys")."""

    needs_states = True
    plays_a_policy_copy = True
    """It simulates with a copy of pi_k, which ZeRO-3 would partition (PolicyModule refuses that)."""

    def __init__(
        self,
        policy,
        tokenizer,
        conversations: list[Conversation],
        prompt_lengths: dict[StateKey, int],
        settings: OracleCriticConfig,
        context: ProbeContext,
    ):
        """
        Args:
            policy: pi_k; the oracle plays a frozen copy of it (the policy phase's updates do not change it).
            tokenizer: pi_k's tokenizer.
            conversations: the simulated conversations whose logged states the rollouts start from.
            prompt_lengths: tokens of each logged state as the policy batches hold it (TurnExample.prompt_ids):
                where a rollout row's reply starts.
            settings: model.loop.oracle_critic.
            context: the run's settings (simulator, data.gamma, seeds, pi_k's sampling; loop/critic_probe.py).
        """
        super().__init__()
        self.policy = copy.deepcopy(policy).requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.conversations: dict[str, Conversation] = {}
        for conversation in conversations:
            if self.conversations.setdefault(conversation.conversation_id, conversation) is not conversation:
                raise ValueError(
                    f"model.loop.oracle_critic: two conversations are named {conversation.conversation_id!r}; the "
                    "oracle finds a logged state by its conversation id"
                )
        self.prompt_lengths = dict(prompt_lengths)
        self.settings = settings
        self.context = context
        self._posteriors: dict = {}
        self.stats = {"rows": 0, "replies": 0, "continuations": 0, "seconds": 0.0}
        """What it cost: rollout rows scored, distinct (state, reply) pairs simulated, continuations played, and
        the seconds spent in `score`."""

    def stream_base(self, rollout: int) -> tuple:
        """The prefix of every seed of rollout `rollout`'s continuations."""
        return (self.context.run_seed, self.context.iteration, "oracle_critic", self.settings.seed, rollout)

    def reply_text(self, ids: torch.Tensor, mask: torch.Tensor, state: StateKey) -> str | None:
        """The reply of one [state; reply] row (real tokens where `mask` is 1), as the simulator would receive it
        (env/episodes.suggest decodes the same way: an empty reply is an abstain, None)."""
        tokens = ids[mask.bool()].tolist()[self.prompt_lengths[state] :]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip() or None

    @torch.no_grad()
    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: list[StateKey], rollout: int = 0
    ) -> torch.Tensor:
        """Q of each row [state; reply] (any padding): [n] float, on the rows' device. `states[i]` is row i's
        logged state, `rollout` the rollout's index in the policy phase (it seeds the continuations)."""
        start = time.perf_counter()
        if len(states) != input_ids.shape[0]:
            raise ValueError(f"{len(states)} states for {input_ids.shape[0]} rows")
        self.policy.eval()  # Lightning puts the whole policy module in train mode at fit start
        texts = [self.reply_text(row, m, state) for row, m, state in zip(input_ids, attention_mask, states)]
        # One candidate per state, its distinct replies together: they share the replays and the streams.
        replies: dict[StateKey, list[str | None]] = {}
        for state, text in zip(states, texts):
            at_state = replies.setdefault(state, [])
            if text not in at_state:
                at_state.append(text)
        candidates = [(self.conversations[cid], turn, texts_) for (cid, turn), texts_ in replies.items()]
        returns = continuation_returns(
            self.policy,
            self.tokenizer,
            candidates,
            self.stream_base(rollout),
            self.settings.continuations,
            self.settings.persona,
            self.context,
            self._posteriors,
        )
        value = {
            (state, text): sum(r) / len(r)
            for state, at_state in zip(replies, returns)
            for text, r in zip(replies[state], at_state)
        }
        self.stats["rows"] += len(states)
        self.stats["replies"] += len(value)
        self.stats["continuations"] += len(value) * self.settings.continuations
        self.stats["seconds"] += time.perf_counter() - start
        q = [value[(state, text)] for state, text in zip(states, texts)]
        return torch.tensor(q, dtype=torch.float32, device=input_ids.device)


def make_oracle_critic(policy_module, datamodule, settings: OracleCriticConfig, context: ProbeContext) -> OracleCritic:
    """The oracle for this policy phase: pi_k = the policy module's model now, the states = the DataModule's
    (the buffers the phase draws its prompts from)."""
    prompt_lengths = {(e.conversation_id, e.turn_index): len(e.prompt_ids) for e in datamodule.all_examples}
    return OracleCritic(
        policy_module.policy, policy_module.tokenizer, datamodule.conversations, prompt_lengths, settings, context
    )
