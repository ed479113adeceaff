"""Regression targets of the Q-critic: Monte Carlo, TD(lambda) on logged replies, or fitted Q evaluation.

Monte Carlo (`Conversation.returns`) is sound when the buffer comes from pi_k
alone. Mixed or pooled logs need bootstrapped targets: for agent turn j whose
next customer message brings outcome r_j,

    y_j = r_j                                              if that message ends the conversation,
    y_j = r_j + gamma * ((1 - lam) * Q(s_j+1, a_j+1) + lam * y_j+1)   otherwise.

"td" takes a_j+1 from the log (evaluates the logging policies); "fqe" samples
a_j+1 from pi_k (evaluates pi_k itself) and uses lam = 0, since later logged
replies are not pi_k's. lam = 1 gives back the Monte Carlo return exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.data.padding import pad_left, pad_right
from iterppo_lightning.models.generation import sample_responses

TurnKey = tuple[str, int]
"""(conversation_id, turn index) of an agent turn."""


def lambda_return_targets(
    conversations: list[Conversation], next_q: Mapping[TurnKey, float], gamma: float, lam: float
) -> dict[TurnKey, float]:
    """y_j for every agent turn, from the back of each conversation (see the module docstring).

    `next_q[(cid, t)]` is Q at agent turn t's state with the chosen next reply; it is
    needed for every agent turn except each conversation's first (never looked up when lam = 1).
    """
    targets: dict[TurnKey, float] = {}
    for conv in conversations:
        turns = conv.turns
        following = 0.0  # y of the next agent turn
        for t in reversed(conv.agent_turns):
            reward = float(turns[t + 1].outcome) if t + 1 < len(turns) else 0.0
            if t + 1 >= len(turns) or turns[t + 1].terminal:
                y = reward
            else:
                bootstrap = next_q[(conv.conversation_id, t + 1)] if lam < 1.0 else 0.0
                y = reward + gamma * ((1.0 - lam) * bootstrap + lam * following)
            targets[(conv.conversation_id, t)] = y
            following = y
    return targets


def myopic_targets(conversations: list[Conversation]) -> dict[TurnKey, float]:
    """Single-turn targets: for agent turn j, only the outcome the next customer message brings.

    That is 1 when the conversation succeeds right after this reply, else 0: the Monte
    Carlo return with gamma = 0 (`Conversation.returns(0.0)`), blind to every later turn.
    """
    return {(c.conversation_id, t): g for c in conversations for t, g in zip(c.agent_turns, c.returns(0.0))}


@torch.no_grad()
def score_pairs(
    critic, prompts: list[list[int]], replies: list[list[int]], pad_id: int, batch_size: int = 128
) -> list[float]:
    """Q(s, a) in [0, 1] for token-id pairs, read as in training (the last reply token, or the reply's mean).

    For a critic ensemble, the members' mean (`q_mean`). A critic that was never built (the
    filtered-BC baseline fits none) has no Q: every value is NaN.
    """
    if not getattr(critic, "is_built", True):
        return [float("nan")] * len(prompts)
    was_training = critic.training
    critic.eval()
    device = next(critic.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        seqs = [p + a for p, a in zip(chunk, replies[start : start + batch_size])]
        ids, mask = pad_right(seqs, pad_id)
        reply_starts = torch.tensor([len(p) for p in chunk], dtype=torch.long, device=device)
        out.extend(critic.q_mean(ids.to(device), mask.to(device), reply_starts).float().cpu().tolist())
    critic.train(was_training)
    return out


@torch.no_grad()
def sample_replies(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 128,
    greedy: bool = False,
    temperature: float = 1.0,
) -> list[list[int]]:
    """One reply per prompt from `model` (token ids up to and including the end token)."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_left(prompts[start : start + batch_size], tokenizer.pad_token_id)
        response, resp_mask = sample_responses(
            model,
            ids.to(device),
            mask.to(device),
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            max_new_tokens,
            temperature,
            greedy,
        )
        for row, row_mask in zip(response.cpu(), resp_mask.cpu()):
            out.append(row[row_mask.bool()].tolist())
    return out
