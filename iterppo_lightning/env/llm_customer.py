"""A chat model role-plays the customer from a persona card; a configurable judge decides the outcome.

`LLMCustomerEnvironment` is a drop-in replacement for `SalesSimulator` in
collection and evaluation: episodes have the same surface as `SalesEpisode`
(``.conversation``, ``.done``, ``.step(suggestion)``) and produce the same
Turn/Conversation records, so everything downstream (buffers, critic targets,
the log validator) is unchanged.

Why it is built this way:

* Personas come from the scripted simulator. By default a seed draws exactly
  the persona, opening message and business noise that `SalesSimulator` draws
  for that seed, and the card describes that persona (need, budget, price
  sensitivity, patience). Success rates against the LLM customer and the
  scripted one are then measured on the same customers (common random numbers).
* The business in the loop is the simulator's own code (accept / edit / reject,
  the neutral own message on abstain), not a re-implementation that could drift.
* A round is batched: `step_batch` makes ONE `generate` call for every
  customer reply of the round and at most one judge forward pass, because
  generation, not bookkeeping, is what an LLM customer costs.
* The customer and the judge may instead be any OpenAI-compatible chat
  endpoint (chat_endpoint.py): a round then sends one request per
  conversation, `concurrency` at a time, and fails as a whole (nothing of the
  round is kept) when a request still fails after its retries.
* The customer's text is stored exactly as generated (buy marker included) and
  the judge's probability is kept per reply in ``metadata["judge_probs"]``, so
  any outcome can be audited from the record alone.

Determinism: the seed fixes the persona (and the business's decisions);
sampling the customer's replies uses torch's global RNG, which the caller seeds
(an endpoint samples on its server: see `ChatEndpointConfig.seed`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from iterppo_lightning.data.conversation import Conversation, Turn
from iterppo_lightning.env.chat_endpoint import ChatEndpoint, ChatRequest, request_seed, yes_probability
from iterppo_lightning.env.reply_parser import CATEGORY_WORDS, TIERS
from iterppo_lightning.env.sales_simulator import Persona, SalesEpisode, SimulatorConfig
from iterppo_lightning.models import chat_generation as chat

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

JUDGES: tuple[str, ...] = ("marker", "model")
JUDGE_QUESTION = "Did the customer agree to buy? Answer yes or no."
JUDGE_ENDPOINT_TEMPERATURE = 0.0
JUDGE_ENDPOINT_MAX_TOKENS = 8
"""A judge endpoint's defaults: a deterministic, short answer (its first yes or no is read)."""
OPENING_PREFIX = "opening:"
"""A line of an explicit persona card starting with this (any case) is the customer's first message."""

TIER_DESCRIPTIONS: dict[str, str] = {"basic": "cheap, entry level", "standard": "mid range", "premium": "high end"}


@dataclass
class LLMCustomerConfig:
    """Settings of the LLM customer (the ``llm_customer`` section of a run config)."""

    persona_cards: list[str] | None = None
    """Explicit persona cards (episode seed ``s`` plays card ``s % len(cards)``); ``None`` describes
    the scripted simulator's persona for the seed, so outcomes stay comparable with it. A card line
    ``Opening: ...`` gives the customer's first message; otherwise the simulator's opening is used."""
    judge: str = "marker"
    """``marker``: outcome 1 iff the customer's reply contains `buy_marker`; ``model``: ask the
    judge model whether the customer agreed to buy."""
    buy_marker: str = "[BUY]"
    """What the customer writes to buy (the customer is told so in its rules)."""
    judge_threshold: float = 0.5
    """Judge ``model``: outcome 1 when P(yes) is above this."""
    max_agent_turns: int = 6
    """After this many business messages the customer leaves (terminal turn, outcome 0)."""
    max_new_tokens: int = 40
    """Length cap of one customer reply, in tokens."""
    temperature: float = 0.7
    """Sampling temperature of the customer; 0 means greedy decoding."""
    accept_prob: float = 1.0
    """Probability the business sends the agent's suggestion unchanged."""
    edit_prob: float = 0.0
    """Probability the business sends a light edit; the rest (1 - accept - edit) it rejects."""
    batch_size: int | None = None
    """Most conversations per `generate` call; ``None`` = the whole round in one call."""
    max_prompt_tokens: int = 2048
    """Longer customer prompts lose their oldest tokens (the persona card first): keep it above the
    system prompt plus `max_agent_turns` exchanges."""

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise ValueError("; ".join(problems))


def _config_problems(cfg: LLMCustomerConfig) -> list[str]:
    """Every invalid field, named as in a run config (``llm_customer.<field>``)."""
    out: list[str] = []
    if cfg.persona_cards is not None:
        if isinstance(cfg.persona_cards, str) or not isinstance(cfg.persona_cards, Sequence):
            out.append(f"llm_customer.persona_cards must be a list of strings or null, got {cfg.persona_cards!r}")
        elif not cfg.persona_cards:
            out.append(
                "llm_customer.persona_cards must not be empty (use null for cards from the simulator's personas)"
            )
        else:
            bad = [i for i, card in enumerate(cfg.persona_cards) if not isinstance(card, str) or not card.strip()]
            if bad:
                out.append(f"llm_customer.persona_cards entries must be non-empty strings; bad entries at {bad}")
    if cfg.judge not in JUDGES:
        out.append(f"llm_customer.judge must be marker or model, got {cfg.judge!r}")
    if not isinstance(cfg.buy_marker, str) or not cfg.buy_marker.strip():
        out.append(f"llm_customer.buy_marker must be a non-empty string, got {cfg.buy_marker!r}")
    if not 0.0 <= cfg.judge_threshold <= 1.0:
        out.append(f"llm_customer.judge_threshold must be in [0, 1], got {cfg.judge_threshold}")
    for name in ("max_agent_turns", "max_new_tokens", "max_prompt_tokens"):
        if getattr(cfg, name) < 1:
            out.append(f"llm_customer.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        out.append(f"llm_customer.batch_size must be >= 1 or null, got {cfg.batch_size}")
    if cfg.temperature < 0:
        out.append(f"llm_customer.temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    for name in ("accept_prob", "edit_prob"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            out.append(f"llm_customer.{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.accept_prob + cfg.edit_prob > 1.0 + 1e-6:
        out.append(
            f"llm_customer.accept_prob + llm_customer.edit_prob must be <= 1 (the rest is rejected), "
            f"got {cfg.accept_prob} + {cfg.edit_prob}"
        )
    return out


# ---------------------------------------------------------------------- text
def _with_article(noun: str) -> str:
    return noun if noun.endswith("s") else f"a {noun}"


def _patience_phrase(patience: int) -> str:
    if patience <= 3:
        return "impatient"
    return "fairly patient" if patience == 4 else "patient"


def persona_card(persona: Persona) -> str:
    """Describe a scripted persona in words, so the LLM customer wants what the scripted one wants."""
    synonyms = " or ".join(CATEGORY_WORDS[persona.need][1:])
    others = " or ".join(t for t in TIERS if t != persona.budget)
    discount = (
        "you buy only after the seller has offered a discount."
        if persona.price_sensitive
        else "you pay the normal price; you do not need a discount."
    )
    return "\n".join(
        [
            f"Need: you want to buy {_with_article(persona.need)} (you may also call it {synonyms}).",
            f"Budget: you only buy a {persona.budget} ({TIER_DESCRIPTIONS[persona.budget]}) one; "
            f"{others} is not in your price range.",
            f"Price: {discount}",
            f"Patience: you are {_patience_phrase(persona.patience)}; "
            f"after about {persona.patience} unhelpful messages you leave.",
        ]
    )


def opening_from_card(card: str, fallback: str) -> str:
    """The card's ``Opening:`` line when it has one (explicit cards), else `fallback`."""
    for line in card.splitlines():
        if line.strip().lower().startswith(OPENING_PREFIX):
            text = line.strip()[len(OPENING_PREFIX) :].strip()
            if text:
                return text
    return fallback


def customer_system_prompt(card: str, buy_marker: str) -> str:
    """The customer's instructions: who it is (the card) and the rules that keep the task plannable.

    Plain shop wording ("shop assistant", "About you") grounded SmolLM2-135M's replies in the
    card better than an abstract role-play framing did in a side-by-side try.
    """
    return (
        "You are a customer in an electronics shop, chatting with a shop assistant. "
        "You write only the customer's short replies.\n\n"
        f"About you:\n{card}\n\n"
        "Rules:\n"
        "- Reveal one fact about yourself per message, and only when the assistant asks for it.\n"
        f"- Write {buy_marker} only when the assistant offers a product that fits you; "
        f"otherwise never write {buy_marker}.\n"
        "- Reply in one or two short sentences."
    )


def customer_messages(conversation: Conversation, card: str, buy_marker: str) -> Messages:
    """The customer model's view: the business's messages as ``user``, its own earlier ones as ``assistant``."""
    messages: Messages = [{"role": "system", "content": customer_system_prompt(card, buy_marker)}]
    for turn in conversation.turns:
        messages.append({"role": "assistant", "content": turn.customer})
        if turn.sent is not None:
            messages.append({"role": "user", "content": turn.sent})
    return messages


def judge_messages(card: str, business_message: str, customer_reply: str) -> Messages:
    """A yes/no question about one exchange; the card lets the judge tell politeness from a purchase."""
    return [
        {"role": "system", "content": "You judge sales conversations between a seller and a customer."},
        {
            "role": "user",
            "content": (
                f"Customer persona:\n{card}\n\n"
                f"Seller: {business_message}\n"
                f"Customer: {customer_reply}\n\n"
                f"{JUDGE_QUESTION}"
            ),
        },
    ]


# ---------------------------------------------------------------------- episodes
class LLMCustomerEpisode:
    """One conversation with the LLM customer; the same surface as `SalesEpisode`."""

    def __init__(
        self,
        environment: LLMCustomerEnvironment,
        seed: int,
        conversation_id: str,
        card: str,
        business: SalesEpisode,
        persona: Persona | None,
    ) -> None:
        self.environment = environment
        self.seed = seed
        self.persona_card = card
        self.persona = persona
        """The scripted persona the card describes; ``None`` for explicit cards."""
        self._business = business
        self.done = False
        metadata: dict[str, Any] = {
            "customer": "llm",
            "seed": seed,
            "persona_card": card,
            "judge": environment.config.judge,
            "judge_probs": [],
        }
        if persona is not None:
            metadata["persona"] = persona.to_dict()
        opening = opening_from_card(card, fallback=business.conversation.turns[0].customer)
        self.conversation = Conversation(
            conversation_id=conversation_id, turns=[Turn(customer=opening)], metadata=metadata
        )

    def step(self, suggestion: str | None) -> None:
        """Advance this episode alone (a batch of one); prefer `LLMCustomerEnvironment.step_batch`."""
        self.environment.step_batch([self], [suggestion])

    def business_send(self, suggestion: str | None) -> tuple[str, str]:
        """``(sent, business_action)``: the scripted simulator's business, with this seed's random stream."""
        # SalesEpisode keeps this method private; calling it reuses the exact business logic and
        # random stream instead of copying them (sales_simulator.py has no public hook for it).
        return self._business._business_send(suggestion)


class LLMCustomerEnvironment:
    """Factory of LLM-customer episodes; advances a whole round with one batched generate (or endpoint batch).

    The customer is an in-process `model` + `tokenizer`, or `customer_endpoint` (then no model is needed).
    The judge (``config.judge == "model"``) is `judge_endpoint`, else `judge_model`, else the customer's
    own endpoint or model.
    """

    def __init__(
        self,
        config: LLMCustomerConfig,
        model=None,
        tokenizer=None,
        judge_model=None,
        judge_tokenizer=None,
        *,
        customer_endpoint: ChatEndpoint | None = None,
        judge_endpoint: ChatEndpoint | None = None,
    ) -> None:
        self.config = config
        self.customer_endpoint = customer_endpoint
        if customer_endpoint is None and (model is None or tokenizer is None):
            raise ValueError("the LLM customer needs a model and its tokenizer, or a customer endpoint")
        self.model = model
        self.tokenizer = tokenizer
        self.judge_model = judge_model if judge_model is not None else model
        self.judge_tokenizer = judge_tokenizer if judge_tokenizer is not None else tokenizer
        if judge_endpoint is None and judge_model is None and customer_endpoint is not None:
            # The judge asks its own short question of the customer's server, with the judge's defaults.
            judge_endpoint = ChatEndpoint(
                replace(customer_endpoint.config, temperature=None, max_tokens=None), role="judge"
            )
        self.judge_endpoint = judge_endpoint
        if customer_endpoint is None:
            chat.require_chat_template(tokenizer, "customer")
        if config.judge == "model" and judge_endpoint is None:
            if self.judge_model is None or self.judge_tokenizer is None:
                raise ValueError('llm_customer.judge "model" needs a judge model or a judge endpoint')
            chat.require_chat_template(self.judge_tokenizer, "judge")
        # Persona draws use the simulator's defaults; the business uses this config's probabilities.
        self._business_config = SimulatorConfig(
            accept_prob=config.accept_prob,
            edit_prob=config.edit_prob,
            reject_prob=max(0.0, 1.0 - config.accept_prob - config.edit_prob),
        )

    def new_episode(self, seed: int, conversation_id: str) -> LLMCustomerEpisode:
        """Persona from the seed; the opening message needs no model call."""
        business = SalesEpisode(self._business_config, seed, conversation_id)
        cards = self.config.persona_cards
        if cards is None:
            persona: Persona | None = business.persona
            card = persona_card(business.persona)
        else:
            persona, card = None, cards[seed % len(cards)]
        return LLMCustomerEpisode(self, seed, conversation_id, card, business, persona)

    def step_batch(self, episodes: Sequence[LLMCustomerEpisode], suggestions: Sequence[str | None]) -> None:
        """Send one suggestion per episode and append every customer reply: one generate, one judge call."""
        _check_batch(episodes, suggestions)
        if not episodes:
            return
        pending = [episode.conversation.turns[-1] for episode in episodes]
        for episode, turn, suggestion in zip(episodes, pending, suggestions):
            sent, action = episode.business_send(suggestion)
            turn.suggestion, turn.sent, turn.business_action = suggestion, sent, action
        try:
            replies = self._customer_replies(episodes)
            probs = self._judge(episodes, replies)
        except BaseException:
            # A failed generate (out of memory, interrupt) must not leave a sent message with no reply:
            # such a record would fail validation or, worse, read as a finished conversation.
            for turn in pending:
                turn.suggestion, turn.sent, turn.business_action = None, None, "none"
            raise
        for episode, reply, prob in zip(episodes, replies, probs):
            self._append(episode, reply, prob, bought=self._bought(prob))

    # ------------------------------------------------------------------ internals
    def _customer_replies(self, episodes: Sequence[LLMCustomerEpisode]) -> list[str]:
        cfg = self.config
        conversations = [customer_messages(ep.conversation, ep.persona_card, cfg.buy_marker) for ep in episodes]
        if self.customer_endpoint is not None:
            return self._endpoint_replies(self.customer_endpoint, episodes, conversations)
        return chat.generate_chat(
            self.model,
            self.tokenizer,
            conversations,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature if cfg.temperature > 0 else 1.0,
            greedy=cfg.temperature == 0,
            batch_size=cfg.batch_size or len(conversations),
            max_prompt_tokens=cfg.max_prompt_tokens,
        )

    def _endpoint_replies(
        self, endpoint: ChatEndpoint, episodes: Sequence[LLMCustomerEpisode], conversations: list[Messages]
    ) -> list[str]:
        """One request per conversation, concurrently; the text is kept exactly as the server returned it."""
        settings = endpoint.config
        temperature = self.config.temperature if settings.temperature is None else settings.temperature
        max_tokens = settings.max_tokens or self.config.max_new_tokens
        requests = [
            ChatRequest(
                messages,
                temperature=temperature,
                max_tokens=max_tokens,
                # The same conversation at the same turn asks with the same seed, in a resumed run too.
                seed=request_seed(settings.seed, ep.seed, len(ep.conversation.turns)),
            )
            for ep, messages in zip(episodes, conversations)
        ]
        return [answer.text for answer in endpoint.complete_many(requests)]

    def _judge(self, episodes: Sequence[LLMCustomerEpisode], replies: list[str]) -> list[float]:
        """P(purchase) per reply: 1/0 from the marker, or the judge's P(yes)."""
        cfg = self.config
        if cfg.judge == "marker":
            return [1.0 if cfg.buy_marker in reply else 0.0 for reply in replies]
        questions = [
            judge_messages(ep.persona_card, ep.conversation.turns[-1].sent or "", reply)
            for ep, reply in zip(episodes, replies)
        ]
        if self.judge_endpoint is not None:
            return self._endpoint_judge(self.judge_endpoint, questions)
        batch = cfg.batch_size or len(questions)
        return [
            float(p) for p in chat.yes_probability(self.judge_model, self.judge_tokenizer, questions, batch_size=batch)
        ]

    def _endpoint_judge(self, endpoint: ChatEndpoint, questions: list[Messages]) -> list[float]:
        """P(yes) from the answer's first-token log-probabilities when the server gives them, else its text."""
        settings = endpoint.config
        requests = [
            ChatRequest(
                question,
                temperature=JUDGE_ENDPOINT_TEMPERATURE if settings.temperature is None else settings.temperature,
                max_tokens=settings.max_tokens or JUDGE_ENDPOINT_MAX_TOKENS,
                seed=settings.seed,
                logprobs=settings.logprobs,
            )
            for question in questions
        ]
        probs: list[float] = []
        for answer in endpoint.complete_many(requests):
            prob = yes_probability(answer)
            if prob is None:
                # Counted as "no": an unreadable verdict must not end a conversation as a purchase.
                log.warning("judge endpoint %s said neither yes nor no (%r): counted as no", endpoint.url, answer.text)
                prob = 0.0
            probs.append(prob)
        return probs

    def _bought(self, prob: float) -> bool:
        """The marker judge's probability is already the decision; the model's is thresholded."""
        return prob > self.config.judge_threshold if self.config.judge == "model" else prob >= 1.0

    def _append(self, episode: LLMCustomerEpisode, reply: str, prob: float, bought: bool) -> None:
        """The customer's turn, as `SalesEpisode.step` appends it: a purchase or the last allowed reply ends it."""
        conversation = episode.conversation
        conversation.metadata["judge_probs"].append(prob)
        if bought:
            conversation.turns.append(Turn(customer=reply, outcome=1))
            conversation.metadata["ended"] = "purchase"
            episode.done = True
            return
        conversation.turns.append(Turn(customer=reply))
        if len(conversation.agent_turns) >= self.config.max_agent_turns:
            # The reply just appended has nothing sent after it, so it is the terminal turn (outcome 0).
            conversation.metadata["ended"] = "max_agent_turns"
            episode.done = True


def _check_batch(episodes: Sequence[LLMCustomerEpisode], suggestions: Sequence[str | None]) -> None:
    """Refuse what would silently corrupt records: misaligned lists, finished or repeated episodes."""
    if len(episodes) != len(suggestions):
        raise ValueError(
            f"step_batch needs one suggestion per episode, "
            f"got {len(episodes)} episodes and {len(suggestions)} suggestions"
        )
    seen: set[int] = set()
    for episode in episodes:
        if episode.done:
            raise RuntimeError(f"episode {episode.conversation.conversation_id!r} is already finished")
        if id(episode) in seen:
            raise ValueError(f"episode {episode.conversation.conversation_id!r} appears twice in one step_batch")
        seen.add(id(episode))
