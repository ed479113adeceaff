"""A logged simulated conversation replayed in the simulator, and the hidden customers consistent with its states.

Every simulated conversation records its episode seed (metadata "seed"). The simulator draws all its
randomness from that seed and the messages it is given, so a fresh `SalesEpisode` with the seed, stepped
with the logged suggestions, says exactly what the logged customer said: `replay` checks that turn by
turn and raises `ReplayMismatch` otherwise (another simulator config, or a non-deterministic change).

The critic sees the conversation, never the persona. Q(s, a) is therefore an expectation over the
customers that could have produced state s. `posterior_personas` lists them: the personas under which
the seed's episode, given the logged suggestions, says exactly what the logged customer said. Their
posterior probability is their prior probability, renormalised. The likelihood of the observed messages
is the same for each of them because the customer's random choices (the opening, small talk, a need
synonym, the purchase phrase) do not depend on the persona once the reaction is the same. A need
synonym depends on the need only, and the need is then revealed, so all consistent personas share it.
"""

from __future__ import annotations

from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.env.sales_simulator import Persona, SalesEpisode, SimulatorConfig, persona_prior


class ReplayMismatch(AssertionError):
    """The simulator, replaying a logged conversation from its seed, did not reproduce it."""


def episode_seed(conversation: Conversation) -> int:
    """The simulator seed a collected conversation recorded; a ValueError for conversations not simulated here."""
    seed = conversation.metadata.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(
            f"conversation {conversation.conversation_id!r} records no simulator seed (metadata.seed): it was not "
            "collected on the embedded sales simulator, so it cannot be replayed"
        )
    return seed


def _first_difference(episode: SalesEpisode, logged: Conversation, turn_index: int) -> str | None:
    """Where the replayed episode (stepped up to `turn_index`) differs from the logged conversation, or None."""
    replayed = episode.conversation.turns
    if len(replayed) != turn_index + 1:
        return f"the replay ended after {len(replayed)} turn(s), the log goes on to turn {turn_index}"
    for t in range(turn_index + 1):
        got, want = replayed[t], logged.turns[t]
        if got.customer != want.customer:
            return f"turn {t} customer message {got.customer!r} != logged {want.customer!r}"
        if got.outcome != want.outcome:
            return f"turn {t} outcome {got.outcome} != logged {want.outcome}"
        if t < turn_index and (got.sent, got.business_action) != (want.sent, want.business_action):
            return (
                f"turn {t} business sent {got.sent!r} ({got.business_action}) != logged {want.sent!r} "
                f"({want.business_action})"
            )
    return None


def _stepped(config: SimulatorConfig, conversation: Conversation, turn_index: int, persona: Persona | None):
    """The seed's episode (optionally with another persona) given the logged suggestions before `turn_index`.

    A branch conversation (metadata "branch": {"turn", "stream"}, env/branching.py) forks its streams at its
    branch turn, as it did when it was collected.
    """
    episode = SalesEpisode(config, episode_seed(conversation), conversation.conversation_id, persona)
    branch = conversation.metadata.get("branch")
    for t in range(turn_index):
        if episode.done:
            break
        if branch is not None and t == branch["turn"]:
            episode = episode.fork(branch["stream"])
        episode.step(conversation.turns[t].suggestion)
    return episode


def replay(
    config: SimulatorConfig, conversation: Conversation, turn_index: int, persona: Persona | None = None
) -> SalesEpisode:
    """The episode at state s_`turn_index` of a logged conversation, rebuilt from its seed; raises ReplayMismatch
    unless every customer message, outcome and sent message up to that state is the logged one.

    `persona` replays under another hidden customer (one of `posterior_personas`); None = the seed's own.
    """
    if not 0 <= turn_index < len(conversation.turns) or conversation.turns[turn_index].terminal:
        raise ValueError(
            f"turn {turn_index} of conversation {conversation.conversation_id!r} is not a state the agent acted in"
        )
    episode = _stepped(config, conversation, turn_index, persona)
    problem = _first_difference(episode, conversation, turn_index)
    if problem is None and episode.done:
        problem = f"the replayed customer ended the conversation at turn {turn_index}, the logged one went on"
    if problem is None and persona is None:
        logged = conversation.metadata.get("persona")
        if logged is not None and logged != episode.persona.to_dict():
            problem = f"the seed draws persona {episode.persona.to_dict()}, the log recorded {logged}"
    if problem is not None:
        raise ReplayMismatch(
            f"replaying conversation {conversation.conversation_id!r} from seed {episode.seed} to turn {turn_index}: "
            f"{problem}. The run's simulator settings (model.environment) must be the ones it was collected with"
        )
    return episode


def posterior_personas(
    config: SimulatorConfig, conversation: Conversation, turn_index: int
) -> list[tuple[Persona, float]]:
    """The hidden customers consistent with state s_`turn_index`, with their posterior probabilities (sum 1).

    Every persona the simulator can draw is replayed with the conversation's seed and suggestions; those that say
    exactly what the logged customer said keep their prior probability (module docstring: why that is the posterior).
    """
    consistent = []
    for persona, prior in persona_prior(config):
        episode = _stepped(config, conversation, turn_index, persona)
        if not episode.done and _first_difference(episode, conversation, turn_index) is None:
            consistent.append((persona, prior))
    total = sum(p for _, p in consistent)
    if not consistent or total <= 0:
        raise ReplayMismatch(
            f"no persona reproduces conversation {conversation.conversation_id!r} up to turn {turn_index}; the run's "
            "simulator settings (model.environment) must be the ones it was collected with"
        )
    return [(persona, p / total) for persona, p in consistent]


def draw_persona(posterior: list[tuple[Persona, float]], u: float) -> Persona:
    """The persona at quantile `u` in [0, 1) of the posterior (inverse CDF, in the listed order)."""
    cumulative = 0.0
    for persona, p in posterior:
        cumulative += p
        if u < cumulative:
            return persona
    return posterior[-1][0]  # rounding: u just below 1
