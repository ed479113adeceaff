"""`iterppo sample`: a saved policy's full dialogues with fresh simulated customers, as text for a terminal.

    iterppo sample --policy runs/quickstart/final_policy -n 5 [--greedy] [--seed 1]
    iterppo sample --run_dir runs/quickstart -n 3                # the run's config and final policy

The customers are `iterppo evaluate`'s: dialogue i with --seed S is the customer of evaluate's episode i
with --seed S, so a dialogue can be read next to the success rate it counts in. Each dialogue shows the
turn number, who speaks (customer; the agent's suggestion; what the business sent instead, when it edited
or rejected the suggestion), the customer's hidden persona when the environment records one, and the
outcome at the end.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

from iterppo_lightning.commands.evaluate import check_decoding
from iterppo_lightning.data.conversation import Conversation
from iterppo_lightning.env.episodes import episode_seeds, run_episodes
from iterppo_lightning.models.policy_folder import load_policy, read_card

__all__ = ["sample_dialogues", "format_dialogue", "format_dialogues"]

_LABEL_WIDTH = 10  # "business  "
_SENT_NOTE = {"edit": "edited the suggestion", "reject": "rejected the suggestion"}


def sample_dialogues(
    policy_dir: str,
    environment,
    dialogues: int,
    seed: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    max_new_tokens: int = 24,
    max_prompt_tokens: int = 384,
) -> list[Conversation]:
    """`dialogues` conversations of the saved policy with evaluate's customers for `seed`; each sampled reply draws
    from its own stream of (`seed`, dialogue, turn), so dialogue i does not depend on how many are asked for."""
    if dialogues < 1:
        raise ValueError(f"-n/--dialogues must be >= 1, got {dialogues}")
    check_decoding(greedy, temperature)
    model, tokenizer = load_policy(policy_dir)
    return run_episodes(
        model,
        tokenizer,
        environment,
        episode_seeds("evaluate", seed, 0, dialogues),  # evaluate's customers (commands/evaluate.py)
        id_prefix="sample-",
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        greedy=greedy,
        temperature=temperature,
        reply_seed=seed,  # dialogue i is the same whatever -n is
    )


def _persona(metadata: dict) -> str | None:
    persona = metadata.get("persona")
    if not isinstance(persona, dict) or not persona:
        return None

    def show(value) -> str:
        return ("yes" if value else "no") if isinstance(value, bool) else str(value)

    return ", ".join(f"{key.replace('_', ' ')} {show(value)}" for key, value in persona.items())


def _lines(number: str, label: str, text: str, width: int) -> list[str]:
    """One speaker's message, wrapped under its own column: `  3  customer  text ...`."""
    prefix = f"{number:>3}  {label:<{_LABEL_WIDTH}}"
    wrapped = textwrap.wrap(text, width=max(width - len(prefix), 20)) or [""]
    return [prefix + wrapped[0]] + [" " * len(prefix) + line for line in wrapped[1:]]


def format_dialogue(conversation: Conversation, title: str, width: int = 100) -> str:
    """One dialogue as text: a title line, the persona, one numbered block per customer turn, the outcome."""
    lines = [title]
    persona = _persona(conversation.metadata)
    if persona is not None:
        lines += textwrap.wrap(f"persona (hidden from the agent): {persona}", width=width, subsequent_indent="  ")
    for i, turn in enumerate(conversation.turns, start=1):
        lines += _lines(str(i), "customer", turn.customer or "(says nothing)", width)
        if turn.terminal:
            continue
        lines += _lines("", "agent", turn.suggestion if turn.suggestion is not None else "(abstains)", width)
        if turn.suggestion is None or turn.business_action in _SENT_NOTE:
            note = "wrote its own reply" if turn.suggestion is None else _SENT_NOTE[turn.business_action]
            lines += _lines("", "business", f"{turn.sent}   [{note}]", width)
    last = len(conversation.turns)
    if conversation.success:
        at = next(i for i, t in enumerate(conversation.turns, start=1) if t.outcome)
        outcome = f"outcome: SUCCESS (outcome 1 with the customer's message at turn {at})"
    else:
        outcome = f"outcome: no success (the customer left at turn {last}, outcome 0)"
    lines += textwrap.wrap(outcome, width=width, subsequent_indent="  ")
    return "\n".join(lines)


def format_dialogues(
    conversations: list[Conversation],
    policy_dir: str,
    seed: int,
    greedy: bool,
    width: int | None = None,
    temperature: float = 1.0,
) -> str:
    """Every dialogue, with a header naming the policy, the seed and the decoding, and a closing count."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    card = read_card(policy_dir) or {}
    name = card.get("policy_id") or Path(policy_dir).name
    decoding = "greedy decoding" if greedy else "sampled replies"
    if not greedy and temperature != 1.0:
        decoding += f" at temperature {temperature:g}"
    n = len(conversations)
    blocks = [f"policy {name} ({policy_dir}), {n} dialogue(s) with evaluate's customers for seed {seed}, {decoding}"]
    for i, conversation in enumerate(conversations, start=1):
        rule = "-" * min(width, 100)
        blocks.append(f"{rule}\n" + format_dialogue(conversation, f"dialogue {i} of {n}", width))
    successes = sum(c.success for c in conversations)
    blocks.append("-" * min(width, 100) + f"\n{successes} of {n} dialogue(s) ended in success")
    return "\n".join(blocks)
