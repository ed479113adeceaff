"""Scripted sales agents (behaviour, myopic, optimal) and a helper that measures them on the simulator.

The agents see only the :class:`Conversation` (never the hidden persona), the
same view a learned policy has. They serve three purposes:

* :class:`BehaviourAgent` is the noisy exploration policy that produces the
  initial logged conversations ("persona exploration").
* :class:`MyopicAgent` is the best single-turn strategy: asking earns no
  immediate reward, so it never asks and keeps guessing products. It is the
  baseline a multi-turn method has to beat.
* :class:`OptimalAgent` asks the need, asks the budget, then recommends the
  fitting product with a discount: the ceiling.

Run ``python -m iterppo_lightning.env.scripted_agents`` to print their success rates.
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.env.reply_parser import (
    CATEGORIES,
    CATEGORY_WORDS,
    TIER_WORDS,
    TIERS,
    canonical_category,
    parse_reply,
)
from iterppo_lightning.env.sales_simulator import (
    BUDGET_PHRASES,
    LEAVING,
    NEED_TEMPLATES,
    TOO_EXPENSIVE,
    WRONG_CATEGORY,
    WRONG_TIER,
    SalesSimulator,
    SimulatorConfig,
)
from iterppo_lightning.utils.seeding import scripted_agent_rng, scripted_episode_seed


class Agent(Protocol):
    """Anything that suggests the next business message from the conversation so far."""

    def act(self, conversation: Conversation, rng: random.Random) -> str | None:
        """Return the suggested message, or ``None`` to abstain."""
        ...


# ---------------------------------------------------------------------------
# Reading the customer back
# ---------------------------------------------------------------------------


def _template_regex(template: str, slot: str) -> re.Pattern[str]:
    """Compile a phrase template into a regex whose group captures the ``{slot}`` word."""
    head, tail = template.split("{" + slot + "}")
    return re.compile(re.escape(head) + r"([a-z]+)" + re.escape(tail))


_NEED_PATTERNS = [_template_regex(t, "word") for t in NEED_TEMPLATES]
_WRONG_CATEGORY_PATTERN = _template_regex(WRONG_CATEGORY, "category")
_BUDGET_OF_PHRASE = {phrase: tier for tier, phrases in BUDGET_PHRASES.items() for phrase in phrases}


@dataclass
class RevealedInfo:
    """What the customer has given away so far, read from its messages."""

    need: str | None = None
    """Canonical category the customer needs, once revealed (or implied)."""
    budget: str | None = None
    """Canonical tier the customer can pay, once revealed (or implied)."""
    price_sensitive_hint: bool = False
    """The customer called a fitting product too expensive (it wants a discount)."""
    rejected: set[str] = field(default_factory=set)
    """Canonical categories and tiers the customer turned down (the two name sets are disjoint)."""


def revealed_info(conversation: Conversation) -> RevealedInfo:
    """Read need, budget, price sensitivity and rejections from the customer's messages.

    Replies to a recommended product are read together with that product:
    "not in my price range" means the category was right and the tier wrong,
    "a bit expensive" means the product fits and only a discount is missing.
    """
    info = RevealedInfo()
    turns = conversation.turns
    for i, turn in enumerate(turns):
        text = turn.customer.removesuffix(" " + LEAVING).strip()
        if (tier := _BUDGET_OF_PHRASE.get(text)) is not None:
            info.budget = tier
            continue
        if (match := _WRONG_CATEGORY_PATTERN.fullmatch(text)) is not None:
            if (category := canonical_category(match.group(1))) is not None:
                info.rejected.add(category)
            continue
        for pattern in _NEED_PATTERNS:
            if (match := pattern.fullmatch(text)) is not None:
                if (category := canonical_category(match.group(1))) is not None:
                    info.need = category
                break
        # The remaining signals are about the product in the message being answered.
        previous_sent = turns[i - 1].sent if i > 0 else None
        product = parse_reply(previous_sent).product if previous_sent else None
        if product is None:
            continue
        tier, category = product
        if text == WRONG_TIER:
            info.need = category
            info.rejected.add(tier)
        elif text == TOO_EXPENSIVE:
            info.need, info.budget = category, tier
            info.price_sensitive_hint = True
    return info


# ---------------------------------------------------------------------------
# Agents
# ---------------------------------------------------------------------------

DISCOUNT_CLAUSE = "i can give you 10 % off ."


def recommend(tier: str, category: str, discount: bool = True) -> str:
    """The canonical recommendation used by the optimal and myopic agents."""
    text = f"how about the {tier} {category} ?"
    return f"{text} {DISCOUNT_CLAUSE}" if discount else text


class OptimalAgent:
    """Ask the need, then the budget, then recommend the fitting product with a discount."""

    ASK_NEED = "what are you looking for ?"
    ASK_BUDGET = "what is your budget ?"

    def act(self, conversation: Conversation, rng: random.Random) -> str | None:
        info = revealed_info(conversation)
        if info.need is None:
            return self.ASK_NEED
        if info.budget is None:
            return self.ASK_BUDGET
        return recommend(info.budget, info.need)


class MyopicAgent:
    """Greedy on immediate reward: never asks, always recommends a most likely product with a discount.

    Every product consistent with what the customer has revealed or turned down
    is equally likely to fit, so the choice among them is uniform (``rng``).
    """

    def act(self, conversation: Conversation, rng: random.Random) -> str | None:
        info = revealed_info(conversation)
        categories = [info.need] if info.need else [c for c in CATEGORIES if c not in info.rejected]
        tiers = [info.budget] if info.budget else [t for t in TIERS if t not in info.rejected]
        # Rejections always leave a candidate in practice; fall back to the full
        # catalog rather than crash if a conversation was edited by hand.
        candidates = [(t, c) for c in categories or CATEGORIES for t in tiers or TIERS]
        tier, category = rng.choice(candidates)
        return recommend(tier, category)


@dataclass
class BehaviourAgent:
    """Noisy exploration policy: a random intent per turn, phrased with a random template.

    Intents and their probabilities: ask the need, ask the budget, recommend a
    product, offer only a discount, small talk. A recommendation uses the
    revealed need and budget, each independently with probability
    ``informed_prob`` when known (otherwise a uniform pick), and carries a
    discount clause with probability ``discount_prob``.
    """

    ask_need_prob: float = 0.25
    ask_budget_prob: float = 0.2
    recommend_prob: float = 0.35
    discount_only_prob: float = 0.05
    small_talk_prob: float = 0.15
    informed_prob: float = 0.5
    discount_prob: float = 0.5
    synonym_prob: float = 0.3
    """Probability of naming a tier or category with a synonym, so logs show the customer's vocabulary."""
    skip_known_questions: bool = False
    """Never re-ask what the customer already revealed: that question's probability goes to
    recommending. Keeps the order of intents random while making informed recommendations
    common enough in imagined data for a tiny model to learn to use what it was told."""

    ASK_NEED: ClassVar[tuple[str, ...]] = (
        "what are you looking for ?",
        "what kind of device do you need ?",
        "how can i help you today ?",
        "what would you like to find today ?",
        "which type of product are you interested in ?",
    )
    ASK_BUDGET: ClassVar[tuple[str, ...]] = (
        "what is your budget ?",
        "how much would you like to spend ?",
        "what price range works for you ?",
        "what can you afford ?",
    )
    RECOMMEND: ClassVar[tuple[str, ...]] = (
        "how about the {product} ?",
        "i recommend the {product} .",
        "you might like the {product} .",
        "the {product} is a great choice .",
    )
    DISCOUNT: ClassVar[tuple[str, ...]] = (
        "i can give you 10 % off .",
        "there is a discount for you today .",
        "we have a special deal this week .",
    )
    SMALL_TALK: ClassVar[tuple[str, ...]] = (
        "thanks for stopping by .",
        "it is a nice day today .",
        "we have many good products .",
        "let me know if you have questions .",
    )

    def __post_init__(self) -> None:
        intents = self._intent_probs()
        if any(p < 0 for p in intents.values()) or abs(sum(intents.values()) - 1.0) > 1e-6:
            raise ValueError(f"intent probabilities must be non-negative and sum to 1, got {intents}")
        for name in ("informed_prob", "discount_prob", "synonym_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def _intent_probs(self) -> dict[str, float]:
        return {
            "ask_need": self.ask_need_prob,
            "ask_budget": self.ask_budget_prob,
            "recommend": self.recommend_prob,
            "discount_only": self.discount_only_prob,
            "small_talk": self.small_talk_prob,
        }

    def act(self, conversation: Conversation, rng: random.Random) -> str | None:
        intents = self._intent_probs()
        info = revealed_info(conversation)
        if self.skip_known_questions:
            for known, question in ((info.need, "ask_need"), (info.budget, "ask_budget")):
                if known:
                    intents["recommend"] += intents[question]
                    intents[question] = 0.0
        intent = rng.choices(list(intents), weights=list(intents.values()))[0]
        if intent == "ask_need":
            return rng.choice(self.ASK_NEED)
        if intent == "ask_budget":
            return rng.choice(self.ASK_BUDGET)
        if intent == "discount_only":
            return rng.choice(self.DISCOUNT)
        if intent == "small_talk":
            return rng.choice(self.SMALL_TALK)
        return self._recommendation(info, rng)

    def _recommendation(self, info: RevealedInfo, rng: random.Random) -> str:
        category = info.need if info.need and rng.random() < self.informed_prob else rng.choice(CATEGORIES)
        tier = info.budget if info.budget and rng.random() < self.informed_prob else rng.choice(TIERS)
        product = f"{self._word(TIER_WORDS[tier], rng)} {self._word(CATEGORY_WORDS[category], rng)}"
        text = rng.choice(self.RECOMMEND).format(product=product)
        if rng.random() < self.discount_prob:
            text = f"{text} {rng.choice(self.DISCOUNT)}"
        return text

    def _word(self, words: tuple[str, ...], rng: random.Random) -> str:
        """The canonical name (first), or sometimes a synonym."""
        return rng.choice(words[1:]) if rng.random() < self.synonym_prob else words[0]


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def play_episode(agent: Agent, simulator: SalesSimulator, seed: int, conversation_id: str) -> Conversation:
    """Play one episode to the end; the agent's rng is `scripted_agent_rng` of the episode seed."""
    episode = simulator.new_episode(seed, conversation_id)
    rng = scripted_agent_rng(seed)
    while not episode.done:
        episode.step(agent.act(episode.conversation, rng))
    return episode.conversation


def run_agent(agent: Agent, config: SimulatorConfig, episodes: int, seed: int) -> dict[str, float | int]:
    """Success rate and mean agent messages per conversation over ``episodes`` episodes.

    Episode ``i`` uses simulator seed ``scripted_episode_seed(seed, i)`` and agent
    rng ``scripted_agent_rng`` of that seed (utils/seeding.py), so results are reproducible
    and independent of how episodes are grouped.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    simulator = SalesSimulator(config)
    successes = 0
    turns = 0
    for i in range(episodes):
        conversation = play_episode(agent, simulator, scripted_episode_seed(seed, i), f"{seed}-{i}")
        successes += conversation.success
        turns += len(conversation.agent_turns)
    return {"success_rate": successes / episodes, "mean_turns": turns / episodes, "episodes": episodes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Success rates of the scripted sales agents.")
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("suggested_response", "agent"), default="suggested_response")
    args = parser.parse_args(argv)
    config = SimulatorConfig(mode=args.mode)
    agents: dict[str, Agent] = {
        "optimal": OptimalAgent(),
        "myopic": MyopicAgent(),
        "behaviour": BehaviourAgent(),
    }
    for name, agent in agents.items():
        result = run_agent(agent, config, args.episodes, args.seed)
        print(f"{name:10s} success_rate={result['success_rate']:.3f} mean_turns={result['mean_turns']:.2f}")


if __name__ == "__main__":
    main()
