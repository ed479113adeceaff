"""The critic probe: Q_k against the simulator's ground truth, reply by reply, at logged states (docs/critic.md).

For a sample of logged states of iteration k's buffer, each rebuilt exactly from its episode seed
(env/simulator_replay.py), the probe scores candidate replies: a few samples from pi_k, plus the simulator's
canonical moves (ask the need, ask the budget, recommend with and without a discount, a discount alone, small
talk, and, once the need is known, a product of another category). It scores each with Q_k, by the critic's
`q_mean` on the rendering the critic trains on. It also scores each with its true value under pi_k: the mean
discounted return (data.gamma, the critic targets' discount) of M simulated continuations after the reply, in
which pi_k plays the rest.

Common random numbers: continuation j of a state uses the same hidden customer, the same business and
customer streams (`SalesEpisode.fork`) and the same per-reply sampling streams for pi_k whatever the
candidate, so differences between the replies at a state are measured with far less noise than the values.

The hidden customer: with persona "posterior" (default) continuation j draws the customer from the personas
consistent with the state, so the truth is Q^pi_k(s, a) of the observable state, what a critic can know. With
"logged", it is always the logged customer's own persona.

Everything is seeded by (run seed, iteration, probe seed): the same seed gives the same numbers, in the loop
and in `iterppo probe-critic` on the saved run.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.data.rendering import render_state, render_suggestion
from iterppo_lightning.env.episodes import suggest
from iterppo_lightning.env.reply_parser import CATEGORIES, TIERS
from iterppo_lightning.env.sales_simulator import SalesEpisode, SimulatorConfig
from iterppo_lightning.env.scripted_agents import (
    DISCOUNT_CLAUSE,
    BehaviourAgent,
    OptimalAgent,
    recommend,
    revealed_info,
)
from iterppo_lightning.env.simulator_replay import draw_persona, episode_seed, posterior_personas, replay
from iterppo_lightning.loop.probe_config import CriticProbeConfig
from iterppo_lightning.rl import probe_metrics as pm
from iterppo_lightning.rl.critic_targets import score_pairs
from iterppo_lightning.utils.seeding import derive_seed, derive_uniform

STAGES = ("nothing", "need", "budget", "need+budget")
"""What the customer has revealed at a state; states are sampled evenly across these."""

DECISIONS = {
    # name: (candidate A, candidate B, the stages where the choice is the decisive one)
    "discount_decision": ("recommend_discount", "recommend", ("need+budget",)),
    "ask_decision": ("ask_need", "recommend_discount", ("nothing", "budget")),
    # The same recommendation (tier, discount) of the category the customer asked for against another one.
    "category_decision": ("recommend_discount", "wrong_product", ("need", "need+budget")),
}
"""Decisive choices: Q(A) - Q(B) against the true difference, at the states where each is the question."""


@dataclass
class ProbeContext:
    """What the probe (and the oracle critic's continuations) need besides Q_k, pi_k and the buffer: the run's
    settings."""

    simulator: SimulatorConfig
    """model.environment: the simulator the buffer was collected on."""
    gamma: float
    """data.gamma: the discount of the critic's Monte Carlo targets."""
    run_seed: int
    iteration: int
    max_new_tokens: int
    """model.policy.max_new_tokens."""
    temperature: float = 1.0
    """model.loop.collect_temperature: pi_k as it collected the buffer."""
    policy_prompt_tokens: int = 384
    """model.loop.max_prompt_tokens: what pi_k reads of a state."""
    critic_prompt_tokens: int = 384
    """data.max_prompt_tokens: what the critic reads of a state."""
    critic_action_tokens: int = 24
    """data.max_action_tokens: what the critic reads of a reply."""
    batch_size: int = 256
    """model.loop.rollout_batch_size: continuations advanced together in one generate call."""


@dataclass
class _State:
    conversation: Conversation
    turn: int
    stage: str
    moves: list[str]
    texts: list[str | None]
    q: list[float]
    returns: list[list[float]]
    """returns[c][j]: discounted return of continuation j after candidate c."""


def _prefix(conversation: Conversation, turn: int) -> Conversation:
    """State s_turn as a conversation of its own, to read (it shares the logged turns): its last turn is the
    customer message being answered."""
    return Conversation(conversation.conversation_id, conversation.turns[: turn + 1])


def state_stage(conversation: Conversation, turn: int) -> str:
    info = revealed_info(_prefix(conversation, turn))
    return STAGES[(info.need is not None) + 2 * (info.budget is not None)]


def sample_states(conversations: list[Conversation], count: int, rng: random.Random) -> list[tuple[int, int, str]]:
    """`count` (conversation index, turn, stage) states, as evenly across the stages as the buffer allows."""
    strata: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for n, conversation in enumerate(conversations):
        for turn in conversation.agent_turns:
            stage = state_stage(conversation, turn)
            strata[stage].append((n, turn, stage))
    pools = [rng.sample(strata[s], len(strata[s])) for s in STAGES if strata[s]]
    chosen: list[tuple[int, int, str]] = []
    while len(chosen) < count and any(pools):
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(pool.pop())
    return chosen


def canonical_moves(conversation: Conversation, turn: int, rng: random.Random) -> list[tuple[str, str]]:
    """The simulator's intents as replies at state s_turn: (move, text).

    A recommendation names what the customer revealed; what it has not revealed is guessed among what it has
    not turned down (as the myopic agent guesses). Once the need is known, "wrong_product" offers another category.
    """
    info = revealed_info(_prefix(conversation, turn))
    need = info.need or rng.choice([c for c in CATEGORIES if c not in info.rejected] or list(CATEGORIES))
    tier = info.budget or rng.choice([t for t in TIERS if t not in info.rejected] or list(TIERS))
    moves = [
        ("ask_need", OptimalAgent.ASK_NEED),
        ("ask_budget", OptimalAgent.ASK_BUDGET),
        ("recommend_discount", recommend(tier, need, discount=True)),
        ("recommend", recommend(tier, need, discount=False)),
        ("discount_only", DISCOUNT_CLAUSE),
        ("small_talk", BehaviourAgent.SMALL_TALK[0]),
    ]
    if info.need is not None:
        other = rng.choice([c for c in CATEGORIES if c != info.need])
        moves.append(("wrong_product", recommend(tier, other, discount=True)))
    return moves


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _score(critic, tokenizer, states: list[_State], ctx: ProbeContext) -> None:
    """Q_k of every candidate, on the critic's own rendering and truncation (data/datamodule.py's examples); a
    critic that reads text (loop/table_critic.py) scores the candidates' text at the state instead."""
    if hasattr(critic, "score_replies"):
        for st in states:
            st.q = critic.score_replies(st.conversation, st.turn, st.texts)
        return
    prompts, replies = [], []
    for st in states:
        prompt = _encode(tokenizer, [render_state(st.conversation, st.turn, tokenizer)])[0]
        for text in st.texts:
            prompts.append(prompt[-ctx.critic_prompt_tokens :])
            replies.append(_encode(tokenizer, [render_suggestion(text, tokenizer)])[0][: ctx.critic_action_tokens])
    q = iter(score_pairs(critic, prompts, replies, tokenizer.pad_token_id))
    for st in states:
        st.q = [next(q) for _ in st.texts]


def _play(model, tokenizer, episodes: list[tuple[SalesEpisode, tuple]], ctx: ProbeContext) -> None:
    """pi_k plays every episode to its end, each reply drawn from the stream of (its continuation, its turn)."""
    while True:
        live = [(ep, key) for ep, key in episodes if not ep.done]
        if not live:
            return
        for start in range(0, len(live), ctx.batch_size):
            chunk = live[start : start + ctx.batch_size]
            seeds = [derive_seed(*key, "reply", len(ep.conversation.turns)) for ep, key in chunk]
            replies = suggest(
                model,
                tokenizer,
                [ep.conversation for ep, _ in chunk],
                max_new_tokens=ctx.max_new_tokens,
                max_prompt_tokens=ctx.policy_prompt_tokens,
                temperature=ctx.temperature,
                reply_seeds=seeds,
            )
            for (ep, _), reply in zip(chunk, replies):
                ep.step(reply)


def continuation_returns(
    model,
    tokenizer,
    candidates: list[tuple[Conversation, int, list[str | None]]],
    base: tuple,
    continuations: int,
    persona: str,
    ctx: ProbeContext,
    posteriors: dict | None = None,
) -> list[list[list[float]]]:
    """The true values of replies at logged states under pi_k, as simulated returns: `returns[i][c][j]` is the
    discounted return (ctx.gamma) from the state on of continuation j after reply c of `candidates[i]` =
    (conversation, turn, replies), in which pi_k (`model`) plays the rest. The critic probe's ground truth and the
    oracle critic's Q (loop/oracle_critic.py) are their means over j.

    Continuation j of a state draws only from streams of (*base, conversation id, turn, j): its hidden customer
    (`persona` "posterior": drawn from the personas consistent with the state; "logged": the logged one), the
    business's and the customer's streams, and pi_k's per-reply sampling streams. They are the same for every
    reply at the state (common random numbers), and a reply's returns do not depend on what else is computed
    with it (nor on ctx.batch_size). `posteriors`: a cache of the states' posteriors by (conversation id, turn),
    kept by a caller that meets the same states again.
    """
    episodes: list[tuple[SalesEpisode, tuple]] = []
    slots: list[tuple[int, int, int]] = []
    returns: list[list[list[float]]] = []
    for i, (conversation, turn, texts) in enumerate(candidates):
        cid = conversation.conversation_id
        posterior = None
        if persona == "posterior":
            cache = {} if posteriors is None else posteriors
            if (cid, turn) not in cache:
                cache[(cid, turn)] = posterior_personas(ctx.simulator, conversation, turn)
            posterior = cache[(cid, turn)]
        at_state: dict = {}
        returns.append([[0.0] * continuations for _ in texts])
        for j in range(continuations):
            customer = None if posterior is None else draw_persona(posterior, derive_uniform(*base, cid, turn, j))
            key = None if customer is None else tuple(customer.to_dict().values())
            if key not in at_state:
                at_state[key] = replay(ctx.simulator, conversation, turn, customer)
            stream = derive_seed(*base, cid, turn, j, "stream")
            for c, text in enumerate(texts):
                episode = at_state[key].fork(stream)
                episode.step(text)
                episodes.append((episode, (*base, cid, turn, j)))
                slots.append((i, c, j))
    _play(model, tokenizer, episodes, ctx)
    for (episode, _), (i, c, j) in zip(episodes, slots):
        returns[i][c][j] = episode.conversation.returns(ctx.gamma)[candidates[i][1]]
    return returns


def run_critic_probe(
    critic, model, tokenizer, conversations: list[Conversation], settings: CriticProbeConfig, ctx: ProbeContext
) -> dict:
    """The probe's record (docs/critic.md): Q_k against the true values of replies at logged states of D_k.

    `critic` is Q_k (or any object with `score_replies(conversation, turn, texts)`), `model`/`tokenizer` pi_k,
    `conversations` the buffer pi_k collected on the simulator.
    """
    base = (ctx.run_seed, ctx.iteration, "critic_probe", settings.seed)
    for conversation in conversations:
        episode_seed(conversation)  # a clear error for conversations the simulator did not make
    picked = sample_states(conversations, settings.states, random.Random(derive_seed(*base, "states")))
    states: list[_State] = []
    for n, turn, stage in picked:
        conversation = conversations[n]
        replay(ctx.simulator, conversation, turn)  # raises ReplayMismatch unless the log is reproduced exactly
        moves = canonical_moves(conversation, turn, random.Random(derive_seed(*base, conversation.conversation_id)))
        states.append(_State(conversation, turn, stage, [m for m, _ in moves], [t for _, t in moves], [], []))

    # pi_k's own replies at each state, one stream per (state, sample).
    if settings.policy_samples:
        prefixes, seeds = [], []
        for st in states:
            for p in range(settings.policy_samples):
                prefixes.append(_prefix(st.conversation, st.turn))
                seeds.append(derive_seed(*base, st.conversation.conversation_id, st.turn, "sample", p))
        samples = iter(
            suggest(
                model,
                tokenizer,
                prefixes,
                max_new_tokens=ctx.max_new_tokens,
                max_prompt_tokens=ctx.policy_prompt_tokens,
                temperature=ctx.temperature,
                reply_seeds=seeds,
            )
        )
        for st in states:
            for _ in range(settings.policy_samples):
                text = next(samples)
                if text not in st.texts:  # the same reply twice would count one action twice
                    st.moves.append("policy")
                    st.texts.append(text)

    _score(critic, tokenizer, states, ctx)

    # M continuations per candidate, continuation j sharing its customer and streams across the candidates.
    candidates = [(st.conversation, st.turn, st.texts) for st in states]
    returns = continuation_returns(model, tokenizer, candidates, base, settings.continuations, settings.persona, ctx)
    for st, at_state in zip(states, returns):
        st.returns = at_state

    return summarize(states, settings, ctx)


def summarize(states: list[_State], settings: CriticProbeConfig, ctx: ProbeContext) -> dict:
    """The probe's record from the scored states (rl/probe_metrics.py does the maths)."""
    groups = [(st.q, [pm.mean(r) for r in st.returns]) for st in states]
    # Two independent halves of the continuations: how well the ground truth agrees with itself.
    halves = [([pm.mean(r[0::2]) for r in st.returns], [pm.mean(r[1::2]) for r in st.returns]) for st in states]
    corr, corr_states = pm.within_state_corr(groups)
    pairwise, pairs = pm.pairwise_accuracy(groups, settings.pair_threshold)
    ratio, q_spread, true_spread = pm.spread_ratio(groups)
    bias, mae = pm.errors(groups)
    split = pm.within_state_corr(halves)[0]
    record = {
        "within_state_corr": corr,
        # How much the states sampled move it: the standard error of the mean over states.
        "corr_se": pm.standard_error(pm.state_correlations(groups)),
        "pairwise_acc": pairwise,
        "spread_ratio": ratio,
        "bias": bias,
        "mae": mae,
        "within_state_error": pm.within_state_error(groups),
        "q_spread": q_spread,
        "true_spread": true_spread,
        "mean_q": pm.mean([q for g in groups for q in g[0]]),
        "mean_true": pm.mean([v for g in groups for v in g[1]]),
        "true_se": pm.mean([pm.standard_error(r) for st in states for r in st.returns]),
        "true_split_corr": split,
        "corr_ceiling": pm.corr_ceiling(split),
        "corr_states": corr_states,
        "pairs": pairs,
        "states": len(states),
        "candidates": sum(len(st.texts) for st in states),
        "continuations": settings.continuations,
        "policy_samples": settings.policy_samples,
        "pair_threshold": settings.pair_threshold,
        "persona": settings.persona,
        "seed": settings.seed,
        "gamma": ctx.gamma,
        "stages": {s: sum(st.stage == s for st in states) for s in STAGES},
    }
    # pi_k's own replies only: the replies PPO actually compares, where Q_k is identifiable from D_k. The canonical
    # moves include replies pi_k almost never writes (another category, a bare discount); Q_k's error there cannot
    # be learned from pi_k's data and matters to Theorem 2 only if pi_(k+1) moves there.
    own = [
        tuple([x for x, m in zip(column, st.moves) if m == "policy"] for column in group)
        for st, group in zip(states, groups)
    ]
    own_corr, own_states = pm.within_state_corr(own)
    own_pairwise, own_pairs = pm.pairwise_accuracy(own, settings.pair_threshold)
    record["policy_samples_only"] = {
        "within_state_corr": own_corr,
        "corr_states": own_states,
        "pairwise_acc": own_pairwise,
        "pairs": own_pairs,
    }
    for name, (a, b, stages) in DECISIONS.items():
        pairs_ab, diff_se = [], []
        for st in states:
            if st.stage in stages and a in st.moves and b in st.moves:
                ia, ib = st.moves.index(a), st.moves.index(b)
                va, vb = pm.mean(st.returns[ia]), pm.mean(st.returns[ib])
                pairs_ab.append((st.q[ia], st.q[ib], va, vb))
                # Common random numbers: the paired differences' standard error, not the two values'.
                diff_se.append(pm.standard_error([x - y for x, y in zip(st.returns[ia], st.returns[ib])]))
        record[name] = {**pm.decision(pairs_ab, settings.pair_threshold), "true_diff_se": pm.mean(diff_se)}
    by_move: dict[str, dict] = {}
    for move in dict.fromkeys(m for st in states for m in st.moves):
        cells = [(st.q[c], pm.mean(st.returns[c])) for st in states for c, m in enumerate(st.moves) if m == move]
        by_move[move] = {
            "n": len(cells),
            "q": pm.mean([q for q, _ in cells]),
            "true": pm.mean([v for _, v in cells]),
        }
    record["by_move"] = by_move
    return record
