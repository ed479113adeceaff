"""`OffPolicyEstimateCallback`: before deploying pi_(k+1), estimate its outcome rate from the logs alone.

For the logged opening states s_1 (up to `max_states`), it samples pi_(k+1)'s
reply and averages the frozen Q_k(s_1, a): a direct-method estimate of
pi_(k+1)'s discounted success. It is optimistic in two known ways: Q_k values
the turns after the first as pi_k would play them, and PPO pushed pi_(k+1)
towards the replies Q_k over-rates. Beside it, as a calibration check, Q_k on
the logged replies and the logged discounted return they actually got. In
simulated runs the evaluation callback's `mean_return` (same discount, true
simulated customers) is the number to compare it with. With a critic ensemble
Q_k is the members' mean; the filtered-BC baseline has no Q_k and no estimate.

When there are more than `max_states` opening states, the ones used are a sample
whose stream depends on the iteration only, not on the run seed
(`utils.seeding.ope_sample_rng`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iterppo_lightning.rl.critic_targets import sample_replies, score_pairs
from iterppo_lightning.utils.seeding import ope_sample_rng

from .base import IterationCallback

if TYPE_CHECKING:
    from iterppo_lightning.loop.view import LoopView


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class OffPolicyEstimateCallback(IterationCallback):
    def __init__(self, max_states: int = 512) -> None:
        if max_states < 1:
            raise ValueError(f"max_states must be >= 1, got {max_states}")
        self.max_states = max_states

    def on_iteration_end(self, loop: LoopView, iteration: int, record: dict) -> None:
        dm, critic, policy = loop.datamodule, loop.critic, loop.policy
        if critic is None or not critic.is_built:  # filtered BC fits no Q: there is nothing to estimate with
            return
        current = {c.conversation_id: c for c in dm.conversations if c.iteration == iteration}
        opening = [
            e
            for e in dm.all_examples
            if e.conversation_id in current and e.turn_index == current[e.conversation_id].agent_turns[0]
        ]
        if not opening:
            return
        if len(opening) > self.max_states:
            # The sample depends on the iteration only, not on the run seed (see `ope_sample_rng`).
            opening = ope_sample_rng(iteration).sample(opening, self.max_states)
        prompts = [e.prompt_ids for e in opening]
        pad = policy.tokenizer.pad_token_id
        replies = sample_replies(
            policy.policy, policy.tokenizer, prompts, policy.max_new_tokens, temperature=policy.temperature
        )
        record["ope"] = {
            "q_policy": _mean(score_pairs(critic, prompts, replies, pad)),
            "q_logged": _mean(score_pairs(critic, prompts, [e.action_ids for e in opening], pad)),
            "logged_return": _mean([current[e.conversation_id].returns(dm.gamma)[0] for e in opening]),
            "states": len(opening),
        }
